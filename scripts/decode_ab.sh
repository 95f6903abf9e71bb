#!/usr/bin/env bash
# On the GPU machine: an A/B of decode-step settings in one run. For each round, every setting (a list of
# VAR=value environment assignments, "" for the defaults) runs `mamba3 bench --device cuda` on the same preset and
# batches, so that settings alternate and drift between them shows. Prints one line per (round, setting, batch): the
# bench's decode row prefixed by the setting. A setting's BIN=path runs that binary instead (two builds in one A/B).
# Usage:
#   MAMBA3_BIN=run/bin/mamba3 scripts/decode_ab.sh [-p 1.5b|1.5b-mimo] [-b "1 16 128"] [-r 2] -- "" "VAR=x" "VAR=y W=z"
set -uo pipefail
preset=1.5b
batches="1 16 128"
rounds=2
while [[ $# -gt 0 && $1 != -- ]]; do
  case $1 in
    -p) preset=$2; shift 2 ;;
    -b) batches=$2; shift 2 ;;
    -r) rounds=$2; shift 2 ;;
    *) echo "decode_ab.sh: unknown option $1 (usage in the header)" >&2; exit 2 ;;
  esac
done
[[ ${1:-} == -- ]] && shift
[[ $# -gt 0 ]] || { echo "decode_ab.sh: no settings after -- (\"\" is the defaults)" >&2; exit 2; }
bin=${MAMBA3_BIN:-run/bin/mamba3}
[[ -x $bin ]] || { echo "decode_ab.sh: $bin is not an executable (set MAMBA3_BIN)" >&2; exit 2; }
read -r -a batch_list <<< "$batches"
for ((round = 1; round <= rounds; ++round)); do
  for setting in "$@"; do
    read -r -a words <<< "$setting"
    run_bin=$bin assignments=()
    for w in "${words[@]}"; do
      if [[ $w == BIN=* ]]; then run_bin=${w#BIN=}; else assignments+=("$w"); fi
    done
    # --lengths 64 with two timed steps: the shortest prefill+decode run the bench allows.
    rows=$(env "${assignments[@]}" "$run_bin" bench --device cuda --preset "$preset" --batch "${batch_list[@]}" \
             --lengths 64 --max-decode-steps 2 2>&1 | grep -E '^  b[0-9]|rror')
    while IFS= read -r row; do
      printf 'round %d  %-44s %s\n' "$round" "${setting:-defaults}" "$row"
    done <<< "$rows"
  done
done
