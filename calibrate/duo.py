"""DuoAttention gates (Xiao et al., "DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming
Heads", arXiv 2410.10819).

One gate α per (layer, KV head) in [0, 1], initialised to 1. In the student, a head's output (before o_proj) is
α·full + (1 − α)·streaming, streaming being attention restricted to `train_sink` first + `train_recent` last tokens.
Only the gates train (model frozen). Loss = MSE between the teacher's (full attention) and the student's final hidden
states (after the final norm, no lm_head) on supervised positions, + λ·|α| (mean by default, as the public code; sum
as the paper writes). AdamW, lr 0.02, weight decay 0; lr rises from 0.002 over the first 20% of steps, holds, and
falls back to 0.002 over the last 20%. Gates are clamped to [0, 1] in the forward and after every step.

Where the public code departs from the paper, both are options; defaults follow the public code:
  full_branch  "teacher": the student's full branch reuses the teacher's full-attention output of that layer (one full
               attention per layer); "student": the student computes its own full attention (paper).
  positions    "qa": every question + answer token (code); "answer": the passkey answer tokens only (paper).
  l1           "mean" (code) or "sum" (paper).
  student      "all": every position of the student runs the gated attention (paper and code: three passes of the
               whole sample per step: teacher, student, backward); "tail" (kvtool, issue 14): the context is prefilled
               once by the teacher (exact attention, no grad) into a cache, and only the supervised span (from the
               first supervised position on) runs twice more over that cache, as the teacher (the target) and as the
               gated student. That is how kvtool's runtime meets the answer: decoded over a prefilled cache. A step then
               costs about one forward of the sample, not three, so a CPU covers the deployment's 1-4k lengths.
  reuse        (kvtool, with the tail student) optimizer steps per sample: the context's prefill and the teacher's
               target are made once and every step runs only the gated span over a copy of the cache, so steps cost
               a fraction of a forward and the gates can converge within a CPU's time budget; a new sample every
               `reuse` steps (the data is then `steps / reuse` samples).
  average      (kvtool, issue 14) Polyak-Ruppert tail averaging (Polyak & Juditsky, SIAM J. Control Optim. 1992): the
               profile's gates are the mean of the clamped iterates over the last `average` of the steps, not the last
               iterate (0, the paper). One sample a step makes each iterate lean toward its sample; the mean over many
               samples does not, so the deployed ranking stops depending on which sample came last.
Pull (kvtool, issue 14): with the L1 pull Adam moves every gate by about the learning rate whatever the size of its
gradient, so the heads the distillation loss needs all end clamped at or near 1 and their gates no longer say which
matters most (a plateau: on the embedded model the top 16 gates lie in [0.955, 1]). `heads.duo.pull` keeps what the
clamp throws away: the mean over the steps of -d(loss)/d(gate), the distillation loss's own gradient without the L1
term, i.e. how strongly the loss asked for each head to attend fully (first-order head importance, as in Molchanov
et al., "Importance Estimation for Neural Network Pruning", CVPR 2019). It is recorded beside the training and changes
nothing of it; a ranking by it is `kvtool calibrate --method combo --signals ...,pull` or read directly.
Data: synthetic multi-passkey samples (kvtool.data.passkey_samples), one per step, seeded by step so that `resume`
continues exactly; or (`data`, issue 14: trained as deployed) samples of the evaluation tasks of kvtool.tasks
(`copy,lookup,passkey-chat,nll-repeat`, one task per step in turn) from seeds the evaluation never uses, the prompt
plus its answer teacher-forced, supervised on the answer. The `deploy` preset trains that way with the deployment's
windows (64 + 256) on 1-4k tokens. The summary carries the gate curve: how far the gates moved between snapshots. Deployment picks retrieval heads by a global quantile of the gates (`fraction`; 0.5 for GQA, 0.25
for MHA by default) with deterministic tie-breaking; training and deployment windows are separate fields.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from calibrate import duo_checkpoint as checkpoint_io
from calibrate import register
from calibrate.heads import HeadsResult, top_fraction
from kvtool.attention import DUO_ATTENTION, DUO_STATES, DuoState, switched
from kvtool.errors import KvtoolError
from kvtool.trace import Dims, attention_modules, capped_attention

PRESETS = {
    # What the paper/public code runs (hours on GPUs for a 7B model).
    "paper": {},
    # Practical on a 2-core CPU for the embedded 135M model: ~20 minutes (docs/BENCHMARKS.md).
    "cpu": {"steps": 200, "passkeys": 4, "words": 8, "min_len": 512, "max_len": 1024, "lengths": 8,
            "train_sink": 32, "train_recent": 128, "checkpoint_every": 40},
    # Trained as deployed within ~20 minutes on a 2-core CPU (issue 14): the evaluation tasks' generators (training
    # seeds), the deployment's windows and its 1-4k lengths, the tail student (one forward a step), a higher lr.
    "cpu-deploy": {"steps": 50, "data": "copy-digits,passkey-chat,lookup", "min_len": 1024, "max_len": 4096,
                   "lengths": 4, "train_sink": 64, "train_recent": 256, "student": "tail", "lr": 0.05,
                   "ramp": 0.1, "checkpoint_every": 10},
    # Trained as deployed (issue 14): the evaluation tasks' generators (other seeds), the deployment's windows, its
    # lengths. ~8-25 s a step on a 2-core CPU at 1-4k tokens (docs/BENCHMARKS.md): a GPU run, or --steps for a pilot.
    "deploy": {"steps": 400, "data": "copy,lookup,passkey-chat", "min_len": 1024, "max_len": 4096, "lengths": 4,
               "train_sink": 64, "train_recent": 256, "checkpoint_every": 20},
}
TASK_SEED = 1_000_000          # task samples for training draw seeds from here on (evaluation: 0; pilots: 100+)


@register("duo")
@dataclass
class Duo:
    steps: int = 2000
    lr: float = 0.02
    lr_min: float = 0.002
    ramp: float = 0.2                 # fraction of steps for warm-up and for decay
    l1_weight: float = 0.05
    l1: str = "mean"
    positions: str = "qa"
    full_branch: str = "teacher"
    student: str = "all"              # "all" (paper) or "tail": only the supervised span runs gated, over a prefill
    reuse: int = 1                    # tail: optimizer steps per sample, over one teacher prefill (steps count each)
    average: float = 0.0              # deploy the mean of the iterates over this last fraction of steps (0: the last)
    train_sink: int = 128
    train_recent: int = 256
    deploy_sink: int = 64
    deploy_recent: int = 256
    passkeys: int = 10
    words: int = 32
    min_len: int = 1000
    max_len: int | None = None        # None: the model's context
    lengths: int = 50
    seed: int = 42
    data: str = "passkey"             # "passkey" or comma-separated kvtool.tasks names (trained as deployed)
    checkpoint: str | None = None
    checkpoint_every: int = 100
    resume: bool = False
    stop_after: int | None = None     # stop (with a checkpoint) after this many steps of this run: for tests/CI

    @classmethod
    def from_preset(cls, preset: str | None, **overrides) -> "Duo":
        if preset is not None and preset not in PRESETS:
            raise KvtoolError(f"unknown duo preset {preset!r} (known: {', '.join(PRESETS)})")
        return cls(**{**PRESETS.get(preset or "paper", {}), **overrides})

    def __post_init__(self) -> None:
        for name, allowed in (("l1", ("mean", "sum")), ("positions", ("qa", "answer")),
                              ("full_branch", ("teacher", "student")), ("student", ("all", "tail"))):
            if getattr(self, name) not in allowed:
                raise KvtoolError(f"duo {name} must be one of {', '.join(allowed)} (got {getattr(self, name)!r})")
        if self.steps < 1 or self.lengths < 1 or self.passkeys < 1 or self.words < 1:
            raise KvtoolError("duo steps, lengths, passkeys and words must be at least 1")
        if isinstance(self.reuse, bool) or not isinstance(self.reuse, int) or self.reuse < 1:
            raise KvtoolError(f"duo --reuse must be an integer of at least 1 (got {self.reuse!r})")
        if self.reuse > 1 and self.student != "tail":
            raise KvtoolError("duo --reuse needs --student tail (only the tail student keeps a prefill to reuse)")
        if isinstance(self.average, bool) or not (0.0 <= float(self.average) <= 1.0):
            raise KvtoolError(f"duo --average must be a fraction of the steps in [0, 1] (got {self.average!r})")
        self._tasks()
        if not (0 < self.lr < float("inf") and 0 < self.lr_min < float("inf") and 0 <= self.ramp <= 0.5):
            raise KvtoolError(f"duo lr and lr_min must be > 0 and ramp in [0, 0.5] (got {self.lr}, {self.lr_min}, "
                              f"{self.ramp})")
        if self.checkpoint_every < 1:
            raise KvtoolError(f"duo checkpoint_every must be at least 1 (got {self.checkpoint_every})")
        if self.resume and not self.checkpoint:
            raise KvtoolError("--resume needs --checkpoint PATH")
        if self.checkpoint:
            checkpoint_io.check_path(self)

    # -- schedule and data ---------------------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        """Warm up lr_min → lr over the first `ramp` of steps, hold, decay back to lr_min over the last `ramp`."""
        n = max(1, int(round(self.ramp * self.steps)))
        if step < n:
            return self.lr_min + (self.lr - self.lr_min) * step / n
        if step >= self.steps - n:
            return self.lr_min + (self.lr - self.lr_min) * (self.steps - 1 - step) / n
        return self.lr

    def average_from(self) -> int:
        """The first step (0-based) whose iterate enters the deployed mean; `steps` when averaging is off."""
        if not self.average:
            return self.steps
        return self.steps - max(1, int(round(float(self.average) * self.steps)))

    def grid(self, model) -> list[int]:
        limit = model.config.get_text_config().max_position_embeddings
        top = min(self.max_len or limit, limit)
        if self.min_len > top:
            raise KvtoolError(f"duo --min-len {self.min_len} is beyond the model's context of {limit}")
        if self.min_len <= self.train_sink + self.train_recent:
            raise KvtoolError(f"duo training samples ({self.min_len} tokens) must be longer than sink + recent "
                              f"({self.train_sink} + {self.train_recent})")
        return sorted({int(x) for x in np.linspace(self.min_len, top, self.lengths)})

    def _tasks(self) -> list[str]:
        """The kvtool.tasks names of `data` ([] for passkey); an unknown name is refused."""
        if self.data == "passkey":
            return []
        from kvtool.tasks import TASKS

        names = [t.strip() for t in str(self.data).split(",") if t.strip()]
        bad = [t for t in names if t not in TASKS]
        if not names or bad:
            raise KvtoolError(f"duo --data {self.data!r}: give passkey or evaluation tasks separated by commas "
                              f"({', '.join(TASKS)})")
        return names

    def sample(self, tokenizer, grid: list[int], step: int):
        from kvtool.data import passkey_samples

        rng = np.random.default_rng(self.seed * 1_000_003 + step)
        length = grid[int(rng.integers(len(grid)))]
        tasks = self._tasks()
        if tasks:
            return self._task_sample(tokenizer, tasks[step % len(tasks)], length, float(rng.uniform(0.05, 0.95)),
                                     TASK_SEED + self.seed * 100_003 + step)
        return passkey_samples(tokenizer, 1, length, n_needles=self.passkeys, words_per_needle=self.words,
                               seed=self.seed * 7919 + step)[0]

    @staticmethod
    def _task_sample(tokenizer, task: str, length: int, depth: float, seed: int):
        """One evaluation-task sample as a kvtool.data.Sample: prompt + answer (a generation task) or context +
        continuation (nll-repeat), `length` tokens before the answer; the answer is the supervised span."""
        from kvtool.data import Sample
        from kvtool.tasks import TASKS

        t = TASKS[task]
        item = t.make(tokenizer, [length], [depth], seed, t.default_text)[0]
        prompt, answer = item[0], torch.as_tensor(item[1], dtype=torch.int64)
        ids = torch.cat([prompt, answer])                                          # [T]
        p = prompt.numel()
        return Sample(ids, torch.zeros((0, 2), dtype=torch.int64), [], [(p, ids.numel())],
                      {"kind": task, "seed": seed, "seq_len": length, "depths": [depth], "qa_start": p - 1})

    def supervised(self, sample) -> torch.Tensor:
        """Positions whose final hidden states enter the loss: [P]."""
        if self.positions == "answer":
            return torch.cat([torch.arange(a, b) for a, b in sample.answer_spans])
        return torch.arange(sample.meta["qa_start"], sample.input_ids.numel())

    # -- the run -------------------------------------------------------------------------------------------------
    def run(self, model, tokenizer, profile=None, fraction: float | None = None, on_progress=None) -> HeadsResult:
        attention_modules(model)                      # refuses an architecture the tracer does not understand
        dims = Dims.of(model)
        if tokenizer is None:
            raise KvtoolError("duo needs the model's tokenizer to build passkey data")
        grid = self.grid(model)
        gates = torch.ones(dims.layers, dims.kv_heads, requires_grad=True)
        opt = torch.optim.AdamW([gates], lr=self.lr_at(0), weight_decay=0.0)
        total = torch.zeros(dims.layers, dims.kv_heads, dtype=torch.float64)    # sum of averaged iterates [L, H_kv]
        pull = torch.zeros(dims.layers, dims.kv_heads, dtype=torch.float64)     # sum of -d(loss)/d(gate) [L, H_kv]
        start, history = 0, []
        if self.resume:
            start, history = checkpoint_io.load(self, gates, opt, total, pull)
        first = self.average_from()

        def averaged() -> int:                        # iterates summed in `total` so far
            return max(0, min(len(history), self.steps) - first)

        def deployed() -> torch.Tensor:               # the gates the profile would get now: [L, H_kv]
            n = averaged()
            return (total / n).float() if n else gates.detach().clamp(0, 1).float()
        for p in model.parameters():
            p.requires_grad_(False)
        state = _DuoState(gates, dims, self.train_sink, self.train_recent, self.full_branch)
        stop = self.steps if self.stop_after is None else min(self.steps, start + self.stop_after)
        curve = _GateCurve(deployed, start, max(1, self.steps // 20),
                           fraction if fraction is not None else 0.5 if dims.kv_heads < dims.q_heads else 0.25)
        held = None                                   # the tail student's (sample index, prefilled context)
        with _duo_attention(model, state):
            for step in range(start, stop):
                for group in opt.param_groups:
                    group["lr"] = self.lr_at(step)
                index = step // self.reuse                # a new sample every `reuse` steps
                if held is None or held[0] != index:
                    held = (index, self.sample(tokenizer, grid, index), None)
                loss, reg, context = self._step(model, state, held[1], held[2])
                held = (index, held[1], context if self.reuse > 1 else None)    # reuse 1: free it now
                opt.zero_grad(set_to_none=True)
                (l1_grad,) = torch.autograd.grad(reg, [gates], retain_graph=True)    # [L, H_kv], a tiny graph
                (loss + self.l1_weight * reg).backward()
                with torch.no_grad():                 # the loss's own gradient: the total less the L1 term's
                    pull -= (gates.grad - self.l1_weight * l1_grad).double()
                opt.step()
                with torch.no_grad():
                    gates.clamp_(0.0, 1.0)
                    if step >= first:
                        total += gates.detach().double()
                history.append([loss.item(), reg.item()])
                done = step + 1
                curve.after(done, done == stop)
                if self.checkpoint and (done % self.checkpoint_every == 0 or done == stop):
                    checkpoint_io.save(self, gates, opt, done, history, total, pull)
                if on_progress is not None:
                    on_progress(done, f"loss {history[-1][0]:.3g} · sparsity {1 - gates.mean().item():.3f}")
        finished = len(history) >= self.steps
        g = deployed()
        if fraction is None:
            fraction = 0.5 if dims.kv_heads < dims.q_heads else 0.25
        params = {k: v for k, v in asdict(self).items() if k not in checkpoint_io.RUN_CONTROL}
        params.update(fraction=fraction, steps_done=len(history), finished=finished,
                      averaged_steps=averaged(),
                      final_loss=history[-1][0] if history else None, gate_curve=curve.points)
        windows = {"train": {"sink": self.train_sink, "recent": self.train_recent},
                   "deploy": {"sink": self.deploy_sink, "recent": self.deploy_recent}}
        mean_pull = (pull / max(len(history), 1)).float()                      # [L, H_kv]
        return HeadsResult("duo", {"gate": g, "score": g.clone(), "mask": top_fraction(g, fraction),
                                   "pull": mean_pull}, params, windows)

    def _step(self, model, state: "_DuoState", sample, context=None):
        """One step's (loss, regulariser, the tail student's context to reuse: None for the paper student)."""
        ids = sample.input_ids.view(1, -1)
        pos = self.supervised(sample)
        decoder = model.get_decoder()
        if self.student == "tail":
            if context is None:
                context = self._tail_context(decoder, state, ids, pos)
            hidden, target = self._tail_student(decoder, state, ids, pos, context), context[1]
        else:
            state.mode = "teacher"
            with torch.no_grad():
                target = decoder(input_ids=ids, use_cache=False).last_hidden_state[0, pos]   # [P, d]
            state.mode = "student"
            hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state[0, pos]
        state.teacher.clear()
        loss = torch.nn.functional.mse_loss(hidden, target)
        reg = state.gates.abs().mean() if self.l1 == "mean" else state.gates.abs().sum()
        return loss, reg, context

    def _tail_context(self, decoder, state: "_DuoState", ids: torch.Tensor, pos: torch.Tensor):
        """`student="tail"`: the teacher prefills ids[:, :q0] (q0 = the first supervised position) into a cache once,
        and the span ids[:, q0:] runs over a copy of it as the teacher. ids: [1, T]; pos: [P] supervised positions,
        all ≥ q0. Returns (the context's cache, the target [P, d], the teacher's per-layer full-attention outputs of
        the span, which the student's full branch reads with full_branch "teacher"): what every step on this sample
        reuses (`reuse`); the gates never enter it."""
        import copy

        from transformers import DynamicCache

        from kvtool.models import with_cache

        q0 = int(pos.min())
        if q0 < 1:
            raise KvtoolError("duo --student tail needs context before the first supervised position")
        cache = DynamicCache(config=decoder.config)
        state.mode = "teacher"
        with torch.no_grad():
            decoder.set_attn_implementation(state.native)          # the context: the model's own (fused) attention
            try:
                decoder(input_ids=ids[:, :q0], **with_cache(decoder, cache), use_cache=True)
            finally:
                decoder.set_attn_implementation(DUO_ATTENTION)
            target = decoder(input_ids=ids[:, q0:], **with_cache(decoder, copy.deepcopy(cache)),
                             use_cache=True).last_hidden_state[0, pos - q0]                     # [P, d]
        return cache, target, dict(state.teacher)

    def _tail_student(self, decoder, state: "_DuoState", ids: torch.Tensor, pos: torch.Tensor, context):
        """The gated student's final hidden states [P, d] at `pos`: the span ids[:, q0:] over a copy of the context's
        cache (the copy keeps the context as it was for the next step on the same sample)."""
        import copy

        from kvtool.models import with_cache

        q0 = int(pos.min())
        cache = context[0] if self.reuse == 1 else copy.deepcopy(context[0])
        state.teacher = dict(context[2])                  # the span's full-attention outputs (full_branch "teacher")
        state.mode = "student"
        return decoder(input_ids=ids[:, q0:], **with_cache(decoder, cache),
                       use_cache=True).last_hidden_state[0, pos - q0]


class _GateCurve:
    """How much the deployed gates move (the mean of the iterates once averaging has begun, else the last iterate):
    every `every` steps (and at the end), the mean and largest |Δ gate| since the last snapshot and how many heads
    entered or left the top `fraction` (the deployed retrieval set). Converged gates move little and change no head."""

    def __init__(self, deployed, step: int, every: int, fraction: float):
        self.deployed, self.every, self.fraction = deployed, every, fraction
        self.last = deployed().clone()                                              # [L, H_kv]
        self.step = step
        self.points: list[dict] = []

    def after(self, step: int, last: bool) -> None:
        if step % self.every and not last:
            return
        now = self.deployed()
        delta = (now - self.last).abs()
        changed = int((top_fraction(now, self.fraction) != top_fraction(self.last.clamp(0, 1), self.fraction)).sum())
        self.points.append({"step": step, "mean_abs_change": round(float(delta.mean()), 6),
                            "max_abs_change": round(float(delta.max()), 6), "heads_changed": changed})
        self.last, self.step = now.clone(), step


# The gated attention function and its state live with every other attention registration in kvtool/attention.py.
_DuoState = DuoState


def _duo_attention(model, state: DuoState):
    """The model runs with the duo attention function; restored afterwards (also on errors)."""
    state.capped = capped_attention                         # exact attention for soft-capped models (Gemma 2)
    state.native = model.config._attn_implementation        # the model's own attention: the tail student's prefill
    return switched(model, DUO_ATTENTION, DUO_STATES, state)


# -- contract (calibrate.contract): options, sections, summary --------------------------------------------------------
from calibrate import contract as C  # noqa: E402


def _duo_check(duo: Duo) -> None:
    import os

    if duo.resume and not os.path.isfile(duo.checkpoint):
        raise KvtoolError(f"--resume: checkpoint {duo.checkpoint} "
                          f"{'is not a file' if os.path.exists(duo.checkpoint) else 'does not exist'}")


def _checkpoint_path(value) -> str:
    import os

    if os.path.isdir(value):
        raise KvtoolError(f"--checkpoint {value} is a directory; give a file path inside it")
    return str(value)


def default_preset() -> str:
    """'paper' with a GPU, else 'cpu'."""
    return "paper" if torch.cuda.is_available() else "cpu"


def _duo_summary(profile) -> dict:
    """The head summary plus the gate curve (how far the gates moved per snapshot) and the training data."""
    out = C.heads_summary("duo")(profile)
    params = profile.calibration["methods"]["duo"]
    out.update(data=params.get("data", "passkey"), steps_done=params.get("steps_done"),
               gate_curve=params.get("gate_curve", []), averaged_steps=params.get("averaged_steps", 0))
    return out


def _duo_text(s: dict) -> str:
    curve = s.get("gate_curve") or []
    tail = ""
    if curve:
        last = curve[-1]
        tail = (f"; gate curve: mean |Δ| {curve[0]['mean_abs_change']:.4f} by step {curve[0]['step']} → "
                f"{last['mean_abs_change']:.4f} over the steps to {last['step']}, {last['heads_changed']} heads "
                "changed side in that last stretch")
    mean = f", gates averaged over the last {s['averaged_steps']}" if s.get("averaged_steps") else ""
    return C.heads_text(s) + f" (data {s.get('data', 'passkey')}, {s.get('steps_done')} steps{mean}{tail})"


Duo.default_preset = staticmethod(default_preset)
Duo.presets = tuple(PRESETS)
Duo.contract = C.Contract(
    about="DuoAttention gates trained by distillation on passkey data (arXiv 2410.10819)",
    options=(C.Option("preset", "--preset", f"settings preset, {', '.join(PRESETS)} ('cpu-deploy': trained as "
                      "deployed in ~20 min on 2 cores for the default model)", default="paper with a GPU, else cpu"),
             C.Option("steps", "--steps", "optimisation steps ("
                      + ", ".join(f"{k} {PRESETS[k].get('steps', Duo.steps)}" for k in PRESETS) + ")",
                      check=C.at_least("--steps", 1), default="the preset's"),
             C.Option("checkpoint", "--checkpoint", "checkpoint file, written every --checkpoint-every steps",
                      parse=_checkpoint_path),
             C.Option("checkpoint_every", "--checkpoint-every", "steps between checkpoints",
                      check=C.at_least("--checkpoint-every", 1), default="the preset's"),
             C.Option("resume", "--resume", "continue from --checkpoint exactly where it stopped"),
             C.data("training data: passkey (DuoAttention's multi-passkey samples) or kvtool.tasks evaluation "
                    "tasks, comma-separated (copy,lookup,passkey-chat,nll-repeat; training seeds the evaluation "
                    "never uses)"),
             C.Option("train_sink", "--train-sink", "sink tokens of the streaming branch in training",
                      check=C.at_least("--train-sink", 0), default="the preset's"),
             C.Option("train_recent", "--train-recent", "recent tokens of the streaming branch in training",
                      check=C.at_least("--train-recent", 1), default="the preset's"),
             C.Option("student", "--student", "all (paper: every position runs the gated attention) or tail (only "
                      "the supervised span, over the teacher's prefill of the context: one forward a step)",
                      parse=str, default="the preset's"),
             C.Option("reuse", "--reuse", "with --student tail: optimizer steps on each sample, all over one prefill "
                      "of its context (--steps counts every one; a new sample every --reuse steps)",
                      check=C.at_least("--reuse", 1), default="the preset's"),
             C.Option("average", "--average", "deploy the mean of the gates over this last fraction of the steps "
                      "(Polyak averaging; 0: the last step's gates, as the paper)", default="the preset's"),
             C.Option("lr", "--lr", "peak learning rate of the gates", default="the preset's"),
             C.Option("min_len", "--min-len", "shortest training sample (tokens)",
                      check=C.at_least("--min-len", 2), default="the preset's"),
             C.Option("max_len", "--max-len", "longest training sample (tokens; default the model's context)",
                      check=C.at_least("--max-len", 2), default="the preset's"),
             C.seed("random seed of the training samples")),
    sections=tuple(C.Section(f"heads.duo.{n}", "L, H") for n in ("gate", "score", "mask", "pull")),
    summary=_duo_summary, text=_duo_text, fraction=True, check=_duo_check,
    total=lambda r, model: r.steps, paper="arXiv 2410.10819")
