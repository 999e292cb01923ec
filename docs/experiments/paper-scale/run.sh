#!/usr/bin/env bash
# Issue 43: the committed commands, in order (DESIGN.md). Each step is resumable: a finished
# candidate or run (its compare.json exists) is skipped, an interrupted one continues with --resume.
# Every command runs at low priority (nice). From the repository root:
#   bash docs/experiments/paper-scale/run.sh STEP
#   STEP = splits | bank | tune1 | tune2 | tune3 | main | secondary | crosseval | report
set -euo pipefail
D=docs/experiments/paper-scale
CFG=$D/hh.yaml
R=runs/paper-scale
TUNE=$R/tune
MR="nice -n 10 .venv/bin/mars-ray"
PY=".venv/bin/python"
compare() {  # out, args...: one compare run, resumed when it was started before
  local out=$1; shift
  if [ -f "$out/compare.json" ]; then echo "done: $out"; return; fi
  if [ -d "$out" ]; then $MR compare --config $CFG --resume "$out" --output.dir "$out" "$@"
  else $MR compare --config $CFG --output.dir "$out" "$@"; fi
}
candidate() {  # name, overrides...: one tuning candidate on the tuning file, seed 90
  local name=$1; shift
  compare "$TUNE/$name" --compare.seeds '[90]' --compare.eval_paths "[$R/data/hh_tune.jsonl]" "$@"
}
choose() {  # step, candidates, default: DESIGN.md's rule on the finished candidates
  $PY docs/experiments/paper-ratio/choose.py --step "$1" --tune $TUNE --file hh_tune --candidates "$2" \
    --default "$3" --tie 0.005
}
case ${1:?step} in
  splits) $PY docs/experiments/paper-ratio/splits.py --dataset hh --out $R/data --train 1003 --tune 340 --heldout 1006 --seed 43
          # issue 18's PKU-SafeRLHF reported held-out file, for the cross-dataset evaluation
          $PY docs/experiments/paper-ratio/splits.py --dataset pku --out runs/paper-ratio/data ;;
  bank) $MR bank build --config $CFG ;;
  tune1)
    candidate full-2e-5 --compare.strategies '[uniform]' --train.lora false --train.lr 2.0e-5
    candidate full-5e-5 --compare.strategies '[uniform]' --train.lora false --train.lr 5.0e-5
    candidate lora-1e-3 --compare.strategies '[uniform]' --train.lora true --train.lr 1.0e-3
    choose 1 full-2e-5,full-5e-5,lora-1e-3 full-5e-5 ;;
  tune2)  # with step 1's choice written into hh.yaml
    for s in std raw; do candidate mars-warmup1-$s --compare.strategies '[mars]' --mars.margin_scale $s; done
    choose 2 mars-warmup1-std,mars-warmup1-raw mars-warmup1-std ;;
  tune3)  # with steps 1-2's choices written into hh.yaml
    for w in 0.1 0.3; do candidate uniform-sw$w --compare.strategies '[uniform]' --train.synthetic_weight $w; done
    choose 1 uniform-sw0.1,uniform-sw0.3 uniform-sw0.3 ;;
  main) compare $R/hh ;;
  secondary)  # the synthetic weight tuning step 3 chose
    w=$(choose 1 uniform-sw0.1,uniform-sw0.3 uniform-sw0.3 | sed -n 's/^chosen: uniform-sw//p')
    [ -n "$w" ] || { echo "tuning step 3 has not finished" >&2; exit 1; }
    five='[0, 1, 2, 3, 4]'
    compare $R/hh-nosem --compare.strategies '[mars-nosem]' --compare.seeds "$five"
    compare $R/hh-uniform-sw --compare.strategies '[uniform]' --compare.seeds "$five" --train.synthetic_weight "$w"
    compare $R/hh-mars-sw --compare.strategies '[mars]' --compare.seeds "$five" --train.synthetic_weight "$w"
    compare $R/hh-none-steps --compare.strategies '[none]' --compare.seeds "$five" --train.passes_per_epoch '[6, 11]' ;;
  crosseval)
    for run in $R/hh $R/hh-nosem $R/hh-uniform-sw $R/hh-mars-sw $R/hh-none-steps; do
      [ -d "$run/trials" ] || continue
      for trial in "$run"/trials/strategy=*; do
        [ -f "$trial/model/config.json" ] || continue  # not finished
        for data in ../shared/data/llmbar_rewardbench_chat_hard_419.jsonl \
                    ../shared/data/ultrafeedback_binarized_sample_1200.jsonl runs/paper-ratio/data/pku_heldout.jsonl; do
          out="$trial/heldout-x/$(basename "$data" .jsonl)"
          [ -f "$out/eval.json" ] && continue
          rm -rf "$out"  # an evaluation cut off mid-way starts again
          $MR eval --model "$trial" --data.path "$data" --output.dir "$out"
        done
      done
    done ;;
  report) $PY docs/experiments/paper-ratio/report.py --run $R/hh --run $R/hh-nosem --run $R/hh-uniform-sw=uniform-sw \
            --run $R/hh-mars-sw=mars-sw --run $R/hh-none-steps=none-steps --heldout hh_heldout \
            --pair mars:mars-nosem --pair uniform-sw:uniform --pair mars-sw:mars --pair uniform-sw:none \
            --pair uniform:none-steps --pair none-steps:none ;;
  *) echo "step must be splits, bank, tune1, tune2, tune3, main, secondary, crosseval or report" >&2; exit 2 ;;
esac
