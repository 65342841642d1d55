"""`kvtool export`: a profile's calibration in the files other engines read.

- `vllm`: FP8 (e4m3) KV-cache scales as a compressed-tensors checkpoint holds them: one `k_scale` and one `v_scale`
  per attention layer (`model.layers.{i}.self_attn.k_scale`), shape [1] (strategy `tensor`) or [H_kv] (strategy
  `attn_head`), scale = max |x| / 448 over the calibrated post-RoPE keys (`channels.key_post.absmax`) and values
  (`channels.value.absmax`), so x / scale fills e4m3's range; and the `quantization_config` entry with its
  `kv_cache_scheme` that goes into the checkpoint's config.json.
- `duo`: DuoAttention's head pattern directory: `full_attention_heads.tsv` (one line per layer, one tab-separated
  column per KV head: the method's score in [0, 1], e.g. DuoAttention's gates, or its 0/1 mask) and `config.json`
  (`sink_size`, `recent_size`), the layout DuoAttention's `load_attn_pattern` and kvpress's DuoAttentionPress read.

Everything is computed and checked before anything is written; the files of one export appear together or not at all
(kvtool.fileio.atomic_write_files).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kvtool import __version__, sections
from kvtool.errors import KvtoolError

FORMATS = ("vllm", "duo")
FP8_E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)          # 448
VLLM_PREFIX = "model.layers.{layer}.self_attn"                       # Llama, Qwen2/3, Mistral, Gemma ... in vLLM
VLLM_SCALES = "kv_scales.safetensors"
VLLM_CONFIG = "kv_cache_scheme.json"
DUO_HEADS = "full_attention_heads.tsv"
DUO_CONFIG = "config.json"


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise KvtoolError(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    return fmt


def _provenance(profile) -> dict:
    return {"kvtool_version": __version__, "model": profile.model.get("name"),
            "fingerprint": profile.model.get("fingerprint"), "samples": profile.calibration.get("samples")}


# -- vLLM ---------------------------------------------------------------------------------------------------------------

def vllm_scales(profile, per_head: bool = False, prefix: str = VLLM_PREFIX) -> dict[str, torch.Tensor]:
    """{`<prefix>.k_scale`: [1] or [H_kv], `<prefix>.v_scale`: ...} per layer, float32: max |x| / 448 over the
    calibration data (per layer, or per layer and KV head). A head that was never non-zero gets scale 1."""
    if "{layer}" not in prefix:
        raise KvtoolError(f"--prefix must contain {{layer}} (got {prefix!r})")
    out = {}
    for kind, name in (("key_post", "k_scale"), ("value", "v_scale")):
        key = sections.channels(kind, "absmax")
        if key not in profile:
            raise KvtoolError(f"the profile has no {key} (the calibrated {kind} ranges): make it with "
                              "`kvtool profile`")
        absmax = profile[key].float().amax(-1)                                  # [L, H_kv, D] -> [L, H_kv]
        if not per_head:
            absmax = absmax.amax(-1, keepdim=True)                              # [L, 1]
        scale = torch.where(absmax > 0, absmax / FP8_E4M3_MAX, torch.ones_like(absmax))
        for layer in range(scale.shape[0]):
            out[f"{prefix.format(layer=layer)}.{name}"] = scale[layer].clone().contiguous()
    return out


def vllm_config(per_head: bool = False) -> dict:
    """The `quantization_config` of a compressed-tensors checkpoint whose only quantization is a static FP8 KV
    cache (merge `kv_cache_scheme` into an existing compressed-tensors quantization_config instead)."""
    return {"quantization_config": {
        "quant_method": "compressed-tensors",
        "format": "dense",
        "quantization_status": "frozen",
        "config_groups": {},
        "ignore": [],
        "kv_cache_scheme": {"num_bits": 8, "type": "float", "strategy": "attn_head" if per_head else "tensor",
                            "dynamic": False, "symmetric": True},
    }}


def vllm_files(profile, per_head: bool = False, prefix: str = VLLM_PREFIX) -> dict[str, bytes]:
    from safetensors.torch import save

    scales = vllm_scales(profile, per_head, prefix)
    meta = {"format": "pt", "kvtool.export": json.dumps({"format": "vllm", "per_head": per_head,
                                                          "fp8": "e4m3", **_provenance(profile)})}
    return {VLLM_SCALES: save(scales, metadata=meta),
            VLLM_CONFIG: (json.dumps(vllm_config(per_head), indent=2) + "\n").encode()}


# -- DuoAttention / kvpress ---------------------------------------------------------------------------------------------

def head_methods(profile) -> list[str]:
    """Head methods whose score the profile holds (`heads.<method>.score`), plus `retrieval` for a traced profile
    (its copy score)."""
    names = sorted({k.split(".")[1] for k in profile.tensors if k.startswith("heads.") and k.endswith(".score")
                    and k.count(".") == 2})
    if "retrieval" not in names and sections.resolve(profile, sections.heads_score("retrieval")):
        names.append("retrieval")
    return names


def duo_pattern(profile, method: str | None = None, binary: bool = False, sink: int | None = None,
                recent: int | None = None) -> tuple[torch.Tensor, dict]:
    """(values [L, H_kv] float32 in [0, 1], config {sink_size, recent_size, ...}) for DuoAttention's files.

    `method` defaults to duo when the profile holds it, else the profile's default policy's head method. Values are
    the method's continuous score (duo: its gates), or with `binary` its 0/1 mask (recomputed from the score at the
    policy's fraction when the method wrote no mask). Windows: the method's deployment sink/recent (duo: `deploy`),
    else the profile's default policy's; `sink` / `recent` override them."""
    from kvtool.policy import Policy

    have = head_methods(profile)
    policy = Policy.from_profile(profile.policy)
    if method is None:
        method = "duo" if "duo" in have else policy.heads if policy.heads in have else None
        if method is None:
            raise KvtoolError("the profile holds no head scores (heads.<method>.score): run `kvtool calibrate "
                              "--method duo|razor|retrieval` first" if not have else
                              f"choose the head method to export with --heads ({', '.join(have)})")
    if method not in have:
        raise KvtoolError(f"the profile has no heads.{method}.score"
                          f"{' (it holds ' + ', '.join(have) + ')' if have else ''}: run `kvtool calibrate "
                          f"--method {method}` on it first")
    score = profile[sections.resolve(profile, sections.heads_score(method))].float()          # [L, H_kv]
    if binary:
        mask_key = sections.heads_mask(method)
        if mask_key in profile:
            values = profile[mask_key].float()
        else:
            from kvtool.select import top_fraction

            values = top_fraction(score, policy.fraction if policy.heads == method and policy.fraction is not None
                                  else 0.5).float()
    else:
        if score.min() < 0 or score.max() > 1:
            raise KvtoolError(f"heads.{method}.score lies in [{score.min():.3g}, {score.max():.3g}], outside the "
                              "[0, 1] DuoAttention clips to: export its 0/1 mask with --binary")
        values = score
    windows = ((profile.calibration.get("methods") or {}).get(method) or {}).get("windows") or {}
    windows = windows.get("deploy", windows)
    sink = sink if sink is not None else windows.get("sink", policy.sink)
    recent = recent if recent is not None else windows.get("recent", policy.recent)
    for flag, v in (("--sink", sink), ("--recent", recent)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise KvtoolError(f"{flag} must be a whole number of tokens, at least 0 (got {v!r})")
    config = {"sink_size": sink, "recent_size": recent,
              "kvtool": {"heads": method, "values": "mask" if binary else "score", **_provenance(profile)}}
    return values.contiguous(), config


def duo_files(profile, method: str | None = None, binary: bool = False, sink: int | None = None,
              recent: int | None = None) -> dict[str, bytes]:
    values, config = duo_pattern(profile, method, binary, sink, recent)
    rows = ["\t".join(f"{v:.10f}" for v in row.tolist()) for row in values]       # one line per layer
    return {DUO_HEADS: ("\n".join(rows) + "\n").encode(),
            DUO_CONFIG: (json.dumps(config, indent=2) + "\n").encode()}


# -- both ---------------------------------------------------------------------------------------------------------------

def export(profile, fmt: str, output: str | Path, *, per_head: bool = False, prefix: str = VLLM_PREFIX,
           method: str | None = None, binary: bool = False, sink: int | None = None,
           recent: int | None = None) -> list[Path]:
    """Write `profile` (a kvtool.profile.Profile) in format `fmt` into directory `output` (made if absent); return
    the paths written. Options of the other format are refused rather than ignored."""
    from kvtool.fileio import atomic_write_files

    check_format(fmt)
    if fmt == "vllm":
        if method is not None or binary or sink is not None or recent is not None:
            raise KvtoolError("--heads, --binary, --sink and --recent apply to --format duo only")
        files = vllm_files(profile, per_head, prefix)
    else:
        if per_head or prefix != VLLM_PREFIX:
            raise KvtoolError("--per-head and --prefix apply to --format vllm only")
        files = duo_files(profile, method, binary, sink, recent)
    return atomic_write_files(output, files)
