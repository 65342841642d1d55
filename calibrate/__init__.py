"""Calibration methods, one module per method, registered by name.

A method reads traced statistics (or runs its own optimisation) and writes one section of a profile. Methods
register themselves with `@register("name")`; `get("name")` finds one and `names()` lists them. Head methods return
a `calibrate.heads.HeadsResult`. Implemented: `retrieval`, `razor`, `duo`; the other reference methods (kvquant, pca,
pod, snapkv) arrive with their own issues; see ../shared/METHODS.md.
"""

from __future__ import annotations

from typing import Callable

from kvtool.errors import KvtoolError

_REGISTRY: dict[str, Callable] = {}
_MODULES = ("retrieval", "razor", "duo")   # imported on first lookup; each registers itself


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
