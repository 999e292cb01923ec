#!/usr/bin/env bash
# Issue 18: the committed commands, in order (DESIGN.md), for either dataset. Each step is
# resumable: a finished candidate (its compare.json exists) is skipped, an interrupted one continues
# with --resume. Run from the repository root:
#   bash docs/experiments/paper-ratio/run.sh DATASET STEP
#   DATASET = hh | pku;  STEP = bank | tune1 | tune2 | main | secondary
# (run_hh.sh STEP and run_pku.sh STEP are the same with the dataset filled in.)
set -euo pipefail
DS=${1:?dataset: hh or pku}
case $DS in hh|pku) ;; *) echo "dataset must be hh or pku, got $DS" >&2; exit 2 ;; esac
CFG=docs/experiments/paper-ratio/$DS.yaml
TUNE=runs/paper-ratio/tune-$DS
MR=.venv/bin/mars-ray
candidate() {  # name, overrides...: one tuning candidate on the tuning file, seeds 90 and 91
  local name=$1; shift
  local out=$TUNE/$name
  if [ -f "$out/compare.json" ]; then echo "done: $name"; return; fi
  local resume=()
  if [ -d "$out" ]; then resume=(--resume "$out"); fi
  $MR compare --config $CFG "${resume[@]}" --output.dir "$out" --compare.seeds '[90, 91]' \
    --compare.eval_paths "[runs/paper-ratio/data/${DS}_tune.jsonl]" "$@"
}
case ${2:?step} in
  bank) .venv/bin/python docs/experiments/paper-ratio/splits.py --dataset $DS
        $MR bank build --config $CFG ;;
  tune1)
    candidate lora-1e-3 --compare.strategies '[uniform]' --train.lora true --train.lr 1.0e-3
    candidate lora-3e-3 --compare.strategies '[uniform]' --train.lora true --train.lr 3.0e-3
    candidate full-5e-5 --compare.strategies '[uniform]' --train.lora false --train.lr 5.0e-5
    candidate full-1e-4 --compare.strategies '[uniform]' --train.lora false --train.lr 1.0e-4 ;;
  tune2)  # with step 1's choice written into $DS.yaml
    for w in 0 1; do for s in raw std; do
      candidate mars-warmup$w-$s --compare.strategies '[mars]' --mars.warmup_passes $w --mars.margin_scale $s
    done; done ;;
  main) out=runs/paper-ratio/$DS
        if [ -d $out ]; then $MR compare --config $CFG --resume $out
        else $MR compare --config $CFG; fi ;;
  secondary)
    out=runs/paper-ratio/$DS-secondary
    if [ -d $out ]; then $MR compare --config $CFG --resume $out --output.dir $out --compare.strategies '[mars-nosem, adaboost]'
    else $MR compare --config $CFG --output.dir $out --compare.strategies '[mars-nosem, adaboost]'; fi ;;
  *) echo "step must be bank, tune1, tune2, main or secondary" >&2; exit 2 ;;
esac
