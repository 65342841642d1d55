"""Echo and induction heads (RazorAttention, Tang et al., arXiv 2407.15891).

Probe: `probe_len` random tokens (distinct within a copy) repeated `repeats` times (2500 × 4 in the paper, scaled
down to fit the model's context). For a query in copy r ≥ 1 whose token also stands at i - k·n (k = 1..r), the echo
score is the attention it puts on those earlier copies of itself, the induction score the attention on the tokens
that followed them (i - k·n + 1). Scores are averaged over `query_samples` evenly spaced queries of copies 1.. per
query head; a KV group takes the max. Protected (retrieval) heads: the top 1% by echo ∪ the top 14% by induction,
counts rounded up. Other heads keep 4 sink tokens and the recent max(4000, n/5) tokens (+ one compensation token in
the paper; that is the runtime's business and stored here only as the proposed deployment window).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from calibrate import register
from calibrate.heads import HeadsResult, top_count, top_fraction
from kvtool.errors import KvtoolError
from kvtool.models import input_device
from kvtool.trace import Dims, RowMaker, attention_modules, observing


@register("razor")
@dataclass
class Razor:
    probe_len: int = 2500
    repeats: int = 4
    echo_top: float = 0.01
    induction_top: float = 0.14
    query_samples: int = 256
    chunk: int = 64
    seed: int = 42

    def probe(self, model, tokenizer=None) -> tuple[torch.Tensor, int, int]:
        """(ids [T], offset of the first copy, copy length n); n scaled down to fit the context."""
        cfg = model.config.get_text_config()
        bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
        offset = 1 if bos is not None else 0
        limit = getattr(cfg, "max_position_embeddings", None) or self.probe_len * self.repeats + offset
        n = min(self.probe_len, (limit - offset) // self.repeats)
        if self.repeats < 2 or n < 8:
            raise KvtoolError(f"razor probe too short: {self.repeats} copies of {n} tokens (need >= 2 copies of >= 8)")
        vocab = cfg.vocab_size
        g = torch.Generator().manual_seed(self.seed)
        special = set(getattr(tokenizer, "all_special_ids", []) or []) if tokenizer is not None else set()
        pool = torch.tensor([t for t in range(vocab) if t not in special]) if special else torch.arange(vocab)
        copy = pool[torch.randperm(pool.numel(), generator=g)[:n]] if pool.numel() >= n else \
            pool[torch.randint(pool.numel(), (n,), generator=g)]
        ids = copy.repeat(self.repeats)
        if offset:
            ids = torch.cat([torch.tensor([bos]), ids])
        return ids.long(), offset, n

    def run(self, model, tokenizer=None, profile=None, fraction: float | None = None, on_progress=None) -> HeadsResult:
        attention_modules(model)
        ids, offset, n = self.probe(model, tokenizer)
        observer = _EchoInduction(Dims.of(model), ids, offset, n, self.query_samples, self.chunk)
        with observing(model, observer), torch.inference_mode():
            model.get_decoder()(input_ids=ids.view(1, -1).to(input_device(model)), use_cache=False)
        if on_progress is not None:
            on_progress(1)
        echo, induction = observer.scores()                                   # [L, H_kv] each
        if fraction is None:
            mask = top_count(echo, self.echo_top) | top_count(induction, self.induction_top)
        else:
            mask = top_fraction(echo + induction, fraction)
        params = {"probe_len": n, "repeats": self.repeats, "echo_top": self.echo_top,
                  "induction_top": self.induction_top, "query_samples": self.query_samples, "seed": self.seed,
                  "fraction": fraction, "score": "echo + induction"}
        windows = {"sink": 4, "recent": 4000, "recent_fraction": 0.2, "compensation_token": True}
        return HeadsResult("razor", {"score": echo + induction, "mask": mask, "echo": echo, "induction": induction},
                           params, windows)


class _EchoInduction:
    """Attention observer: echo / induction mass of sampled queries in the repeated copies, per query head."""

    def __init__(self, dims: Dims, ids, offset: int, n: int, query_samples: int, chunk: int):
        self.dims, self.offset, self.n, self.chunk = dims, offset, n, chunk
        first, last = offset + n, ids.numel() - 1
        count = min(query_samples, last - first + 1) if query_samples else last - first + 1
        self.queries = torch.linspace(first, last, count).round().long().unique()
        self.echo = torch.zeros(dims.layers, dims.q_heads, dtype=torch.float64)
        self.induction = torch.zeros_like(self.echo)

    def observe_attention(self, module, query, key, value, mask, scaling, softcap) -> None:
        rows = RowMaker(query[0].float(), key[0].float(), mask, scaling, softcap, self.dims.group)
        for pos in self.queries.split(self.chunk):
            p = rows(pos)                                                      # [H_q, m, S']
            copies = (pos - self.offset) // self.n                             # earlier copies of each query
            for k in range(1, int(copies.max()) + 1):
                has = copies >= k                                              # queries with a k-th earlier copy
                src = (pos - k * self.n + rows.offset).clamp_min(0)
                e = p.gather(-1, src.view(1, -1, 1).expand(p.shape[0], -1, 1)).squeeze(-1)
                i = p.gather(-1, (src + 1).view(1, -1, 1).expand(p.shape[0], -1, 1)).squeeze(-1)
                self.echo[module.layer_idx] += (e * has).sum(-1).double()
                self.induction[module.layer_idx] += (i * has).sum(-1).double()

    def scores(self) -> tuple[torch.Tensor, torch.Tensor]:
        d, m = self.dims, self.queries.numel()
        group = lambda t: (t / m).float().view(d.layers, d.kv_heads, d.group).amax(-1)   # noqa: E731
        return group(self.echo), group(self.induction)


# -- contract (calibrate.contract): options, sections, summary --------------------------------------------------------
from calibrate import contract as C  # noqa: E402

Razor.contract = C.Contract(
    about="echo and induction heads on a repeated random probe (RazorAttention, arXiv 2407.15891)",
    options=(C.Option("probe_len", "--probe-len", "random tokens per copy (scaled down to the context)",
                      check=C.at_least("--probe-len", 8)),
             C.seed("random seed of the probe")),
    sections=tuple(C.Section(f"heads.razor.{n}", "L, H") for n in ("score", "mask", "echo", "induction")),
    summary=C.heads_summary("razor"), text=C.heads_text, fraction=True, paper="arXiv 2407.15891")
