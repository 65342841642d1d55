"""Layer groups that share distant tokens' keys (PoD, Ma et al., "Compressing KV Cache for Long-Context LLM Inference
with Inter-Layer Attention Similarity", arXiv 2412.02252; related: MiniCache, Liu et al., arXiv 2405.14366).

PoD keeps proximal tokens (sink + recent) per layer and, within a group of consecutive layers whose attention is
similar, stores distant tokens' keys once (the group's first layer's) — values stay per layer; the two partial
softmaxes merge by log-sum-exp (kvtool.stores.base.merge). Groups come greedily from the profile's traced
`layers.similarity` [L-1, H] (1 − JS/ln 2 between adjacent layers' attention rows of the last `window` queries of each
calibration sample, in [0, 1]): layer l joins layer l−1's group while the similarity is ≥ `threshold` (default 0.5,
PoD's value) and the group has fewer than `max_group` layers. Per layer (`per="layer"`, default) a layer's similarity
is the minimum over its KV heads — keys of a whole layer are shared only if every KV head agrees; `per="head"`
groups every KV head on its own. Sliding-window layers (kvtool.windows.layer_types) never join a group; explicit
`groups` (e.g. "3-8,23-28") replace the similarity, and one spanning a sliding-window layer is refused.
Caveat: the trace compares whole attention rows; PoD compares attention over distant tokens, which the trace does
not separate, so on a profile traced with a large sink share the similarity reads high.

PoD then post-trains the model (~5B tokens) to work with the shared keys. We do not train. Instead, training-free:
per layer and KV head a least-squares map W [D, D] (ridge λ = `ridge` · trace(XᵀX) / D) with
leader_keys @ W ≈ own_keys, fitted on pre-RoPE keys of `samples` × `seq_len` calibration tokens. Pre-RoPE because
RoPE is the same rotation for both layers at one position, so own_post ≈ RoPE(leader_pre @ W): the runtime keeps the
leader's keys pre-RoPE, maps, then rotates; a post-RoPE map would have to commute with every rotation. The relative
fit error ‖Y − XW‖² / ‖Y‖² and the error of sharing the keys unchanged (W = I, plain PoD) are both written.

Writes `layers.pod.group` and `layers.pod.leader` int64 [L, H] (group number in layer order; the layer whose keys
are shared, = the layer itself for a leader; equal across H with per="layer"), `layers.pod.map` float32
[L, H, D, D] (identity for leaders), `layers.pod.fit_error` and `layers.pod.share_error` float32 [L, H] (0 for
leaders), and `layers.pod.heldout_error` [L, H]: the map's error on `heldout` further samples it was not fitted on
(the in-sample fit error flatters a D×D map fitted on a few thousand tokens). The threshold, rule and groups go to
kvtool.calibration.methods.pod.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from calibrate import Result, register
from kvtool.errors import KvtoolError
from kvtool.sharing import (SECTION, check_threshold, fit_maps, group_ids, group_layers, map_error, parse_groups,
                            sliding_layers, spans)
from kvtool.trace import Dims, attention_modules, observing
from kvtool.windows import layer_types


@register("pod")
@dataclass
class PoD:
    threshold: float = 0.5         # adjacent-layer similarity (1 - JS/ln 2) a layer needs to join the group above
    per: str = "layer"             # "layer": min over KV heads; "head": every KV head grouped on its own
    max_group: int | None = None   # most layers per group (None: no limit)
    groups: str | None = None      # explicit groups "first-last,..." instead of the similarity
    ridge: float = 1e-3            # ridge of the key maps, relative to the mean eigenvalue of the leader's keys
    samples: int = 4               # calibration samples for the key maps
    heldout: int = 1               # further samples, not fitted on, for `heldout_error` (0: none)
    seq_len: int = 1024            # tokens per sample
    data: str | None = None        # None / "passkey" (built-in) or a .txt / .jsonl file
    seed: int = 42

    def __post_init__(self) -> None:
        self.threshold = check_threshold(self.threshold)
        if self.per not in ("layer", "head"):
            raise KvtoolError(f"--per must be layer or head (got {self.per!r})")
        if self.max_group is not None and self.max_group < 1:
            raise KvtoolError(f"--max-group must be at least 1 (got {self.max_group})")
        if self.ridge < 0:
            raise KvtoolError(f"--ridge must be at least 0 (got {self.ridge:g})")
        for name, least in (("samples", 1), ("heldout", 0), ("seq_len", 2)):
            if getattr(self, name) < least:
                raise KvtoolError(f"--{name.replace('_', '-')} must be at least {least} (got {getattr(self, name)})")

    def run(self, model, tokenizer, profile=None, fraction: float | None = None, on_progress=None) -> Result:
        from kvtool.data import describe, load_samples

        if fraction is not None:
            raise KvtoolError("--retrieval-fraction does not apply to pod (it groups layers)")
        leader = self.leaders(model, profile)                                 # [L, H]
        limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        if limit is not None and self.seq_len > limit:
            raise KvtoolError(f"--seq-len {self.seq_len} is beyond the model's context of {limit} tokens")
        if tokenizer is None:
            raise KvtoolError("pod needs the model's tokenizer to build its calibration samples")
        samples = load_samples(self.data, tokenizer, self.samples + self.heldout, self.seq_len, seed=self.seed)
        if len(samples) < self.samples + self.heldout:
            raise KvtoolError(f"--data gives {len(samples)} samples of {self.seq_len} tokens, fewer than --samples "
                              f"{self.samples} + --heldout {self.heldout}; use a longer file or fewer samples")
        samples, held = samples[: self.samples], samples[self.samples:]
        start = time.perf_counter()
        tensors = self.fit(model, samples, leader, on_progress, heldout=held)
        shared = [[list(s) for s in spans(leader[:, h]) if s[1] > s[0]] for h in range(leader.shape[1])]
        params = {"threshold": self.threshold, "per": self.per, "rule": "min over KV heads" if self.per == "layer"
                  else "per KV head", "max_group": self.max_group, "groups": shared[0] if self.per == "layer"
                  else shared, "explicit": self.groups is not None, "ridge": self.ridge, "rope": "pre",
                  "samples": len(samples), "heldout": len(held), "seq_len": self.seq_len, "seed": self.seed,
                  "data": describe(self.data),
                  "fit_seconds": round(time.perf_counter() - start, 2)}
        return Result("pod", tensors, params, section=SECTION)

    @staticmethod
    def summary(profile) -> dict:
        """What `kvtool calibrate` prints: threshold, the shared groups, mean key-map errors over non-leaders."""
        rec = profile.calibration["methods"]["pod"]
        leader = profile[f"{SECTION}.leader"]
        member = leader != torch.arange(leader.shape[0])[:, None]                   # [L, H]
        mean = lambda name: round(profile[f"{SECTION}.{name}"][member].mean().item(), 4) if member.any() else None  # noqa: E731
        out = {"method": "pod", "threshold": rec["threshold"], "per": rec["per"], "groups": rec["groups"],
               "layers sharing": int(member[:, 0].sum()) if rec["per"] == "layer" else int(member.sum()),
               "fit error": mean("fit_error"), "error keys as is": mean("share_error"), "seconds": rec["seconds"]}
        if f"{SECTION}.heldout_error" in profile:
            out["held-out error"] = mean("heldout_error")
        return out

    def leaders(self, model, profile) -> torch.Tensor:
        """Refuse bad input before any work; the leader layer of every (layer, KV head): [L, H] int64."""
        attention_modules(model)
        dims = Dims.of(model)
        excluded = sliding_layers(layer_types(model.config.get_text_config()))
        if self.groups is not None:
            if self.per != "layer":
                raise KvtoolError("--groups are whole layers; leave --per at layer")
            leader = parse_groups(self.groups, dims.layers, excluded)
        else:
            if profile is None:
                raise KvtoolError("pod needs a profile's layers.similarity: give --profile (made by `kvtool profile`)"
                                  " or explicit --groups")
            if "layers.similarity" not in profile:
                raise KvtoolError("profile has no layers.similarity (traced with one layer?); re-run `kvtool "
                                  "profile` or give explicit --groups")
            sim = profile["layers.similarity"].float()                        # [L-1, H]
            if sim.shape != (dims.layers - 1, dims.kv_heads):
                raise KvtoolError(f"layers.similarity has shape {list(sim.shape)}, not the model's "
                                  f"[{dims.layers - 1}, {dims.kv_heads}]")
            sim = sim.amin(-1) if self.per == "layer" else sim
            leader = group_layers(sim, self.threshold, self.max_group, excluded)
        if leader.dim() == 1:
            leader = leader[:, None].expand(dims.layers, dims.kv_heads)
        return leader.contiguous()

    def fit(self, model, samples, leader: torch.Tensor, on_progress=None, heldout=()) -> dict[str, torch.Tensor]:
        """Key maps from pre-RoPE keys of `samples` (errors also on `heldout` samples, when given); the section's
        tensors (names without `layers.pod.`)."""
        if not samples:
            raise KvtoolError("zero samples: no calibration data for pod")
        dims = Dims.of(model)
        fitted = self._moments(model, samples, leader, on_progress, 0)
        w, fit_err, share_err = fit_maps(fitted.xtx, fitted.xty, fitted.yty, self.ridge)   # [L, H, D, D], [L, H] ×2
        is_leader = leader == torch.arange(dims.layers)[:, None]                     # [L, H]
        eye = torch.eye(dims.head_dim).expand_as(w)
        w = torch.where(is_leader[..., None, None], eye, w).contiguous()
        zero = torch.zeros(())
        out = {"group": group_ids(leader), "leader": leader.clone(), "map": w,
               "fit_error": torch.where(is_leader, zero, fit_err), "share_error": torch.where(is_leader, zero, share_err)}
        if heldout:
            held = self._moments(model, heldout, leader, on_progress, len(samples))
            out["heldout_error"] = torch.where(is_leader, zero, map_error(w, held.xtx, held.xty, held.yty))
        return out

    @staticmethod
    def _moments(model, samples, leader, on_progress, done: int) -> "_CrossMoments":
        obs = _CrossMoments(Dims.of(model), leader)
        from kvtool.models import input_device

        device = input_device(model)
        with observing(model, obs, obs.observe_pre_rope_key), torch.inference_mode():
            for i, sample in enumerate(samples):
                obs.keys = {}
                model.get_decoder()(input_ids=sample.input_ids.view(1, -1).to(device), use_cache=False)
                if on_progress is not None:
                    on_progress(done + i + 1, f"sample {done + i + 1}")
        return obs


class _CrossMoments:
    """Pre-RoPE key hook: per (layer, KV head), float64 sums XᵀX, XᵀY, YᵀY with X the leader's keys and Y the layer's
    own, over every token of every sample (leaders come first in the forward pass, so their keys are at hand)."""

    def __init__(self, dims: Dims, leader: torch.Tensor):
        self.dims, self.leader = dims, leader
        L, H, D = dims.layers, dims.kv_heads, dims.head_dim
        f64 = torch.float64
        self.xtx, self.xty, self.yty = (torch.zeros(L, H, D, D, dtype=f64) for _ in range(3))
        self.keys: dict[int, torch.Tensor] = {}

    def observe_pre_rope_key(self, module, keys: torch.Tensor) -> None:
        layer = module.layer_idx
        k = keys.detach().float().transpose(0, 1)   # [H, T, D]
        self.keys[layer] = k
        for h in range(self.dims.kv_heads):
            src = int(self.leader[layer, h])
            if src == layer:
                continue
            x, y = self.keys[src][h].double(), k[h].double()                   # [T, D] each
            self.xtx[layer, h] += (x.T @ x).cpu()
            self.xty[layer, h] += (x.T @ y).cpu()
            self.yty[layer, h] += (y.T @ y).cpu()

    def observe_attention(self, module, query, key, value, mask, scaling, softcap) -> None:
        if query.shape[0] != 1:
            raise KvtoolError("pod runs one sample at a time (batch size 1)")


# -- contract (calibrate.contract): options, sections, summary --------------------------------------------------------
from calibrate import contract as C  # noqa: E402


def _text(s: dict) -> str:
    groups = ", ".join(f"{a}-{b}" for a, b in s["groups"]) if s["per"] == "layer" else "per KV head"
    held = f", held-out {s['held-out error']}" if s.get("held-out error") is not None else ""
    return (f"pod: threshold {s['threshold']}, {s['layers sharing']} layers share keys (groups {groups or 'none'}); "
            f"key-map error {s['fit error']}{held} vs {s['error keys as is']} sharing keys as they are "
            f"({s['seconds']} s)")


PoD.contract = C.Contract(
    about="groups of consecutive layers with similar attention share distant tokens' keys, with least-squares key "
          "maps (PoD, arXiv 2412.02252)",
    options=(C.Option("threshold", "--threshold", "adjacent-layer similarity (1 - JS/ln 2, in [0, 1]) a layer needs "
                      "to join the group above"),
             C.Option("max_group", "--max-group", "most layers per group (default: no limit)"),
             C.Option("per", "--per", "'layer' (min over KV heads) or 'head' (every KV head grouped on its own)"),
             C.Option("groups", "--groups", "explicit groups such as 3-8,23-28 instead of the similarity"),
             C.Option("ridge", "--ridge", "ridge of the key maps, relative to the mean eigenvalue of the leader's "
                      "keys"),
             C.samples("calibration samples for the key maps"),
             C.Option("heldout", "--heldout", "further samples, not fitted on, for the held-out error (0: none)"),
             C.seq_len(), C.data(), C.seed("random seed of the samples")),
    sections=(C.Section(f"{SECTION}.group", "L, H"), C.Section(f"{SECTION}.leader", "L, H"),
              C.Section(f"{SECTION}.map", "L, H, D, D"), C.Section(f"{SECTION}.fit_error", "L, H"),
              C.Section(f"{SECTION}.share_error", "L, H"),
              C.Section(f"{SECTION}.heldout_error", "L, H", when="heldout")),
    reads=lambda r: ("layers.similarity",) if r.groups is None else (),
    summary=PoD.summary, text=_text, needs_profile=lambda r: r.groups is None,
    needs="layers.similarity (or give explicit --groups)",
    total=lambda r, model: r.samples + r.heldout, paper="arXiv 2412.02252")
