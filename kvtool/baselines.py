"""Caches to compare side by side, by spec: kvtool's own CompressedCache and the baselines users would otherwise run.

  full                    transformers DynamicCache (the uncompressed reference)
  <policy string>         kvtool CompressedCache, e.g. heads=duo:0.5,k=4,v=4 (see kvtool.policy)
  quanto:<2|4>            transformers QuantizedCache with optimum-quanto (q_group_size 64, residual 128, its defaults)
  streaming:<sink>:<recent>  StreamingLLM (Xiao et al., arXiv 2309.17453): every head keeps sink + recent tokens
  press:<name>:<ratio>    an NVIDIA kvpress press (e.g. press:snapkv:0.75), when kvpress is installed

Bytes: every tensor the cache holds, with floating-point tensors counted at 16 bits at most — what they take when the
model runs in 16 bits. (On CPU kvtool runs models in float32; DynamicCache and QuantizedCache then hold float32
tensors, which would otherwise count double against the 16-bit reference.) kvtool's own stores are 16-bit already.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

from kvtool.errors import KvtoolError


def bytes16(tensors) -> int:
    """Bytes of `tensors`, floating point counted at ≤ 2 bytes per element."""
    total = 0
    for t in tensors:
        size = t.element_size()
        total += t.numel() * (min(size, 2) if t.is_floating_point() else size)
    return total


@dataclass
class CacheHandle:
    """Makes a fresh cache per sample and measures it."""
    spec: str
    fresh: Callable[[], object]
    held: Callable[[object], int]                 # bytes held (see the module docstring)
    tokens: Callable[[object], int]
    dims: tuple[int, int, int]                    # layers, KV heads, head_dim

    def nbytes(self, cache) -> int:
        return self.held(cache)

    def full16(self, cache) -> int:
        layers, heads, dim = self.dims
        return 2 * layers * heads * self.tokens(cache) * dim * 2


def check_spec(spec: str) -> None:
    """Refuse a malformed or unavailable spec before any model work (one-line KvtoolError)."""
    from kvtool.policy import Policy

    spec = spec.strip()
    if spec == "full":
        return
    if spec.startswith("quanto:"):
        if spec.split(":", 1)[1] not in ("2", "4"):
            raise KvtoolError(f"baseline {spec!r}: quanto supports 2 or 4 bits")
        try:
            import optimum.quanto  # noqa: F401
        except Exception:
            raise KvtoolError("baseline quanto needs optimum-quanto (pip install optimum-quanto)") from None
    elif spec.startswith("streaming:"):
        _streaming(spec)
    elif spec.startswith("press:"):
        from kvtool.press import press_handle

        press_handle(None, spec, None)
    else:
        Policy.parse(spec, default_method="duo")


def _streaming(spec: str) -> tuple[int, int]:
    """streaming:<sink>:<recent> -> (sink >= 0, recent >= 1), plain decimal integers."""
    parts = spec.split(":")
    if len(parts) != 3 or not all(re.fullmatch(r"-?[0-9]+", p) for p in parts[1:]):
        raise KvtoolError(f"baseline {spec!r}: write streaming:<sink>:<recent> with whole numbers, "
                          "e.g. streaming:4:1020")
    sink, recent = int(parts[1]), int(parts[2])
    if sink < 0:
        raise KvtoolError(f"baseline {spec!r}: sink must be at least 0 (got {sink})")
    if recent < 1:
        raise KvtoolError(f"baseline {spec!r}: recent must be at least 1 (the newest token is always kept)")
    return sink, recent


def make_cache(model, profile, spec: str, backend: str = "auto") -> CacheHandle:
    from kvtool.modelinfo import Dims

    d = Dims.of(model)
    dims = (d.layers, d.kv_heads, d.head_dim)
    spec = spec.strip()
    if spec == "full":
        from transformers import DynamicCache

        _plain_attention(model)
        return CacheHandle(spec, lambda: DynamicCache(config=model.config), _dynamic_bytes,
                           lambda c: c.get_seq_length(), dims)
    if spec.startswith("quanto:"):
        return _quanto(model, spec, dims)
    if spec.startswith("streaming:"):
        sink, recent = _streaming(spec)
        return _kvtool(model, None, f"heads=none,sink={sink},recent={recent}", dims, backend, label=spec)
    if spec.startswith("press:"):
        from kvtool.press import press_handle

        return press_handle(model, spec, dims)
    return _kvtool(model, profile, spec, dims, backend)


def _kvtool(model, profile, policy: str, dims, backend: str, label: str | None = None) -> CacheHandle:
    from kvtool.cache import CompressedCache

    cache = CompressedCache(model, profile, policy, backend=backend)        # validated once; reset per sample

    def fresh():
        cache.reset()
        return cache

    return CacheHandle(label or policy, fresh, lambda c: c.nbytes(), lambda c: c.get_seq_length(), dims)


def _plain_attention(model) -> None:
    """Baselines run with sdpa (a model switched to "kvtool" by a CompressedCache is switched back)."""
    from kvtool.cache import KVTOOL_ATTENTION

    if model.config._attn_implementation == KVTOOL_ATTENTION:
        model.set_attn_implementation("sdpa")


def _dynamic_bytes(cache) -> int:
    return bytes16(t for layer in cache.layers for t in (layer.keys, layer.values) if t is not None)


def _quanto(model, spec: str, dims) -> CacheHandle:
    from transformers import QuantizedCache

    bits = spec.split(":", 1)[1]
    if bits not in ("2", "4"):
        raise KvtoolError(f"baseline {spec!r}: quanto supports 2 or 4 bits")
    try:
        import optimum.quanto  # noqa: F401
    except Exception:
        raise KvtoolError("baseline quanto needs optimum-quanto (pip install optimum-quanto)") from None
    _plain_attention(model)

    def fresh():
        return QuantizedCache(backend="quanto", config=model.config, nbits=int(bits), q_group_size=64,
                              residual_length=128)

    return CacheHandle(spec, fresh, _quantized_bytes, lambda c: c.get_seq_length(), dims)


def _qtensor_parts(q) -> list[torch.Tensor]:
    """The plain tensors inside a quanto quantized tensor (packed data, scale, shift), found by walking its
    attributes: quanto nests a packed tensor inside the quantized one."""
    out, stack, seen = [], [q], set()
    while stack:
        t = stack.pop()
        if id(t) in seen:
            continue
        seen.add(id(t))
        inner = getattr(t, "__tensor_flatten__", None)
        if inner is not None and type(t) is not torch.Tensor:
            names, _ = t.__tensor_flatten__()
            stack.extend(getattr(t, n) for n in names)
        elif isinstance(t, torch.Tensor):
            out.append(t)
    return out


def _quantized_bytes(cache) -> int:
    tensors = []
    for layer in cache.layers:
        for name in ("_quantized_keys", "_quantized_values"):
            q = getattr(layer, name, None)
            if q is not None:
                tensors += _qtensor_parts(q)
        tensors += [t for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if t is not None]
    return bytes16(tensors)
