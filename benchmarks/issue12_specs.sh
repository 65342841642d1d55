# Issue 12, point 6: token selection side by side. `source benchmarks/issue12_specs.sh` defines the policy strings;
# `bash benchmarks/issue12_specs.sh run [PART PARTS]` runs the sweep, part PART of PARTS (every PARTS-th spec from
# PART: two processes given 0 2 and 1 2 share the work; default: the whole sweep in two processes). Long: hours on CPU;
# every row is saved as it finishes in $ROWS, so a stopped run resumes. Not run by any test.
# The task is passkey-chat (docs/BENCHMARKS.md, "Issue 14: evaluation tasks"): the embedded model's full cache finds
# 40/40 of its keys at 1-4k, where it finds only 15-16/40 of the plain `passkey` task's, so "within 2 of the full
# cache" means something. Its question (everything after the haystack) is what `--query after` holds back.
# The sweep passes --share-prefill: in each process the SPP / SNAP / ROCK / ROCK4 / SPPQ specs (select=snapkv++|snapkv with
# heads=all) run from one prefill per sample (exactly the same results; docs/runtime.md); STR, H2O and the head
# splits run alone. Their rows are written when the whole group is done, so an interruption loses that group's work.
# It also passes --reuse-prefix: a sample whose prompt starts like an earlier one's (the same filler up to the needle)
# resumes from that sample's saved cache state at a chunk boundary (exact; about a third of the prefill tokens skipped).
#
# Caches, at budgets 128/256/512/1024 tokens per KV head (the StreamingLLM window is sink 4 + recent budget-4):
#   SPP   SnapKV++ (one selection per KV group, RocketKV stage 1)  select=snapkv++,budget=B
#   SNAP  SnapKV, plain (per query head: G copies per KV head)       select=snapkv,budget=B
#   STR   StreamingLLM (kvtool's window store)                       heads=none,sink=4,recent=B-4
#   H2O   H2O (heavy hitters + recent, evicting as tokens arrive)    select=h2o,budget=B
#   ROCK  RocketKV: SnapKV++ + stage 2 reading 1/16 of the kept tokens' pages per decode step (read=0.0625, pages of
#         16), so that with the open page and the page min/max it reads about 1/8 of the kept bytes at budget 512
#   ROCK4 RocketKV with pages of 4 and 16 of the 64 head dims scored (read=0.0625,page=4,rdims=16): added 2026-12-07
#         after ROCK failed (2/40 at budget 512), chosen on 12 pilot samples of seed 7 (docs/BENCHMARKS.md)
#   SPPQ  SnapKV++ with its kept tokens in 4 bits (KIVI / KVQuant-style body, sink 4, buffer 32)
#   HSPP  head split: DuoAttention's retrieval half selects with SnapKV++, streaming heads keep sink 4 + recent B-4
#   HSPPQ the head split + SnapKV++ + 4-bit kept tokens
# plus, for "which policy keeps the accuracy after compression at the same bytes", policies with no query-aware
# eviction: the issue-11 8x policy (P8: every retrieval head keeps every token in 4/3 bits), and razor's top 10% of
# the KV heads keeping every token, the rest sink 64 + recent 256 (RZ10, 4.7x), and the same in 4 bits (RZ10Q);
# added 2026-12-07 (pre-registered in docs/BENCHMARKS.md, "the question after compression at budget 512").
# SnapKV's obs/kernel come from the profile's snapkv section when it has one (kvtool calibrate --method snapkv),
# else RocketKV's 32/63; to calibrate first:
#   kvtool calibrate --method snapkv --profile profiles/smollm2-135m-instruct.kv.st -o /tmp/smollm2.snap.kv.st
# and pass `--profile /tmp/smollm2.snap.kv.st` to the bench commands below.

BUDGETS="128 256 512 1024"
P8="heads=duo:0.125,k=4,v=3,sink=4,recent=864,buffer=0,wk=4,wv=4,krope=pre,vgroup=64"
RZ10="heads=razor:0.1"
RZ10Q="heads=razor:0.1,k=4,v=4,wk=4,wv=4"

units_for() {        # the policies at budget $1 as '|'-separated units: the specs that share a prefill are one unit
  local b=$1 r=$(( $1 - 4 ))
  printf '%s;%s;%s;%s;%s|%s|%s|%s|%s|' \
    "select=snapkv++,budget=$b" \
    "select=snapkv,budget=$b" \
    "select=snapkv++,budget=$b,read=0.0625,page=16" \
    "select=snapkv++,budget=$b,read=0.0625,page=4,rdims=16" \
    "select=snapkv++,budget=$b,k=4,v=4,sink=4,buffer=32" \
    "heads=none,sink=4,recent=$r" \
    "select=h2o,budget=$b" \
    "heads=duo:0.5,select=snapkv++,budget=$b,sink=4,recent=$r" \
    "heads=duo:0.5,select=snapkv++,budget=$b,sink=4,recent=$r,k=4,v=4,buffer=32"
}

specs_for() {        # the policies at budget $1, ';'-separated
  local u=$(units_for "$1")
  printf '%s' "${u//|/;}"
}

ALL=""
for b in $BUDGETS; do ALL="$ALL$(specs_for "$b")"; done
ALL="$ALL$P8;$RZ10;$RZ10Q"

ROWS=${ROWS:-docs/bench-rows/issue12-selection.jsonl}
PASSKEY="--task passkey-chat --lengths 1024,2048,3072,4096 --depths 10 --threads 1"   # 40 samples, 1k-4k
NLL="--task nll --samples 6 --context 2048 --continuation 128 --decode-steps 4 --threads 1"

source "$(dirname "${BASH_SOURCE[0]}")/parts.sh"      # part SPECS I N

sweep() {            # $1: the bench options, $2 $3: this process's part of the units (the full cache first)
  local mine=$(part "$UNITS" "$2" "$3" "|")
  kvtool bench $1 --baselines none --policies "full;${mine//|/;}" --rows "$ROWS" --share-prefill --reuse-prefix --json > /dev/null
}

# the targets' budget (512) first, so an interrupted sweep has measured what the targets need
UNITS="$(units_for 512)$P8|$RZ10|$RZ10Q|$(units_for 1024)$(units_for 256)$(units_for 128)"

all() {              # every regime for part $1 of $2
  # question inside the prompt (SnapKV's and RocketKV's setting: the observation window sees the question)
  sweep "$PASSKEY --query inside" "$1" "$2"
  # question after compression (SCBench's multi-turn reuse): the same 40 samples
  sweep "$PASSKEY --query after" "$1" "$2"
  # NLL as before (the continuation is teacher-forced after the context was compressed)
  sweep "$NLL" "$1" "$2"
}

if [ "${1:-}" = "run" ]; then
  set -e
  if [ -n "${2:-}" ]; then
    all "$2" "${3:-1}"
  else
    all 0 2 &
    all 1 2
    wait
    python benchmarks/rows_table.py "$ROWS"
  fi
fi
