"""Issue 12's token-selection sweep as a picture: passkey accuracy against the bytes each cache holds, one panel per
query regime (question inside the prompt / after compression), one line per policy family across its budgets
(128/256/512/1024 tokens), 95% bootstrap intervals of the accuracy as error bars, the full cache as a dashed line.

    python benchmarks/selection_plot.py docs/bench-rows/issue12-selection.jsonl --plot docs/issue12-selection.png
    python benchmarks/selection_plot.py docs/bench-rows/issue12-selection.jsonl --grid    # Markdown, a table per regime

A family is a spec with its budget written as B (the StreamingLLM window's recent=B-4 likewise); the short names are
those of benchmarks/issue12_specs.sh. Rows of other tasks (NLL) are left out. Prints the points it drew.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rows_table import load  # noqa: E402  (benchmarks/ is not a package)

NAMES = {   # family (budget as B) -> the short name of benchmarks/issue12_specs.sh
    "select=snapkv++,budget=B": "SPP (SnapKV++)",
    "select=snapkv,budget=B": "SNAP (plain SnapKV)",
    "select=snapkv++,budget=B,read=0.0625,page=16": "ROCK (stage 2, pages of 16)",
    "select=snapkv++,budget=B,read=0.0625,page=4,rdims=16": "ROCK4 (stage 2, pages of 4)",
    "select=snapkv++,budget=B,read=32,page=4,rdims=16": "ROCK4, 32 tokens read",
    "select=snapkv++,budget=B,k=4,v=4,sink=4,buffer=32": "SPPQ (SnapKV++, 4-bit)",
    "heads=none,sink=4,recent=B-4": "STR (StreamingLLM)",
    "select=h2o,budget=B": "H2O",
    "heads=duo:0.5,select=snapkv++,budget=B,sink=4,recent=B-4": "HSPP (head split + SnapKV++)",
    "heads=duo:0.5,select=snapkv++,budget=B,sink=4,recent=B-4,k=4,v=4,buffer=32": "HSPPQ (… + 4-bit)",
    "heads=duo:0.125,k=4,v=3,sink=4,recent=864,buffer=0,wk=4,wv=4,krope=pre,vgroup=64": "P8 (issue 11's 8x)",
    "heads=razor:0.1": "RZ10 (razor 10% heads)",
    "heads=razor:0.1,k=4,v=4,wk=4,wv=4": "RZ10Q (… 4-bit)",
}


def family(spec: str) -> str:
    """The spec with its token budget as B: `select=h2o,budget=256` -> `select=h2o,budget=B`."""
    m = re.search(r"budget=(\d+)", spec)
    if not m:        # StreamingLLM at budget B is the window sink 4 + recent B-4
        return re.sub(r"^heads=none,sink=4,recent=\d+$", "heads=none,sink=4,recent=B-4", spec)
    b = int(m.group(1))
    out = spec.replace(f"budget={b}", "budget=B")
    return out.replace(f"recent={b - 4}", "recent=B-4")


def interval(hits, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the accuracy (the samples resampled)."""
    h = np.asarray(hits, dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(h), size=(n, len(h)))
    means = h[idx].mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def panels(rows_path: Path) -> list[tuple[str, dict[str, list]]]:
    """[(regime, {family: [(bytes fraction, accuracy, lo, hi, spec, correct, samples)]})] for the passkey setups of the
    file."""
    out = []
    for setup, results in load(rows_path):
        if not results or results[0].correct is None:
            continue
        regime = "question after compression" if setup.get("query") == "after" else "question inside the prompt"
        fams: dict[str, list] = {}
        for r in results:
            lo, hi = interval(r.hits)
            fams.setdefault(family(r.spec), []).append((1.0 / r.ratio, r.correct / r.samples, lo, hi, r.spec, r.correct,
                                                        r.samples))
        out.append((regime, fams))
    return out


def budget_of(spec: str) -> int | None:
    """The token budget of a spec (StreamingLLM's: recent + 4), None for a policy without one."""
    m = re.search(r"budget=(\d+)", spec) or re.search(r"^heads=none,sink=4,recent=(\d+)$", spec)
    if not m:
        return None
    return int(m.group(1)) + (4 if spec.startswith("heads=none") else 0)


def grid(data) -> str:
    """Markdown: per regime, a row per family and a column per budget, cells `correct/samples (x smaller)`."""
    out = []
    for regime, fams in data:
        budgets = sorted({b for pts in fams.values() for p in pts if (b := budget_of(p[4])) is not None})
        out.append(f"**{regime}**\n")
        out.append("| policy | " + " | ".join(f"budget {b}" for b in budgets) + " | no budget |")
        out.append("|---" * (len(budgets) + 2) + "|")
        names = [f for f in ["full"] + list(NAMES) if f in fams] + [f for f in fams if f not in NAMES and f != "full"]
        for fam in names:
            cells = {budget_of(p[4]): p for p in fams[fam]}
            row = [NAMES.get(fam, f"`{fam}`")]
            for b in budgets + [None]:
                p = cells.get(b)
                row.append("—" if p is None else f"{p[5]}/{p[6]} ({1 / p[0]:.2f}x)")
            out.append("| " + " | ".join(row) + " |")
        out.append("")
    return "\n".join(out)


def plot(data, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(data), figsize=(max(9, 7.5 * len(data)), 7), squeeze=False, sharey=True)
    cmap = plt.get_cmap("tab20")
    names = [f for f in NAMES] + sorted({f for _, fams in data for f in fams if f not in NAMES and f != "full"})
    for ax, (regime, fams) in zip(axes[0], data):
        if "full" in fams:
            ax.axhline(fams["full"][0][1], color="k", ls="--", lw=1, label="full cache")
        for i, fam in enumerate(names):
            if fam not in fams:
                continue
            pts = sorted(fams[fam])
            x = [p[0] for p in pts]
            y = [p[1] for p in pts]
            err = [[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]]
            ax.errorbar(x, y, yerr=err, marker="o", ms=5, capsize=3, lw=1.5, color=cmap(i % 20),
                        label=NAMES.get(fam, fam))
        ax.set_xscale("log")
        ax.set_xlabel("KV bytes held / 16-bit full cache (log; left is smaller)")
        ax.set_title(f"passkey-chat, seed 0, 40 samples of 1-4k: {regime}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.set_ylim(-0.03, 1.05)
    axes[0][0].set_ylabel("pass keys found (95% bootstrap interval)")
    handles, labels = {}, {}
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=3, fontsize=8)
    fig.tight_layout(rect=(0, 0.2, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rows", type=Path)
    ap.add_argument("--plot", type=Path, default=None, help="write the figure here (PNG)")
    ap.add_argument("--grid", action="store_true", help="print a Markdown table per regime instead of the points")
    args = ap.parse_args()
    data = panels(args.rows)
    for regime, fams in ([] if args.grid else data):
        print(f"## {regime}")
        for fam, pts in fams.items():
            for x, y, lo, hi, spec, *_ in sorted(pts):
                print(f"{NAMES.get(fam, fam):32s} {1 / x:6.2f}x  {y:.3f} [{lo:.2f}, {hi:.2f}]  {spec}")
    if args.grid:
        print(grid(data))
    if args.plot:
        plot(data, args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
