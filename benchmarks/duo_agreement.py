"""How many heads two duo gate sets share at each deployed fraction (issue 14, point 2: is the ranking settled?).

    python benchmarks/duo_agreement.py LABEL=FILE LABEL=FILE ... [--fractions 0.1,0.25,0.5] [--signal gate|pull]

A FILE is a profile (its `heads.duo.gate`, or `heads.duo.pull` with --signal pull) or a duo checkpoint (its `gates`,
the last iterate, clamped to [0, 1]; with --signal pull its `pull_sum`, whose ranking is the mean's).
Prints, for every pair, the heads both put in the top fraction (calibrate.heads.top_fraction: global quantile,
deterministic ties). No model is loaded."""

from __future__ import annotations

import argparse
import itertools

import torch
from safetensors import safe_open

from calibrate.heads import top_fraction


def gates(path: str, signal: str = "gate") -> torch.Tensor:
    """[L, H_kv] gates (or pull) of a profile or a duo checkpoint."""
    names = {"gate": ("heads.duo.gate", "gates"), "pull": ("heads.duo.pull", "pull_sum")}[signal]
    with safe_open(path, framework="pt") as fh:
        keys = set(fh.keys())
        if names[0] in keys:
            return fh.get_tensor(names[0]).float()
        if names[1] in keys:
            t = fh.get_tensor(names[1]).float()
            return t.clamp(0, 1) if signal == "gate" else t
    raise SystemExit(f"Error: {path} has neither {names[0]} (a profile) nor {names[1]} (a duo checkpoint)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("sets", nargs="+", help="LABEL=FILE")
    ap.add_argument("--fractions", default="0.1,0.25,0.5")
    ap.add_argument("--signal", choices=("gate", "pull"), default="gate", help="rank heads by duo's gate or its pull")
    args = ap.parse_args()
    named = {}
    for item in args.sets:
        label, sep, path = item.partition("=")
        if not sep:
            raise SystemExit(f"Error: {item!r}: give LABEL=FILE")
        named[label] = gates(path, args.signal)
    width = max(map(len, named))
    for f in (float(x) for x in args.fractions.split(",")):
        masks = {k: top_fraction(v, f) for k, v in named.items()}
        n = int(next(iter(masks.values())).sum())
        print(f"top {f:.0%} ({n} heads): shared")
        for a, b in itertools.combinations(named, 2):
            print(f"  {a:<{width}}  {b:<{width}}  {int((masks[a] & masks[b]).sum()):3d}/{n}")


if __name__ == "__main__":
    main()
