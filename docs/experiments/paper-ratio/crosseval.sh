#!/usr/bin/env bash
# Issue 18's cross-dataset held-out sets (DESIGN.md, secondary endpoints): every finished trial's
# kept final model evaluated with `mars-ray eval` on LLMBar (419), the UltraFeedback sample (1,200)
# and the other dataset's reported held-out file. Resumable: an evaluation whose eval.json exists
# is skipped. Run from the repository root after `run_hh.sh main` (or run_pku.sh main):
#   bash docs/experiments/paper-ratio/crosseval.sh hh      # or: pku
set -euo pipefail
MR=.venv/bin/mars-ray
SHARED=../shared/data
case ${1:?hh or pku} in
  hh)  runs="runs/paper-ratio/hh runs/paper-ratio/hh-secondary"; other=runs/paper-ratio/data/pku_heldout.jsonl ;;
  pku) runs="runs/paper-ratio/pku runs/paper-ratio/pku-secondary"; other=runs/paper-ratio/data/hh_heldout.jsonl ;;
  *) echo "usage: $0 hh|pku" >&2; exit 2 ;;
esac
for run in $runs; do
  [ -d "$run/trials" ] || continue
  for trial in "$run"/trials/strategy=*; do
    [ -f "$trial/model/config.json" ] || continue  # not finished
    for data in "$SHARED/llmbar_rewardbench_chat_hard_419.jsonl" "$SHARED/ultrafeedback_binarized_sample_1200.jsonl" "$other"; do
      name=$(basename "$data" .jsonl)
      out="$trial/heldout-x/$name"
      [ -f "$out/eval.json" ] && continue
      rm -rf "$out"  # an evaluation cut off mid-way starts again
      $MR eval --model "$trial" --data.path "$data" --output.dir "$out"
    done
  done
done
