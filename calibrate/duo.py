"""DuoAttention gates (Xiao et al., "DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming
Heads", arXiv 2410.10819).

One gate α per (layer, KV head) in [0, 1], initialised to 1. In the student, a head's output (before o_proj) is
α·full + (1 − α)·streaming, streaming being attention restricted to `train_sink` first + `train_recent` last tokens.
Only the gates train (model frozen). Loss = MSE between the teacher's (full attention) and the student's final hidden
states (after the final norm, no lm_head) on supervised positions, + λ·|α| (mean by default, as the public code; sum
as the paper writes). AdamW, lr 0.02, weight decay 0; lr rises from 0.002 over the first 20% of steps, holds, and
falls back to 0.002 over the last 20%. Gates are clamped to [0, 1] in the forward and after every step.

Where the public code departs from the paper, both are options; defaults follow the public code:
  full_branch  "teacher": the student's full branch reuses the teacher's full-attention output of that layer (one full
               attention per layer); "student": the student computes its own full attention (paper).
  positions    "qa": every question + answer token (code); "answer": the passkey answer tokens only (paper).
  l1           "mean" (code) or "sum" (paper).
Data: synthetic multi-passkey samples (kvtool.data.passkey_samples), one per step, seeded by step so that `resume`
continues exactly. Deployment picks retrieval heads by a global quantile of the gates (`fraction`; 0.5 for GQA, 0.25
for MHA by default) with deterministic tie-breaking; training and deployment windows are separate fields.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from calibrate import register
from calibrate.heads import HeadsResult, top_fraction
from kvtool.windows import window_allowed
from kvtool.errors import KvtoolError
from kvtool.trace import Dims, attention_modules

DUO_ATTENTION = "kvtool_duo"
PRESETS = {
    # What the paper/public code runs (hours on GPUs for a 7B model).
    "paper": {},
    # Practical on a 2-core CPU for the embedded 135M model: ~20 minutes (docs/BENCHMARKS.md).
    "cpu": {"steps": 200, "passkeys": 4, "words": 8, "min_len": 512, "max_len": 1024, "lengths": 8,
            "train_sink": 32, "train_recent": 128, "checkpoint_every": 40},
}


_RUN_CONTROL = ("checkpoint", "resume", "stop_after")   # how a run is driven, not what it computes


@register("duo")
@dataclass
class Duo:
    steps: int = 2000
    lr: float = 0.02
    lr_min: float = 0.002
    ramp: float = 0.2                 # fraction of steps for warm-up and for decay
    l1_weight: float = 0.05
    l1: str = "mean"
    positions: str = "qa"
    full_branch: str = "teacher"
    train_sink: int = 128
    train_recent: int = 256
    deploy_sink: int = 64
    deploy_recent: int = 256
    passkeys: int = 10
    words: int = 32
    min_len: int = 1000
    max_len: int | None = None        # None: the model's context
    lengths: int = 50
    seed: int = 42
    checkpoint: str | None = None
    checkpoint_every: int = 100
    resume: bool = False
    stop_after: int | None = None     # stop (with a checkpoint) after this many steps of this run: for tests/CI

    @classmethod
    def from_preset(cls, preset: str | None, **overrides) -> "Duo":
        if preset is not None and preset not in PRESETS:
            raise KvtoolError(f"unknown duo preset {preset!r} (known: {', '.join(PRESETS)})")
        return cls(**{**PRESETS.get(preset or "paper", {}), **overrides})

    def __post_init__(self) -> None:
        for name, allowed in (("l1", ("mean", "sum")), ("positions", ("qa", "answer")),
                              ("full_branch", ("teacher", "student"))):
            if getattr(self, name) not in allowed:
                raise KvtoolError(f"duo {name} must be one of {', '.join(allowed)} (got {getattr(self, name)!r})")
        if self.steps < 1 or self.lengths < 1 or self.passkeys < 1 or self.words < 1:
            raise KvtoolError("duo steps, lengths, passkeys and words must be at least 1")
        if self.resume and not self.checkpoint:
            raise KvtoolError("--resume needs --checkpoint PATH")

    # -- schedule and data ---------------------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        """Warm up lr_min → lr over the first `ramp` of steps, hold, decay back to lr_min over the last `ramp`."""
        n = max(1, int(round(self.ramp * self.steps)))
        if step < n:
            return self.lr_min + (self.lr - self.lr_min) * step / n
        if step >= self.steps - n:
            return self.lr_min + (self.lr - self.lr_min) * (self.steps - 1 - step) / n
        return self.lr

    def grid(self, model) -> list[int]:
        limit = model.config.get_text_config().max_position_embeddings
        top = min(self.max_len or limit, limit)
        if self.min_len > top:
            raise KvtoolError(f"duo --min-len {self.min_len} is beyond the model's context of {limit}")
        if self.min_len <= self.train_sink + self.train_recent:
            raise KvtoolError(f"duo training samples ({self.min_len} tokens) must be longer than sink + recent "
                              f"({self.train_sink} + {self.train_recent})")
        return sorted({int(x) for x in np.linspace(self.min_len, top, self.lengths)})

    def sample(self, tokenizer, grid: list[int], step: int):
        from kvtool.data import passkey_samples

        rng = np.random.default_rng(self.seed * 1_000_003 + step)
        length = grid[int(rng.integers(len(grid)))]
        return passkey_samples(tokenizer, 1, length, n_needles=self.passkeys, words_per_needle=self.words,
                               seed=self.seed * 7919 + step)[0]

    def supervised(self, sample) -> torch.Tensor:
        """Positions whose final hidden states enter the loss: [P]."""
        if self.positions == "answer":
            return torch.cat([torch.arange(a, b) for a, b in sample.answer_spans])
        return torch.arange(sample.meta["qa_start"], sample.input_ids.numel())

    # -- the run -------------------------------------------------------------------------------------------------
    def run(self, model, tokenizer, profile=None, fraction: float | None = None, on_progress=None) -> HeadsResult:
        attention_modules(model)                      # refuses an architecture the tracer does not understand
        dims = Dims.of(model)
        if tokenizer is None:
            raise KvtoolError("duo needs the model's tokenizer to build passkey data")
        grid = self.grid(model)
        gates = torch.ones(dims.layers, dims.kv_heads, requires_grad=True)
        opt = torch.optim.AdamW([gates], lr=self.lr_at(0), weight_decay=0.0)
        start, history = 0, []
        if self.resume:
            start, history = self._load(gates, opt)
        for p in model.parameters():
            p.requires_grad_(False)
        state = _DuoState(gates, dims, self.train_sink, self.train_recent, self.full_branch)
        stop = self.steps if self.stop_after is None else min(self.steps, start + self.stop_after)
        with _duo_attention(model, state):
            for step in range(start, stop):
                for group in opt.param_groups:
                    group["lr"] = self.lr_at(step)
                loss, reg = self._step(model, state, self.sample(tokenizer, grid, step))
                opt.zero_grad(set_to_none=True)
                (loss + self.l1_weight * reg).backward()
                opt.step()
                with torch.no_grad():
                    gates.clamp_(0.0, 1.0)
                history.append([loss.item(), reg.item()])
                done = step + 1
                if self.checkpoint and (done % self.checkpoint_every == 0 or done == stop):
                    self._save(gates, opt, done, history)
                if on_progress is not None:
                    on_progress(done, f"loss {history[-1][0]:.3g} · sparsity {1 - gates.mean().item():.3f}")
        finished = len(history) >= self.steps
        g = gates.detach().clamp(0, 1).float()
        if fraction is None:
            fraction = 0.5 if dims.kv_heads < dims.q_heads else 0.25
        params = {k: v for k, v in asdict(self).items() if k not in _RUN_CONTROL}
        params.update(fraction=fraction, steps_done=len(history), finished=finished,
                      final_loss=history[-1][0] if history else None)
        windows = {"train": {"sink": self.train_sink, "recent": self.train_recent},
                   "deploy": {"sink": self.deploy_sink, "recent": self.deploy_recent}}
        return HeadsResult("duo", {"gate": g, "score": g.clone(), "mask": top_fraction(g, fraction)}, params, windows)

    def _step(self, model, state: "_DuoState", sample):
        ids = sample.input_ids.view(1, -1)
        pos = self.supervised(sample)
        decoder = model.get_decoder()
        state.mode = "teacher"
        with torch.no_grad():
            target = decoder(input_ids=ids, use_cache=False).last_hidden_state[0, pos]   # [P, d]
        state.mode = "student"
        hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state[0, pos]
        state.teacher.clear()
        loss = torch.nn.functional.mse_loss(hidden, target)
        reg = state.gates.abs().mean() if self.l1 == "mean" else state.gates.abs().sum()
        return loss, reg

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def _fingerprint(self) -> dict:
        """The settings a checkpoint must share with the run that resumes it."""
        return {k: v for k, v in asdict(self).items() if k not in _RUN_CONTROL + ("checkpoint_every",)}

    def _save(self, gates, opt, step: int, history: list) -> None:
        from kvtool.fileio import atomic_write

        blob = {"step": step, "gates": gates.detach().clone(), "optimizer": opt.state_dict(), "history": history,
                "config": self._fingerprint()}
        atomic_write(self.checkpoint, lambda tmp: torch.save(blob, tmp))

    def _load(self, gates, opt) -> tuple[int, list]:
        try:
            blob = torch.load(self.checkpoint, weights_only=False)
        except FileNotFoundError:
            raise KvtoolError(f"checkpoint {self.checkpoint} does not exist") from None
        except Exception as exc:
            raise KvtoolError(f"checkpoint {self.checkpoint} is not readable: {type(exc).__name__}") from None
        if blob.get("config") != self._fingerprint():
            raise KvtoolError(f"checkpoint {self.checkpoint} was made with other duo settings; "
                              "resume with the same options or start without --resume")
        if blob["gates"].shape != gates.shape:
            raise KvtoolError(f"checkpoint {self.checkpoint} is for another model (gate shape differs)")
        with torch.no_grad():
            gates.copy_(blob["gates"])
        opt.load_state_dict(blob["optimizer"])
        return int(blob["step"]), list(blob["history"])


class _DuoState:
    """What the duo attention function needs: gates, windows, mode, and the teacher's per-layer full outputs."""

    def __init__(self, gates, dims: Dims, sink: int, recent: int, full_branch: str):
        self.gates, self.dims, self.sink, self.recent, self.full_branch = gates, dims, sink, recent, full_branch
        self.mode = "teacher"
        self.teacher: dict[int, torch.Tensor] = {}
        self._masks: dict[tuple, torch.Tensor] = {}

    def streaming_mask(self, t: int, s: int, device) -> torch.Tensor:
        """Λ mask [1, 1, T, S] (True = attend): causal, and key in the first `sink` or the last `recent` tokens."""
        key = (t, s, str(device))
        if key not in self._masks:
            qpos, kpos = torch.arange(s - t, s, device=device), torch.arange(s, device=device)
            self._masks[key] = window_allowed(qpos, kpos, self.sink, self.recent).view(1, 1, t, s)
        return self._masks[key]


_ACTIVE: list[_DuoState] = []


def duo_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Teacher: plain sdpa (output kept). Student: α·full + (1 − α)·streaming per KV head (out: [B, T, H_q, D])."""
    state = _ACTIVE[-1]
    layer = module.layer_idx
    if state.mode == "teacher":
        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        if state.full_branch == "teacher":
            state.teacher[layer] = out.detach()
        return out, None
    lam = state.streaming_mask(query.shape[2], key.shape[2], query.device)
    mask = lam if attention_mask is None else (attention_mask.bool() & lam)
    stream, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=scaling, **kwargs)
    if state.full_branch == "teacher":
        full = state.teacher[layer]
    else:
        full, _ = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    alpha = state.gates[layer].clamp(0, 1).repeat_interleave(state.dims.group).view(1, 1, -1, 1)   # [1, 1, H_q, 1]
    return alpha * full + (1 - alpha) * stream, None


AttentionInterface.register(DUO_ATTENTION, duo_attention)
AttentionMaskInterface.register(DUO_ATTENTION, sdpa_mask)


@contextmanager
def _duo_attention(model, state: _DuoState):
    """The model runs with the duo attention function; restored afterwards (also on errors)."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(DUO_ATTENTION)
    _ACTIVE.append(state)
    try:
        yield
    finally:
        _ACTIVE.remove(state)
        model.set_attn_implementation(previous)
