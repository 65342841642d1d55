"""What a profile says, as plain data (for tables and --json) and as heatmaps (PNG)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from kvtool import lowrank, sections, sharing
from kvtool.errors import KvtoolError
from kvtool.fileio import atomic_write
from kvtool.profile import Profile

OUTLIER_RATIO = 4.0   # a channel is an outlier when its abs-max exceeds this many times its head's median abs-max


def summarize(profile: Profile, top: int = 10) -> dict:
    """Tables of a profile: retrieval-like and streaming-like heads, layer similarity, outlier channels, PCA, and the
    pca (`lowrank`: ranks by energy) and pod (layer groups and key-map errors) sections where present."""
    out = {"model": profile.model, "calibration": {k: v for k, v in profile.calibration.items() if k != "lengths"}}
    if sections.COPY_SCORE in profile:
        out["retrieval_heads"] = _rank_heads(profile, "retrieval", top)
        out["streaming_heads"] = _rank_heads(profile, "streaming", top)
    if sections.LAYER_SIMILARITY in profile:
        sim = profile[sections.LAYER_SIMILARITY]                                      # [L-1, H_kv]
        out["layer_similarity"] = [
            {"layers": f"{i}-{i + 1}", "mean": round(sim[i].mean().item(), 4), "min": round(sim[i].min().item(), 4),
             "max": round(sim[i].max().item(), 4)} for i in range(sim.shape[0])
        ]
    methods = _methods(profile)
    if methods:
        out["methods"] = methods
    out["outlier_channels"] = _outliers(profile, top)
    out["pca"] = _pca_table(profile)
    if f"{lowrank.SECTION}.key.eigvals" in profile or f"{lowrank.SECTION}.value.eigvals" in profile:
        out["lowrank"] = _lowrank_table(profile)
    if f"{sharing.SECTION}.leader" in profile:
        out["pod"] = _pod_table(profile)
    return out


def _rank_heads(profile: Profile, kind: str, top: int) -> list[dict]:
    ret, stream = profile[sections.COPY_SCORE], profile[sections.STREAMING_MASS]   # [L, H_kv]
    sink, ent = profile[sections.SINK_MASS], profile[sections.ENTROPY]
    L, H = ret.shape
    flat = [(l, h) for l in range(L) for h in range(H)]
    if kind == "retrieval":   # highest copy score first; ties: the least streaming head
        flat.sort(key=lambda lh: (-ret[lh].item(), stream[lh].item(), lh))
    else:                     # most attention mass on sink + recent first
        flat.sort(key=lambda lh: (-stream[lh].item(), ret[lh].item(), lh))
    return [{"layer": l, "kv_head": h, "retrieval_score": round(ret[l, h].item(), 4),
             "streaming_mass": round(stream[l, h].item(), 4), "sink_mass": round(sink[l, h].item(), 4),
             "entropy": round(ent[l, h].item(), 4)} for l, h in flat[:top]]


def _methods(profile: Profile) -> dict:
    """Per calibration method with a `heads.<method>.mask`: how many retrieval heads, and which."""
    out = {}
    for name in sorted({k.split(".")[1] for k in profile.tensors if k.startswith("heads.") and k.endswith(".mask")}):
        mask, score = profile[sections.heads_mask(name)], profile[sections.heads_score(name)]
        heads = [(l, h) for l, h in mask.nonzero().tolist()]
        heads.sort(key=lambda lh: -score[lh].item())
        out[name] = {"retrieval_heads": len(heads), "kv_heads": mask.numel(),
                     "fraction": round(len(heads) / mask.numel(), 4),
                     "heads (layer, kv_head) by score": [list(lh) for lh in heads]}
    return out


def _outliers(profile: Profile, top: int) -> list[dict]:
    rows = []
    for name in ("key_pre", "key_post", "value"):
        key = sections.channels(name, "absmax")
        if key not in profile:
            continue
        absmax = profile[key]                                                   # [L, H_kv, D]
        ratio = absmax / absmax.median(-1, keepdim=True).values.clamp_min(1e-6)
        idx = (ratio >= OUTLIER_RATIO).nonzero().tolist()
        for l, h, c in idx:
            rows.append({"tensor": name, "layer": l, "kv_head": h, "channel": c,
                         "absmax": round(absmax[l, h, c].item(), 3), "x_median": round(ratio[l, h, c].item(), 2)})
    rows.sort(key=lambda r: -r["x_median"])
    return rows[:top]


def explained(profile: Profile, name: str) -> torch.Tensor:
    """Cumulative explained-variance fraction [L, H_kv, D] of the PCA of `name` (key_pre / key_post / value)."""
    ev = profile[sections.pca(name, "eigvals")].double()
    return (ev.cumsum(-1) / ev.sum(-1, keepdim=True).clamp_min(1e-30)).float()


def _pca_table(profile: Profile) -> list[dict]:
    rows = []
    for name in ("key_pre", "key_post", "value"):
        if sections.pca(name, "eigvals") not in profile:
            continue
        cum = explained(profile, name)
        d = cum.shape[-1]
        ranks = sorted({max(1, d // 16), max(1, d // 8), max(1, d // 4), max(1, d // 2)})
        rows.append({"tensor": name, "head_dim": d,
                     **{f"rank {r}": round(cum[..., r - 1].mean().item(), 4) for r in ranks},
                     "worst head @ d/4": round(cum[..., max(1, d // 4) - 1].min().item(), 4)})
    return rows


ENERGIES = (0.9, 0.99)


def _lowrank_table(profile: Profile) -> list[dict]:
    """Per kind (pre-RoPE key, value) of `kvtool calibrate --method pca`: the ranks `auto:E` picks, per layer (the
    largest over the layer's KV heads, as the runtime keeps them) — mean and max over layers — and per KV head."""
    rows = []
    for name in lowrank.NAMES:
        key = f"{lowrank.SECTION}.{name}.eigvals"
        if key not in profile:
            continue
        ev = profile[key]                                                       # [L, H, D]
        row = {"tensor": "key (pre-RoPE)" if name == "key" else name, "head_dim": ev.shape[-1]}
        for e in ENERGIES:
            per_layer = lowrank.choose_rank(ev, f"auto:{e}")[:, 0].float()
            per_head = lowrank.choose_rank(ev, f"auto:{e}", per="head").float()
            row[f"rank@{e:g} mean"] = round(per_layer.mean().item(), 1)
            row[f"rank@{e:g} max"] = int(per_layer.max().item())
            row[f"rank@{e:g} per head: mean"] = round(per_head.mean().item(), 1)
            power = f"{lowrank.SECTION}.{name}.power"
            if power in profile:                        # energy those ranks keep on the pca pass's own data
                kept = lowrank.energy(profile[power]).gather(-1, lowrank.choose_rank(ev, f"auto:{e}")[..., None] - 1)
                row[f"pass energy@{e:g}"] = round(kept.mean().item(), 4)
        rows.append(row)
    return rows


def _pod_table(profile: Profile) -> list[dict]:
    """Groups of `kvtool calibrate --method pod` with their members' key-map fit error and the error of sharing
    the leader's keys unchanged (relative squared errors, mean over the group's non-leader layers and KV heads)."""
    leader = profile[f"{sharing.SECTION}.leader"]                               # [L, H]
    fit, share = profile[f"{sharing.SECTION}.fit_error"], profile[f"{sharing.SECTION}.share_error"]
    held = profile.tensors.get(f"{sharing.SECTION}.heldout_error")
    held_rows = lambda h, sel: held[sel] if h is None else held[sel, h]         # noqa: E731
    same = bool((leader == leader[:, :1]).all())
    rows = []
    for h in ([None] if same else range(leader.shape[1])):
        col = leader[:, 0 if h is None else h]
        for first, last in sharing.spans(col):
            if last == first:
                continue
            sel = slice(first + 1, last + 1)
            f, s = (t[sel] if h is None else t[sel, h] for t in (fit, share))
            rows.append({"kv_head": "all" if h is None else h, "layers": f"{first}-{last}", "leader": first,
                         "size": last - first + 1, "fit error (map)": round(f.mean().item(), 4),
                         "worst fit": round(f.max().item(), 4),
                         **({"held-out error": round(held_rows(h, sel).mean().item(), 4)} if held is not None else {}),
                         "error (keys as is)": round(s.mean().item(), 4)})
    return rows


def plot(profile: Profile, path: str | os.PathLike) -> Path:
    """Heatmaps (layer × KV head) of retrieval score, streaming mass, adjacent-layer similarity, PCA at d/4."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches
    import matplotlib.pyplot as plt

    panels = [(sections.COPY_SCORE, "retrieval (copy) score", "magma"),
              (sections.STREAMING_MASS, "attention mass on sink + recent", "viridis"),
              (sections.LAYER_SIMILARITY, "similarity to next layer (1 - JS)", "cividis")]
    panels = [(k, t, c) for k, t, c in panels if k in profile]
    panels += [(sections.heads_score(m), f"{m} score (□ = retrieval head)", "magma") for m in _methods(profile)]
    pca = [n for n in ("key_pre", "value") if sections.pca(n, "eigvals") in profile]
    extra = _method_panels(profile)
    n = len(panels) + len(pca) + len(extra)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 6), squeeze=False)
    axes = axes[0]
    for ax, (key, title, cmap) in zip(axes, panels):
        _heat(fig, ax, profile[key], title, cmap)
        mask_key = key.replace(".score", ".mask")
        if key.endswith(".score") and mask_key in profile:
            for l, h in profile[mask_key].nonzero().tolist():
                ax.add_patch(matplotlib.patches.Rectangle((h - 0.5, l - 0.5), 1, 1, fill=False, edgecolor="cyan", lw=1.2))
    for ax, name in zip(axes[len(panels):], pca):
        cum = explained(profile, name)
        r = max(1, cum.shape[-1] // 4)
        _heat(fig, ax, cum[..., r - 1], f"{name} PCA: variance in rank {r}", "plasma")
    for ax, (data, title, cmap, lines) in zip(axes[len(panels) + len(pca):], extra):
        _heat(fig, ax, data, title, cmap)
        for y in lines:                                                         # group boundaries
            ax.axhline(y, color="white", lw=1.0)
    fig.suptitle(f"kvtool profile: {profile.model.get('name') or profile.model.get('architecture')}")
    fig.tight_layout()
    return _save_figure(fig, Path(path))


def _method_panels(profile: Profile) -> list[tuple]:
    """(data [L, H], title, colormap, horizontal lines) for the pca and pod sections."""
    out = []
    for name in lowrank.NAMES:
        key = f"{lowrank.SECTION}.{name}.eigvals"
        if key in profile:
            ranks = lowrank.choose_rank(profile[key], "auto:0.99", per="head")
            out.append((ranks.float(), f"{name} latent: rank for 99% energy", "viridis", []))
    if f"{sharing.SECTION}.leader" in profile:
        leader = profile[f"{sharing.SECTION}.leader"]
        starts = [l - 0.5 for l, _ in sharing.spans(leader[:, 0])][1:]
        out.append((profile[f"{sharing.SECTION}.fit_error"], "pod key-map fit error (— = group edge)", "magma",
                    starts))
    return out


def _heat(fig, ax, data: torch.Tensor, title: str, cmap: str) -> None:
    im = ax.imshow(data.float().numpy(), aspect="auto", cmap=cmap, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer")
    fig.colorbar(im, ax=ax, fraction=0.05)


def _save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    try:
        if path.suffix.lower() != ".png":
            raise KvtoolError(f"--plot {path}: give a .png file name")
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
