"""Layering: the runtime (stores, attention, cache and what they import) never imports calibrate/, and calibrate/
never imports the runtime modules; what both need lives in low modules (kvtool.windows, kvtool.select, kvtool.modelinfo, kvtool.trace,
kvtool.sections, kvtool.attention: every registered attention function, which imports none of the runtime's modules). Checked on the source's import statements (module level and inside functions)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNTIME = ["kvtool/stores/*.py", "kvtool/cache.py", "kvtool/attention.py", "kvtool/kvstore.py", "kvtool/policy.py",
           "kvtool/quant_setup.py", "kvtool/quant.py", "kvtool/windows.py", "kvtool/select.py", "kvtool/sections.py",
           "kvtool/store_layer.py"]
RUNTIME_MODULES = ("kvtool.cache", "kvtool.store_layer", "kvtool.stores", "kvtool.kvstore", "kvtool.quant_setup",
                   "kvtool.api", "kvtool.cli", "kvtool.cli_run", "kvtool.evaluate", "kvtool.baselines",
                   "kvtool.sweep")


def imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def files(patterns) -> list[Path]:
    found = [p for pat in patterns for p in sorted(ROOT.glob(pat))]
    assert found
    return found


def test_runtime_never_imports_calibrate():
    for path in files(RUNTIME):
        bad = sorted(m for m in imports(path) if m == "calibrate" or m.startswith("calibrate."))
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_runtime_reads_the_model_through_modelinfo_not_the_trace():
    """The runtime needs a model's sizes and RoPE, not the trace: it takes them from kvtool.modelinfo."""
    for path in files(RUNTIME + ["kvtool/baselines.py", "kvtool/lowrank_setup.py"]):
        bad = sorted(m for m in imports(path) if m == "kvtool.trace" or m.startswith("kvtool.trace."))
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_calibrate_never_imports_the_runtime():
    for path in files(["calibrate/*.py"]):
        bad = sorted(m for m in imports(path) if m.startswith(RUNTIME_MODULES))
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def registrations(path: Path) -> list[str]:
    """Calls `<X>Interface.register(...)` / `<X>Interface.__setitem__` (AttentionInterface, AttentionMaskInterface,
    any alias or the global mappings ALL_*_FUNCTIONS) in a file's source."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in ("register", "__setitem__", "update"):
            target = ast.unparse(node.func.value)
            if "Interface" in target or "ALL_" in target:
                found.append(ast.unparse(node))
        elif isinstance(node, ast.Assign):                      # ALL_ATTENTION_FUNCTIONS["x"] = f
            for t in node.targets:
                name = ast.unparse(t.value) if isinstance(t, ast.Subscript) else ""
                if "Interface" in name or "ALL_" in name:
                    found.append(ast.unparse(node))
    return found


def test_every_attention_registration_is_in_one_module():
    """kvtool/attention.py registers the runtime's, the trace's and duo's attention functions and mask hooks; no
    other source file registers any."""
    hits = {str(p.relative_to(ROOT)): registrations(p)
            for p in files(["kvtool/*.py", "kvtool/stores/*.py", "calibrate/*.py", "cupy_kernels/*.py",
                            "benchmarks/*.py"])}
    assert {k: v for k, v in hits.items() if v and k != "kvtool/attention.py"} == {}
    mine = hits["kvtool/attention.py"]
    for name in ("KVTOOL_ATTENTION", "TRACE_ATTENTION", "DUO_ATTENTION"):
        assert f"AttentionInterface.register({name}" in " ".join(mine)
        assert f"AttentionMaskInterface.register({name}" in " ".join(mine)


def test_the_registration_check_would_fail(tmp_path):
    """The check above sees a registration written the ways transformers allows."""
    src = tmp_path / "x.py"
    src.write_text("from transformers import AttentionInterface\nAttentionInterface.register('a', f)\n"
                   "ALL_MASK_ATTENTION_FUNCTIONS['b'] = g\n")
    assert len(registrations(src)) == 2


def test_the_attention_module_is_low():
    """kvtool/attention.py, which calibrate/duo.py and kvtool.trace use, imports no runtime module nor calibrate/."""
    bad = sorted(m for m in imports(ROOT / "kvtool/attention.py")
                 if m.startswith(RUNTIME_MODULES + ("kvtool.trace", "kvtool.policy", "calibrate")))
    assert not bad, f"kvtool/attention.py imports {bad}"
    assert "kvtool.attention" not in RUNTIME_MODULES


def test_copy_score_and_retrieval_method_no_longer_share_a_name():
    """New profiles hold the trace's copy score as heads.copy_score; a profile written before the rename (with
    heads.retrieval_score) answers to both names, and the retrieval method keeps its own heads.retrieval.* section."""
    import torch

    from conftest import needle_sample, tiny_model
    from kvtool import sections
    from kvtool.api import profile_model
    from kvtool.profile import Profile
    from kvtool.trace import TraceConfig

    prof = profile_model(tiny_model("gqa"), [needle_sample(T=64)], config=TraceConfig(sink=4, recent=16,
                                                                                        query_samples=8))
    assert sections.COPY_SCORE in prof.tensors and "heads.retrieval_score" not in prof.tensors
    old = Profile({("heads.retrieval_score" if k == sections.COPY_SCORE else k): v for k, v in prof.tensors.items()},
                  prof.model, prof.calibration, prof.policy)
    assert torch.equal(old[sections.COPY_SCORE], prof[sections.COPY_SCORE])
    assert torch.equal(prof["heads.retrieval_score"], prof[sections.COPY_SCORE])
    assert sections.resolve(prof, sections.heads_score("retrieval")) == sections.COPY_SCORE
    assert sections.heads_score("retrieval") == "heads.retrieval.score" != sections.COPY_SCORE


def test_the_command_modules_do_not_import_each_other():
    """kvtool.cli_run, kvtool.cli_calibrate and kvtool.cli_base never import kvtool.cli (which registers the command
    modules' commands once); what the command modules need lives in kvtool.cli_base."""
    for name in ("kvtool/cli_run.py", "kvtool/cli_calibrate.py", "kvtool/cli_base.py"):
        bad = sorted(m for m in imports(ROOT / name) if m == "kvtool.cli" or m.startswith("kvtool.cli."))
        assert not bad, f"{name} imports {bad}"
    assert not any(m.startswith("kvtool.cli_run") for m in imports(ROOT / "kvtool/cli_base.py"))
