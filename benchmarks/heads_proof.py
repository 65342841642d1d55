"""Issue 14, point 4: retrieval-head rankings against random, from the rows `benchmarks/issue14_proof.sh` saved.

For one rows file (one task, one setup), every `heads=<method>:<f>` row and every `heads=random:<f>:<seed>` row is
placed by method and fraction. Prints a Markdown table (correct / samples and a bootstrap 95% interval of the
accuracy, resampling the samples; random as the mean of its seeds, the interval resampling the samples jointly for
every seed, since they share the samples) and the issue's targets at 25%: the best method keeps ≥ 95% of the full
cache's accuracy, random's mean keeps ≤ 60%, duo is at least as good as the copy score (`retrieval`). `--plot PNG`
draws accuracy vs the fraction of KV heads kept whole, one line per method with its interval, the full cache as a
line. `--extra FILE=LABEL` (repeatable) adds the rankings of another profile measured on the same samples (same task,
text, seed, lengths, depths; the rows file of a run with that profile), as `<method>@LABEL`, e.g. the gates of
`--preset cpu-deploy` beside the shipped ones. Last, at every fraction, duo against each other ranking on the same
samples: the difference in correct samples with a paired bootstrap 95% interval (a tie when it holds 0).

    python benchmarks/heads_proof.py docs/bench-rows/issue14-proof-passkey-chat.jsonl [--setup N] [--plot PNG] \
        [--extra docs/bench-rows/issue14-duo-cpu-deploy-passkey-chat.jsonl=cpu-deploy]
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from rows_table import load

SPEC = re.compile(r"^heads=(?P<method>[a-z_]+):(?P<f>[0-9.]+)(?::(?P<seed>\d+))?$")
B = 2000


def interval(hits: np.ndarray, rng) -> tuple[float, float]:
    """hits [S, N] (S runs on the same N samples): percentile 95% interval of their mean accuracy, samples resampled
    jointly."""
    n = hits.shape[1]
    idx = rng.integers(0, n, (B, n))                                   # [B, N]
    means = hits[:, idx].mean(axis=(0, 2))                             # [B]
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


SAME = ("task", "text", "seed", "lengths", "depths", "chunk", "dtype")     # what makes two setups' samples the same


def collect(results, grid=None, label: str = "") -> tuple[object, dict]:
    """(the full row, {method: {fraction: [rows]}}); with `label`, methods are named `<method>@label` (random rows
    are left out: random does not depend on the profile) and added to `grid`."""
    full = next((r for r in results if r.spec == "full"), None)
    if grid is None:
        grid = defaultdict(lambda: defaultdict(list))
    for r in results:
        m = SPEC.match(r.spec)
        if m and r.hits and not (label and m["method"] == "random"):
            grid[m["method"] + (f"@{label}" if label else "")][float(m["f"])].append(r)
    return full, grid


def summary(full, grid, rng) -> tuple[str, dict]:
    """(Markdown table, {(method, f): (accuracy, lo, hi, runs)})."""
    fractions = sorted({f for cells in grid.values() for f in cells})
    methods = sorted(grid, key=lambda m: (m == "random", m))
    stats = {}
    for m in methods:
        for f, rows in grid[m].items():
            hits = np.array([r.hits for r in rows], dtype=float)       # [S, N]
            stats[m, f] = (float(hits.mean()), *interval(hits, rng), len(rows))
    head = "| method | " + " | ".join(f"{f:g}" for f in fractions) + " |"
    out = [head, "|---|" + "---|" * len(fractions)]
    for m in methods:
        cells = []
        for f in fractions:
            if (m, f) not in stats:
                cells.append("—")
                continue
            acc, lo, hi, runs = stats[m, f]
            n = len(grid[m][f][0].hits)
            what = f"{acc * n:.1f}/{n} (mean of {runs} seeds)" if m == "random" else f"{round(acc * n)}/{n}"
            cells.append(f"{what} [{lo:.2f}, {hi:.2f}]")
        out.append(f"| `{m}` | " + " | ".join(cells) + " |")
    if full is not None:
        out.append(f"| `full` | {full.correct}/{full.samples} at every fraction |" + " |" * (len(fractions) - 1))
    return "\n".join(out), stats


def targets(full, stats, f: float = 0.25) -> str:
    if full is None or not full.correct:
        return "(no full-cache row: the targets need it)"
    base = full.correct / full.samples
    lines = []
    methods = [m for (m, g) in stats if g == f and m != "random"]
    if methods:
        acc = max(stats[m, f][0] for m in methods)
        best = ", ".join(f"`{m}`" for m in sorted(methods) if stats[m, f][0] == acc)
        lines.append(f"- best at {f:g}: {best} keep{'s' if ',' not in best else ''} {acc / base:.0%} of the full "
                     f"cache's accuracy "
                     f"(target ≥ 95%: {'met' if acc >= 0.95 * base else 'missed'})")
    if ("random", f) in stats:
        acc, _, _, runs = stats["random", f]
        lines.append(f"- random at {f:g} (mean of {runs} seeds) keeps {acc / base:.0%} "
                     f"(target ≤ 60%: {'met' if acc <= 0.6 * base else 'missed'}"
                     f"{'' if runs >= 3 else f'; only {runs} of the 3 seeds the issue asks for'})")
    if ("duo", f) in stats and ("retrieval", f) in stats:
        d, r = stats["duo", f][0], stats["retrieval", f][0]
        lines.append(f"- duo {d:.3f} vs the copy score (`retrieval`) {r:.3f}: "
                     f"{'duo at least as good' if d >= r else 'duo loses'}")
    return "\n".join(lines) or f"(no rows at {f:g} yet)"


def paired(grid, rng, base: str = "duo") -> str:
    """At each fraction, `base` minus every other non-random method on the same samples: the difference in correct
    samples and a percentile 95% interval, the samples resampled once for both (a paired bootstrap)."""
    lines = []
    for f in sorted({f for cells in grid.values() for f in cells}):
        if f not in grid.get(base, {}):
            continue
        a = np.array(grid[base][f][0].hits, dtype=float)                          # [N]
        for m in sorted(grid):
            if m in (base, "random") or f not in grid[m]:
                continue
            b = np.array(grid[m][f][0].hits, dtype=float)                         # [N]
            if b.shape != a.shape:
                continue
            d = a - b                                                             # [N] per-sample difference
            idx = rng.integers(0, len(d), (B, len(d)))                            # [B, N]
            sums = d[idx].sum(axis=1)                                             # [B]
            lo, hi = np.quantile(sums, 0.025), np.quantile(sums, 0.975)
            verdict = "a tie" if lo <= 0 <= hi else (f"{base} better" if lo > 0 else f"{m} better")
            lines.append(f"- at {f:g}: `{base}` − `{m}` = {int(d.sum()):+d} samples [{lo:+.0f}, {hi:+.0f}] "
                         f"(paired bootstrap 95%; {int((a > b).sum())} only {base}, {int((b > a).sum())} only {m}): "
                         f"{verdict}")
    return "\n".join(lines)


def plot(full, stats, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    names = sorted({m for m, _ in stats}, key=lambda m: (m == "random", m))
    for j, m in enumerate(names):
        fs = sorted(f for mm, f in stats if mm == m)
        shift = 0.008 * (j - (len(names) - 1) / 2)                     # side by side, so tied methods stay visible
        acc = [stats[m, f][0] for f in fs]
        lo = [stats[m, f][0] - stats[m, f][1] for f in fs]
        hi = [stats[m, f][2] - stats[m, f][0] for f in fs]
        label = "random (mean of seeds)" if m == "random" else m
        ax.errorbar([f + shift for f in fs], acc, yerr=[lo, hi], marker="o", capsize=3, label=label,
                    linestyle="--" if m == "random" else "-", color="grey" if m == "random" else None)
    if full is not None:
        ax.axhline(full.correct / full.samples, color="k", linewidth=1, label="full cache")
    ax.set_xlabel("fraction of KV heads kept whole (methods side by side); the rest: sink 64 + recent 256")
    ax.set_ylabel("accuracy (95% bootstrap interval)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlim(0, 1)
    ax.set_xticks([0, 0.1, 0.25, 0.5, 0.75, 1])
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rows", type=Path)
    ap.add_argument("--setup", type=int, default=1, help="which setup of the file (from 1, in file order)")
    ap.add_argument("--plot", type=Path, help="write the accuracy-vs-fraction plot here")
    ap.add_argument("--extra", action="append", default=[], metavar="FILE=LABEL",
                    help="rows of another profile on the same samples, shown as <method>@LABEL")
    args = ap.parse_args()
    setups = load(args.rows)
    if not 1 <= args.setup <= len(setups):
        raise SystemExit(f"Error: {args.rows} has {len(setups)} setups; --setup {args.setup} is not one of them")
    setup, results = setups[args.setup - 1]
    full, grid = collect(results)
    for extra in args.extra:
        path, sep, label = extra.rpartition("=")
        if not sep or not path or not re.fullmatch(r"[A-Za-z0-9_.-]+", label):
            raise SystemExit(f"Error: --extra {extra!r}: give FILE=LABEL (label: letters, digits, - _ .)")
        found = [res for s, res in load(Path(path)) if all(s.get(k) == setup.get(k) for k in SAME)]
        if not found:
            raise SystemExit(f"Error: {path} has no rows on the same samples ({', '.join(SAME)}) as {args.rows}")
        for res in found:
            collect(res, grid, label)
    table, stats = summary(full, grid, np.random.default_rng(0))
    print(f"<!-- task {setup.get('task')}, text {setup.get('text')}, seed {setup.get('seed')} -->")
    print(table)
    print()
    print(targets(full, stats))
    pairs = paired(grid, np.random.default_rng(1))
    if pairs:
        print()
        print(pairs)
    if args.plot:
        plot(full, stats, args.plot, f"{setup.get('task')} (seed {setup.get('seed')}): retrieval-head rankings vs random")


if __name__ == "__main__":
    main()
