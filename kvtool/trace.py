"""One-pass, O(n)-memory attention trace.

A registered attention function (`"kvtool_trace"` in transformers' `AttentionInterface`, with the sdpa mask in
`ALL_MASK_ATTENTION_FUNCTIONS`; both registered in kvtool/attention.py) returns the exact sdpa output and, on the
side, feeds `TraceStats`:

* attention rows of a *sample of queries*, computed in chunks of `chunk` rows — the full n×n matrix never exists:
  - evenly spaced queries at positions >= sink + recent (where a streaming head would drop something):
    attention mass on the first `sink` tokens, on the `recent` window, and the row entropy (StreamingLLM,
    DuoAttention arXiv 2410.10819);
  - the query before each copied needle token: a hit when the head's top-attended token is a needle token equal
    to the token being produced (Retrieval Head copy score, arXiv 2404.15574); a sample's hits count only when
    the model, teacher-forced, predicts more than `recall_threshold` of the answer tokens;
  - the last `window` queries: Jensen-Shannon similarity of adjacent layers' rows, per head (PoD, arXiv 2412.02252);
* every token's keys before RoPE, after RoPE and values: per-channel min / max / histogram (quantiles) and moments
  for PCA (KVQuant arXiv 2401.18079, KIVI 2402.02750). Pre-RoPE keys are the output of the attention's key norm
  where it has one (Qwen 3, Gemma 3; in either layout, [B, T, H_kv, D] or [B, H_kv, T, D]), else of `k_proj`, else
  the key slice of a fused `qkv_proj` (Phi-3); a model without rotary embeddings (GPT-2) has no RoPE to undo, and
  its "pre-RoPE" statistics are those of its keys (`key_source`).

Statistics are kept per query head ([L, H_q]); `TraceStats.derive()` aggregates a KV group as documented there.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from kvtool.attention import TRACE_ATTENTION, TRACE_OBSERVERS, switched
from kvtool.errors import KvtoolError
from kvtool.modelinfo import Dims, attention_modules, has_rope, key_source  # noqa: F401  (re-exported)
from kvtool.stats import ChannelRange, Mean, Moments

DEFAULT_QUANTILES = (0.001, 0.005, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 0.995, 0.999)


@dataclass
class TraceConfig:
    sink: int = 64               # sink tokens for the streaming-mass statistics
    recent: int = 256            # recent window for the streaming-mass statistics
    query_samples: int = 128     # queries per sample for masses/entropy; 0 = every eligible query
    window: int = 32             # last queries whose rows are compared across layers
    chunk: int = 64              # query rows computed at once
    recall_threshold: float = 0.5
    quantile_levels: tuple[float, ...] = DEFAULT_QUANTILES

    def __post_init__(self) -> None:
        for name, least in (("sink", 0), ("recent", 1), ("query_samples", 0), ("window", 1), ("chunk", 1)):
            if getattr(self, name) < least:
                raise KvtoolError(f"--{name.replace('_', '-')} must be at least {least} (got {getattr(self, name)})")
        if not all(0.0 <= q <= 1.0 for q in self.quantile_levels):
            raise KvtoolError("quantile levels must lie in [0, 1]")

    @classmethod
    def from_dict(cls, d: dict) -> "TraceConfig":
        d = {k: v for k, v in d.items() if k in {f.name for f in fields(cls)}}
        if "quantile_levels" in d:
            d["quantile_levels"] = tuple(d["quantile_levels"])
        return cls(**d)


# Accumulator fields of TraceStats and their kinds, in serialisation order.
_HEAD_MEANS = ("sink_mass", "recent_mass", "streaming_mass", "entropy", "copy")
_CHANNELS = ("key_pre", "key_post", "value")


@dataclass
class TraceStats:
    """Everything the trace accumulates; `merge` adds two shards. Per query head: [L, H_q]."""

    config: TraceConfig
    dims: Dims
    acc: dict = field(default_factory=dict)

    @classmethod
    def empty(cls, config: TraceConfig, dims: Dims) -> "TraceStats":
        L, Hq, Hkv, D = dims.layers, dims.q_heads, dims.kv_heads, dims.head_dim
        acc = {name: Mean.zeros(L, Hq) for name in _HEAD_MEANS}
        acc["similarity"] = Mean.zeros(max(L - 1, 1), Hq)
        acc["tokens"] = Mean.zeros(L)          # total = tokens traced, count = samples (per layer)
        acc["recall"] = Mean.zeros(L)          # total = answer recall, count = samples with needles
        for name in _CHANNELS:
            acc[name] = ChannelRange.empty(L, Hkv, D)
            acc[f"{name}_moments"] = Moments.zeros(L, Hkv, D)
        return cls(config, dims, acc)

    def merge(self, other: "TraceStats") -> "TraceStats":
        if other.dims != self.dims:
            raise KvtoolError(f"cannot merge statistics of different model shapes ({other.dims} vs {self.dims})")
        if other.config != self.config:
            raise KvtoolError("cannot merge statistics traced with different settings (sink/recent/samples/window)")
        for name, a in self.acc.items():
            a.merge(other.acc[name])
        return self

    @property
    def samples(self) -> int:
        return int(self.acc["tokens"].count[0].item())

    def state(self) -> dict[str, torch.Tensor]:
        """Flat tensors for the profile's `stats.` section.

        Histograms are stored compactly and losslessly: only the span of bins that any channel uses
        (`<name>.hist` [L, H_kv, D, n], `<name>.hist_start` = index of its first bin on the fixed 512-bin grid) in
        the smallest integer type that holds the largest count (int16 or int32). Most of the grid (which covers the
        whole fp16 range) is empty; this takes the embedded model's profile from ~50 MB to ~20 MB."""
        out = {}
        for name, a in self.acc.items():
            for key, t in a.state(f"stats.{name}").items():
                if isinstance(a, ChannelRange) and key.endswith(".hist"):
                    used = (t.sum(dim=tuple(range(t.dim() - 1))) > 0).nonzero().flatten()
                    first, last = (int(used[0]), int(used[-1])) if used.numel() else (0, -1)
                    t = t[..., first:last + 1]
                    small = t.numel() == 0 or int(t.max()) <= torch.iinfo(torch.int16).max
                    out[key] = t.to(torch.int16 if small else torch.int32).contiguous()
                    out[f"{key}_start"] = torch.tensor(first, dtype=torch.int64)
                    continue
                out[key] = t.to(torch.int32) if t.dtype == torch.int64 else t
        return out

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], config: TraceConfig, dims: Dims) -> "TraceStats":
        """Inverse of `state()` (also reads full 512-bin int32 histograms); refuses statistics of the wrong shape."""
        stats = cls.empty(config, dims)
        for name, a in stats.acc.items():
            prefix = f"stats.{name}"
            view = dict(tensors)
            if isinstance(a, ChannelRange) and f"{prefix}.hist" in tensors:
                view[f"{prefix}.hist"] = _full_hist(tensors, prefix, a.hist.shape)
            try:
                loaded = type(a).from_state(view, prefix)
            except KeyError as exc:
                raise KvtoolError(f"profile has no raw statistics ({exc.args[0]} missing); it cannot be merged") from None
            for f in fields(loaded):
                t = getattr(loaded, f.name)
                expect = getattr(a, f.name)
                if tuple(t.shape) != tuple(expect.shape) or t.is_floating_point() != expect.is_floating_point():
                    raise KvtoolError(f"profile statistic {prefix}.{f.name} has shape {list(t.shape)} "
                                      f"({str(t.dtype).replace('torch.', '')}), expected {list(expect.shape)}")
                setattr(loaded, f.name, t.to(expect.dtype))
            stats.acc[name] = loaded
        return stats

    def derive(self) -> dict[str, torch.Tensor]:
        """Profile tensors from the raw statistics.

        A KV group of G query heads is one KV head (it shares one cache): masses take the *minimum* over the group
        (a KV head is only as streaming as its least streaming query head), entropy and the retrieval score the
        *maximum* (RazorAttention's rule: one retrieval query head protects the group), layer similarity the mean.
        Per query head values are kept as `*_q` with shape [L, H_kv, G].
        """
        d, out = self.dims, {}
        per_q = {name: self.acc[name].value() for name in _HEAD_MEANS}
        per_q["copy_score"] = per_q.pop("copy")                 # heads.copy_score (was heads.retrieval_score)
        agg = {"sink_mass": "min", "recent_mass": "min", "streaming_mass": "min", "entropy": "max",
               "copy_score": "max"}
        for name, how in agg.items():
            grouped = per_q[name].view(d.layers, d.kv_heads, d.group)
            out[f"heads.{name}"] = grouped.amin(-1) if how == "min" else grouped.amax(-1)
            out[f"heads.{name}_q"] = grouped.contiguous()
        if d.layers > 1:
            sim = self.acc["similarity"].value().view(d.layers - 1, d.kv_heads, d.group)
            out["layers.similarity"] = sim.mean(-1)
            out["layers.similarity_q"] = sim.contiguous()
        for name in _CHANNELS:
            rng, mom = self.acc[name], self.acc[f"{name}_moments"]
            seen = torch.isfinite(rng.lo)
            out[f"channels.{name}.min"] = torch.where(seen, rng.lo, 0.0)
            out[f"channels.{name}.max"] = torch.where(seen, rng.hi, 0.0)
            out[f"channels.{name}.absmax"] = torch.where(seen, rng.absmax(), 0.0)
            out[f"channels.{name}.quantiles"] = rng.quantiles(list(self.config.quantile_levels))
            mean, evals, basis = mom.pca()
            out[f"pca.{name}.mean"], out[f"pca.{name}.eigvals"], out[f"pca.{name}.basis"] = mean, evals, basis
        return out


def check_lengths(model, seq_len: int, config: TraceConfig, limit: int | None = None) -> None:
    """Refuse a sequence length beyond the model's context, or too short for the streaming statistics. Without a
    model (None: before loading it) the context is `limit`, when known."""
    if model is not None:
        limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise KvtoolError(f"--seq-len {seq_len} is beyond the model's context of {limit} tokens")
    if seq_len <= config.sink + config.recent:
        raise KvtoolError(
            f"--seq-len {seq_len} must exceed sink + recent = {config.sink + config.recent} "
            "(lower --sink/--recent or raise --seq-len)"
        )


def pre_rope_tokens(output: torch.Tensor, how: str, T: int, dims: Dims) -> torch.Tensor:
    """The pre-RoPE keys of one forward of T tokens as [B·T, H_kv, D] from a key source's output (`key_source`): a
    projection [B, T, H_kv·D], a fused projection [B, T, (H_q + 2·H_kv)·D] (keys follow the queries), or a key norm's
    [B, T, H_kv, D] or [B, H_kv, T, D] (told apart by T; a T equal to H_kv is refused as ambiguous)."""
    H, D, Hq = dims.kv_heads, dims.head_dim, dims.q_heads
    shape = tuple(output.shape)
    if how == "fused" and output.dim() == 3 and shape[1] == T and shape[2] == (Hq + 2 * H) * D:
        return output[..., Hq * D:(Hq + H) * D].reshape(-1, H, D)
    if how == "proj" and output.dim() == 3 and shape[1] == T and shape[2] == H * D:
        return output.reshape(-1, H, D)
    if how == "norm" and output.dim() == 3 and shape[1] == T and shape[2] == H * D:
        return output.reshape(-1, H, D)
    if how == "norm" and output.dim() == 4 and shape[3] == D and T != H:
        if shape[1:3] == (T, H):
            return output.reshape(-1, H, D)
        if shape[1:3] == (H, T):
            return output.transpose(1, 2).reshape(-1, H, D)
    raise KvtoolError(f"the tracer cannot read pre-RoPE keys of shape {list(shape)} from the key {how} "
                      f"({T} tokens, {H} KV heads of {D})")


class _SampleContext:
    """Per-sample positions and scratch, set before each forward."""

    def __init__(self, tracer: "Tracer", input_ids: torch.Tensor, copy_pairs: torch.Tensor, needle_mask: torch.Tensor):
        cfg, T = tracer.config, input_ids.numel()
        self.ids = input_ids
        first = cfg.sink + cfg.recent
        if cfg.query_samples and T - first > cfg.query_samples:
            self.sampled = torch.linspace(first, T - 1, cfg.query_samples).round().long().unique()
        else:
            self.sampled = torch.arange(first, T)
        self.window = torch.arange(max(T - cfg.window, 0), T)
        self.copy_query = copy_pairs[:, 0] - 1 if copy_pairs.numel() else torch.zeros(0, dtype=torch.long)
        self.copy_target = input_ids[copy_pairs[:, 0]] if copy_pairs.numel() else torch.zeros(0, dtype=torch.long)
        self.needle_mask = needle_mask
        self.hits = torch.zeros(tracer.dims.layers, tracer.dims.q_heads, dtype=torch.float64)
        self.prev_rows: dict[int, torch.Tensor] = {}


class Tracer:
    """Runs samples through a model with the trace attention and fills a `TraceStats`."""

    def __init__(self, model, config: TraceConfig | None = None):
        self.model = model
        self.config = config or TraceConfig()
        self.modules = attention_modules(model)
        self.dims = Dims.of(model)
        self.stats = TraceStats.empty(self.config, self.dims)
        self.ctx: _SampleContext | None = None

    # -- the per-sample loop ---------------------------------------------------------------------------------
    def run(self, samples, on_sample=None) -> TraceStats:
        with _tracing(self):
            for i, sample in enumerate(samples):
                self.trace_sample(sample)
                if on_sample is not None:
                    on_sample(i + 1)
        return self.stats

    @torch.inference_mode()
    def trace_sample(self, sample) -> None:
        ids = sample.input_ids.view(-1)                                        # [T]
        needle = torch.zeros(ids.numel(), dtype=torch.bool)
        for start, end in sample.needle_spans:
            needle[start:end] = True
        self.ctx = _SampleContext(self, ids, sample.copy_pairs.view(-1, 2).long(), needle)
        try:
            from kvtool.models import input_device

            device = input_device(self.model)
            decoder = self.model.get_decoder()
            hidden = decoder(input_ids=ids.view(1, -1).to(device), use_cache=False).last_hidden_state  # [1, T, d]
            self._finish_sample(hidden[0])
        finally:
            self.ctx = None

    def _finish_sample(self, hidden: torch.Tensor) -> None:
        ctx, acc = self.ctx, self.stats.acc
        acc["tokens"].add(slice(None), torch.tensor(float(ctx.ids.numel())), 1)
        if ctx.copy_query.numel() == 0:
            return
        logits = self.model.get_output_embeddings()(hidden[ctx.copy_query.to(hidden.device)])  # [n, V]
        recall = (logits.argmax(-1).cpu() == ctx.copy_target).float().mean()
        acc["recall"].add(slice(None), recall, 1)
        if recall.item() > self.config.recall_threshold:
            acc["copy"].add(slice(None), ctx.hits, ctx.copy_query.numel())

    # -- called from the attention function and the hooks ----------------------------------------------------
    def observe_pre_rope_key(self, module, keys: torch.Tensor) -> None:
        """keys: [T, H_kv, D] (see `observing`)."""
        if self.ctx is None:
            return
        k = keys.detach().float()
        _check_finite(module.layer_idx, "pre-RoPE key", k)
        layer = module.layer_idx
        self.stats.acc["key_pre"].add(layer, k)
        self.stats.acc["key_pre_moments"].add(layer, k)

    def observe_attention(self, module, query, key, value, attention_mask, scaling, softcap) -> None:
        """query: [1, H_q, T, D]; key, value: [1, H_kv, S, D] (post-RoPE)."""
        if self.ctx is None:
            return
        layer = module.layer_idx
        for name, t in (("query", query), ("key", key), ("value", value)):
            _check_finite(layer, name, t)
        if query.shape[0] != 1:
            raise KvtoolError("the tracer runs one sample at a time (batch size 1)")
        acc = self.stats.acc
        k, v = key[0].float().transpose(0, 1), value[0].float().transpose(0, 1)  # [S, H_kv, D]
        acc["key_post"].add(layer, k)
        acc["key_post_moments"].add(layer, k)
        acc["value"].add(layer, v)
        acc["value_moments"].add(layer, v)
        rows = RowMaker(query[0].float(), key[0].float(), attention_mask, scaling, softcap, self.dims.group)
        ctx = self.ctx
        for part in ctx.sampled.split(self.config.chunk):
            self._masses(layer, rows(part), part, rows.offset)
        if ctx.copy_query.numel():
            self._copy_hits(layer, rows(ctx.copy_query), rows.offset)
        self._similarity(layer, rows(ctx.window, full=True))

    def _masses(self, layer: int, p: torch.Tensor, pos: torch.Tensor, offset: int) -> None:
        """p: [H_q, n, S'] rows of the queries at `pos` (S' >= last position + 1)."""
        cfg, acc = self.config, self.stats.acc
        sink = p[..., : cfg.sink].sum(-1)                                       # [H_q, n]
        cum = p.cumsum(-1)
        abs_pos = (pos.to(p.device) + offset).view(1, -1, 1).expand(p.shape[0], -1, 1)
        upto = cum.gather(-1, abs_pos).squeeze(-1)
        before = cum.gather(-1, (abs_pos - cfg.recent).clamp_min(0)).squeeze(-1)
        recent = upto - before
        n = pos.numel()
        acc["sink_mass"].add(layer, sink.sum(-1), n)
        acc["recent_mass"].add(layer, recent.sum(-1), n)
        acc["streaming_mass"].add(layer, (sink + recent).sum(-1), n)
        acc["entropy"].add(layer, torch.special.entr(p).sum(-1).sum(-1), n)

    def _copy_hits(self, layer: int, p: torch.Tensor, offset: int) -> None:
        """p: [H_q, n, S'] rows of the queries just before each copied answer token."""
        ctx = self.ctx
        top = (p.argmax(-1).cpu() - offset).clamp(0, ctx.ids.numel() - 1)      # [H_q, n] query-local positions
        hit = ctx.needle_mask[top] & (ctx.ids[top] == ctx.copy_target.view(1, -1))
        ctx.hits[layer] += hit.sum(-1).double()

    def _similarity(self, layer: int, cur: torch.Tensor) -> None:
        """cur: [H_q, W, S] rows of the last `window` queries; compared with the previous layer's."""
        ctx = self.ctx
        prev = ctx.prev_rows.pop(layer - 1, None)
        if prev is not None and prev.shape == cur.shape:
            m = 0.5 * (prev + cur)
            js = 0.5 * (torch.special.xlogy(prev, prev) - torch.special.xlogy(prev, m)).sum(-1) \
                + 0.5 * (torch.special.xlogy(cur, cur) - torch.special.xlogy(cur, m)).sum(-1)   # [H_q, W]
            sim = 1.0 - js.clamp(0, math.log(2)) / math.log(2)
            self.stats.acc["similarity"].add(layer - 1, sim.sum(-1), cur.shape[1])
        ctx.prev_rows[layer] = cur


def _check_finite(layer: int, name: str, t: torch.Tensor) -> None:
    # One reduction: a NaN/inf anywhere makes the sum non-finite (an overflowing sum is confirmed element-wise).
    if not torch.isfinite(t.sum()) and not torch.isfinite(t).all():
        raise KvtoolError(f"non-finite values (NaN or inf) in the {name} activations of layer {layer}; "
                          "check the model weights and dtype (try --dtype float32)")


class RowMaker:
    """Exact attention probabilities for chosen query rows: rows(pos) -> [H_q, n, S], never all T rows at once."""

    def __init__(self, q, k, mask, scaling, softcap, group):
        self.q, self.k, self.mask, self.group = q, k, mask, group               # q: [H_q, T, D]; k: [H_kv, S, D]
        self.scaling = scaling if scaling is not None else q.shape[-1] ** -0.5
        self.softcap = softcap
        self.offset = k.shape[1] - q.shape[1]                                  # keys before the first query

    def __call__(self, pos: torch.Tensor, full: bool = False) -> torch.Tensor:
        """Rows of the queries at `pos` (sorted): [H_q, n, S'] with S' = keys up to the last query, or all keys.

        Keys after the last query of the chunk are masked for every query in it (causal), so they are cut off
        instead of computed; a mask that allows any of them (not causal) gets full rows.
        """
        hq, _, d = self.q.shape
        hkv, s = self.k.shape[0], self.k.shape[1]
        pos = pos.to(self.q.device)
        width = s if full else min(s, int(pos.max()) + self.offset + 1)
        mask = None if self.mask is None else self.mask[0, 0][pos.to(self.mask.device)]    # [n, S]
        if mask is not None and width < s and (mask.dtype != torch.bool or mask[:, width:].any()):
            width = s
        q = self.q[:, pos].view(hkv, self.group, -1, d) * self.scaling          # [H_kv, G, n, D]
        k = self.k[:, :width]                                                   # [H_kv, S', D]
        scores = q @ k.transpose(1, 2).unsqueeze(1)                             # [H_kv, G, n, S']
        scores = scores.reshape(hq, -1, width)
        if self.softcap:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        if mask is None:
            keys = torch.arange(width, device=scores.device).view(1, -1)
            scores.masked_fill_(keys > (pos + self.offset).view(-1, 1), -math.inf)   # causal
        elif mask.dtype == torch.bool:
            scores.masked_fill_(~mask[:, :width], -math.inf)
        else:
            scores += mask[:, :width].float()
        return torch.softmax(scores, -1)


class _Tracing:
    """What `observing` pushes on kvtool.attention.TRACE_OBSERVERS: an observer and the trace's forward, which the
    registered "kvtool_trace" attention calls."""

    def __init__(self, observer):
        self.observer = observer

    def forward(self, module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        return trace_forward(self.observer, module, query, key, value, attention_mask, dropout=dropout,
                             scaling=scaling, **kwargs)


def trace_forward(observer, module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The trace's attention: exact sdpa output (or, with logit soft-capping, which sdpa lacks, the exact softmax
    computed in chunks of query rows); `observer` sees the inputs on the side."""
    if kwargs.get("s_aux") is not None:
        raise KvtoolError(f"the tracer does not handle attention sinks (s_aux) yet ({type(module).__name__})")
    if isinstance(observer, _KeysArePreRope):
        key = observer.keys(module, key)
    if kwargs.get("softcap") is not None:
        out = capped_attention(query, key, value, attention_mask, scaling, kwargs["softcap"])
    else:
        out = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                     **kwargs)
    observer.observe_attention(module, query, key, value, attention_mask, scaling, kwargs.get("softcap"))
    return out


def capped_attention(query, key, value, mask, scaling, softcap, chunk: int = 64):
    """Soft-capped attention (Gemma 2) of query [B, H_q, T, D] over key, value [B, H_kv, S, D] with the trace's mask,
    chunk by chunk of query rows (never the whole T×S matrix) → ([B, T, H_q, D], None)."""
    b, hq, t, d = query.shape
    group = hq // key.shape[1]
    out = query.new_empty(b, t, hq, value.shape[-1])
    for i in range(b):
        rows = RowMaker(query[i].float(), key[i].float(), None if mask is None else mask[i:i + 1], scaling, softcap,
                        group)
        v = value[i].float().repeat_interleave(group, 0)                                 # [H_q, S, D]
        for part in torch.arange(t).split(chunk):
            p = rows(part)                                                               # [H_q, n, S']
            out[i, part] = (p @ v[:, :p.shape[-1]]).transpose(0, 1).to(out.dtype)
    return out, None



@contextmanager
def observing(model, observer, pre_rope_key=None):
    """Run `model` with the trace attention feeding `observer`; optionally feed every layer's pre-RoPE keys to
    `pre_rope_key(module, keys [B·T, H_kv, D])` (found per family by `key_source`; the keys themselves for a model
    without RoPE; not detached: with gradients on, the model computes on from `keys`, so they get a gradient). Restores the model's attention implementation and removes hooks afterwards."""
    modules = attention_modules(model)
    dims = Dims.of(model)
    handles, tokens = [], {}
    if pre_rope_key is not None and has_rope(model):
        def remember(mod, args, kwargs):                                   # the forward's token count T
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            tokens[mod] = hidden.shape[1]

        def hook(mod, how, output):
            keys = pre_rope_tokens(output, how, tokens[mod], dims)                # [B·T, H_kv, D]
            pre_rope_key(mod, keys)
            if output.requires_grad:                # the model goes on from `keys`, so gradients reach them (fisher)
                return _rebuild(keys, output, how, dims)
            return None

        for mod in modules:
            src, how = key_source(model, mod)
            handles.append(mod.register_forward_pre_hook(remember, with_kwargs=True))
            handles.append(src.register_forward_hook(lambda m, i, o, mod=mod, how=how: hook(mod, how, o)))
    elif pre_rope_key is not None:
        observer = _KeysArePreRope(observer, pre_rope_key)
    try:
        with switched(model, TRACE_ATTENTION, TRACE_OBSERVERS, _Tracing(observer)):
            yield
    finally:
        for h in handles:
            h.remove()


def _rebuild(keys: torch.Tensor, output: torch.Tensor, how: str, dims: Dims) -> torch.Tensor:
    """The key source's output rebuilt from the keys `pre_rope_tokens` read from it (same values, computed from
    `keys`), for a forward hook to return."""
    H, D, Hq = dims.kv_heads, dims.head_dim, dims.q_heads
    b, t = output.shape[0], keys.shape[0] // output.shape[0]
    if how == "fused":
        return torch.cat([output[..., :Hq * D], keys.reshape(b, t, H * D), output[..., (Hq + H) * D:]], -1)
    if output.dim() == 4 and tuple(output.shape[1:3]) == (H, t):
        return keys.reshape(b, t, H, D).transpose(1, 2)
    return keys.reshape(output.shape)


class _KeysArePreRope:
    """For a model without RoPE: the attention's keys go to `pre_rope_key` as well (`keys`, called by the trace
    attention before it attends), then everything to the observer."""

    def __init__(self, observer, pre_rope_key):
        self.observer, self.pre_rope_key = observer, pre_rope_key

    def keys(self, module, key: torch.Tensor) -> torch.Tensor:
        """key [B, H_kv, S, D] → the key to attend with: the same values, computed from the [B·S, H_kv, D] tensor
        given to `pre_rope_key` when gradients are on (so that it gets a gradient)."""
        b, h, s, d = key.shape
        keys = key.transpose(1, 2).reshape(-1, h, d)                                     # [B·S, H_kv, D]
        self.pre_rope_key(module, keys)
        return keys.reshape(b, s, h, d).transpose(1, 2) if key.requires_grad else key

    def observe_attention(self, module, query, key, value, attention_mask, scaling, softcap) -> None:
        self.observer.observe_attention(module, query, key, value, attention_mask, scaling, softcap)


def _tracing(tracer: Tracer):
    return observing(tracer.model, tracer, tracer.observe_pre_rope_key)


def config_dict(config: TraceConfig) -> dict:
    d = asdict(config)
    d["quantile_levels"] = list(config.quantile_levels)
    return d


def _full_hist(tensors: dict[str, torch.Tensor], prefix: str, shape) -> torch.Tensor:
    """A stored histogram back on the full grid: [L, H_kv, D, 512] int64 (see TraceStats.state)."""
    hist = tensors[f"{prefix}.hist"]
    start_t = tensors.get(f"{prefix}.hist_start")
    start = 0 if start_t is None else int(start_t.reshape(-1)[0]) if start_t.numel() == 1 else -1
    n = hist.shape[-1] if hist.dim() else -1
    if hist.is_floating_point() or hist.dim() != len(shape) or tuple(hist.shape[:-1]) != tuple(shape[:-1]) \
            or start < 0 or start + n > shape[-1]:
        raise KvtoolError(f"profile statistic {prefix}.hist has shape {list(hist.shape)} (start {start}), expected "
                          f"[{', '.join(map(str, shape[:-1]))}, n] within {shape[-1]} bins")
    if (hist < 0).any():
        raise KvtoolError(f"profile statistic {prefix}.hist has negative counts")
    full = torch.zeros(tuple(shape), dtype=torch.int64)
    full[..., start:start + n] = hist.long()
    return full
