#!/usr/bin/env bash
# Repeats `wanjax eval` over several calibration-reservoir seeds (the spread of a recipe's PSNR over calibration
# draws) on the device machine, without installing the package. Usage (repo root):
#   bash bench/eval_seeds.sh OUT_DIR "SEEDS" EVAL_ARGS...
# e.g. bash bench/eval_seeds.sh $OUT "0 1 2" --recipes svdquant,default --ablations shared_calib,bins1 \
#        --max-clips 24 --eval-set wanjax/evaluation/sets/eval_mini24.json
# Writes OUT_DIR/s<seed>.json (results.json of each run) and OUT_DIR/eval_seed<seed>.log. Seeds run one after
# another; start one script per seed (each with its own cores: taskset) to run them side by side. EVAL_TIMEOUT=S
# stops each run after S seconds (its finished variants are kept).
set -u
out=$1; seeds=$2; shift 2
# `wanjax eval` from a plain checkout: bench.pipeline.ensure_package_layout registers wanjax.quant / wanjax.kernels
cli='import sys; from bench.pipeline import ensure_package_layout; ensure_package_layout(); from wanjax.cli import main; sys.exit(main(sys.argv[1:]))'
mkdir -p "$out"
for s in $seeds; do
  PYTHONPATH=. timeout "${EVAL_TIMEOUT:-0}" python3 -c "$cli" eval --model models/mini --calib-set wanjax/evaluation/sets/calib_mini.json --steps 20 \
      --calib-seed "$s" --out "/tmp/eval_seed$s" "$@" >"$out/eval_seed$s.log" 2>&1
  # results.json is rewritten after every variant: a run cut short still leaves its finished variants
  [ -f "/tmp/eval_seed$s/results.json" ] && cp "/tmp/eval_seed$s/results.json" "$out/s$s.json"
  grep "PSNR" "$out/eval_seed$s.log"
done
