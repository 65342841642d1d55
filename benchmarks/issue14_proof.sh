# Issue 14, point 4: retrieval-head rankings against random, on the pre-registered tasks (docs/BENCHMARKS.md,
# "Issue 14: evaluation tasks"). `source benchmarks/issue14_proof.sh` defines the specs; `bash benchmarks/issue14_proof.sh
# run TASK [PART PARTS]` runs the grid for one task (passkey-chat or copy-digits) into its rows file, part PART of
# PARTS (every PARTS-th spec from PART, so two processes given 0 2 and 1 2 share the work). Every row is saved as it
# finishes, so a stopped run resumes where it was. Hours on CPU (20-30 min per row at one thread; --reuse-prefix, which the
# run passes, skips about a third of the prefill with the same results: docs/runtime.md); not run by any test.
#
# Methods: duo (heads.duo), razor (heads.razor), retrieval (heads.retrieval: the copy score of Retrieval Head), combo
# (heads.combo: mean rank of duo, copy score, razor) and random with seeds 1-3; fractions 25% first (the issue's
# target), then 10, 50, 75. Streaming heads keep the deployment's sink 64 + recent 256 (the runtime's defaults).

METHODS="duo random:%s:1 random:%s:2 random:%s:3 retrieval razor combo"
FRACTIONS="0.25 0.1 0.5 0.75"

specs() {             # every spec, ';'-separated, in the order they run
  local f m out=""
  for f in $FRACTIONS; do
    for m in $METHODS; do
      case $m in
        random:*) out="$out heads=$(printf "$m" "$f");" ;;
        *) out="$out heads=$m:$f;" ;;
      esac
    done
  done
  printf '%s' "${out// /}"
}

source "$(dirname "${BASH_SOURCE[0]}")/parts.sh"      # part SPECS I N

if [ "${1:-}" = run ]; then
  set -euo pipefail
  task=$2 p=${3:-0} n=${4:-1}
  case $task in
    passkey-chat|copy|copy-digits) text=filler ;;
    *) text=${TEXT:-filler} ;;
  esac
  kvtool bench --task "$task" --text "$text" --lengths 1024,2048,3072,4096 --depths 10 --seed "${SEED:-0}" \
    --threads 1 --baselines none --reuse-prefix --json --rows "docs/bench-rows/issue14-proof-$task.jsonl" \
    --policies "full;$(part "$(specs)" "$p" "$n")"
fi
