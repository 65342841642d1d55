"""Print Markdown tables of the rows a `kvtool bench --rows FILE` run saved: one table per setup, in the file's order
(`--setup N` prints only the N-th, from 1), one row per cache (the first saved for each spec), its result, the
paired-bootstrap 95% interval of its change vs the full cache (kvtool.evaluate.paired_bootstrap), its bytes and, when
a policy reads less than it keeps (RocketKV stage 2), the fraction of its kept bytes one decode step read.

    python benchmarks/rows_table.py docs/bench-rows/issue11-passkey-stdlib.jsonl [--order SPEC;SPEC;...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kvtool.evaluate import TaskResult, paired_bootstrap


def load(path: Path) -> list[tuple[dict, list[TaskResult]]]:
    """[(setup, its results)] in the order the setups first appear in the file."""
    groups: list[tuple[dict, dict]] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        item = json.loads(line)
        group = next((g for g in groups if g[0] == item["setup"]), None)
        if group is None:
            group = (item["setup"], {})
            groups.append(group)
        result = TaskResult(**item["result"])
        group[1].setdefault(result.spec, result)
    return [(setup, list(seen.values())) for setup, seen in groups]


def _read(r: TaskResult) -> str:
    return "—" if r.read_bytes is None or not r.kv_bytes else f"{r.read_bytes / r.kv_bytes:.3f}"


def table(results: list[TaskResult]) -> str:
    full = next((r for r in results if r.spec == "full"), None)
    if full is None:
        return "(no full-cache row under this setup yet)"
    base = full.row()
    reads = any(r.read_bytes is not None and r.read_bytes < r.kv_bytes for r in results)
    out = []
    if full.correct is not None:
        out += ["| cache | correct | vs full, 95% CI | full-cache successes kept | x smaller than 16-bit |"
                + (" read / kept per step |" if reads else ""), "|---|---|---|---|---|" + ("---|" if reads else "")]
        for r in results:
            row = r.row()
            ci = "—" if r is full else "[{:+.0f}, {:+.0f}]".format(*paired_bootstrap(row, base))
            kept = sum(a and b for a, b in zip(r.hits, full.hits))
            out.append(f"| `{r.spec}` | {r.correct}/{r.samples} | {ci} | {kept}/{sum(full.hits)} | {r.ratio:.2f} |"
                       + (f" {_read(r)} |" if reads else ""))
    else:
        out += ["| cache | NLL | vs full | 95% CI | x smaller than 16-bit |", "|---|---|---|---|---|"]
        for r in results:
            row = r.row()
            ci = "—" if r is full else "[{:+.1f}, {:+.1f}]%".format(*paired_bootstrap(row, base))
            change = "—" if r is full else f"{100 * (r.nll / full.nll - 1):+.1f}%"
            out.append(f"| `{r.spec}` | {r.nll:.4f} | {change} | {ci} | {r.ratio:.2f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rows", type=Path)
    ap.add_argument("--order", default=None, help="';'-separated specs: print these, in this order (full first).")
    ap.add_argument("--setup", type=int, default=None, help="print only the N-th setup of the file (from 1)")
    args = ap.parse_args()
    groups = load(args.rows)
    if args.setup is not None:
        groups = groups[args.setup - 1:args.setup]
    for n, (setup, results) in enumerate(groups):
        if args.order:
            by = {r.spec: r for r in results}
            want = ["full"] + [s.strip() for s in args.order.split(";") if s.strip() and s.strip() != "full"]
            results = [by[s] for s in want if s in by]
        print(("\n" if n else "") + f"<!-- setup: {json.dumps(setup)} -->")
        print(table(results))


if __name__ == "__main__":
    main()
