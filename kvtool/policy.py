"""Compression policy strings: `heads=duo:0.5,sink=64,recent=256`.

Fields (comma-separated `key=value`, every field optional):
  heads   which KV heads keep the whole context (retrieval); the others keep sink + recent tokens (streaming):
          `all` (lossless), `none` (every head streaming), `<method>` (the mask stored by that calibration method),
          `<method>:<fraction>` (the top fraction of that method's score, a global quantile), `random:<fraction>[:seed]`.
  sink    tokens kept at the start by streaming heads (default 64)
  recent  most recent tokens kept by streaming heads (default 256)
Quantization fields (`k=4bit,v=4bit`) belong to the quantized runtime and are refused until it exists.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvtool.errors import KvtoolError


@dataclass(frozen=True)
class Policy:
    heads: str = "all"
    fraction: float | None = None
    seed: int = 0
    sink: int = 64
    recent: int = 256

    @classmethod
    def parse(cls, text: str | None) -> "Policy":
        if text is None or not text.strip():
            return cls()
        fields: dict = {}
        for part in text.split(","):
            if "=" not in part:
                raise KvtoolError(f"policy field {part.strip()!r} is not key=value (e.g. heads=duo:0.5,sink=64)")
            key, value = (s.strip() for s in part.split("=", 1))
            if key in fields or (key == "heads" and "heads" in fields):
                raise KvtoolError(f"policy field {key!r} is given twice")
            if key == "heads":
                fields.update(_heads(value))
            elif key in ("sink", "recent"):
                fields[key] = _count(key, value, least=0 if key == "sink" else 1)
            elif key in ("k", "v"):
                raise KvtoolError(f"policy field {key!r}: KV quantization is not available in this runtime yet")
            else:
                raise KvtoolError(f"unknown policy field {key!r} (known: heads, sink, recent)")
        return cls(**fields)


def _count(key: str, value: str, least: int) -> int:
    try:
        n = int(value)
    except ValueError:
        raise KvtoolError(f"policy field {key!r}: {value!r} is not a whole number") from None
    if n < least:
        raise KvtoolError(f"policy field {key!r} must be at least {least} (got {n})")
    return n


def _heads(value: str) -> dict:
    parts = value.split(":")
    name = parts[0]
    if not name:
        raise KvtoolError("policy field 'heads' is empty")
    if name in ("all", "none"):
        if len(parts) > 1:
            raise KvtoolError(f"policy field 'heads': {name!r} takes no fraction")
        return {"heads": name}
    out = {"heads": name}
    if len(parts) > 1:
        try:
            out["fraction"] = float(parts[1])
        except ValueError:
            raise KvtoolError(f"policy field 'heads': fraction {parts[1]!r} is not a number") from None
        if not 0.0 <= out["fraction"] <= 1.0:
            raise KvtoolError(f"policy field 'heads': fraction {out['fraction']} is outside [0, 1]")
    if name == "random":
        if "fraction" not in out:
            raise KvtoolError("policy field 'heads': random needs a fraction, e.g. heads=random:0.5")
        if len(parts) > 2:
            out["seed"] = _count("heads seed", parts[2], least=0)
    elif len(parts) > 2:
        raise KvtoolError(f"policy field 'heads': {value!r} has too many ':' parts")
    return out
