"""The quantized window store: a streaming head's sink + recent window, with the window's older tokens quantized.

A streaming head (StreamingLLM, Xiao et al., arXiv 2309.17453; DuoAttention's streaming heads, arXiv 2410.10819)
sees only the first `sink` and the last `recent` tokens. In 16 bits (`WindowStore`) that window is the biggest
part of a compressed cache once most heads stream: at 8x on 2k-token contexts it holds about three quarters of the
bytes. Here the window is laid out like the quantized store, 16-bit sink | quantized body | 16-bit buffer, with the
same calibrated key ranges (pre- or post-RoPE, KVQuant arXiv 2401.18079) and per-token value groups (KIVI arXiv
2402.02750), so the same bytes hold a window about 3-4x longer (policy fields `wk`, `wv`).

Tokens that fall out of the window are freed, not masked: the body's oldest tokens are cut off (the block copied
without them) once at least `flush` of them are out of the window, so up to `flush - 1` tokens older than the window
may still be held between cuts. They are invisible to every query (`visible` is the streaming rule) and counted in
`nbytes()`. The buffer must fit inside the window (recent ≥ buffer + flush), so everything a decode step reads from
the buffer is visible.
"""

from __future__ import annotations

import torch

from kvtool.errors import KvtoolError
from kvtool.policy import _bits, register_field, simple
from kvtool.stores.base import register
from kvtool.stores.quantized import BLOCK, FLUSH, Block, QuantizedStore
from kvtool.windows import window_allowed

register_field(
    simple("wk", lambda t: _bits("wk", t), 16, "2, 3, 4, 8, 16 (`4bit` also works)",
           "Bits per key element of streaming heads' window (16: a plain 16-bit window). Below 16 the window "
           "older than `buffer` tokens is quantized like retrieval heads' keys (same `krope`, `kclip`, "
           "`codebook`), so the same bytes hold a longer `recent`.", "qwindow"),
    simple("wv", lambda t: _bits("wv", t), 16, "2, 3, 4, 8, 16 (`4bit` also works)",
           "Bits per value element of streaming heads' window (16: not quantized); values use `vgroup`.",
           "qwindow"),
)


@register("qwindow")
class QuantizedWindowStore(QuantizedStore):
    """sink_k/sink_v [B, h, s, D] and buf_k/buf_v [B, h, b, D] in `dtype`, body `blocks` of the window's older
    tokens (quantized; see QuantizedStore; `n_body` counts every token that ever entered the body, so the next one's
    position follows from it, while the blocks hold only what is still in the window)."""

    reads = ("sink", "recent", "buffer", "wk", "wv", "krope", "kclip", "outliers", "codebook", "vgroup", "dtype")

    def __init__(self, k_bits: int, v_bits: int, sink: int, recent: int, buffer: int, dtype: torch.dtype,
                 key=None, value=None, backend: str = "torch", block: int = BLOCK, flush: int = 1):
        if recent < buffer + flush:
            raise KvtoolError(f"policy recent={recent} is shorter than buffer={buffer} plus the {flush} tokens that "
                              f"leave the buffer together: a quantized window (wk/wv < 16) needs recent ≥ "
                              f"{buffer + flush}")
        if k_bits >= 16 and v_bits >= 16:
            raise ValueError("a quantized window with wk=wv=16 quantizes nothing: use WindowStore")
        self.n_recent = recent
        super().__init__(k_bits, v_bits, sink, buffer, dtype, key, value, backend, block=block, flush=flush)

    @classmethod
    def from_policy(cls, policy, dtype: torch.dtype, key=None, value=None, backend="torch", **_):
        return cls(policy.wk, policy.wv, policy.sink, policy.recent, policy.buffer, dtype, key, value, backend,
                   block=BLOCK, flush=FLUSH)

    def __len__(self) -> int:
        return 0 if self.sink_k is None else self.sink_k.shape[2] + sum(b.n for b in self.blocks) + self.buf_k.shape[2]

    def visible(self, qpos, kpos):
        return window_allowed(qpos, kpos, self.n_sink, self.n_recent)

    def _masks(self, blk: Block, qpos: torch.Tensor, qmin: int) -> bool:
        # causal, or a key older than the window of the latest query
        return blk.start + blk.n - 1 > qmin or blk.start <= int(qpos.max()) - self.n_recent

    def append(self, k, v, pos):
        """k, v [B, h, t, D] at positions pos [t]; then the body's tokens that no later query can see are cut."""
        super().append(k, v, pos)
        self._evict()

    def _evict(self) -> None:
        """Free the body tokens older than the window of the next query (position `seen`), once `flush` of them
        are out: a query at `seen` sees positions > seen - recent. Nothing is cut while `record_past` is on
        (assisted decoding may crop back to an earlier position, whose window reaches further back)."""
        if not self.blocks or self.record_past:                             # assisted decoding may crop back
            return
        oldest = self.seen - self.n_recent + 1                               # first position still in the window
        out = max(0, oldest - self.blocks[0].start)
        if out < self.flush:
            return
        while out and self.blocks:
            blk = self.blocks[0]
            if out >= blk.n:                                                 # the whole block is out
                self.blocks.pop(0)
                out -= blk.n
                continue
            self._cut(blk, out)
            out = 0

    def crop(self, end: int) -> None:
        """Drop positions ≥ end (only from the 16-bit buffer, see QuantizedStore); then cut what the window lost
        while `record_past` kept it."""
        super().crop(end)
        self._evict()

    def _cut(self, blk: Block, c: int) -> None:
        """Drop the first c tokens of a block; the kept ones are copied so the cut tokens' memory is freed."""
        blk.k, blk.v = blk.k[:, :, c:].clone(), blk.v[:, :, c:].clone()
        if blk.v_lo is not None:
            blk.v_lo, blk.v_span = blk.v_lo[:, :, c:].clone(), blk.v_span[:, :, c:].clone()
        if blk.out_idx is not None:                                          # token-major [n, B, h, D] flat index
            b, h, _, d = self.sink_k.shape
            per = b * h * d                                                  # elements per token
            keep = blk.out_idx >= c * per
            blk.out_idx = (blk.out_idx[keep] - c * per).to(torch.int32)
            blk.out_val = blk.out_val[keep].clone()
        blk.start += c
        blk.n -= c

    def read(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every held token dequantized whole (tests and the reference): keys, values float32 [B, h, n, D] and their
        positions [n] (sink | body blocks | buffer; the body starts wherever the last cut left it)."""
        ks, vs, _ = super().read()
        dev = self.sink_k.device
        pos = [torch.arange(self.first, self.first + self.sink_k.shape[2], device=dev)]
        pos += [torch.arange(b.start, b.start + b.n, device=dev) for b in self.blocks]
        pos.append(torch.arange(self.seen - self.buf_k.shape[2], self.seen, device=dev))
        return ks, vs, torch.cat(pos)

    def fused_ok(self) -> bool:
        """The fused CuPy kernel reads every held token; tokens past the window wait for the next cut, so this store
        takes the torch path."""
        return False
