"""CuPy GPU kernels for the compressed KV cache (quantize/pack, fused decode attention), each with a torch twin.

No kernels are here yet: they arrive with their own issue and are tested against their torch references on a
CUDA GPU. `available()` tells whether CuPy and a CUDA device can be used at all (install the `gpu` extra).
"""

from __future__ import annotations


def available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    try:
        import cupy
    except Exception:
        return False
    try:
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False
