"""The low-rank store: every token of its heads, as 16-bit sink | low-rank latent body | 16-bit recent buffer
(Palu, Chang et al., arXiv 2407.21118; Eigen Attention, Saxena et al., arXiv 2408.05646; ShadowKV, Sun et al.,
arXiv 2410.21465). The bases come from `kvtool calibrate --method pca` (the profile's `lowrank.` section, see
kvtool.lowrank and kvtool/lowrank_setup.py).

- Keys are kept PRE-RoPE in the latent: RoPE is undone on the post-RoPE key the attention hands over (the model's own
  rotary table, exactly as `krope=pre` does in the quantized store), then z_k = (k_pre − mean_k) @ basis_k[:, :r_k].
  On read a block is reconstructed (z_k @ basis_kᵀ + mean_k) and RoPE is applied at its positions. So `krank`
  always means pre-RoPE keys; the quantized store's `krope` field does not apply here (it is not refused: a latent of
  post-RoPE keys would mix positions, so there is no post variant).
- Values are kept in the latent z_v = (v − mean_v) @ basis_v[:, :r_v] and never reconstructed token by token: per
  block, Σ p·v̂ = (Σ p·z_v) @ basis_vᵀ + (Σ p)·mean_v (kvtool.lowrank.weighted_values, exact for any weights).
- Optional quantization of the latent at `k` / `v` bits (2, 3, 4, 8; 16 = the latent in 16 bits): static ranges per
  latent coordinate and head, for both the key and the value latent, from calibration (`lo/hi` with kclip=1,
  else `qlo/qhi`), uniform levels, kvtool.quant's packing; values outside the range are clamped. Packing needs a
  multiple of 8 codes, so a quantized latent's rank is rounded up to a multiple of 8 (at most head_dim).
- The first `sink` tokens and the last `buffer` tokens stay 16-bit and exact (post-RoPE), as in the quantized store;
  tokens leave the buffer in groups of `flush`.

The rank is one per layer for the heads of a store (the largest over them: every head keeps at least the asked
energy; a layer's latent is one [B, h, T, r] tensor). `attend` reads the body block by block with the online-softmax
(log-sum-exp) merge of the quantized store, so only one block's reconstructed keys exist in float at a time.
`nbytes()` counts the sink, buffer, latents (or packed codes) and the per-layer constants reading needs: per head
the mean [D] and the r basis columns [D, r] of keys and of values (float32), and the latent ranges (float32).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtool import quant
from kvtool.kvstore import RopeTable
from kvtool.lowrank import RankSpec, parse_rank, reconstruct, weighted_values
from kvtool.policy import Field, register_field
from kvtool.stores.base import (SixteenBitRollback, Store, append_sixteen_bit, attend_sixteen_bit, batch_rows,
                                register, select_sixteen_bit, softcap_, tensor_bytes)
from kvtool.stores.quantized import FLUSH, unpack_float

BLOCK = 1024                   # body tokens per block: bounds the float scratch of one read (reconstructed keys)


def _rank_field(name: str, kind: str) -> Field:
    def parse(text: str, _method) -> dict:
        return {name: parse_rank(text, 1 << 30, name)}          # rank > head_dim is checked when the cache is built

    return Field(name, parse, {name: None}, "`r` (1..head_dim) or `auto:E` (E in (0, 1])",
                 f"Rank of the PCA latent of retrieval heads' {kind} (low-rank store; needs `kvtool calibrate "
                 f"--method pca`). `auto:E`: per layer the smallest rank keeping energy ≥ E on every retrieval "
                 f"head. Unset with the other rank set: full rank (head_dim). "
                 + ("Keys are kept pre-RoPE (whatever `krope` says)." if kind == "keys" else
                    "Projected back after the weighted sum (exact)."), "lowrank")


register_field(_rank_field("krank", "keys"), _rank_field("vrank", "values"))


@dataclass
class Latent:
    """One kind's projection for a store's h heads: mean [h, D], basis [h, D, r] (the first r eigenvectors as
    columns), and an optional quantizer over the r latent coordinates (ranges lo/span [h, r], uniform levels)."""
    mean: torch.Tensor
    basis: torch.Tensor
    quantizer: quant.ChannelQuantizer | None = None

    @property
    def rank(self) -> int:
        return self.basis.shape[-1]

    @property
    def bits(self) -> int:
        return 16 if self.quantizer is None else self.quantizer.bits

    def to(self, device) -> "Latent":
        return Latent(self.mean.to(device), self.basis.to(device),
                      None if self.quantizer is None else self.quantizer.to(device))

    def select(self, heads) -> "Latent":
        """The latent of a subset of its heads (index or slice into h)."""
        q = self.quantizer
        return Latent(self.mean[heads], self.basis[heads],
                      None if q is None else quant.ChannelQuantizer(q.lo[heads], q.span[heads], q.bits, q.levels))

    def nbytes(self) -> int:
        """The constants reading needs: mean, r basis columns, and the latent ranges + levels when quantized."""
        return tensor_bytes(self.mean, self.basis) + (0 if self.quantizer is None else self.quantizer.nbytes())

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, h, n, D] → z [B, h, n, r] float32."""
        return (x.float() - self.mean[:, None, :]) @ self.basis

    def encode(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """x [B, h, n, D] → stored latent: [B, h, n, r] in `dtype`, or packed codes [B, h, n, r·bits/8] uint8."""
        z = self.project(x)
        return z.to(dtype) if self.quantizer is None else self.quantizer.quantize(z)

    def decode(self, stored: torch.Tensor) -> torch.Tensor:
        """Stored latent → z float32 [B, h, n, r]."""
        q = self.quantizer
        if q is None:
            return stored.float()
        if q.bits in (2, 4, 8):                                              # uniform levels: lo + span/(2^b−1)·code
            step = (q.span * (1.0 / (2 ** q.bits - 1))).unsqueeze(1)           # [h, 1, r]
            return torch.addcmul(q.lo.unsqueeze(1), step, unpack_float(stored, q.bits))
        return q.dequantize(stored)


@dataclass
class LatentBlock:
    """Consecutive body tokens start..start+n-1: k, v the stored latents [B, h, n, r] (or packed codes)."""
    start: int
    n: int
    k: torch.Tensor
    v: torch.Tensor


@register("lowrank")
class LowRankStore(SixteenBitRollback, Store):
    """sink_k/sink_v [B, h, s, D] and buf_k/buf_v [B, h, b, D] in `dtype` (post-RoPE keys), body `blocks` of latents.

    rope: the model's RopeTable (keys arrive post-RoPE; None: keys carry no RoPE, e.g. in tests)."""

    reads = ("sink", "buffer", "krank", "vrank", "k", "v", "kclip", "dtype")
    exact = False

    def __init__(self, key: Latent, value: Latent, rope: RopeTable | None, sink: int, buffer: int,
                 dtype: torch.dtype, block: int = BLOCK, flush: int = 1):
        self.key, self.value, self.rope = key, value, rope
        self.n_sink, self.n_buffer, self.dtype, self.block, self.flush = sink, buffer, dtype, block, flush
        self.reset()

    @classmethod
    def from_policy(cls, policy, dtype: torch.dtype, key: Latent, value: Latent, rope=None, **_) -> "LowRankStore":
        return cls(key, value, rope, policy.sink, policy.buffer, dtype, block=BLOCK, flush=FLUSH)

    def reset(self) -> None:
        self.sink_k = self.sink_v = self.buf_k = self.buf_v = None
        self.blocks: list[LatentBlock] = []
        self.n_body = 0
        self.first = self.seen = 0

    def __len__(self) -> int:
        return 0 if self.sink_k is None else self.sink_k.shape[2] + self.n_body + self.buf_k.shape[2]

    # ---- append -------------------------------------------------------------------------------------------------

    def append(self, k, v, pos):
        """k, v [B, h, t, D] at positions pos [t] (consecutive, continuing what was appended)."""
        if self.sink_k is None:
            self.key, self.value = self.key.to(k.device), self.value.to(k.device)
        append_sixteen_bit(self, k, v, pos, self._project)

    def _project(self, xk: torch.Tensor, xv: torch.Tensor, start: int) -> None:
        """Append xk (post-RoPE), xv [B, h, n, D] at positions start..start+n-1 to the body as latents."""
        n = xk.shape[2]
        pre = self.rope.unrotate(xk, start) if self.rope is not None else xk.float()
        new = LatentBlock(start, n, self.key.encode(pre, self.dtype), self.value.encode(xv, self.dtype))
        last = self.blocks[-1] if self.blocks else None
        if last is None or last.n >= self.block:
            self.blocks.append(new)
        else:
            last.k, last.v = torch.cat([last.k, new.k], 2), torch.cat([last.v, new.v], 2)
            last.n += n
        self.n_body += n

    # ---- read ---------------------------------------------------------------------------------------------------

    def block_keys(self, blk: LatentBlock) -> torch.Tensor:
        """The keys of one body block as attention sees them (reconstructed, then RoPE), float32 [B, h, n, D]."""
        x = reconstruct(self.key.decode(blk.k), self.key.mean[:, None, :], self.key.basis)
        return self.rope.rotate_rows(x, blk.start) if self.rope is not None else x

    def block_values(self, blk: LatentBlock) -> torch.Tensor:
        """The values of one body block reconstructed, float32 [B, h, n, D] (for `read`; `attend` never does this)."""
        return reconstruct(self.value.decode(blk.v), self.value.mean[:, None, :], self.value.basis)

    def attend(self, q, qpos, scaling, new=None):
        """q [B, h·G, t, D] → (out, lse) over sink | latent body blocks | buffer (| the exact new chunk), causal."""
        parts = []
        b, hq, t, d = q.shape
        if self.blocks:
            h = self.sink_k.shape[1]
            g = hq // h
            qs = q.float().reshape(b, h, g * t, d) * scaling                    # [B, h, G·t, D]
            qmin = int(qpos.min())
            vmean = self.value.mean[:, None, :]                                 # [h, 1, D]
            for blk in self.blocks:
                sc = torch.matmul(qs, self.block_keys(blk).transpose(-1, -2))    # [B, h, G·t, n]
                softcap_(sc, scaling)
                if blk.start + blk.n - 1 > qmin:
                    kpos = torch.arange(blk.start, blk.start + blk.n, device=q.device)
                    sc.masked_fill_(~self.visible(qpos, kpos).repeat(g, 1), float("-inf"))
                m = sc.amax(-1, keepdim=True).clamp_min(-1e30)                  # [B, h, G·t, 1]
                pw = sc.sub_(m).exp_()
                lsum = pw.sum(-1, keepdim=True)
                pw.div_(lsum.clamp_min(1e-30))                                  # normalised weights (0 rows stay 0)
                out = weighted_values(pw, self.value.decode(blk.v), vmean, self.value.basis)   # [B, h, G·t, D]
                parts.append((out.reshape(b, hq, t, d), (m + lsum.log()).reshape(b, hq, t)))
        return attend_sixteen_bit(self, q, qpos, scaling, new, parts)

    def read(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every held token reconstructed whole: keys (post-RoPE), values float32 [B, h, n, D] and positions [n]
        (for tests; `attend` never builds this)."""
        ks = [self.sink_k.float()] + [self.block_keys(b) for b in self.blocks] + [self.buf_k.float()]
        vs = [self.sink_v.float()] + [self.block_values(b) for b in self.blocks] + [self.buf_v.float()]
        return torch.cat(ks, 2), torch.cat(vs, 2), torch.arange(self.first, self.seen, device=self.sink_k.device)

    # ---- batch and rollback (generate's beam search, num_return_sequences, assisted decoding) --------------------

    def select_batch(self, idx):
        def rows(blk: LatentBlock) -> None:
            blk.k, blk.v = batch_rows(blk.k, idx), batch_rows(blk.v, idx)
        select_sixteen_bit(self, idx, rows)

    # ---- bytes --------------------------------------------------------------------------------------------------

    def tensors(self) -> list[torch.Tensor]:
        held = [t for t in (self.sink_k, self.sink_v, self.buf_k, self.buf_v) if t is not None]
        for blk in self.blocks:
            held += [blk.k, blk.v]
        return held

    def constants_nbytes(self) -> int:
        return self.key.nbytes() + self.value.nbytes()

    def nbytes(self) -> int:
        return tensor_bytes(*self.tensors()) + (self.constants_nbytes() if len(self) else 0)


__all__ = ["BLOCK", "Latent", "LatentBlock", "LowRankStore", "RankSpec"]
