"""Every registered calibration method, through its contract (calibrate.contract), on a tiny random model with a
small passkey-traced profile: through the API it writes exactly the sections its contract declares with the declared
shapes and its summary is produced; through the CLI it runs with exit 0 and refuses another method's option in one
line before the model loads.

Adding a method is its file in calibrate/ plus one entry in TINY below: the options that make it fast here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import calibrate as registry
from calibrate.contract import COMMON_FLAGS, contract_of, markdown
from kvtool.api import calibrate, make_runner, profile_model
from kvtool.data import describe, passkey_samples
from kvtool.models import load_model
from kvtool.profile import Profile
from kvtool.trace import Dims, TraceConfig
from test_cli import assert_one_line_error, run

# method -> options {dataclass field: value} small enough for a 2-layer model on a 2-core CPU; each is a CLI flag
TINY = {
    "retrieval": {},                                          # reuses the profile's passkey trace
    "razor": {"probe_len": 16},
    "duo": {"preset": "cpu", "steps": 2},
    "combo": {"signals": "copy,distant"},                     # the two head signals a traced profile holds
    "kvquant": {"bits": (2,), "vgroup": 4, "samples": 1, "seq_len": 192},
    "pca": {"samples": 1, "seq_len": 192},
    "pod": {"samples": 1, "heldout": 1, "seq_len": 192},
    "snapkv": {"samples": 1, "seq_len": 192, "windows": (8, 16), "kernels": (1, 7), "future": 16},
}
ROOT = Path(__file__).resolve().parents[1]


def test_every_registered_method_has_an_entry():
    assert sorted(TINY) == registry.names()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama (2 layers, 2 KV heads, head_dim 8) with the embedded tokenizer, on disk, with a passkey-traced
    profile; context 1100 so that duo's 'cpu' preset (512..1024-token samples) fits."""
    tok = load_model()[1]
    path = tmp_path_factory.mktemp("methods")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1100,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path / "model")
    tok.save_pretrained(path / "model")
    model, tok = load_model(str(path / "model"))
    samples = passkey_samples(tok, 2, 96, n_needles=1, seed=0)
    prof = profile_model(model, samples, config=TraceConfig(sink=4, recent=16, query_samples=16),
                         data=describe("passkey"))
    prof.save(path / "p.kv.st")
    return path / "model", model, tok, path / "p.kv.st"


def _cli_args(method: str, options: dict) -> list[str]:
    by_field = {o.field: o.flag for o in contract_of(registry.get(method)).options}
    args = []
    for field, value in options.items():
        flag = by_field[field]                                 # every tiny option is a CLI flag of the method
        if value is True:
            args.append(flag)
        else:
            args += [flag, ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)]
    return args


@pytest.mark.parametrize("method", sorted(TINY))
def test_api_writes_the_declared_sections_and_a_summary(tiny, method):
    _, model, tok, path = tiny
    base = Profile.load(path)
    contract = contract_of(registry.get(method))
    out = calibrate(model, tok, method, profile=base, options=dict(TINY[method]))
    written = {k: tuple(t.shape) for k, t in out.tensors.items() if k not in base.tensors}
    d = Dims.of(model)
    expected = contract.expected(make_runner(method, dict(TINY[method])), d.layers, d.kv_heads, d.head_dim)
    assert written == expected and expected
    for s in contract.sections:                               # every declared name matches something written
        pattern = re.escape(s.name).replace(re.escape("{b}"), r"\d+")
        assert s.when or any(re.fullmatch(pattern, k) for k in written), s.name
    summary = contract.summary(out)
    assert summary["method"] == method and summary["seconds"] >= 0
    json.dumps(summary)
    text = contract.text(summary)
    assert text.startswith(f"{method}:") and "\n" not in text
    assert method in out.calibration["methods"]


@pytest.mark.parametrize("method", sorted(TINY))
def test_cli_runs_and_prints_the_summary(capsys, tiny, tmp_path, method):
    model_dir, _, _, path = tiny
    target = tmp_path / "out.kv.st"
    code, out, err = run(capsys, "calibrate", "--method", method, model_dir, "--profile", path,
                         *_cli_args(method, TINY[method]), "-o", target, "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["output"] == str(target) and summary["method"] == method
    written = Profile.load(target)
    expected = contract_of(registry.get(method)).expected(make_runner(method, dict(TINY[method])), 2, 2, 8)
    assert {k: tuple(written[k].shape) for k in expected} == expected
    code, out, err = run(capsys, "calibrate", "--method", method, model_dir, "--profile", target,
                         *_cli_args(method, TINY[method]), "-o", tmp_path / "again.kv.st")
    assert code == 0, err
    assert out.strip().startswith(f"{method}:") and "again.kv.st" in out
    code, out, err = run(capsys, "inspect", tmp_path / "again.kv.st")
    assert code == 0, err


@pytest.mark.parametrize("method", sorted(TINY))
def test_cli_refuses_another_methods_option(capsys, tiny, tmp_path, method, monkeypatch):
    import kvtool.models

    monkeypatch.setattr(kvtool.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    model_dir, _, _, path = tiny
    mine = set(contract_of(registry.get(method)).flags())
    other, value = next((o.flag, "1") for name in registry.names() if name != method
                        for o in contract_of(registry.get(name)).options if o.flag not in mine)
    code, _, err = run(capsys, "calibrate", "--method", method, model_dir, "--profile", path, other, value,
                       "-o", tmp_path / "x.kv.st")
    assert_one_line_error(code, err, f"{other} does not apply to {method}")
    assert not (tmp_path / "x.kv.st").exists()


def test_cli_flags_are_the_contracts_flags():
    """Every flag a contract names is on `kvtool calibrate`, and every method flag there belongs to some method."""
    import typer.main

    from kvtool.cli import app

    cmd = typer.main.get_command(app).commands["calibrate"]
    on_cli = {o for p in cmd.params for o in getattr(p, "opts", []) if o.startswith("--")}
    declared = {o.flag for _, cls in ((n, registry.get(n)) for n in registry.names())
                for o in contract_of(cls).options} | {"--retrieval-fraction"}
    assert declared <= on_cli
    assert on_cli - declared == set(COMMON_FLAGS)


@pytest.mark.parametrize("doc", ["README.md", "docs/how-it-works.md"])
def test_docs_list_the_contracts(doc):
    text = (ROOT / doc).read_text()
    block = re.search(r"<!-- calibrate-methods: begin.*?-->\n(.*?)\n<!-- calibrate-methods: end -->", text, re.S)
    assert block, f"{doc} has no calibrate-methods block"
    assert block.group(1).strip() == markdown().strip(), \
        f"{doc}: regenerate the block with python -c 'from calibrate.contract import markdown; print(markdown())'"


def _without(path: Path, prefix: str, target: Path) -> Path:
    p = Profile.load(path)
    p.tensors = {k: t for k, t in p.tensors.items() if not k.startswith(prefix)}
    return p.save(target)


# (id, method, CLI arguments, what the one line says); {profile}: the traced profile, {no-pca} / {no-sim}: it without
# pca.* / layers.similarity. Every one is refused before the model loads.
BAD = [
    ("pca-no-profile", "pca", [], "pca needs a profile's traced PCA"),
    ("pod-no-profile", "pod", [], "pod needs a profile's layers.similarity"),
    ("pca-profile-without-pca", "pca", ["--profile", "{no-pca}"], "has no pca.key_pre.mean"),
    ("pod-profile-without-similarity", "pod", ["--profile", "{no-sim}"], "has no layers.similarity"),
    ("pod-threshold-high", "pod", ["--profile", "{profile}", "--threshold", "1.5"], "--threshold must lie in [0, 1]"),
    ("pod-threshold-nan", "pod", ["--profile", "{profile}", "--threshold", "nan"], "--threshold must lie in [0, 1]"),
    ("pod-per", "pod", ["--profile", "{profile}", "--per", "row"], "--per must be layer or head"),
    ("pod-max-group-0", "pod", ["--profile", "{profile}", "--max-group", "0"], "--max-group must be at least 1"),
    ("pod-heldout-neg", "pod", ["--profile", "{profile}", "--heldout", "-1"], "--heldout must be at least 0"),
    ("pca-clip", "pca", ["--profile", "{profile}", "--clip", "0.3"], "--clip must be a quantile level"),
    ("pca-samples-0", "pca", ["--profile", "{profile}", "--samples", "0"], "zero samples"),
    ("pca-seq-len-beyond-context", "pca", ["--profile", "{profile}", "--seq-len", "5000"], "context of 1100"),
    ("retrieval-threshold", "retrieval", ["--threshold", "2"], "--threshold must lie in [0, 1]"),
    ("kvquant-bits", "kvquant", ["--profile", "{profile}", "--bits", "5"], "--bits must be some of"),
    ("duo-clip", "duo", ["--preset", "cpu", "--clip", "0.9"], "--clip does not apply to duo"),
    ("duo-unknown-task", "duo", ["--preset", "cpu", "--data", "copy,sort"], "give passkey or evaluation tasks"),
    ("combo-no-profile", "combo", [], "combo needs a profile's head signals"),
    ("combo-missing-signal", "combo", ["--profile", "{profile}", "--signals", "duo,copy"], "has no heads.duo.gate"),
    ("combo-one-signal", "combo", ["--profile", "{profile}", "--signals", "copy"], "two or more different signals"),
    ("razor-fraction-for-pod", "pod", ["--profile", "{profile}", "--retrieval-fraction", "0.5"],
     "--retrieval-fraction does not apply to pod"),
]


@pytest.mark.parametrize("method,args,needle", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_cli_bad_input_is_one_line_before_loading(capsys, tiny, tmp_path, monkeypatch, method, args, needle):
    import kvtool.models

    model_dir, _, _, path = tiny
    files = {"{profile}": path, "{no-pca}": _without(path, "pca.", tmp_path / "no-pca.kv.st"),
             "{no-sim}": _without(path, "layers.similarity", tmp_path / "no-sim.kv.st")}
    before = sorted(tmp_path.iterdir())
    monkeypatch.setattr(kvtool.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    code, _, err = run(capsys, "calibrate", "--method", method, model_dir, *(files.get(a, a) for a in args),
                       "-o", tmp_path / "x.kv.st")
    assert_one_line_error(code, err, needle)
    assert sorted(tmp_path.iterdir()) == before


def test_pod_groups_from_the_cli_without_a_profile_and_bad_groups(capsys, tiny, tmp_path):
    model_dir, _, _, _ = tiny
    code, out, err = run(capsys, "calibrate", "--method", "pod", model_dir, "--groups", "0-1", "--samples", "1",
                         "--heldout", "0", "--seq-len", "192", "-o", tmp_path / "g.kv.st", "--json")
    assert code == 0, err
    assert json.loads(out)["groups"] == [[0, 1]] and json.loads(out)["layers sharing"] == 1
    code, _, err = run(capsys, "calibrate", "--method", "pod", model_dir, "--groups", "0-5", "--samples", "1",
                       "--seq-len", "192", "-o", tmp_path / "bad.kv.st")
    assert_one_line_error(code, err, "--groups: 0-5 is not a range of layers 0..1")
    assert not (tmp_path / "bad.kv.st").exists()


@pytest.mark.parametrize("method,title,key", [("pca", "Low-rank (calibrate --method pca)", "lowrank"),
                                              ("pod", "PoD layer groups (calibrate --method pod)", "pod")])
def test_inspect_prints_the_pca_and_pod_tables(capsys, tiny, tmp_path, method, title, key):
    model_dir, _, _, path = tiny
    target = tmp_path / "m.kv.st"
    extra = ["--groups", "0-1"] if method == "pod" else []                     # a group, whatever the similarity
    code, _, err = run(capsys, "calibrate", "--method", method, model_dir, "--profile", path,
                       *_cli_args(method, TINY[method]), *extra, "-o", target)
    assert code == 0, err
    code, out, err = run(capsys, "inspect", target)
    assert code == 0, err
    assert title in out.replace("\n", " ") or title in out
    code, out, _ = run(capsys, "inspect", target, "--json")
    assert json.loads(out)[key]
