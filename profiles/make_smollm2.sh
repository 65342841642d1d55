#!/usr/bin/env bash
# Remake profiles/smollm2-135m-instruct.kv.st exactly as shipped (CPU, ~20 minutes, most of it duo).
set -euo pipefail
out="$(dirname "$0")/smollm2-135m-instruct.kv.st"
work="$(mktemp -d "${TMPDIR:-/tmp}/kvtool-duo.XXXXXXXX")"     # private (0700), unpredictable: holds the duo checkpoint
trap 'rm -rf "$work"' EXIT
kvtool profile --no-stats -o "$out"                         # trace: 8 passkey samples x 1024 tokens
kvtool calibrate --method razor --profile "$out"            # echo/induction probe, 2047 tokens x 4
kvtool calibrate --method retrieval --profile "$out"        # copy score from the trace above
kvtool calibrate --method duo --preset cpu --profile "$out" --checkpoint "$work/duo.ckpt"
kvtool calibrate --method kvquant --profile "$out"          # k-means quantization levels (2/3/4 bit), ~1 min
kvtool calibrate --method pca --profile "$out"              # PCA bases from the traced moments + latent ranges, ~2 min
kvtool calibrate --method pod --threshold 0.4 --samples 2 --seq-len 512 --profile "$out"   # PoD groups + key maps, ~1 min
kvtool calibrate --method combo --profile "$out"          # mean rank of duo, copy score, razor (profile only, seconds)
kvtool policy "$out" "heads=duo:0.5,k=4,v=4,krope=pre"     # the default policy: duo's half of the KV heads whole in 4 bits (4x)
