"""The `.kv.st` profile: a safetensors file of tensors named by section plus `kvtool.*` JSON metadata.

Format (docs/profile-format.md): tensors `heads.*` [L, H_kv, ...], `layers.*` [L-1 or L, ...], `channels.*`,
`pca.*` [L, H_kv, D, ...], `quant.*` [L, H_kv, ...], raw mergeable statistics `stats.*`; metadata keys
`kvtool.format_version`, `kvtool.model`, `kvtool.calibration`, `kvtool.policy` (JSON strings). Writes are atomic;
loading validates shapes and metadata and refuses a profile made for another model.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvtool.errors import KvtoolError
from kvtool.fileio import atomic_write, first_line, write_bytes

FORMAT_VERSION = "1"
_VOLATILE = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "_attn_implementation",
             "_attn_implementation_internal", "_attn_implementation_autoset", "quantization_config", "use_cache",
             "_commit_hash", "output_attentions", "output_hidden_states", "return_dict"}
_SAMPLE = 65536


def _text_config(model):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def model_fingerprint(model) -> str:
    """sha256 over the config (minus volatile keys) and the weights.

    Weights: every tensor of `model.state_dict()` sorted by name contributes its name, shape and an evenly strided
    sample of at most 65536 elements cast to float32 — cheap for an 8B model, and any real change of weights (a
    fine-tune, another checkpoint) changes it. The same weights loaded in another dtype give another fingerprint
    only if the values round differently.
    """
    h = hashlib.sha256()
    cfg = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE}
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        if t.device.type == "meta":          # offloaded by accelerate (device_map): read it from its weights map
            t = _offloaded_weight(model, name)
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // _SAMPLE)
        sample = flat[::step][:_SAMPLE].to("cpu", torch.float32).contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()


def _offloaded_weight(model, name: str) -> torch.Tensor:
    """A weight accelerate keeps on the meta device (offloaded to disk or CPU): one tensor, from the weights map of
    the hook of the module that holds it."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    hook = getattr(module, "_hf_hook", None)
    weights = getattr(hook, "weights_map", None)
    if weights is None:
        raise KvtoolError(f"weight {name} is on the meta device and no accelerate hook holds it; load the model "
                          "without --device-map or with more memory")
    return weights[leaf]


def model_meta(model, name: str | None = None) -> dict:
    """The `kvtool.model` record: architecture, shapes, rope, context, layer types and the fingerprint."""
    cfg = _text_config(model)
    heads = cfg.num_attention_heads
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None)
    if rope is None and getattr(cfg, "rope_theta", None) is not None:
        rope = {"rope_theta": cfg.rope_theta}
    return {
        "architecture": (getattr(model.config, "architectures", None) or [type(model).__name__])[0],
        "model_type": getattr(cfg, "model_type", None),
        "num_layers": cfg.num_hidden_layers,
        "num_attention_heads": heads,
        "num_kv_heads": getattr(cfg, "num_key_value_heads", None) or heads,
        "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
        "rope": json.loads(json.dumps(rope, default=str)) if rope is not None else None,
        "max_position_embeddings": getattr(cfg, "max_position_embeddings", None),
        "layer_types": list(getattr(cfg, "layer_types", None) or []) or None,
        "name": name,
        "fingerprint": model_fingerprint(model),
    }


def _count(record: dict, key: str) -> int:
    v = record[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(key)
    return v


def _exact_shape(name: str, L: int, H: int, D: int, levels) -> tuple | None:
    """The full shape of a tensor kvtool writes, where it is fixed by the model record; None for others."""
    parts = name.split(".")
    if parts[0] == "heads" and len(parts) == 2 and parts[1] in _HEAD_STATS:
        return (L, H)
    if parts[0] == "heads" and len(parts) == 3 and parts[2] in ("score", "mask", "gate", "echo", "induction", "pull"):
        return (L, H)
    if parts[0] == "layers" and name == "layers.similarity":
        return (L - 1, H)
    if parts[0] == "channels" and len(parts) == 3:
        if parts[2] in ("min", "max", "absmax"):
            return (L, H, D)
        if parts[2] == "quantiles" and isinstance(levels, list):
            return (L, H, D, len(levels))
    if parts[0] == "pca" and len(parts) == 3:
        return {"mean": (L, H, D), "eigvals": (L, H, D), "basis": (L, H, D, D)}.get(parts[2])
    if parts[0] == "quant" and len(parts) == 3 and parts[2].startswith("levels") and parts[2][6:].isdigit():
        bits = int(parts[2][6:])
        return (L, H, 2 ** bits) if 1 <= bits <= 16 else (L, H, -1)
    return None


_HEAD_STATS = ("sink_mass", "recent_mass", "streaming_mass", "entropy", "retrieval_score")
_MAX_DEPTH = 8            # JSON nesting allowed in a metadata record (kvtool writes at most 4 levels)
_OPTIONAL = object()


def _depth(value, limit: int) -> int:
    """Nesting depth of a JSON value, stopping as soon as it exceeds `limit`."""
    if limit < 0:
        return 1
    if isinstance(value, dict):
        return 1 + max((_depth(v, limit - 1) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v, limit - 1) for v in value), default=0)
    return 0


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# Known fields of each metadata record: (check, what it must be). None is allowed where the writer can store None.
_POS_INT = (lambda v: _is_int(v) and v >= 1, "a positive integer")
_STR_OR_NULL = (lambda v: v is None or isinstance(v, str), "a string or null")
_MODEL_FIELDS = {
    "architecture": _STR_OR_NULL,
    "model_type": _STR_OR_NULL,
    "num_layers": _POS_INT,
    "num_attention_heads": _POS_INT,
    "num_kv_heads": _POS_INT,
    "head_dim": _POS_INT,
    "rope": (lambda v: v is None or isinstance(v, dict), "an object or null"),
    "max_position_embeddings": (lambda v: v is None or (_is_int(v) and v >= 1), "a positive integer or null"),
    "layer_types": (lambda v: v is None or (isinstance(v, list) and all(isinstance(x, str) for x in v)),
                    "a list of strings or null"),
    "name": _STR_OR_NULL,
    "fingerprint": (lambda v: isinstance(v, str), "a string"),
}
_CALIBRATION_FIELDS = {
    "data": (lambda v: isinstance(v, dict), "an object"),
    "samples": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "lengths": (lambda v: isinstance(v, list) and all(_is_int(x) and x >= 0 for x in v), "a list of integers >= 0"),
    "seed": (lambda v: v is None or _is_int(v), "an integer or null"),
    "methods": (lambda v: isinstance(v, dict) and all(isinstance(x, dict) for x in v.values()),
                "an object of objects"),
    "created": (lambda v: isinstance(v, str), "a string"),
    "kvtool_version": (lambda v: isinstance(v, str), "a string"),
    "trace_seconds": (_is_number, "a number"),
    "merged_from": (lambda v: _is_int(v) and v >= 2, "an integer >= 2"),
}
_TRACE_FIELDS = {
    "sink": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "recent": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "quantile_levels": (lambda v: isinstance(v, list) and all(_is_number(x) and 0 <= x <= 1 for x in v),
                        "a list of numbers in [0, 1]"),
}


def check_metadata(model: dict, calibration: dict, policy: dict, where: str = "profile") -> None:
    """Schema check of the three metadata records: JSON objects, at most 8 levels deep, known fields of the right
    type (unknown fields are kept: forward compatible). A bad profile fails here, with one line, not at run time."""
    for key, record in (("model", model), ("calibration", calibration), ("policy", policy)):
        if not isinstance(record, dict):
            raise KvtoolError(f"{where}: kvtool.{key} metadata must be a JSON object")
        if _depth(record, _MAX_DEPTH) > _MAX_DEPTH:
            raise KvtoolError(f"{where}: kvtool.{key} metadata is nested more than {_MAX_DEPTH} levels deep")
    for key, record, rules in (("model", model, _MODEL_FIELDS), ("calibration", calibration, _CALIBRATION_FIELDS),
                               ("calibration.methods.trace", (calibration.get("methods") or {}).get("trace") or {},
                                _TRACE_FIELDS)):
        for fld, (ok, what) in rules.items():
            if fld in record and not ok(record[fld]):
                got = json.dumps(record[fld])
                got = got if len(got) <= 40 else got[:37] + "..."
                raise KvtoolError(f"{where}: kvtool.{key}.{fld} must be {what} (got {got})")
    for fld, value in policy.items():
        if not (value is None or isinstance(value, (str, bool)) or _is_number(value)):
            raise KvtoolError(f"{where}: kvtool.policy.{fld} must be a string or a number")


@dataclass
class Profile:
    tensors: dict[str, torch.Tensor]
    model: dict
    calibration: dict
    policy: dict = field(default_factory=dict)
    format_version: str = FORMAT_VERSION

    # -- access ------------------------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        key = _alias(self.tensors, name)
        if key is None:
            raise KvtoolError(f"profile has no tensor {name!r}")
        return self.tensors[key]

    def __contains__(self, name: str) -> bool:
        return _alias(self.tensors, name) is not None

    def section(self, prefix: str) -> dict[str, torch.Tensor]:
        """Tensors under `prefix.` with the prefix stripped."""
        p = prefix.rstrip(".") + "."
        return {k[len(p):]: v for k, v in self.tensors.items() if k.startswith(p)}

    def rows_fingerprint(self) -> dict:
        """What in a profile decides a benchmark row (`kvtool bench --rows`): a sha256 over its tensors (name, dtype,
        shape, bytes, in name order) and the method a bare `heads=<fraction>` resolves to. The rest of the metadata
        (the default policy string, calibration notes) does not change a row of an explicit policy, so setting a
        profile's default with `kvtool policy` keeps its rows."""
        from kvtool.policy import Policy

        digest = hashlib.sha256()
        for name in sorted(self.tensors):
            t = self.tensors[name].detach().cpu().contiguous()
            digest.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
            digest.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        try:
            method = Policy.from_profile(self.policy).heads
        except KvtoolError:      # no usable default policy: a bare heads=<f> is refused anyway
            method = None
        return {"profile_tensors_sha256": digest.hexdigest(), "profile_method": method}

    # -- validation --------------------------------------------------------------------------------------------
    def validate(self, where: str = "profile") -> None:
        """Shapes against the model record (leading axes per section; exact shapes for every tensor kvtool writes,
        the quantile count against `methods.trace.quantile_levels`); no NaN/inf outside `stats.`, no NaN in it."""
        m = self.model
        try:
            L, H, D = (_count(m, "num_layers"), _count(m, "num_kv_heads"), _count(m, "head_dim"))
        except (KeyError, TypeError, ValueError):
            raise KvtoolError(f"{where}: kvtool.model lacks num_layers / num_kv_heads / head_dim "
                              "(positive integers)") from None
        trace = (self.calibration.get("methods") or {}).get("trace") or {}
        levels = trace.get("quantile_levels")
        for name, t in self.tensors.items():
            if not isinstance(t, torch.Tensor):
                raise KvtoolError(f"{where}: {name} is not a tensor")
            shape, section = tuple(t.shape), name.split(".", 1)[0]
            expect = {"heads": (L, H), "channels": (L, H, D), "pca": (L, H, D), "quant": (L, H)}.get(section)
            if expect is not None and shape[: len(expect)] != expect:
                raise KvtoolError(f"{where}: {name} has shape {list(shape)}, expected it to start with {list(expect)}")
            exact = _exact_shape(name, L, H, D, levels)
            if exact is not None and shape != exact:
                raise KvtoolError(f"{where}: {name} has shape {list(shape)}, expected {list(exact)}")
            if section == "layers" and (not shape or shape[0] not in (L, L - 1)):
                raise KvtoolError(f"{where}: {name} has shape {list(shape)}, expected it to start with {L - 1} or {L}")
            if t.is_floating_point():
                if section != "stats" and not torch.isfinite(t).all():
                    raise KvtoolError(f"{where}: {name} contains NaN or inf")
                if section == "stats" and torch.isnan(t).any():
                    raise KvtoolError(f"{where}: {name} contains NaN")

    def check_model(self, model) -> None:
        """Refuse a profile made for another model (shape mismatch, or same shape but other weights), in one line
        that names both models (name, architecture) and, for a shape mismatch, both shapes."""
        other = model_meta(model, name=getattr(model, "kvtool_name", None))
        keys = ("num_layers", "num_attention_heads", "num_kv_heads", "head_dim")
        wrong = [k for k in keys if self.model.get(k) != other[k]]
        if wrong:
            raise KvtoolError(
                f"profile was made for another model: {_model_words(self.model, True)}, not "
                f"{_model_words(other, True)} ({wrong[0]} differs)"
            )
        if self.model.get("fingerprint") != other["fingerprint"]:
            raise KvtoolError(
                f"profile was made for a different model (fingerprint {str(self.model.get('fingerprint'))[:12]} "
                f"!= {other['fingerprint'][:12]}): same shapes, other weights ({_model_words(self.model)} vs "
                f"{_model_words(other)})"
            )

    # -- files -------------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically: temporary file in the same directory, fsync, rename. Nothing is left on failure."""
        from safetensors.torch import save

        path = Path(path)
        self.validate(str(path))
        check_metadata(self.model, self.calibration, self.policy, str(path))
        tensors, seen = {}, set()
        for k, v in self.tensors.items():
            v = v.detach().to("cpu").contiguous()
            ptr = v.untyped_storage().data_ptr()
            tensors[k] = v.clone() if ptr in seen else v          # safetensors refuses tensors sharing storage
            seen.add(ptr)
        meta = {"kvtool.format_version": self.format_version, "kvtool.model": json.dumps(self.model),
                "kvtool.calibration": json.dumps(self.calibration), "kvtool.policy": json.dumps(self.policy)}
        # serialised in memory and written by atomic_write itself: safetensors' save_file would add its own
        # `.tmpXXXX` file beside the target, which a killed process leaves behind
        return atomic_write(path, lambda tmp: write_bytes(save(tensors, metadata=meta))(tmp))

    @classmethod
    def load(cls, path: str | os.PathLike, model=None) -> "Profile":
        """Read and validate a profile; with `model`, also refuse a profile made for another model."""
        path = Path(path)
        meta, tensors = read_file(path, tensors=True)
        version = meta["kvtool.format_version"]
        if version.split(".")[0] != FORMAT_VERSION:
            raise KvtoolError(f"{path}: format version {version} is not supported by this kvtool (supports {FORMAT_VERSION})")
        parsed = {}
        for key, required in (("model", True), ("calibration", True), ("policy", False)):
            raw = meta.get(f"kvtool.{key}")
            if raw is None and required:
                raise KvtoolError(f"{path}: kvtool.{key} metadata is missing")
            try:
                parsed[key] = json.loads(raw) if raw is not None else {}
            except (json.JSONDecodeError, RecursionError):
                raise KvtoolError(f"{path}: kvtool.{key} metadata is not valid JSON (or nested too deeply)") from None
            if not isinstance(parsed[key], dict):
                raise KvtoolError(f"{path}: kvtool.{key} metadata must be a JSON object")
        check_metadata(parsed["model"], parsed["calibration"], parsed["policy"], str(path))
        profile = cls(tensors, parsed["model"], parsed["calibration"], parsed["policy"], version)
        profile.validate(str(path))
        if model is not None:
            profile.check_model(model)
        return profile


def _model_words(record: dict, shape: bool = False) -> str:
    """A `kvtool.model` record in words: "<name> (<architecture>[: <shape>])"; the architecture first without a
    name."""
    arch = record.get("architecture") or "unknown architecture"
    inside = f"{arch}: {record.get('num_layers')} layers, {record.get('num_attention_heads')} query / " \
             f"{record.get('num_kv_heads')} KV heads of {record.get('head_dim')}" if shape else arch
    return f"{record['name']} ({inside})" if record.get("name") else f"({inside})" if shape else str(arch)


def read_file(path: Path, tensors: bool = False) -> tuple[dict, dict]:
    """The metadata (and, with `tensors`, copies of the tensors) of a kvtool profile file; one-line errors for a
    missing path, a directory, a file safetensors cannot read, or a safetensors file that is no kvtool profile.
    Without `tensors` only the header is read (cheap: `kvtool.checks.profile_file` runs it before a model loads)."""
    from safetensors import safe_open

    if not path.is_file():
        raise KvtoolError(f"profile {path} does not exist" if not path.exists() else f"profile {path} is not a file")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            # copies: safetensors maps the file, and a tensor that still pointed into it would change under a
            # running program whenever the file is rewritten in place (cp, an editor)
            held = {k: fh.get_tensor(k).clone() for k in fh.keys()} if tensors else {}
    except Exception as exc:  # safetensors raises its own error types for bad headers and short files
        raise KvtoolError(f"{path} is not a readable safetensors profile (truncated or corrupted?): "
                          f"{first_line(exc)}") from None
    if not isinstance(meta.get("kvtool.format_version"), str):
        raise KvtoolError(f"{path} is not a kvtool profile (no kvtool.format_version)")
    return meta, held


def rows_fingerprint(path: Path) -> dict:
    """`Profile.rows_fingerprint` of the profile file at `path`."""
    return Profile.load(path).rows_fingerprint()


def _alias(tensors: dict, name: str) -> str | None:
    """`name`, or the other name of a renamed section (kvtool.sections.LEGACY: old profiles answer to the new name
    and new profiles to the old one), whichever the profile holds."""
    if name in tensors:
        return name
    from kvtool.sections import LEGACY

    other = LEGACY.get(name) or next((old for old, new in LEGACY.items() if new == name), None)
    return other if other is not None and other in tensors else None
