"""kvtool: offline KV-cache profiling and calibration for LLMs.

    import kvtool
    model, tok = kvtool.load_model()                 # embedded SmolLM2-135M-Instruct, or a name/path
    samples = kvtool.load_samples(None, tok, n_samples=8, seq_len=1024)
    profile = kvtool.profile_model(model, samples)   # one-pass trace -> Profile
    profile.save("smollm2.kv.st")
"""

__version__ = "0.1.0"

from kvtool.errors import KvtoolError  # noqa: E402
from kvtool.models import load_model  # noqa: E402


def __getattr__(name):
    # Lazy: importing kvtool stays cheap (the CLI's --help must not pay for torch + transformers twice).
    lazy = {
        "Profile": ("kvtool.profile", "Profile"),
        "load_samples": ("kvtool.data", "load_samples"),
        "passkey_samples": ("kvtool.data", "passkey_samples"),
        "profile_model": ("kvtool.api", "profile_model"),
        "merge_profiles": ("kvtool.api", "merge_profiles"),
        "TraceConfig": ("kvtool.trace", "TraceConfig"),
        "summarize": ("kvtool.inspect", "summarize"),
        "CompressedCache": ("kvtool.cache", "CompressedCache"),
        "use_kvtool_attention": ("kvtool.cache", "use_kvtool_attention"),
        "with_cache": ("kvtool.cache", "with_cache"),
        "calibrate": ("kvtool.api", "calibrate"),
    }
    if name in lazy:
        import importlib

        module, attr = lazy[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'kvtool' has no attribute {name!r}")


__all__ = ["KvtoolError", "load_model", "Profile", "load_samples", "passkey_samples", "profile_model",
           "merge_profiles", "TraceConfig", "summarize", "CompressedCache", "use_kvtool_attention", "with_cache", "calibrate",
           "__version__"]
