#!/bin/bash
# issue 32: q_major at 75,600 / 32,760; issue 36: rank-32 vs rank-96 branch per linear; Lightning warm repeat (T5 warm)
export PYTHONPATH=. PYTHONUNBUFFERED=1
T0=$(date +%s)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -c "import jax;print(jax.__version__, jax.devices())"
WANJAX_ATTN8_IMPL=gpu timeout 130 python -m bench.attention8 --s 75600 32760 --iters 5 --configs "" "q_major=1" --name attention8_qmajor 2>&1 | tee $OUT/attn8.log | grep -v "^\s*$" | tail -14
echo "== attn8 done at $(( $(date +%s) - T0 )) s"
timeout 130 python -m bench.rank --ranks 5120x5120=32,96 --ranks 5120x13824=32,96 --ranks 13824x5120=32,96 --name rank_32_vs_96 2>&1 | tee $OUT/rank.log | grep -v "^\s*$" | tail -25
echo "== rank done at $(( $(date +%s) - T0 )) s"
LEFT=$(( 580 - ($(date +%s) - T0) ))
B=$(( LEFT - 15 ))
timeout $LEFT python -m bench.pipeline --skip-bf16 --skip-w4a4 --skip-diffusers --skip-artifact --pipeline-experts w4a4 --pipeline-preset lightning --pipeline-lora-rank 64 --pipeline-warm-repeat --budget-s $B --name pipeline_lightning_warm 2>&1 | tee $OUT/lightning.log | grep -v "^\s*$" | tail -40
echo "== all done at $(( $(date +%s) - T0 )) s"
