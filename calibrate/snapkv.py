"""SnapKV's observation window and pooling kernel, per layer, by how well they recover the oracle's top attention
(SnapKV, arXiv 2404.14469; RocketKV's SnapKV++, arXiv 2502.14051, whose window 32 and kernel 63 are among the
default candidates).

Each calibration sample of `seq_len` tokens is split into a prompt (the first seq_len - `future` tokens) and its
future (the last `future` tokens). The oracle is what the future's queries really attend to among the prompt tokens:
their softmax attention (over every key they see) on each prompt token, summed over the future queries and the query
heads of each KV group. For every candidate window w of `windows` and odd kernel of `kernels`, SnapKV++ keeps
`budget` (a fraction of the prompt) tokens per KV head: the last w prompt tokens and the top of the earlier ones by
the last w prompt queries' votes, max-pooled with that kernel and summed over the group (the runtime's own
selection, kvtool/stores/snapkv.py). Its recall is the oracle attention mass of the kept tokens over the mass of the
oracle's own top `budget` tokens (1 = the best any `budget` tokens could keep), averaged over samples and KV heads.
Per layer, the (window, kernel) of the highest recall is chosen. A model's own sliding-window layers never select
(they keep their window): they are not measured (recall 0, the candidates nearest 32 / 63, listed in
`unmeasured_layers`).

Writes `snapkv.obs` and `snapkv.kernel` int64 [L] (the choice per layer; the SnapKV store's defaults when a policy
leaves `obs` / `kernel` unset), `snapkv.recall` float32 [L] (the chosen pair's recall), and `snapkv.grid` float32
[L, n_windows, n_kernels] (every candidate's recall). The candidates, budget and the mean recall of RocketKV's
32 / 63 go to kvtool.calibration.methods.snapkv.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from calibrate import Result, register
from kvtool.errors import KvtoolError
from kvtool.select import snap_select
from kvtool.trace import Dims, observing

SECTION = "snapkv"


@register("snapkv")
@dataclass
class SnapKV:
    windows: tuple[int, ...] = (8, 16, 32, 64)     # candidate observation windows (prompt queries that vote)
    kernels: tuple[int, ...] = (1, 7, 15, 31, 63)   # candidate pooling kernels (odd)
    budget: float = 0.125                           # tokens kept, as a fraction of the prompt
    future: int = 64                                # the oracle's queries: the last tokens of each sample
    samples: int = 4
    seq_len: int = 1024
    data: str | None = None                          # None / "passkey" (built-in) or a .txt / .jsonl file
    seed: int = 42

    def __post_init__(self) -> None:
        self.windows, self.kernels = tuple(int(w) for w in self.windows), tuple(int(k) for k in self.kernels)
        if not self.windows or min(self.windows) < 1:
            raise KvtoolError(f"--windows must be whole numbers ≥ 1 (got {','.join(map(str, self.windows))})")
        if not self.kernels or any(k < 1 or k % 2 == 0 for k in self.kernels):
            raise KvtoolError(f"--kernels must be odd whole numbers (got {','.join(map(str, self.kernels))})")
        if not 0.0 < self.budget < 1.0:
            raise KvtoolError(f"--budget must lie in (0, 1): a fraction of the prompt (got {self.budget})")
        for name, least in (("samples", 1), ("future", 1), ("seq_len", 2)):
            if getattr(self, name) < least:
                raise KvtoolError(f"--{name.replace('_', '-')} must be at least {least} (got {getattr(self, name)})")
        prompt = self.seq_len - self.future
        if prompt <= max(self.windows):
            raise KvtoolError(f"--seq-len {self.seq_len} - --future {self.future} leaves a prompt of {prompt} tokens, "
                              f"not longer than the largest window {max(self.windows)}")
        self.n_windows, self.n_kernels = len(self.windows), len(self.kernels)    # section shapes (contract)

    def run(self, model, tokenizer, profile=None, fraction: float | None = None, on_progress=None) -> Result:
        from kvtool.data import describe, load_samples
        from kvtool.models import input_device

        if fraction is not None:
            raise KvtoolError("--retrieval-fraction does not apply to snapkv (it chooses a window and a kernel)")
        limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        if limit is not None and self.seq_len > limit:
            raise KvtoolError(f"--seq-len {self.seq_len} is beyond the model's context of {limit} tokens")
        if tokenizer is None:
            raise KvtoolError("snapkv needs the model's tokenizer to build its calibration samples")
        samples = load_samples(self.data, tokenizer, self.samples, self.seq_len, seed=self.seed)
        start = time.perf_counter()
        obs = _Recall(self, Dims.of(model))
        device = input_device(model)
        with observing(model, obs), torch.inference_mode():
            for i, sample in enumerate(samples):
                model.get_decoder()(input_ids=sample.input_ids[:self.seq_len].view(1, -1).to(device), use_cache=False)
                if on_progress is not None:
                    on_progress(i + 1, f"sample {i + 1}")
        if int(obs.count.max()) == 0:
            raise KvtoolError(f"snapkv measured no layer: every layer is a sliding-window layer, or the samples are "
                              f"not longer than --future {self.future} + the largest window")
        grid = (obs.total / obs.count.clamp_min(1).view(-1, 1, 1)).float()                # [L, W, K]
        best = grid.flatten(1).argmax(1)                                                 # [L]
        unseen = (obs.count == 0).nonzero().view(-1).tolist()        # sliding-window layers: they never select
        if unseen:
            near = min(range(self.n_windows), key=lambda i: abs(self.windows[i] - 32)) * self.n_kernels + \
                min(range(self.n_kernels), key=lambda j: abs(self.kernels[j] - 63))
            best[unseen] = near
        w_idx, k_idx = best // self.n_kernels, best % self.n_kernels
        tensors = {"obs": torch.tensor(self.windows)[w_idx], "kernel": torch.tensor(self.kernels)[k_idx],
                   "recall": grid.flatten(1).gather(1, best.view(-1, 1)).view(-1), "grid": grid}
        rocket = None
        if 32 in self.windows and 63 in self.kernels:
            rocket = round(float(grid[:, self.windows.index(32), self.kernels.index(63)].mean()), 4)
        params = {"windows": list(self.windows), "kernels": list(self.kernels), "budget": self.budget,
                  "future": self.future, "pool": "max", "samples": len(samples), "seq_len": self.seq_len,
                  "seed": self.seed, "data": describe(self.data), "recall_rocketkv_32_63": rocket,
                  "unmeasured_layers": unseen,
                  "fit_seconds": round(time.perf_counter() - start, 2)}
        return Result("snapkv", tensors, params, section=SECTION)

    @staticmethod
    def summary(profile) -> dict:
        rec = profile.calibration["methods"]["snapkv"]
        return {"method": "snapkv", "obs": profile[f"{SECTION}.obs"].tolist(),
                "kernel": profile[f"{SECTION}.kernel"].tolist(),
                "mean recall": round(float(profile[f"{SECTION}.recall"].mean()), 4),
                "recall at 32/63": rec.get("recall_rocketkv_32_63"), "budget": rec["budget"],
                "seconds": rec["seconds"]}


class _Recall:
    """Trace observer: per layer, the recall of every (window, kernel) on each sample, summed ([L, W, K]), and the
    number of (sample, KV head) pairs summed ([L])."""

    def __init__(self, cfg: SnapKV, dims: Dims):
        self.cfg, self.dims = cfg, dims
        self.total = torch.zeros(dims.layers, cfg.n_windows, cfg.n_kernels, dtype=torch.float64)
        self.count = torch.zeros(dims.layers, dtype=torch.long)

    def observe_attention(self, module, query, key, value, mask, scaling, softcap) -> None:
        """query [1, H_q, T, D], key [1, H_kv, T, D] (post-RoPE, the whole sample at once)."""
        from kvtool.scores import Scaling, softcap_

        cfg = self.cfg
        if query.shape[0] != 1:
            raise KvtoolError("snapkv runs one sample at a time (batch size 1)")
        t = query.shape[2]
        prompt = t - cfg.future
        if prompt <= max(cfg.windows) or key.shape[2] != t or getattr(module, "sliding_window", None):
            return                             # a short sample; a sliding-window layer (its own store, no selection)
        b, hq, _, d = query.shape
        h = key.shape[1]
        g = hq // h
        scale = Scaling(scaling if scaling is not None else d ** -0.5, softcap)

        def probs(rows: slice) -> torch.Tensor:                 # softmax of query rows over every key they see
            q = query[:, :, rows].float().view(b, h, g, -1, d)
            s = torch.matmul(q, key.float().unsqueeze(2).transpose(-1, -2))                 # [1, h, G, r, T]
            softcap_(s.mul_(scale), scale)
            qpos = torch.arange(t, device=q.device)[rows]
            s.masked_fill_(torch.arange(t, device=q.device).view(1, -1) > qpos.view(-1, 1), float("-inf"))
            return s.softmax(-1)[..., :prompt]                                               # [1, h, G, r, P]

        oracle = probs(slice(prompt, t)).sum((2, 3))                                         # [1, h, P]
        keep = max(1, round(cfg.budget * prompt))
        best = oracle.topk(keep, -1).values.sum(-1)                                          # [1, h]
        wmax = max(cfg.windows)
        rows = probs(slice(prompt - wmax, prompt))                                           # [1, h, G, wmax, P]
        layer = module.layer_idx
        for i, w in enumerate(cfg.windows):
            votes = rows[..., wmax - w:, :].sum(3)                                           # [1, h, G, P]
            for j, kern in enumerate(cfg.kernels):
                idx = snap_select(votes, prompt, w, keep, kern, "max", per_query=False)      # [1, h, keep]
                got = oracle.gather(-1, idx).sum(-1)
                self.total[layer, i, j] += float((got / best.clamp_min(1e-30)).sum())
        self.count[layer] += h


# -- contract (calibrate.contract): options, sections, summary --------------------------------------------------------
from calibrate import contract as C  # noqa: E402


def _text(s: dict) -> str:
    at = f" (RocketKV's 32/63: {s['recall at 32/63']})" if s.get("recall at 32/63") is not None else ""
    pairs = sorted({(o, k) for o, k in zip(s["obs"], s["kernel"])})
    shown = ", ".join(f"{o}/{k}" for o, k in pairs[:4]) + (" ..." if len(pairs) > 4 else "")
    return (f"snapkv: window/kernel per layer {shown}; recall of the oracle's top {s['budget']:g} attention "
            f"{s['mean recall']}{at} ({s['seconds']} s)")


SnapKV.contract = C.Contract(
    about="SnapKV's observation window and pooling kernel per layer, by recall of the oracle's top attention of "
          "later queries (SnapKV arXiv 2404.14469, RocketKV arXiv 2502.14051)",
    options=(C.Option("windows", "--windows", "candidate observation windows (prompt queries that vote)",
                      parse=C.split_ints("--windows")),
             C.Option("kernels", "--kernels", "candidate pooling kernels (odd)", parse=C.split_ints("--kernels")),
             C.Option("budget", "--budget", "tokens kept, as a fraction of the prompt"),
             C.Option("future", "--future", "last tokens of each sample whose attention is the oracle",
                      check=C.at_least("--future", 1)),
             C.samples(), C.seq_len(), C.data(), C.seed("random seed of the samples")),
    sections=(C.Section(f"{SECTION}.obs", "L"), C.Section(f"{SECTION}.kernel", "L"), C.Section(f"{SECTION}.recall", "L"),
              C.Section(f"{SECTION}.grid", "L, n_windows, n_kernels")),
    summary=SnapKV.summary, text=_text, total=lambda r, model: r.samples, paper="arXiv 2404.14469")
