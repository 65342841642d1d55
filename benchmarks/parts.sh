# Shared by the benchmark sweeps (issue12_specs.sh, issue14_proof.sh): `part LIST I N [SEP]` prints the items of LIST
# (SEP-separated, default ';') whose index is I modulo N, each followed by SEP, so N processes given 0..N-1 split a
# sweep between them. An item may hold several ';'-separated specs when SEP is another character (specs that must
# run in the same process, e.g. a --share-prefill group).
part() {
  local i=0 out="" s sep=${4:-;}
  IFS="$sep" read -ra items <<< "$1"
  for s in "${items[@]}"; do [ $((i % $3)) -eq "$2" ] && out="$out$s$sep"; i=$((i + 1)); done
  printf '%s' "$out"
}
