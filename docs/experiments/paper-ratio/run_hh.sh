#!/usr/bin/env bash
# Issue 18 on hh: run.sh with the dataset filled in (bash docs/experiments/paper-ratio/run_hh.sh STEP).
exec bash "$(dirname "$0")/run.sh" hh "$@"
