"""Low-rank keys and values by PCA (Palu, Chang et al., arXiv 2407.21118; Eigen Attention, Saxena et al., arXiv
2408.05646; ShadowKV, Sun et al., arXiv 2410.21465).

Per layer and KV head, the principal axes of the pre-RoPE keys and of the values: mean, eigenvalues (descending) and
eigenvectors, taken from the profile's trace (`pca.key_pre.*`, `pca.value.*`, the eigen-decomposition of the traced
first and second moments, kvtool.stats.Moments). Keys are pre-RoPE as in Palu and ShadowKV: RoPE rotates every
position differently, so a latent of rotated keys would mix positions; the runtime keeps the latent
z = (k − mean) @ basis[:, :r] and applies RoPE after reconstructing. Values are kept in the latent and projected
back once after the weighted sum (kvtool.lowrank.weighted_values, exact). The rank is chosen at load time
(`krank=32`, `krank=auto:0.99`; kvtool.lowrank.choose_rank).

What this method adds to the traced spectra is what quantizing the latent needs: one short pass over calibration
samples (`samples` × `seq_len` tokens from kvtool.data.load_samples) projects every key and value on the full basis
and records, per latent coordinate, the min / max and the (1 − clip, clip) quantiles (from at most `max_points`
random tokens per layer and KV head). Not done: Palu's low-rank factorisation of the projection weights (we
project activations), Eigen Attention's per-layer error budget, and the post-RoPE (MatryoshkaKV) variant.

Writes `lowrank.{key,value}.{mean,eigvals,lo,hi,qlo,qhi}` float32 [L, H, D] and `lowrank.{key,value}.basis`
float32 [L, H, D, D]; `key` is the trace's `key_pre`. Also `lowrank.{key,value}.power` [L, H, D]: the mean of z²
per latent coordinate on this pass — the eigenvalues as this data sees them (with `data` other than the trace's, a
held-out check of the energy a rank keeps). The basis is copied next to its latent ranges so that a
re-traced or merged profile cannot pair new axes with old ranges.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from calibrate import Result, register
from kvtool.errors import KvtoolError
from kvtool.lowrank import NAMES, SECTION, SOURCE
from kvtool.trace import Dims, attention_modules, observing


@register("pca")
@dataclass
class PCA:
    samples: int = 4               # calibration samples for the latent ranges
    seq_len: int = 1024            # tokens per sample
    data: str | None = None        # None / "passkey" (built-in) or a .txt / .jsonl file
    clip: float = 0.999            # clipped latent range: the (1 - clip, clip) quantiles per latent coordinate
    max_points: int = 8192         # latent vectors per (layer, KV head) kept for the quantiles
    seed: int = 42

    def __post_init__(self) -> None:
        if not 0.5 < self.clip <= 1.0:
            raise KvtoolError(f"--clip must be a quantile level in (0.5, 1] (got {self.clip})")
        for name, least in (("samples", 1), ("seq_len", 2), ("max_points", 2)):
            if getattr(self, name) < least:
                raise KvtoolError(f"--{name.replace('_', '-')} must be at least {least} (got {getattr(self, name)})")

    def run(self, model, tokenizer, profile=None, fraction: float | None = None, on_progress=None) -> Result:
        from kvtool.data import describe, load_samples

        if fraction is not None:
            raise KvtoolError("--retrieval-fraction does not apply to pca (it fits low-rank bases)")
        spectra = self.check(model, profile)
        limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        if limit is not None and self.seq_len > limit:
            raise KvtoolError(f"--seq-len {self.seq_len} is beyond the model's context of {limit} tokens")
        if tokenizer is None:
            raise KvtoolError("pca needs the model's tokenizer to build its calibration samples")
        samples = load_samples(self.data, tokenizer, self.samples, self.seq_len, seed=self.seed)
        start = time.perf_counter()
        tensors, kept = self.fit(model, samples, spectra, on_progress)
        params = {"clip": self.clip, "samples": len(samples), "seq_len": self.seq_len, "max_points": self.max_points,
                  "points": kept, "seed": self.seed, "data": describe(self.data),
                  "source": {n: f"pca.{SOURCE[n]}" for n in NAMES},
                  "trace_samples": profile.calibration.get("samples"),
                  "pass_seconds": round(time.perf_counter() - start, 2)}
        return Result("pca", tensors, params, section=SECTION)

    @staticmethod
    def summary(profile) -> dict:
        """What `kvtool calibrate` prints: per kind the per-layer ranks (mean, max) at 0.9 and 0.99 energy."""
        from kvtool.lowrank import LowRank, choose_rank

        rec = profile.calibration["methods"]["pca"]
        out = {"method": "pca", "samples": rec["samples"], "seq_len": rec["seq_len"], "clip": rec["clip"],
               "seconds": rec["seconds"]}
        for name in NAMES:
            ev = LowRank.from_tensors(profile.tensors, name).eigvals
            for e in ("0.9", "0.99"):
                ranks = choose_rank(ev, f"auto:{e}")[:, 0].float()
                out[f"{name} rank@{e}"] = {"mean": round(ranks.mean().item(), 1), "max": int(ranks.max())}
        return out

    def check(self, model, profile) -> dict[str, dict[str, torch.Tensor]]:
        """Refuse bad input before any work; return the traced spectra {name: {mean, eigvals, basis}}."""
        attention_modules(model)
        if profile is None:
            raise KvtoolError("pca needs a profile's traced PCA (pca.key_pre, pca.value): give --profile "
                              "(made by `kvtool profile`)")
        dims = Dims.of(model)
        out = {}
        for name in NAMES:
            src = SOURCE[name]
            missing = [f for f in ("mean", "eigvals", "basis") if f"pca.{src}.{f}" not in profile]
            if missing:
                raise KvtoolError(f"profile has no traced pca.{src} ({', '.join(missing)} missing); "
                                  "re-run `kvtool profile` to trace it")
            out[name] = {f: profile[f"pca.{src}.{f}"].float() for f in ("mean", "eigvals", "basis")}
            if out[name]["basis"].shape != (dims.layers, dims.kv_heads, dims.head_dim, dims.head_dim):
                raise KvtoolError(f"pca.{src}.basis has shape {list(out[name]['basis'].shape)}, not the model's "
                                  f"[{dims.layers}, {dims.kv_heads}, {dims.head_dim}, {dims.head_dim}]")
        return out

    def fit(self, model, samples, spectra, on_progress=None) -> tuple[dict[str, torch.Tensor], int]:
        """The section's tensors (names without the `lowrank.` prefix) and the latent points kept per head."""
        if not samples:
            raise KvtoolError("zero samples: no calibration data for pca")
        dims = Dims.of(model)
        obs = _Latents(dims, spectra, -(-self.max_points // len(samples)), torch.Generator().manual_seed(self.seed))
        from kvtool.models import input_device

        device = input_device(model)
        with observing(model, obs, obs.observe_pre_rope_key), torch.inference_mode():
            for i, sample in enumerate(samples):
                model.get_decoder()(input_ids=sample.input_ids.view(1, -1).to(device), use_cache=False)
                if on_progress is not None:
                    on_progress(i + 1, f"sample {i + 1}/{len(samples)}")
        q = torch.tensor([1.0 - self.clip, self.clip])
        tensors, kept = {}, 0
        for name in NAMES:
            for f, t in spectra[name].items():
                tensors[f"{name}.{f}"] = t.contiguous()
            tensors[f"{name}.lo"], tensors[f"{name}.hi"] = obs.lo[name], obs.hi[name]
            qlo, qhi = torch.zeros_like(obs.lo[name]), torch.zeros_like(obs.hi[name])
            for layer in range(dims.layers):
                z = torch.cat(obs.points[name][layer], 1)                       # [H, n, D]
                if z.shape[1] > self.max_points:
                    z = z[:, torch.randperm(z.shape[1], generator=obs.gen)[: self.max_points]]
                kept = z.shape[1]
                qs = torch.quantile(z, q, dim=1)                                # [2, H, D]
                qlo[layer], qhi[layer] = qs[0], qs[1]
            tensors[f"{name}.qlo"], tensors[f"{name}.qhi"] = qlo, qhi
            tensors[f"{name}.power"] = (obs.sq[name] / obs.n[name]).float()              # [L, H, D]
        return tensors, kept


class _Latents:
    """Observer for kvtool.trace.observing: latent coordinates of every pre-RoPE key and value on the full basis,
    running min / max, and `keep` random tokens per sample and layer for the quantiles."""

    def __init__(self, dims: Dims, spectra, keep: int, gen: torch.Generator):
        self.dims, self.spectra, self.keep, self.gen = dims, spectra, keep, gen
        shape = (dims.layers, dims.kv_heads, dims.head_dim)
        self.lo = {n: torch.full(shape, float("inf")) for n in NAMES}
        self.hi = {n: torch.full(shape, float("-inf")) for n in NAMES}
        self.points = {n: [[] for _ in range(dims.layers)] for n in NAMES}   # chunks [H, keep, D]
        self.sq = {n: torch.zeros(shape, dtype=torch.float64) for n in NAMES}  # Σ z² per latent coordinate
        self.n = {n: 0 for n in NAMES}

    def observe_pre_rope_key(self, module, keys: torch.Tensor) -> None:
        k = keys.detach().float()   # [T, H, D]
        self._add("key", module.layer_idx, k.transpose(0, 1))

    def observe_attention(self, module, query, key, value, mask, scaling, softcap) -> None:
        if value.shape[0] != 1:
            raise KvtoolError("pca runs one sample at a time (batch size 1)")
        self._add("value", module.layer_idx, value[0].detach().float())         # [H, T, D]

    def _add(self, name: str, layer: int, x: torch.Tensor) -> None:
        s = self.spectra[name]
        mean, basis = s["mean"][layer].to(x.device), s["basis"][layer].to(x.device)   # [H, D], [H, D, D]
        z = ((x - mean[:, None, :]) @ basis).cpu()                               # [H, T, D] latent, full rank
        lo, hi = z.amin(1), z.amax(1)                                            # [H, D]
        self.lo[name][layer] = torch.minimum(self.lo[name][layer], lo)
        self.hi[name][layer] = torch.maximum(self.hi[name][layer], hi)
        self.sq[name][layer] += z.double().square().sum(1)
        if layer == 0:
            self.n[name] += z.shape[1]
        idx = torch.randperm(z.shape[1], generator=self.gen)[: self.keep]
        self.points[name][layer].append(z[:, idx])


# -- contract (calibrate.contract): options, sections, summary --------------------------------------------------------
from calibrate import contract as C  # noqa: E402
from kvtool.lowrank import FIELDS  # noqa: E402


def _text(s: dict) -> str:
    ranks = ", ".join(f"{k} {v['mean']} (max {v['max']})" for k, v in s.items() if "rank@" in k)
    return f"pca: per-layer ranks by energy (mean over layers): {ranks}; {s['samples']} x {s['seq_len']} tokens " \
           f"for the latent ranges ({s['seconds']} s)"


PCA.contract = C.Contract(
    about="low-rank bases of pre-RoPE keys and of values from the traced moments, with latent ranges (Palu, "
          "arXiv 2407.21118); the rank is chosen later, by count or by energy, from the eigenvalues",
    options=(C.Option("clip", "--clip", "clipped latent range: the (1 - clip, clip) quantiles per latent coordinate"),
             C.samples("calibration samples for the latent ranges"), C.seq_len(), C.data(),
             C.seed("random seed of the samples and of the kept points")),
    sections=tuple(C.Section(f"{SECTION}.{n}.{f}", "L, H, D, D" if f == "basis" else "L, H, D")
                   for n in NAMES for f in (*FIELDS, "power")),
    reads=tuple(f"pca.{SOURCE[n]}.{f}" for n in NAMES for f in ("mean", "eigvals", "basis")),
    summary=PCA.summary, text=_text, needs_profile=True, needs="traced PCA (pca.key_pre, pca.value)",
    total=lambda r, model: r.samples, paper="arXiv 2407.21118")
