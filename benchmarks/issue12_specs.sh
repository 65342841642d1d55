# Issue 12, point 6: token selection side by side. `source benchmarks/issue12_specs.sh` defines the policy strings;
# `bash benchmarks/issue12_specs.sh run` runs the sweep (long: hours on CPU; every row is saved as it finishes in
# $ROWS, so it resumes, and two processes given the same file share the work). Not run by any test.
# The sweep passes --share-prefill: in each process the SPP / SNAP / ROCK / SPPQ specs (select=snapkv++|snapkv with
# heads=all) run from one prefill per sample (exactly the same results; docs/runtime.md); STR, H2O and the head
# splits run alone. Their rows are written when the whole group is done, so an interruption loses that group's work.
#
# Caches, at budgets 128/256/512/1024 tokens per KV head (the StreamingLLM window is sink 4 + recent budget-4):
#   SPP   SnapKV++ (one selection per KV group, RocketKV stage 1)  select=snapkv++,budget=B
#   SNAP  SnapKV, plain (per query head: G copies per KV head)       select=snapkv,budget=B
#   STR   StreamingLLM (kvtool's window store)                       heads=none,sink=4,recent=B-4
#   H2O   H2O (heavy hitters + recent, evicting as tokens arrive)    select=h2o,budget=B
#   ROCK  RocketKV: SnapKV++ + stage 2 reading 1/16 of the kept tokens' pages per decode step (read=0.0625, pages of
#         16), so that with the open page and the page min/max it reads about 1/8 of the kept bytes at budget 512
#   SPPQ  SnapKV++ with its kept tokens in 4 bits (KIVI / KVQuant-style body, sink 4, buffer 32)
#   HSPP  head split: DuoAttention's retrieval half selects with SnapKV++, streaming heads keep sink 4 + recent B-4
#   HSPPQ the head split + SnapKV++ + 4-bit kept tokens
# plus, for "which policy keeps the accuracy after compression at the same bytes", the issue-11 8x policy (P8: no
# query-aware eviction; every retrieval head keeps every token in 4/3 bits).
# SnapKV's obs/kernel come from the profile's snapkv section when it has one (kvtool calibrate --method snapkv),
# else RocketKV's 32/63; to calibrate first:
#   kvtool calibrate --method snapkv --profile profiles/smollm2-135m-instruct.kv.st -o /tmp/smollm2.snap.kv.st
# and pass `--profile /tmp/smollm2.snap.kv.st` to the bench commands below.

BUDGETS="128 256 512 1024"
P8="heads=duo:0.125,k=4,v=3,sink=4,recent=864,buffer=0,wk=4,wv=4,krope=pre,vgroup=64"

specs_for() {        # the policies at budget $1, ';'-separated
  local b=$1 r=$(( $1 - 4 ))
  printf '%s;' \
    "select=snapkv++,budget=$b" \
    "select=snapkv,budget=$b" \
    "heads=none,sink=4,recent=$r" \
    "select=h2o,budget=$b" \
    "select=snapkv++,budget=$b,read=0.0625,page=16" \
    "select=snapkv++,budget=$b,k=4,v=4,sink=4,buffer=32" \
    "heads=duo:0.5,select=snapkv++,budget=$b,sink=4,recent=$r" \
    "heads=duo:0.5,select=snapkv++,budget=$b,sink=4,recent=$r,k=4,v=4,buffer=32"
}

ALL=""
for b in $BUDGETS; do ALL="$ALL$(specs_for "$b")"; done
ALL="$ALL$P8"

ROWS=${ROWS:-benchmarks/rows-issue12.jsonl}
PASSKEY="--task passkey --lengths 1024,2048,3072,4096 --depths 10 --threads 1"   # 40 samples, 1k-4k
NLL="--task nll --samples 6 --context 2048 --continuation 128 --decode-steps 4 --threads 1"

half() {              # the specs of "$1" (';'-separated) whose index is $2 modulo 2, ';'-separated
  local i=0 out="" s
  IFS=';' read -ra items <<< "$1"
  for s in "${items[@]}"; do [ $((i % 2)) -eq "$2" ] && out="$out$s;"; i=$((i + 1)); done
  printf '%s' "$out"
}

sweep() {            # $1: the bench options; the full cache once, then every policy, two processes sharing $ROWS
  kvtool bench $1 --baselines none --policies full --rows "$ROWS" --json > /dev/null
  kvtool bench $1 --baselines none --policies "$(half "$ORDERED" 0)" --rows "$ROWS" --share-prefill --json > /dev/null &
  kvtool bench $1 --baselines none --policies "$(half "$ORDERED" 1)" --rows "$ROWS" --share-prefill --json > /dev/null
  wait
}

# the targets' budget (512) first, so an interrupted sweep has measured what the targets need
ORDERED="$(specs_for 512)$(specs_for 1024)$(specs_for 256)$(specs_for 128)$P8"

if [ "${1:-}" = "run" ]; then
  set -e
  # question inside the prompt (SnapKV's and RocketKV's setting: the observation window sees the question)
  sweep "$PASSKEY --query inside"
  # question after compression (SCBench's multi-turn reuse): the same 40 samples
  sweep "$PASSKEY --query after"
  # NLL as before (the continuation is teacher-forced after the context was compressed)
  sweep "$NLL"
  python benchmarks/rows_table.py "$ROWS"
fi
