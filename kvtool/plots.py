"""Memory-vs-quality plot for `kvtool bench`: one point per cache, KV bytes (relative to a 16-bit full cache) on x,
passkey accuracy or continuation NLL on y; kvtool policies and baselines in different markers."""

from __future__ import annotations

from pathlib import Path


def memory_vs_quality(results, path: str | Path, task: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from kvtool.inspect import _save_figure

    fig, ax = plt.subplots(figsize=(8, 5.2))
    for r in results:
        x = 1.0 / r.ratio                                            # fraction of a 16-bit full cache
        y = r.correct / max(r.samples, 1) if task == "passkey" else r.nll
        kind = "full" if r.spec == "full" else "baseline" if ":" in r.spec.split("=")[0] else "kvtool"
        style = {"full": ("k", "*", 160), "baseline": ("tab:orange", "s", 60), "kvtool": ("tab:blue", "o", 60)}[kind]
        ax.scatter([x], [y], c=style[0], marker=style[1], s=style[2], label=kind, zorder=3)
        ax.annotate(r.spec, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), loc="best")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("KV bytes held / 16-bit full cache (log scale; left is smaller)")
    ax.set_ylabel("passkey accuracy (higher is better)" if task == "passkey" else "continuation NLL (lower is better)")
    n = results[0].samples if results else 0
    ax.set_title(f"kvtool bench --task {task}: {n} samples, same inputs for every cache")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return _save_figure(fig, Path(path))
