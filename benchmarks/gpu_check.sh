#!/usr/bin/env bash
# Device checks for the distributed and Hugging Face integrations (issue 4), in under 10 minutes.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # from the repository root, with .venv set up
#
# 1. the 2-process CPU tests (gloo; torchrun and accelerate launch) as in CI;
# 2. distributed logging and scoring on the GPUs: one process (reference), then W ranks with
#    NCCL (W = min(2, GPUs); with a single GPU the W=2 run falls back to gloo on the CPU), for a
#    plain model, DDP and FSDP2 `fully_shard`; the stores must hold the same (id, row) set and the
#    scores must agree with the reference to 1e-4;
# 3. throughput: logging examples/s vs a bare forward+backward (GPT-2 124M shape, bf16, k=64 on
#    every layer) and scoring GiB/s of a 2 GiB bf16 store on the GPU;
# 4. logging throughput against a bare forward+backward, the activation-gradient floor, LogIX and
#    Bergson (Llama-shaped 8 x 1024, k=64 on every decoder Linear, fp32 + TF32), with the peers'
#    environment PEERS_PY (`make .venv-peers/.installed` with a CUDA TORCH_SPEC); without it, or
#    without CUDA there, the step prints a JSON line saying why and is skipped;
# 5. the HF Trainer callback overhead benchmark on the GPU.
# Every step prints one JSON line; the script exits non-zero on the first failure. Each step's
# timeout is cut to what is left of a 590 s budget, so the whole script stays under 10 minutes.
set -euo pipefail
PY=${PY:-.venv/bin/python}
PEERS_PY=${PEERS_PY:-.venv-peers/bin/python}
OUT=${1:-runs/gpu_check}
mkdir -p "$OUT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
start=$(date +%s)
step() { echo "== $1 ($(( $(date +%s) - start )) s)"; }
# t SECONDS: that timeout, or what is left of the budget when less; fails when under 10 s are left
t() {
    local left=$(( 590 - ($(date +%s) - start) ))
    if (( left < 10 )); then echo "time budget spent before this step" >&2; return 1; fi
    echo $(( $1 < left ? $1 : left ))
}

"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0), torch.cuda.device_count(), 'GPU(s)')"
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
W=2

step "1. CPU multi-process tests (gloo)"
timeout "$(t 300)" "$PY" -m pytest tests/test_distributed.py tests/test_hf.py -q -x -p no:cacheprovider

step "2. distributed logging and scoring on $NGPU GPU(s), W=$W"
rm -rf "$OUT/dist" && mkdir -p "$OUT/dist"
timeout "$(t 120)" "$PY" benchmarks/gpu_dist_check.py reference "$OUT/dist"
timeout "$(t 180)" "$PY" -m torch.distributed.run --standalone --nproc_per_node "$W" benchmarks/gpu_dist_check.py dist "$OUT/dist"
timeout "$(t 60)" "$PY" benchmarks/gpu_dist_check.py compare "$OUT/dist"

step "3. logging and scoring throughput"
timeout "$(t 240)" "$PY" benchmarks/gpu_dist_check.py throughput "$OUT"

step "4. logging throughput vs bare, LogIX and Bergson on the GPU"
if "$PEERS_PY" -c "import torch, logix, bergson; assert torch.cuda.is_available()" 2>/dev/null; then
    timeout "$(t 240)" "$PEERS_PY" benchmarks/gpu_dist_check.py peers "$OUT"
else
    echo "{\"mode\": \"peers\", \"skipped\": \"$PEERS_PY lacks CUDA torch, logix or bergson: make .venv-peers/.installed TORCH_SPEC=<a CUDA torch>\"}"
fi

step "5. Trainer callback overhead"
timeout "$(t 180)" "$PY" benchmarks/trainer_callback_overhead.py --device cuda --n 1024 --steps 128 --batch 32 \
    --layers 6 --width 512 --seq 128 --vocab 8192 --k 64

step "done"
