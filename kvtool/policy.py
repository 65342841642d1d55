"""Compression policy strings: `heads=duo:0.5,k=4bit,v=4bit,sink=64,recent=256`.

Fields (comma-separated `key=value`, every field optional):
  heads     which KV heads keep the whole context (retrieval); the others keep sink + recent tokens (streaming):
            `all` (every head; the default), `none` (every head streaming), `<method>` (the mask stored by that
            calibration method), `<method>:<fraction>` (the top fraction of that method's score, a global quantile),
            `<fraction>` alone (the profile's own method at that fraction), `random:<fraction>[:seed]`.
  sink      tokens kept at the start in 16 bits (by streaming heads, and by retrieval heads before the quantized
            body); default 64
  recent    most recent tokens kept by streaming heads; default 256
  k, v      bits per key / value element of retrieval heads: 2, 3, 4, 8 or 16 (no quantization); `4bit` works too
  buffer    most recent tokens retrieval heads keep in 16 bits before quantizing them; default 128
  krope     `post` (quantize keys after RoPE; default) or `pre` (undo RoPE, quantize, redo it on read — KVQuant)
  kclip     quantile of the calibrated per-channel key range: 1 (min..max), 0.999 (default), 0.995, 0.99
  outliers  `on`: key elements outside the clipped range are stored exactly (sparse, 16 bits); `off` clamps them
  codebook  `uniform` (default) or `kmeans` (non-uniform levels from `kvtool calibrate --method kvquant`)
  vgroup    channels per value scale group (per token), a divisor of head_dim; default 32 (head_dim if narrower)
  dtype     storage of the unquantized parts: `auto` (16 bits: the model's dtype if it is 16-bit, else float16),
            `model` (exactly the model's dtype), `fp16`, `bf16`, `fp32`
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from kvtool.errors import KvtoolError

QUANT_BITS = (2, 3, 4, 8, 16)
CLIP_LEVELS = (1.0, 0.999, 0.995, 0.99)
DTYPES = ("auto", "model", "fp16", "bf16", "fp32")
FIELDS = ("heads", "sink", "recent", "k", "v", "buffer", "krope", "kclip", "outliers", "codebook", "vgroup", "dtype")


@dataclass(frozen=True)
class Policy:
    heads: str = "all"
    fraction: float | None = None
    seed: int = 0
    sink: int = 64
    recent: int = 256
    k: int = 16
    v: int = 16
    buffer: int = 128
    krope: str = "post"
    kclip: float = 0.999
    outliers: bool = False
    codebook: str = "uniform"
    vgroup: int = 32
    dtype: str = "auto"

    @property
    def quantized(self) -> bool:
        return self.k < 16 or self.v < 16

    @classmethod
    def parse(cls, text: str | None, default_method: str | None = None) -> "Policy":
        """Parse a policy string; `default_method` names the method a bare `heads=<fraction>` refers to."""
        if text is None or not text.strip():
            return cls()
        fields: dict = {}
        seen: set[str] = set()
        for part in text.split(","):
            if "=" not in part:
                raise KvtoolError(f"policy field {part.strip()!r} is not key=value (e.g. heads=duo:0.5,k=4,v=4)")
            key, value = (s.strip() for s in part.split("=", 1))
            if key in seen:
                raise KvtoolError(f"policy field {key!r} is given twice")
            seen.add(key)
            if key == "heads":
                fields.update(_heads(value, default_method))
            elif key in ("sink", "recent", "buffer", "vgroup"):
                fields[key] = _count(key, value, least={"sink": 0, "buffer": 0}.get(key, 1))
            elif key in ("k", "v"):
                fields[key] = _bits(key, value)
            elif key == "krope":
                fields[key] = _choice(key, value, ("post", "pre"))
            elif key == "kclip":
                fields[key] = _clip(value)
            elif key == "outliers":
                fields[key] = _choice(key, value, ("on", "off")) == "on"
            elif key == "codebook":
                fields[key] = _choice(key, value, ("uniform", "kmeans"))
            elif key == "dtype":
                fields[key] = _choice(key, value, DTYPES)
            else:
                raise KvtoolError(f"unknown policy field {key!r} (known: {', '.join(FIELDS)})")
        return cls(**fields)

    @classmethod
    def from_profile(cls, stored: dict | None) -> "Policy":
        """The default policy a profile records (`kvtool.policy`: heads, sink, recent, k_bits, v_bits)."""
        stored = stored or {}
        parts = [f"heads={stored['heads']}"] if stored.get("heads") else []
        parts += [f"{k}={stored[k]}" for k in ("sink", "recent") if k in stored]
        parts += [f"{k[0]}={stored[k]}" for k in ("k_bits", "v_bits") if k in stored]
        return cls.parse(",".join(parts))

    def __str__(self) -> str:
        """The canonical policy string (fields that differ from the defaults, heads always)."""
        heads = self.heads if self.fraction is None else f"{self.heads}:{self.fraction:g}"
        if self.heads == "random" and self.seed:
            heads += f":{self.seed}"
        out, base = [f"heads={heads}"], asdict(Policy())
        for key in FIELDS[1:]:
            value = getattr(self, key)
            if value != base[key]:
                out.append(f"{key}={'on' if value is True else 'off' if value is False else value}")
        return ",".join(out)


def _count(key: str, value: str, least: int) -> int:
    try:
        n = int(value)
    except ValueError:
        raise KvtoolError(f"policy field {key!r}: {value!r} is not a whole number") from None
    if n < least:
        raise KvtoolError(f"policy field {key!r} must be at least {least} (got {n})")
    return n


def _bits(key: str, value: str) -> int:
    text = value.lower().removesuffix("bit").removesuffix("bits")
    try:
        n = int(text)
    except ValueError:
        raise KvtoolError(f"policy field {key!r}: {value!r} is not a bit width (2, 3, 4, 8 or 16)") from None
    if n not in QUANT_BITS:
        raise KvtoolError(f"policy field {key!r}: {n} bits is not supported (2, 3, 4, 8 or 16)")
    return n


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise KvtoolError(f"policy field {key!r}: {value!r} is not one of {', '.join(allowed)}")
    return value


def _number(key: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise KvtoolError(f"policy field {key!r}: {text!r} is not a number") from None


def _clip(value: str) -> float:
    x = _number("kclip", value)
    if x not in CLIP_LEVELS:
        raise KvtoolError(f"policy field 'kclip': {value} is not a calibrated level ({', '.join(map(str, CLIP_LEVELS))})")
    return x


def _fraction(text: str) -> float:
    f = _number("heads", text)
    if not 0.0 <= f <= 1.0:
        raise KvtoolError(f"policy field 'heads': fraction {f} is outside [0, 1]")
    return f


def _heads(value: str, default_method: str | None) -> dict:
    parts = value.split(":")
    name = parts[0]
    if not name:
        raise KvtoolError("policy field 'heads' is empty")
    if name in ("all", "none"):
        if len(parts) > 1:
            raise KvtoolError(f"policy field 'heads': {name!r} takes no fraction")
        return {"heads": name}
    if name[0].isdigit() or name[0] in ".-+":                           # heads=0.5: the profile's own method
        if len(parts) > 1:
            raise KvtoolError(f"policy field 'heads': {value!r} has too many ':' parts")
        fraction = _fraction(name)
        if default_method is None:
            raise KvtoolError("policy field 'heads': a bare fraction needs a profile with a calibrated method "
                              "(or name one, e.g. heads=duo:0.5)")
        return {"heads": default_method, "fraction": fraction}
    if not name.isidentifier():
        raise KvtoolError(f"policy field 'heads': {name!r} is neither a fraction nor a method name (give all, none, "
                          "a fraction, <method>, <method>:<fraction> or random:<fraction>)")
    out = {"heads": name}
    if len(parts) > 1:
        out["fraction"] = _fraction(parts[1])
    if name == "random":
        if "fraction" not in out:
            raise KvtoolError("policy field 'heads': random needs a fraction, e.g. heads=random:0.5")
        if len(parts) > 2:
            out["seed"] = _count("heads seed", parts[2], least=0)
            if out["seed"] > 2**63 - 1:
                raise KvtoolError(f"policy field 'heads': random seed {out['seed']} is above 2**63 - 1")
    elif len(parts) > 2:
        raise KvtoolError(f"policy field 'heads': {value!r} has too many ':' parts")
    return out
