"""Non-uniform quantization levels by k-means (KVQuant, Hooper et al., "KVQuant: Towards 10 Million Context Length
LLM Inference with KV Cache Quantization", arXiv 2401.18079).

KVQuant replaces the evenly spaced levels of a b-bit quantizer by 2^b levels fitted offline to calibration
activations. Here one codebook per (layer, KV head) and bit width is learned by 1-D k-means (scikit-learn) on all
channels and tokens of the head, in exactly the units kvtool's runtime encodes (kvtool.quant):
  keys    per channel: t = clamp((k - lo) / (hi - lo), 0, 1), (lo, hi) = kvtool.quant.key_range(profile, rope, kclip);
          `key_pre` is the k_proj output (after k_norm where the model has one) before RoPE, `key_post` the key after
          RoPE as the attention function sees it;
  values  per token in groups of `vgroup` channels: t = (v - min) / (max - min), min and span rounded to float16
          first, as kvtool.quant.quantize_tokens normalises them.
Data: `samples` × `seq_len` tokens from kvtool.data.load_samples (built-in passkey samples, or a .txt / .jsonl file),
subsampled with a seeded generator to at most `max_points` scalars per (layer, head). k-means starts from the data's
quantiles, from the uniform levels and from `n_init` k-means++ draws, and keeps the lowest inertia, so on the
calibration data the levels never do worse than uniform ones. A head with fewer distinct values than levels keeps
uniform levels and is listed in the metadata (`uniform_fallback`).

Sensitivity weighting: the paper weights each point by its Fisher information (squared gradient of the LM loss).
The default, `weighting="none"`, is plain unweighted k-means. `weighting="fisher"` adds one backward pass per sample
and weights a point by (∂loss/∂x · span)², its diagonal-Fisher cost in normalised units. Not done: the paper's
dense-and-sparse outliers (the runtime's `outliers=on` is the analogue), its 2-bit mean/std correction, and its one
codebook per layer (kvtool's runtime reads one per KV head).

Writes `quant.{key_post,key_pre,value}.levels{b}`: float32 [L, H_kv, 2^b], sorted ascending, in [0, 1].
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from calibrate import Result, register
from kvtool.errors import KvtoolError
from kvtool.quant import BITS, SCALE_DTYPE, ChannelQuantizer, key_range
from kvtool.trace import Dims, attention_modules, observing

NAMES = ("key_post", "key_pre", "value")


def value_units(v: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Values [..., D] → (t, span), both [..., D] float32, normalised per token as kvtool.quant.quantize_tokens does:
    groups of `group` channels, min and span rounded to float16, t clamped to [0, 1]."""
    *lead, d = v.shape
    g = v.float().reshape(*lead, d // group, group)
    lo = g.amin(-1).to(SCALE_DTYPE)
    span = (g.amax(-1) - lo.float()).to(SCALE_DTYPE).float().clamp_min(1e-8).unsqueeze(-1)
    t = ((g - lo.float().unsqueeze(-1)) / span).clamp(0, 1)
    return t.reshape(v.shape), span.expand_as(g).reshape(v.shape)


@register("kvquant")
@dataclass
class KVQuant:
    bits: tuple[int, ...] = (2, 3, 4)
    kclip: float = 0.999           # key range: the (1 - kclip, kclip) quantiles of the profile's channel statistics
    vgroup: int = 32               # value channels per scale group (per token)
    samples: int = 4
    seq_len: int = 1024
    data: str | None = None        # None / "passkey" (built-in) or a .txt / .jsonl file
    max_points: int = 20000        # normalised scalars per (layer, KV head) given to k-means
    n_init: int = 1                # k-means++ starts, besides the quantile and uniform starts
    weighting: str = "none"        # "none" (plain k-means) or "fisher" (squared-gradient weights)
    seed: int = 42

    def __post_init__(self) -> None:
        bits = [self.bits] if isinstance(self.bits, int) else list(self.bits)
        if not bits or any(b not in BITS for b in bits):
            raise KvtoolError(f"--bits must be some of {', '.join(map(str, BITS))} (got {', '.join(map(str, bits))})")
        self.bits = tuple(sorted({int(b) for b in bits}))
        if not 0.5 < self.kclip <= 1.0:
            raise KvtoolError(f"--kclip must be a calibrated quantile level in (0.5, 1] (got {self.kclip})")
        for name, least in (("vgroup", 1), ("samples", 1), ("seq_len", 2), ("n_init", 0),
                            ("max_points", 2 ** max(self.bits))):
            if getattr(self, name) < least:
                raise KvtoolError(f"--{name.replace('_', '-')} must be at least {least} (got {getattr(self, name)})")
        if self.weighting not in ("none", "fisher"):
            raise KvtoolError(f"--weighting must be none or fisher (got {self.weighting!r})")

    # -- the method ----------------------------------------------------------------------------------------------
    def run(self, model, tokenizer, profile=None, fraction: float | None = None, on_progress=None) -> Result:
        from kvtool.data import describe, load_samples

        if fraction is not None:
            raise KvtoolError("--retrieval-fraction does not apply to kvquant (it learns quantization levels)")
        ranges = self.check(model, profile)
        limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        if limit is not None and self.seq_len > limit:
            raise KvtoolError(f"--seq-len {self.seq_len} is beyond the model's context of {limit} tokens")
        if tokenizer is None:
            raise KvtoolError("kvquant needs the model's tokenizer to build its calibration samples")
        samples = load_samples(self.data, tokenizer, self.samples, self.seq_len, seed=self.seed)
        start = time.perf_counter()
        points = self.collect(model, samples, ranges, on_progress)
        collect_s = time.perf_counter() - start
        levels, fallback = self.fit(points, on_progress, done=len(samples))
        params = {"kclip": self.kclip, "vgroup": self.vgroup, "bits": list(self.bits), "samples": len(samples),
                  "seq_len": self.seq_len, "max_points": self.max_points, "weighting": self.weighting,
                  "n_init": self.n_init, "seed": self.seed, "data": describe(self.data),
                  "points": int(points["value"][0][0].shape[1]),
                  "uniform_fallback": fallback, "collect_seconds": round(collect_s, 2),
                  "fit_seconds": round(time.perf_counter() - start - collect_s, 2)}
        return Result("kvquant", levels, params, section="quant",
                      replaces=tuple(f"quant.{name}.levels" for name in NAMES))

    def check(self, model, profile) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Refuse bad input before any work; return the key ranges {rope: (lo, hi) [L, H, D]}."""
        attention_modules(model)
        if profile is None:
            raise KvtoolError("kvquant needs a profile's channel ranges: give --profile (made by `kvtool profile`)")
        dims = Dims.of(model)
        if dims.head_dim % self.vgroup:
            raise KvtoolError(f"--vgroup {self.vgroup} does not divide head_dim {dims.head_dim}")
        return {rope: key_range(profile, rope, self.kclip) for rope in ("post", "pre")}

    def normalise(self, name: str, layer: int, x: torch.Tensor, ranges) -> tuple[torch.Tensor, torch.Tensor]:
        """x [H, T, D] → (t in [0, 1], span), both [H, T, D]: the runtime's units for `name` and its scale."""
        if name == "value":
            return value_units(x, self.vgroup)
        lo, hi = ranges[name.removeprefix("key_")]
        q = ChannelQuantizer.from_range(lo[layer], hi[layer], 2)              # lo, span: [H, D]
        return q.normalise(x[None])[0].clamp(0, 1), q.span[:, None].expand_as(x)

    # -- data ------------------------------------------------------------------------------------------------------
    def collect(self, model, samples, ranges, on_progress=None) -> dict:
        """{name: [(x [H, n], w [H, n] or None) per layer]}: normalised scalars (numpy float32), n <= max_points."""
        if not samples:
            raise KvtoolError("zero samples: no calibration data for kvquant")
        dims = Dims.of(model)
        gen = torch.Generator().manual_seed(self.seed)
        col = _Collector(self, dims, ranges, -(-self.max_points // len(samples)), gen)
        from kvtool.models import input_device

        device = input_device(model)
        with observing(model, col, col.observe_pre_rope_key):
            for i, sample in enumerate(samples):
                ids = sample.input_ids.view(1, -1).to(device)                 # [1, T]
                if self.weighting == "fisher":
                    self._backward(model, ids, col)
                else:
                    with torch.inference_mode():
                        model.get_decoder()(input_ids=ids, use_cache=False)
                if on_progress is not None:
                    on_progress(i + 1, f"sample {i + 1}/{len(samples)}")
        return {name: [col.pooled(name, layer) for layer in range(dims.layers)] for name in NAMES}

    @staticmethod
    def _backward(model, ids: torch.Tensor, col: "_Collector") -> None:
        """One forward + backward of the next-token loss; gradients of the held keys / values go to `col`."""
        with torch.enable_grad():
            embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
            hidden = model.get_decoder()(inputs_embeds=embeds, use_cache=False).last_hidden_state   # [1, T, d]
            logits = model.get_output_embeddings()(hidden[0, :-1])                                 # [T-1, V]
            loss = torch.nn.functional.cross_entropy(logits.float(), ids[0, 1:])
            held, col.held = col.held, []
            grads = torch.autograd.grad(loss, [t for _, _, t in held], allow_unused=True)
        for (name, layer, t), g in zip(held, grads):
            col.add(name, layer, t.detach(), torch.zeros_like(t) if g is None else g)

    # -- k-means ---------------------------------------------------------------------------------------------------
    def fit(self, points: dict, on_progress=None, done: int = 0) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Levels {"<name>.levels<b>": [L, H, 2^b]} and the heads that fell back to uniform levels."""
        from sklearn.exceptions import ConvergenceWarning
        from threadpoolctl import threadpool_limits

        layers, heads = len(points["value"]), points["value"][0][0].shape[0]
        out = {f"{n}.levels{b}": torch.zeros(layers, heads, 2 ** b) for n in NAMES for b in self.bits}
        fallback = []
        # one thread: 1-D fits are tiny, and OpenMP threads cost more than they give (10x slower on 2 busy cores)
        with threadpool_limits(1), warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            for layer in range(layers):
                for name in NAMES:
                    x, w = points[name][layer]
                    for h in range(heads):
                        for b in self.bits:
                            c = self.kmeans(x[h], None if w is None else w[h], 2 ** b)
                            if c is None:
                                fallback.append(f"{name}.levels{b}[{layer},{h}]")
                                c = np.linspace(0.0, 1.0, 2 ** b)
                            out[f"{name}.levels{b}"][layer, h] = torch.from_numpy(np.asarray(c, dtype=np.float32))
                if on_progress is not None:
                    on_progress(done + layer + 1, f"k-means layer {layer + 1}/{layers}")
        return out, fallback

    def kmeans(self, x: np.ndarray, w: np.ndarray | None, k: int) -> np.ndarray | None:
        """Sorted levels [k] of (weighted) 1-D k-means on x [n]; None when x has fewer than k distinct values."""
        from sklearn.cluster import KMeans

        if w is not None:
            x, w = x[w > 0], w[w > 0]
            w = w / w.mean() if w.size else w
        if np.unique(x).size < k:
            return None
        starts = [np.quantile(x, (np.arange(k) + 0.5) / k), np.linspace(0.0, 1.0, k)] + ["k-means++"] * self.n_init
        best = None
        for i, init in enumerate(starts):
            init = init if isinstance(init, str) else init.astype(x.dtype).reshape(-1, 1)
            km = KMeans(n_clusters=k, init=init, n_init=1, random_state=self.seed + i).fit(x[:, None], sample_weight=w)
            if best is None or km.inertia_ < best.inertia_:
                best = km
        return np.clip(np.sort(best.cluster_centers_[:, 0]), 0.0, 1.0)


class _Collector:
    """Observer for kvtool.trace.observing: every layer's keys (pre- and post-RoPE) and values in normalised units,
    `keep` random scalars per head and sample. Under `weighting="fisher"` the tensors are held for the backward pass."""

    def __init__(self, method: KVQuant, dims: Dims, ranges, keep: int, gen: torch.Generator):
        self.method, self.dims, self.ranges, self.keep, self.gen = method, dims, ranges, keep, gen
        self.fisher = method.weighting == "fisher"
        self.x = {n: [[] for _ in range(dims.layers)] for n in NAMES}        # chunks [H, keep]
        self.w = {n: [[] for _ in range(dims.layers)] for n in NAMES}
        self.held: list = []                                                  # (name, layer, tensor in the graph)

    def observe_pre_rope_key(self, module, keys: torch.Tensor) -> None:
        self._take("key_pre", module.layer_idx, keys)                         # [T, H, D] (batch 1: key_post checks)

    def observe_attention(self, module, query, key, value, mask, scaling, softcap) -> None:
        self._take("key_post", module.layer_idx, key)                         # [1, H, T, D]
        self._take("value", module.layer_idx, value)

    def _take(self, name: str, layer: int, t: torch.Tensor) -> None:
        if name != "key_pre" and t.shape[0] != 1:
            raise KvtoolError("kvquant runs one sample at a time (batch size 1)")
        if self.fisher:
            self.held.append((name, layer, t))
        else:
            self.add(name, layer, t.detach(), None)

    def _hTd(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """A hooked tensor as [H, T, D]."""
        if name == "key_pre":
            return t.transpose(0, 1)                                          # [T, H, D] from kvtool.trace.observing
        return t[0]

    def add(self, name: str, layer: int, t: torch.Tensor, grad: torch.Tensor | None) -> None:
        x, span = self.method.normalise(name, layer, self._hTd(name, t).float(), self.ranges)   # [H, T, D]
        x = x.reshape(x.shape[0], -1)
        idx = torch.randperm(x.shape[1], generator=self.gen)[: self.keep]
        self.x[name][layer].append(x[:, idx])
        if grad is not None:
            w = (self._hTd(name, grad).float() * span).square().reshape(x.shape[0], -1)
            self.w[name][layer].append(w[:, idx])

    def pooled(self, name: str, layer: int) -> tuple[np.ndarray, np.ndarray | None]:
        x = torch.cat(self.x[name][layer], 1)                                 # [H, n]
        w = torch.cat(self.w[name][layer], 1) if self.w[name][layer] else None
        if x.shape[1] > self.method.max_points:
            idx = torch.randperm(x.shape[1], generator=self.gen)[: self.method.max_points]
            x, w = x[:, idx], None if w is None else w[:, idx]
        return x.numpy(), None if w is None else w.double().numpy()


# -- contract (calibrate.contract): options, sections, summary --------------------------------------------------------
from calibrate import contract as C  # noqa: E402


def _summary(profile) -> dict:
    r = profile.calibration["methods"]["kvquant"]
    return {"method": "kvquant", "bits": r["bits"], "kclip": r["kclip"], "vgroup": r["vgroup"],
            "samples": r["samples"], "seq_len": r["seq_len"], "points": r["points"], "weighting": r["weighting"],
            "uniform_fallback": len(r["uniform_fallback"]), "seconds": r["seconds"]}


def _text(s: dict) -> str:
    fallback = f", {s['uniform_fallback']} codebooks left uniform" if s["uniform_fallback"] else ""
    return (f"kvquant: k-means levels for {'/'.join(map(str, s['bits']))}-bit keys (pre/post RoPE, kclip {s['kclip']})"
            f" and values (vgroup {s['vgroup']}) from {s['samples']} x {s['seq_len']} tokens{fallback} "
            f"({s['seconds']} s)")


KVQuant.contract = C.Contract(
    about="k-means quantization levels for keys and values (KVQuant, arXiv 2401.18079); use them with the run "
          "policy codebook=kmeans",
    options=(C.Option("bits", "--bits", "bit widths to learn levels for, comma-separated (2, 3, 4, 8)",
                      parse=C.split_ints("--bits")),
             C.Option("kclip", "--kclip", "key range quantile level (1 = min..max; 0.999, 0.995, 0.99); the "
                      "runtime's kclip must match"),
             C.Option("vgroup", "--vgroup", "value channels per per-token scale group (divides head_dim); the "
                      "runtime's vgroup must match"),
             C.Option("weighting", "--weighting", "'none' (plain k-means) or 'fisher' (weights = squared gradients; "
                      "one backward pass per sample)"),
             C.samples(), C.seq_len(), C.data(), C.seed("random seed of the samples and of k-means")),
    sections=tuple(C.Section(f"quant.{n}.levels{{b}}", "L, H, 2**b", over="bits") for n in NAMES),
    summary=_summary, text=_text, needs_profile=True, needs="channel ranges",
    total=lambda r, model: r.samples + model.config.get_text_config().num_hidden_layers, paper="arXiv 2401.18079")
