"""kvpress baselines (`press:<name>:<ratio>` in kvtool bench) — guarded.

NVIDIA kvpress compresses the cache once, during prefill, with a press chosen by name. The newest kvpress on PyPI
(0.5.5) declares transformers < 5.3 and, tried against transformers 5.24 with `--no-deps`, its forward hook fails
(`KeyError: 'past_key_values'`: transformers renamed that attention-module argument to `cache`). kvtool needs
transformers 5.x, so this baseline reports that plainly instead of producing numbers from a broken hook. When a
kvpress release supports the installed transformers, wire its presses in here (one forward over the whole context
inside `with press(model):`, then decode).
"""

from __future__ import annotations

from kvtool.errors import KvtoolError


def press_handle(model, spec: str, dims):
    try:
        import kvpress
    except Exception:
        raise KvtoolError(f"baseline {spec!r} needs kvpress (pip install kvpress); note that kvpress 0.5.5 supports "
                          "only transformers < 5.3") from None
    import transformers

    version = getattr(kvpress, "__version__", "?")
    raise KvtoolError(f"baseline {spec!r}: kvpress {version} does not run with transformers {transformers.__version__} "
                      "(its hooks expect the pre-5.3 attention arguments); press baselines are unavailable here")
