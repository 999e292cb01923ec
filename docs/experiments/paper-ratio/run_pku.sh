#!/usr/bin/env bash
# Issue 18 on pku: run.sh with the dataset filled in (bash docs/experiments/paper-ratio/run_pku.sh STEP).
exec bash "$(dirname "$0")/run.sh" pku "$@"
