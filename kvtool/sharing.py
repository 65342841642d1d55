"""Keys shared across layers (PoD, arXiv 2412.02252; MiniCache, arXiv 2405.14366): the math the runtime and
`calibrate/pod.py` share (no calibration imports here).

* `group_layers`: PoD's greedy grouping — walk the layers in order and let layer l join the group of layer l−1 while
  the similarity of their attention is at least a threshold (and the group is not full); a group's first (lowest)
  layer is its leader, whose keys the whole group reads for distant tokens. Layers listed as excluded (a model's
  sliding-window layers) always stand alone. `parse_groups` reads explicit groups such as "3-8,23-28".
* `fit_maps` / `map_error`: the training-free step beyond PoD: per layer and KV head a least-squares map W [D, D] with
  leader_keys @ W ≈ own_keys, from accumulated moments (XᵀX, XᵀY, YᵀY), with a ridge term, and its relative error.
The per-layer proximal part (sink + recent) and the shared distant part join by the runtime's log-sum-exp merge
(`kvtool.stores.base.merge`), like any split of the keys.
"""

from __future__ import annotations

import torch

from kvtool.errors import KvtoolError

SECTION = "layers.pod"
FIELDS = ("group", "leader", "map", "fit_error", "share_error", "heldout_error")


def check_threshold(threshold: float) -> float:
    if not 0.0 <= float(threshold) <= 1.0:
        raise KvtoolError(f"--threshold must lie in [0, 1] (got {threshold:g}): it is a similarity 1 − JS/ln 2")
    return float(threshold)


def sliding_layers(layer_types) -> set[int]:
    """Indices of sliding-window layers from a config's `layer_types` (None: none)."""
    return {i for i, t in enumerate(layer_types or []) if "sliding" in str(t)}


def group_layers(similarity: torch.Tensor, threshold: float, max_group: int | None = None,
                 excluded=()) -> torch.Tensor:
    """Leaders of greedy consecutive groups: similarity [L-1] (layer l vs l+1) → leader [L], or [L-1, H] → [L, H]
    (each column grouped on its own). Layer l joins l−1's group when similarity[l-1] ≥ threshold, the group has fewer
    than `max_group` layers (None: no limit) and neither l nor l−1 is in `excluded`. leader[l] is the group's first
    layer (leader[l] == l for a leader)."""
    check_threshold(threshold)
    if max_group is not None and max_group < 1:
        raise KvtoolError(f"--max-group must be at least 1 (got {max_group})")
    if similarity.dim() == 2:
        cols = [group_layers(similarity[:, h], threshold, max_group, excluded) for h in range(similarity.shape[1])]
        return torch.stack(cols, -1)
    if similarity.dim() != 1:
        raise KvtoolError(f"similarity must be [layers-1] or [layers-1, kv_heads] (got {list(similarity.shape)})")
    layers = similarity.shape[0] + 1
    excluded = set(excluded)
    leader = torch.arange(layers)
    size = 1
    for l in range(1, layers):
        joins = (similarity[l - 1].item() >= threshold and l not in excluded and l - 1 not in excluded
                 and (max_group is None or size < max_group))
        if joins:
            leader[l] = leader[l - 1]
            size += 1
        else:
            size = 1
    return leader


def group_ids(leader: torch.Tensor) -> torch.Tensor:
    """Group numbers 0, 1, ... in layer order, same shape as `leader` ([L] or [L, H])."""
    if leader.dim() == 2:
        return torch.stack([group_ids(leader[:, h]) for h in range(leader.shape[1])], -1)
    starts = leader == torch.arange(leader.shape[0])
    return starts.long().cumsum(0) - 1


def spans(leader: torch.Tensor) -> list[tuple[int, int]]:
    """Groups of a per-layer leader [L] as (first, last) layer pairs, singletons included."""
    out = []
    for l, lead in enumerate(leader.tolist()):
        if lead == l:
            out.append((l, l))
        else:
            out[-1] = (out[-1][0], l)
    return out


def parse_groups(text: str, layers: int, excluded=()) -> torch.Tensor:
    """Explicit groups "3-8,23-28" (first-last, inclusive; unlisted layers stand alone) → leader [L]."""
    leader = torch.arange(layers)
    taken: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            first, last = (int(x) for x in part.split("-")) if "-" in part else (int(part), int(part))
        except ValueError:
            raise KvtoolError(f"--groups: {part!r} is not a layer range such as 3-8") from None
        if not 0 <= first <= last < layers:
            raise KvtoolError(f"--groups: {part} is not a range of layers 0..{layers - 1}")
        members = set(range(first, last + 1))
        if members & taken:
            raise KvtoolError(f"--groups: {part} overlaps another group")
        sliding = sorted(members & set(excluded)) if last > first else []
        if sliding:
            raise KvtoolError(f"--groups: {part} spans sliding-window layer {sliding[0]}, which keeps its own window "
                              "and cannot share keys")
        taken |= members
        leader[first:last + 1] = first
    return leader


def fit_maps(xtx: torch.Tensor, xty: torch.Tensor, yty: torch.Tensor, ridge: float = 1e-3):
    """Ridge least squares W = (XᵀX + λI)⁻¹ XᵀY per batch entry, λ = ridge · trace(XᵀX) / D.

    xtx, xty, yty: [..., D, D] float64 sums over calibration tokens (X = the leader's keys, Y = the layer's own).
    Returns (W [..., D, D] float32, fit_error [...], share_error [...]): the relative squared errors
    ‖Y − XW‖² / ‖Y‖² and, for sharing the leader's keys unchanged (W = I), ‖Y − X‖² / ‖Y‖²."""
    if ridge < 0:
        raise KvtoolError(f"--ridge must be at least 0 (got {ridge:g})")
    d = xtx.shape[-1]
    eye = torch.eye(d, dtype=xtx.dtype)
    lam = ridge * xtx.diagonal(dim1=-2, dim2=-1).sum(-1) / d                     # [...]
    a = xtx + (lam[..., None, None] + 1e-12) * eye
    w = torch.linalg.solve(a, xty)                                             # [..., D, D]
    eye = torch.eye(d, dtype=xtx.dtype).expand_as(w)
    return w.float(), map_error(w, xtx, xty, yty), map_error(eye, xtx, xty, yty)


def map_error(w: torch.Tensor, xtx: torch.Tensor, xty: torch.Tensor, yty: torch.Tensor) -> torch.Tensor:
    """Relative squared error ‖Y − XW‖² / ‖Y‖² [...] of maps w [..., D, D] on data given by its moments (float64
    sums [..., D, D]): tr(YᵀY) − 2 tr(WᵀXᵀY) + tr(WᵀXᵀXW), over tr(YᵀY). Works for data the map was not fitted on."""
    w = w.to(xtx.dtype)
    tr = lambda m: m.diagonal(dim1=-2, dim2=-1).sum(-1)                         # noqa: E731
    err = tr(yty) - 2 * tr(w.transpose(-1, -2) @ xty) + tr(w.transpose(-1, -2) @ xtx @ w)
    return (err / tr(yty).clamp_min(1e-30)).clamp_min(0).float()
