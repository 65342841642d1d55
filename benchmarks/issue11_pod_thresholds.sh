#!/usr/bin/env bash
# PoD alone at other grouping thresholds on the held-out NLL contexts (docs/BENCHMARKS.md, issue 11 point 8).
set -euo pipefail
work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT
for th in 0.5 0.6; do
  cp "$(dirname "$0")/../profiles/smollm2-135m-instruct.kv.st" "$work/pod$th.kv.st"
  kvtool calibrate --method pod --threshold "$th" --samples 2 --seq-len 512 --profile "$work/pod$th.kv.st"
done
WORK="$work" python - <<'PY'
import json, os, torch, kvtool
from kvtool.evaluate import nll_samples, run_nll
from kvtool.profile import Profile
torch.set_num_threads(1)
m, t = kvtool.load_model()
S = nll_samples(t, 6, 2048, 128, seed=0, source="stdlib")
print(json.dumps(run_nll(m, S, "full", None, decode_steps=0).row()))
for th in ("0.5", "0.6"):
    p = Profile.load(os.path.join(os.environ["WORK"], f"pod{th}.kv.st"), model=m)
    print(json.dumps({"threshold": th, **run_nll(m, S, "heads=all,pod=map", p, decode_steps=0).row()}))
PY
