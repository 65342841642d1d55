"""DuoAttention gates on a tiny model with the embedded tokenizer: the objective falls, gates stay in [0, 1], a resumed
run equals an uninterrupted one bit for bit, and bad settings are refused."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from calibrate.duo import Duo, _duo_attention, _DuoState
from kvtool.errors import KvtoolError
from kvtool.models import load_model
from kvtool.trace import Dims

SMALL = dict(steps=8, passkeys=1, words=4, min_len=96, max_len=128, lengths=2, train_sink=4, train_recent=16,
             ramp=0.25, l1_weight=0.05)


@pytest.fixture(scope="module")
def tok():
    return load_model()[1]


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():                       # peaked attention, so streaming really differs from full
        for name, p in m.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(8.0)
    return m


def objective(duo: Duo, model, tok, gates: torch.Tensor, steps=range(100, 104)) -> float:
    """loss + λ·reg with fixed gates on held-out steps' samples (not used in training)."""
    g = gates.clone().requires_grad_(False)
    state = _DuoState(g, Dims.of(model), duo.train_sink, duo.train_recent, duo.full_branch)
    grid, total = duo.grid(model), 0.0
    with _duo_attention(model, state), torch.no_grad():
        for s in steps:
            loss, reg, _ = duo._step(model, state, duo.sample(tok, grid, s))
            total += loss.item() + duo.l1_weight * reg.item()
    return total / len(steps)


@pytest.mark.parametrize("variant", [{}, {"full_branch": "student", "positions": "answer", "l1": "sum"}])
def test_gates_lower_the_objective_and_stay_in_unit_interval(model, tok, variant):
    duo = Duo(**{**SMALL, **variant, "steps": 12, "lr": 0.05})
    result = duo.run(model, tok)
    gates = result.tensors["gate"]
    assert gates.shape == (2, 2) and gates.dtype == torch.float32
    assert (gates >= 0).all() and (gates <= 1).all() and (gates < 1).any()
    assert objective(duo, model, tok, gates) < objective(duo, model, tok, torch.ones(2, 2))
    assert result.tensors["mask"].sum() == 2                                  # GQA default: 50% retrieval
    assert result.windows == {"train": {"sink": 4, "recent": 16}, "deploy": {"sink": 64, "recent": 256}}
    assert model.config._attn_implementation == "sdpa"


def test_resume_reproduces_an_uninterrupted_run(model, tok, tmp_path):
    whole = Duo(**SMALL, checkpoint=str(tmp_path / "a.ckpt")).run(model, tok)
    ckpt = str(tmp_path / "b.ckpt")
    first = Duo(**SMALL, checkpoint=ckpt, checkpoint_every=2, stop_after=3).run(model, tok)
    assert first.params["steps_done"] == 3 and not first.params["finished"]
    resumed = Duo(**SMALL, checkpoint=ckpt, checkpoint_every=2, resume=True).run(model, tok)
    assert resumed.params["finished"] and resumed.params["steps_done"] == 8
    assert torch.equal(resumed.tensors["gate"], whole.tensors["gate"])
    assert resumed.params["final_loss"] == whole.params["final_loss"]


def test_bad_duo_settings(model, tok, tmp_path):
    with pytest.raises(KvtoolError, match="longer than sink \\+ recent"):
        Duo(**{**SMALL, "min_len": 20}).run(model, tok)
    with pytest.raises(KvtoolError, match="beyond the model's context"):
        Duo(**{**SMALL, "min_len": 1000}).run(model, tok)
    with pytest.raises(KvtoolError, match="--resume needs --checkpoint"):
        Duo(**SMALL, resume=True)
    with pytest.raises(KvtoolError, match="does not exist"):
        Duo(**SMALL, checkpoint=str(tmp_path / "none.ckpt"), resume=True).run(model, tok)
    Duo(**{**SMALL, "steps": 1}, checkpoint=str(tmp_path / "c.ckpt")).run(model, tok)
    with pytest.raises(KvtoolError, match="other duo settings"):
        Duo(**{**SMALL, "lr": 0.1}, checkpoint=str(tmp_path / "c.ckpt"), resume=True).run(model, tok)
    with pytest.raises(KvtoolError, match="full_branch must be one of"):
        Duo(full_branch="both")
    with pytest.raises(KvtoolError, match="unknown duo preset"):
        Duo.from_preset("gpu")


class _Payload:
    """Unpickling this creates a file: the proof that code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _edit(src, dst, tensors=None, meta=None, drop=()):
    """Copy a checkpoint with some tensors/metadata replaced or removed."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as fh:
        m = dict(fh.metadata())
        t = {k: fh.get_tensor(k) for k in fh.keys()}
    t.update(tensors or {})
    m.update(meta or {})
    for k in drop:
        t.pop(k, None)
        m.pop(k, None)
    save_file(t, str(dst), metadata=m)
    return str(dst)


def test_checkpoint_is_never_unpickled_and_every_field_is_checked(model, tok, tmp_path):
    good = tmp_path / "good.ckpt"
    Duo(**SMALL, checkpoint=str(good), stop_after=2).run(model, tok)
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.ckpt"
    torch.save({"step": 1, "x": _Payload(str(marker))}, evil)
    with pytest.raises(KvtoolError, match="not a kvtool duo checkpoint"):
        Duo(**SMALL, checkpoint=str(evil), resume=True).run(model, tok)
    assert not marker.exists()                                    # the payload never ran
    cases = {
        "negative step": ({"meta": {"step": "-3"}}, "step must be an integer in \\[0, 8\\]"),
        "step past steps": ({"meta": {"step": "9"}}, "step must be an integer"),
        "step as string": ({"meta": {"step": '"2"'}}, "step must be an integer"),
        "step as bool": ({"meta": {"step": "true"}}, "step must be an integer"),
        "missing step": ({"drop": ["step"]}, "'step' is missing"),
        "missing config": ({"drop": ["config"]}, "'config' is missing"),
        "bad JSON": ({"meta": {"config": "{"}}, "not valid JSON"),
        "no marker": ({"drop": ["kvtool.duo_checkpoint"]}, "not a kvtool duo checkpoint"),
        "missing gates": ({"drop": ["gates"]}, "'gates' is missing"),
        "missing optimizer": ({"drop": ["optimizer.exp_avg"]}, "'optimizer.exp_avg' is missing"),
        "gates of another model": ({"tensors": {"gates": torch.ones(3, 2)}}, "another model"),
        "gates as int": ({"tensors": {"gates": torch.ones(2, 2, dtype=torch.int64)}}, "gates is int64"),
        "gates out of range": ({"tensors": {"gates": torch.full((2, 2), 2.0)}}, "must lie in \\[0, 1\\]"),
        "NaN gates": ({"tensors": {"gates": torch.full((2, 2), float("nan"))}}, "NaN"),
        "pull as float32": ({"tensors": {"pull_sum": torch.zeros(2, 2)}}, "pull_sum is float32"),
        "NaN pull": ({"tensors": {"pull_sum": torch.full((2, 2), float("nan"), dtype=torch.float64)}}, "NaN"),
        "short history": ({"tensors": {"history": torch.zeros(1, 2, dtype=torch.float64)}}, "history is"),
        "extra tensor": ({"tensors": {"extra": torch.zeros(1)}}, "unexpected tensor 'extra'"),
        "optimizer step mismatch": ({"tensors": {"optimizer.step": torch.tensor(5.0)}}, "does not match step 2"),
    }
    for i, (case, (edit, needle)) in enumerate(cases.items()):
        path = _edit(good, tmp_path / f"bad{i}.ckpt", **edit)
        with pytest.raises(KvtoolError, match=needle):
            Duo(**SMALL, checkpoint=path, resume=True).run(model, tok)
    for junk in (b"", b"\x00" * 7, b"not a checkpoint at all" * 10):
        (tmp_path / "junk.ckpt").write_bytes(junk)
        with pytest.raises(KvtoolError, match="not a kvtool duo checkpoint"):
            Duo(**SMALL, checkpoint=str(tmp_path / "junk.ckpt"), resume=True).run(model, tok)


def test_checkpoint_path_is_checked_before_training(tmp_path):
    with pytest.raises(KvtoolError, match="is a directory"):
        Duo(**SMALL, checkpoint=str(tmp_path))
    with pytest.raises(KvtoolError, match="does not exist"):
        Duo(**SMALL, checkpoint=str(tmp_path / "no-dir" / "c.ckpt"))


def test_trained_as_deployed_on_the_evaluation_tasks(model, tok):
    """data = kvtool.tasks names: each step is one task's sample (prompt + answer, the answer supervised), from seeds
    the evaluation (seed 0) never uses; the gates lower the objective there too, and the gate curve is reported."""
    duo = Duo(**{**SMALL, "data": "copy,lookup", "min_len": 160, "max_len": 200, "steps": 10, "lr": 0.05})
    grid = duo.grid(model)
    a, b = duo.sample(tok, grid, 0), duo.sample(tok, grid, 1)
    assert a.meta["kind"] == "copy" and b.meta["kind"] == "lookup"
    (start, end), = a.answer_spans
    assert end == a.input_ids.numel() and a.meta["qa_start"] == start - 1 and start in grid
    assert torch.equal(duo.supervised(a), torch.arange(start - 1, end))
    from kvtool import tasks

    held_out = tasks.copy_samples(tok, [start], a.meta["depths"], seed=0)[0][0]
    assert not torch.equal(held_out, a.input_ids[:start])                    # not an evaluation sample
    result = duo.run(model, tok)
    gates = result.tensors["gate"]
    assert objective(duo, model, tok, gates) < objective(duo, model, tok, torch.ones(2, 2))
    curve = result.params["gate_curve"]
    assert [p["step"] for p in curve] == list(range(1, 11))                   # every max(1, steps // 20) steps
    assert curve[0]["mean_abs_change"] > 0 and all(p["max_abs_change"] >= p["mean_abs_change"] for p in curve)
    assert sum(p["mean_abs_change"] for p in curve) >= float((1 - gates).abs().mean()) - 1e-4   # 6 decimals
    assert result.params["data"] == "copy,lookup"


def test_unknown_training_task_is_refused():
    with pytest.raises(KvtoolError, match="give passkey or evaluation tasks"):
        Duo(**SMALL, data="copy,sort")
    assert Duo.from_preset("deploy").train_sink == Duo.deploy_sink and \
        Duo.from_preset("deploy").train_recent == Duo.deploy_recent


def test_tail_student_matches_the_whole_pass_where_it_must(model, tok, monkeypatch):
    """student="tail": the teacher's target over the prefilled cache equals the one-pass teacher at the supervised
    positions; with every gate open the student equals it too (loss 0); with the gates closed it differs, and the
    gradient reaches the gates."""
    duo = Duo(**{**SMALL, "data": "copy,lookup", "min_len": 160, "max_len": 200, "student": "tail"})
    sample = duo.sample(tok, duo.grid(model), 0)
    ids, pos = sample.input_ids.view(1, -1), duo.supervised(sample)
    assert pos.numel() > 1 and int(pos.min()) > duo.train_sink + duo.train_recent
    with torch.no_grad():
        whole = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state[0, pos]      # [P, d]
    seen = []
    real = torch.nn.functional.mse_loss
    monkeypatch.setattr(torch.nn.functional, "mse_loss", lambda a, b: seen.append((a, b)) or real(a, b))
    dims = Dims.of(model)
    state = _DuoState(torch.ones(dims.layers, dims.kv_heads), dims, duo.train_sink, duo.train_recent, duo.full_branch)
    with _duo_attention(model, state), torch.no_grad():
        loss, _, _ = duo._step(model, state, sample)
    student, target = seen[-1]
    torch.testing.assert_close(target, whole, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(student, whole, rtol=1e-4, atol=1e-5)
    assert loss.item() < 1e-8
    gates = torch.zeros(dims.layers, dims.kv_heads, requires_grad=True)
    state = _DuoState(gates, dims, duo.train_sink, duo.train_recent, duo.full_branch)
    with _duo_attention(model, state):
        loss, _, _ = duo._step(model, state, sample)
        loss.backward()
    assert loss.item() > 1e-6 and gates.grad.abs().sum() > 0
    torch.testing.assert_close(seen[-1][1], whole, rtol=1e-4, atol=1e-5)        # the target never sees the gates


def test_tail_student_trains_and_is_refused_where_it_cannot_work(model, tok):
    duo = Duo(**{**SMALL, "data": "copy,lookup", "min_len": 160, "max_len": 200, "steps": 10, "lr": 0.05,
                 "student": "tail"})
    gates = duo.run(model, tok).tensors["gate"]
    assert (gates < 1).any() and (gates >= 0).all()
    assert objective(duo, model, tok, gates) < objective(duo, model, tok, torch.ones(2, 2))
    with pytest.raises(KvtoolError, match="student must be one of"):
        Duo(student="some")
    with pytest.raises(KvtoolError, match="lr and lr_min must be > 0"):
        Duo(lr=0.0)
    cpu = Duo.from_preset("cpu-deploy")
    assert (cpu.student, cpu.train_sink, cpu.train_recent) == ("tail", Duo.deploy_sink, Duo.deploy_recent)
    assert cpu.min_len <= 1024 and cpu.max_len >= 4096 and "copy-digits" in cpu.data


def test_reuse_steps_share_one_prefill_per_sample_and_match_a_fresh_one(model, tok, monkeypatch, tmp_path):
    """--reuse k (tail student): a new sample every k steps, its context prefilled once; a step over the reused
    context gives the loss a fresh prefill gives; a run stopped mid-sample resumes bit for bit; bad values refused."""
    cfg = {**SMALL, "data": "copy,lookup", "min_len": 160, "max_len": 200, "student": "tail", "steps": 6, "reuse": 3}
    duo = Duo(**cfg)
    drawn, prefills = [], []
    real_sample, real_context = Duo.sample, Duo._tail_context
    monkeypatch.setattr(Duo, "sample", lambda self, t, g, i: drawn.append(i) or real_sample(self, t, g, i))
    monkeypatch.setattr(Duo, "_tail_context", lambda self, *a: prefills.append(1) or real_context(self, *a))
    gates = duo.run(model, tok).tensors["gate"]
    assert drawn == [0, 1] and len(prefills) == 2 and (gates < 1).any()
    sample = real_sample(duo, tok, duo.grid(model), 0)
    dims = Dims.of(model)
    state = _DuoState(torch.full((dims.layers, dims.kv_heads), 0.3), dims, duo.train_sink, duo.train_recent,
                      duo.full_branch)
    with _duo_attention(model, state), torch.no_grad():
        fresh, _, context = duo._step(model, state, sample)
        again = [duo._step(model, state, sample, context)[0] for _ in range(2)]      # the context is not consumed
    assert fresh.item() > 0 and all(torch.equal(fresh, a) for a in again)
    monkeypatch.undo()
    ckpt = str(tmp_path / "reuse.ckpt")
    whole = Duo(**cfg).run(model, tok).tensors["gate"]
    Duo(**cfg, checkpoint=ckpt, checkpoint_every=1, stop_after=4).run(model, tok)      # stops inside sample 1
    resumed = Duo(**cfg, checkpoint=ckpt, resume=True).run(model, tok).tensors["gate"]
    assert torch.equal(whole, resumed)
    for bad, msg in (({"reuse": 0}, "at least 1"), ({"reuse": 2, "student": "all"}, "needs --student tail")):
        with pytest.raises(KvtoolError, match=msg):
            Duo(**{**cfg, **bad})


def test_average_deploys_the_mean_of_the_last_iterates_and_resumes_exactly(model, tok, tmp_path):
    """--average f (Polyak tail averaging): the profile's gates are the mean of the clamped iterates of the last
    f·steps steps; the iterates themselves are those of a run without averaging; a resumed run equals an unbroken
    one; a checkpoint is not resumed under another --average; bad values are refused."""
    cfg = {**SMALL, "steps": 8, "lr": 0.05}
    result = Duo(**cfg, average=0.5).run(model, tok)
    assert result.params["averaged_steps"] == 4 and Duo(**cfg, average=0.5).average_from() == 4
    iterates = [Duo(**cfg, stop_after=k).run(model, tok).tensors["gate"] for k in range(5, 9)]
    assert not torch.equal(iterates[0], iterates[-1])                        # the mean is not one iterate
    torch.testing.assert_close(result.tensors["gate"], torch.stack(iterates).mean(0), rtol=0, atol=1e-6)
    assert torch.equal(Duo(**cfg).run(model, tok).tensors["gate"], iterates[-1])
    assert [p["step"] for p in result.params["gate_curve"]] == list(range(1, 9))
    ckpt = str(tmp_path / "avg.ckpt")
    Duo(**cfg, average=0.5, checkpoint=ckpt, checkpoint_every=1, stop_after=6).run(model, tok)  # 2 steps averaged
    resumed = Duo(**cfg, average=0.5, checkpoint=ckpt, resume=True).run(model, tok).tensors["gate"]
    assert torch.equal(resumed, result.tensors["gate"])
    with pytest.raises(KvtoolError, match="other duo settings"):
        Duo(**cfg, checkpoint=ckpt, resume=True).run(model, tok)
    for bad in (1.5, -0.1, True):
        with pytest.raises(KvtoolError, match="--average must be a fraction"):
            Duo(**cfg, average=bad)


def test_pull_is_the_mean_loss_gradient_and_resumes_exactly(model, tok, tmp_path, monkeypatch):
    """heads.duo.pull is the mean over the steps of -d(loss)/d(gate) without the L1 term, measured here by an
    independent backward of the loss alone at each step's gates; recording it changes no gate; a resumed run carries
    the sum on; a checkpoint without it is refused in one line."""
    cfg = {**SMALL, "steps": 4, "lr": 0.05}
    seen = []
    real = Duo._step

    def step(self, mdl, state, sample, context=None):
        loss, reg, ctx = real(self, mdl, state, sample, context)
        (g,) = torch.autograd.grad(loss, [state.gates], retain_graph=True)      # the loss's own gradient
        seen.append(-g.double())
        return loss, reg, ctx

    monkeypatch.setattr(Duo, "_step", step)
    result = Duo(**cfg).run(model, tok)
    monkeypatch.setattr(Duo, "_step", real)
    pull = result.tensors["pull"]
    assert pull.shape == (2, 2) and pull.dtype == torch.float32 and len(seen) == 4
    torch.testing.assert_close(pull, torch.stack(seen).mean(0).float(), rtol=1e-4, atol=1e-7)
    assert pull.abs().max() > 0 and not torch.allclose(pull, pull.flatten()[0].expand(2, 2))
    plain = Duo(**cfg).run(model, tok)
    assert torch.equal(plain.tensors["gate"], result.tensors["gate"])          # recording it trains nothing
    ckpt = tmp_path / "pull.ckpt"
    Duo(**cfg, checkpoint=str(ckpt), checkpoint_every=1, stop_after=2).run(model, tok)
    resumed = Duo(**cfg, checkpoint=str(ckpt), resume=True).run(model, tok)
    torch.testing.assert_close(resumed.tensors["pull"], plain.tensors["pull"], rtol=0, atol=0)
    old = _edit(ckpt, tmp_path / "old.ckpt", drop=["pull_sum"])
    with pytest.raises(KvtoolError, match="before duo recorded heads.duo.pull"):
        Duo(**cfg, checkpoint=old, resume=True).run(model, tok)
