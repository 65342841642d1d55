"""Calibration methods, one module per method, registered by name.

A method reads traced statistics (or runs its own optimisation) and writes one section of a profile. Methods
register themselves with `@register("name")`; `get("name")` finds one and `names()` lists them. A method is a
dataclass (its fields are its options) with `run(model, tokenizer, profile=None, fraction=None, on_progress=None)`
returning a `Result`, and a `contract` (calibrate.contract.Contract, declared at the end of its file): the CLI flag and
help of each option, the sections it writes with their shapes, whether it needs a profile, the progress total and
its summary. `kvtool calibrate` and kvtool.api.calibrate run every method through that contract, with no
per-method branches. Head methods return a `calibrate.heads.HeadsResult` (section `heads.<method>`, a retrieval
`mask`; they set the default policy's `heads`); others name their own section (`kvquant`: `quant.`, `pca`:
`lowrank.`, `pod`: `layers.pod.`).

Implemented: `retrieval`, `razor`, `duo`, `combo` (their signals rank-averaged) (KV heads), `kvquant` (non-uniform
quantization levels), `pca` (low-rank bases and latent ranges), `pod` (layer groups sharing distant keys), `snapkv`
(SnapKV's observation window and pooling kernel per layer, section `snapkv.`). Adding a method is its file here (added
to `_MODULES`) plus one entry in
tests/test_methods.py's `TINY` (its options for a tiny model); that matrix checks the sections and shapes its contract
declares, its summary, its CLI run and its refusals. A CLI flag no method had before is one more line in
kvtool/cli_calibrate.py's `calibrate` signature (the matrix says so until it is there).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from kvtool.errors import KvtoolError

_REGISTRY: dict[str, Callable] = {}
_MODULES = ("retrieval", "razor", "duo", "combo", "kvquant", "pca", "pod", "snapkv")   # imported on first lookup; each registers itself


@dataclass
class Result:
    """A method's output: `tensors` go to the profile as `<section>.<name>` (section default `heads.<method>`), after
    every tensor whose name starts with one of `replaces` (default `<section>.`) is removed; `params` land in
    kvtool.calibration["methods"][method]. `windows`: sink/recent sizes, for head methods (see HeadsResult)."""

    method: str
    tensors: dict
    params: dict = field(default_factory=dict)
    windows: dict = field(default_factory=dict)
    section: str = ""
    replaces: tuple = ()

    def __post_init__(self) -> None:
        self.section = self.section or f"heads.{self.method}"
        self.replaces = tuple(self.replaces) or (f"{self.section}.",)


def _load() -> None:
    import importlib

    for name in _MODULES:
        importlib.import_module(f"calibrate.{name}")


def register(name: str) -> Callable:
    """Class or function decorator: make a calibration method available as `name`."""

    def wrap(obj):
        if name in _REGISTRY:
            raise ValueError(f"calibration method {name!r} is registered twice")
        _REGISTRY[name] = obj
        return obj

    return wrap


def get(name: str):
    _load()
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY)) or "none yet"
        raise KvtoolError(f"unknown calibration method {name!r} (known: {known})")
    return _REGISTRY[name]


def names() -> list[str]:
    _load()
    return sorted(_REGISTRY)
