"""Memory-vs-quality plot for `kvtool bench`: one numbered point per cache, KV bytes (relative to a 16-bit full
cache) on x, passkey accuracy or continuation NLL on y; kvtool policies and baselines in different markers, the
numbers explained under the axes. NLL points far above the full cache are drawn at the top edge with their value."""

from __future__ import annotations

from pathlib import Path


def memory_vs_quality(results, path: str | Path, task: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from kvtool.inspect import _save_figure

    accuracy = bool(results) and results[0].correct is not None          # passkey and kvtool.tasks' generation tasks
    points = []
    for r in results:
        y = r.correct / max(r.samples, 1) if accuracy else r.nll
        kind = "full" if r.spec == "full" else "baseline" if ":" in r.spec.split("=")[0] else "kvtool"
        points.append((1.0 / r.ratio, y, kind, r.spec))
    full = next((p[1] for p in points if p[2] == "full"), None)
    top = None
    if not accuracy and full is not None:
        top = max([p[1] for p in points if p[1] <= 1.25 * full] + [full]) * 1.01
    fig, ax = plt.subplots(figsize=(9, 5.2 + 0.22 * len(points)))
    style = {"full": ("k", "*", 180), "baseline": ("tab:orange", "s", 70), "kvtool": ("tab:blue", "o", 70)}
    for i, (x, y, kind, spec) in enumerate(points, 1):
        shown = y if top is None or y <= top else top
        c, m, s = style[kind]
        ax.scatter([x], [shown], c=c, marker=m, s=s, label=kind, zorder=3)
        note = f"{i}" if shown == y else f"{i} (off scale: {y:.2f})"
        ax.annotate(note, (x, shown), textcoords="offset points", xytext=(5, 5), fontsize=9, fontweight="bold")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), loc="best")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("KV bytes held / 16-bit full cache (log scale; left is smaller)")
    ax.set_ylabel(f"{task} accuracy (higher is better)" if accuracy else f"{task}: continuation NLL (lower is better)")
    n = results[0].samples if results else 0
    ax.set_title(f"kvtool bench --task {task}: {n} samples, same inputs for every cache")
    ax.grid(True, which="both", alpha=0.3)
    legend = "\n".join(f"{i}: {spec}" for i, (*_, spec) in enumerate(points, 1))
    fig.text(0.01, 0.01, legend, fontsize=8, family="monospace", va="bottom")
    fig.tight_layout(rect=(0, 0.03 + 0.035 * len(points) * 5.2 / (5.2 + 0.22 * len(points)), 1, 1))
    return _save_figure(fig, Path(path))
