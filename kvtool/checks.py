"""Checks the commands run on their options before loading a model (a load takes 5-30 s): every refusal here is a
one-line KvtoolError, and none of them needs the model's weights.

`model_context` reads a model's maximum positions from its config alone (a local directory, an HF id in the local
cache, or a GGUF already converted into kvtool's cache); where that is not possible it returns None and the command
checks the same lengths right after loading, before any forward pass.
"""

from __future__ import annotations

import os
from pathlib import Path

from kvtool.errors import KvtoolError

MAX_SEED = 2**63 - 1                     # numpy and torch generators both take 0 .. 2**63 - 1
MAX_THREADS = 1024
MAX_NLL_TOKENS = 1 << 24                 # samples x (context + continuation) cut from the built-in text


def whole(flag: str, value: int, least: int = 1, most: int | None = None) -> int:
    """Refuse an integer option outside [least, most]."""
    if value < least or (most is not None and value > most):
        span = f"at least {least}" if most is None else f"from {least} to {most}"
        raise KvtoolError(f"{flag} must be {span} (got {value})")
    return value


def seed(value: int, flag: str = "--seed") -> int:
    return whole(flag, value, 0, MAX_SEED)


def samples(value: int, flag: str = "--samples") -> int:
    """A sample count: at least 1 and at most kvtool.data.MAX_SAMPLES (samples stream; merge shards beyond)."""
    from kvtool.data import MAX_SAMPLES

    if value < 1:
        raise KvtoolError(f"zero samples: {flag} must be at least 1 (got {value})")
    if value > MAX_SAMPLES:
        raise KvtoolError(f"{flag} {value} is more than one run takes (at most {MAX_SAMPLES}); trace shards of the "
                          "data and combine them with `kvtool merge`")
    return value


def model_context(model: str | None) -> int | None:
    """The model's maximum positions from its config, without loading weights; None when only a load can tell."""
    try:
        from transformers import AutoConfig

        from kvtool import models

        if model is None or str(model).endswith(".gguf"):
            gguf = models.embedded_gguf_path() if model is None else Path(model)
            if not gguf.is_file():
                return None
            where = models.cache_entry(gguf)                                       # the converted copy
            if not (where / "config.json").is_file():
                return None
        else:
            where = model
        cfg = AutoConfig.from_pretrained(where, local_files_only=True)
        limit = getattr(cfg.get_text_config(), "max_position_embeddings", None)
        return int(limit) if limit else None
    except Exception:           # unknown here: the load reports a bad model, and the lengths are checked after it
        return None


def context(limit: int | None, tokens: int, what: str) -> None:
    """Refuse `tokens` positions beyond the model's context `limit` (None: unknown, nothing to check)."""
    if limit is not None and tokens > limit:
        raise KvtoolError(f"{what} is beyond the model's context of {limit} tokens")


def profile_tensors(path: str | os.PathLike) -> set[str]:
    """The tensor names of a --profile (checked by profile_file first), from its header alone."""
    from safetensors import safe_open

    path = profile_file(path)
    with safe_open(str(path), framework="pt") as fh:
        return set(fh.keys())


def profile_file(path: str | os.PathLike) -> Path:
    """Refuse a --profile that is missing, not a file, or not a kvtool profile, from its header alone."""
    from kvtool.profile import read_file

    read_file(Path(path))
    return Path(path)


def device(value: str, flag: str = "--device") -> str:
    """cpu, cuda or cuda:N, and a GPU only where torch sees one."""
    if value not in ("cpu", "cuda") and not (value.startswith("cuda:") and value[5:].isdigit()):
        raise KvtoolError(f"{flag} {value!r}: give cpu or cuda")
    if value != "cpu":
        import torch

        if not torch.cuda.is_available():
            raise KvtoolError(f"{flag} {value}: torch sees no CUDA GPU here")
    return value


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def device_map(value: str | None, device: str = "cpu", max_memory: str | None = None):
    """`--device-map`: one of accelerate's strategies, or a .json file {module name: device} (device: a GPU index,
    "cuda:N", "cpu" or "disk"); refused with `--device` other than cpu (the map places the model). Under torchrun
    each rank places its copy of the model on its own share of the GPUs (kvtool.distributed.rank_placement).
    Returns (device_map, max_memory) for load_model."""
    if value is None:
        if max_memory is not None:
            raise KvtoolError("--max-memory applies with --device-map only")
        return None, None
    if device != "cpu":
        raise KvtoolError(f"give --device-map or --device {device}, not both (the map places every layer)")
    if value in DEVICE_MAPS:
        placed = value
    else:
        import json

        path = Path(value)
        if path.suffix != ".json" or not path.is_file():
            raise KvtoolError(f"--device-map {value!r}: give {', '.join(DEVICE_MAPS)} or an existing .json file "
                              "{module: device}")
        try:
            placed = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise KvtoolError(f"--device-map {value}: not a readable JSON file ({exc})") from None
        ok = isinstance(placed, dict) and placed and all(
            isinstance(k, str) and (isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                    or v in ("cpu", "disk") or isinstance(v, str) and v.startswith("cuda:"))
            for k, v in placed.items())
        if not ok:
            raise KvtoolError(f"--device-map {value}: expected an object {{module name: GPU index, \"cuda:N\", "
                              "\"cpu\" or \"disk\"}")
    return placed, memory_caps(max_memory)


def memory_caps(text: str | None) -> dict | None:
    """`--max-memory 0=20GiB,1=20GiB,cpu=64GiB` -> {0: "20GiB", 1: "20GiB", "cpu": "64GiB"} (accelerate's max_memory)."""
    if text is None:
        return None
    import re

    caps = {}
    for part in text.split(","):
        key, sep, size = part.strip().partition("=")
        if not sep or not re.fullmatch(r"\d+(\.\d+)?\s*[KMGT]i?B", size.strip(), re.IGNORECASE) or \
                not (key.isdigit() or key == "cpu"):
            raise KvtoolError(f"--max-memory {text!r}: give DEVICE=SIZE pairs such as 0=20GiB,cpu=64GiB "
                              "(DEVICE: a GPU index or cpu; SIZE with a unit: KB, MB, GB, KiB, MiB, GiB)")
        caps[int(key) if key.isdigit() else key] = size.strip()
    return caps
