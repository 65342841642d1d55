"""Print a Markdown table of the rows a `kvtool bench --rows FILE` run saved: one row per cache (the first saved
for each spec of the file's first setup), its result, the paired-bootstrap 95% interval of its change vs the full
cache (kvtool.evaluate.paired_bootstrap) and its bytes.

    python benchmarks/rows_table.py docs/bench-rows/issue11-passkey-stdlib.jsonl [--order SPEC;SPEC;...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kvtool.evaluate import TaskResult, paired_bootstrap


def load(path: Path) -> tuple[dict, list[TaskResult]]:
    setup, seen = None, {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        item = json.loads(line)
        setup = setup or item["setup"]
        if item["setup"] == setup:
            result = TaskResult(**item["result"])
            seen.setdefault(result.spec, result)
    return setup, list(seen.values())


def table(results: list[TaskResult]) -> str:
    full = next(r for r in results if r.spec == "full")
    base = full.row()
    out = []
    if full.task == "passkey":
        out += ["| cache | correct | vs full, 95% CI | full-cache successes kept | x smaller than 16-bit |",
                "|---|---|---|---|---|"]
        for r in results:
            row = r.row()
            ci = "—" if r is full else "[{:+.0f}, {:+.0f}]".format(*paired_bootstrap(row, base))
            kept = sum(a and b for a, b in zip(r.hits, full.hits))
            out.append(f"| `{r.spec}` | {r.correct}/{r.samples} | {ci} | {kept}/{sum(full.hits)} | {r.ratio:.2f} |")
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
    args = ap.parse_args()
    setup, results = load(args.rows)
    if args.order:
        by = {r.spec: r for r in results}
        want = ["full"] + [s.strip() for s in args.order.split(";") if s.strip() and s.strip() != "full"]
        results = [by[s] for s in want if s in by]
    print(f"<!-- setup: {json.dumps(setup)} -->")
    print(table(results))


if __name__ == "__main__":
    main()
