"""Training under accelerate with 2 processes on CPU (gloo) follows the same loss trajectory as one
process with the same global batch: every rank builds the same batch plan, trains its share of each
global batch, and DDP all-reduces the gradients (train.py scales each rank's loss sum by
world / labelled tokens of the global batch).

The trainer reads an already tokenized file: tokenization is its own workflow stage and runs once,
never per rank. Here the token file is even built by hand, without any tokenizer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import build_model, build_tokenizer
from instructflow.examples import IGNORE_INDEX, Examples
from instructflow.io import read_jsonl
from instructflow.launch import accelerate_config

# Float sums run in a different order on 2 ranks (per-rank micro-batches, then an all-reduce), so
# losses agree to ~1e-6 here; the bug this guards against (ranks training alone) moved them by 1e-3
# within two steps.
LOSS_ATOL = 1e-4
STEPS = 6
SETTINGS = {"max_steps": STEPS, "batch_size": 8, "micro_batch_size": 2, "warmup_steps": 1, "log_every": 1,
            "checkpoint_every": 0, "learning_rate": 0.01, "precision": "fp32", "seed": 7, "eval_every": 2,
            "eval_rows": 7}  # an odd count: the ranks score 4 and 3 rows


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("multiprocess")
    tok = build_tokenizer()
    # Tied, as SmolLM2's: with one process the fast path makes the embedding's lookup gradient sparse, under DDP not.
    model = build_model("llama", len(tok), tok.eos_token_id, tok.pad_token_id, tie_word_embeddings=True)
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    model.save_pretrained(root / "model", safe_serialization=True)
    tok.save_pretrained(root / "model")
    # Rows of varied length and prompt share, so micro-batches pad differently on 1 and 2 ranks.
    g = torch.Generator().manual_seed(0)
    for split, count in (("train", 32), ("eval", 10)):
        rows, prompts = [], []
        for _ in range(count):
            n = int(torch.randint(6, 30, (1,), generator=g))
            p = int(torch.randint(2, n - 2, (1,), generator=g))
            ids = torch.randint(2, len(tok), (n,), generator=g).tolist()
            rows.append((ids, [IGNORE_INDEX] * p + ids[p:]))
            prompts.append(p)
        Examples.from_rows(rows, list(range(len(rows))), prompts, {"eos_token_id": tok.eos_token_id,
                           "pad_token_id": tok.pad_token_id}).save(root / f"{split}.safetensors")
    (root / "settings.json").write_text(json.dumps(SETTINGS))
    return root


def launch(root: Path, processes: int, port: int) -> tuple[list[dict], dict]:
    """The train rule's command line, with the accelerate config the rule picks for this count."""
    config = accelerate_config(processes)
    name = f"p{processes}"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
           "--num_processes", str(processes), "--main_process_port", str(port),
           "-m", "instructflow.train", "--settings", str(root / "settings.json"), "--model", str(root / "model"),
           "--train", str(root / "train.safetensors"), "--eval", str(root / "eval.safetensors"), "--out", str(root / name / "model"),
           "--metrics", str(root / name / "metrics.jsonl"), "--summary", str(root / name / "summary.json"),
           "--workdir", str(root / name / "checkpoints")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return read_jsonl(root / name / "metrics.jsonl"), json.loads((root / name / "summary.json").read_text())


@pytest.mark.slow
def test_two_cpu_processes_match_one(workspace):
    one, one_summary = launch(workspace, 1, 29731)
    two, two_summary = launch(workspace, 2, 29732)
    # Two processes really ran (a config that silently starts one would pass the loss check).
    assert (one_summary["processes"], two_summary["processes"]) == (1, 2)
    assert (one_summary["embedding_gradient"], two_summary["embedding_gradient"]) == \
        ("sparse (tied to the output layer)", "dense")
    assert two_summary["trained_tokens"] == one_summary["trained_tokens"]
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, STEPS + 1))
    assert [r["tokens"] for r in two] == [r["tokens"] for r in one]
    # The loss must move, or matching trajectories would prove nothing.
    assert abs(one[-1]["loss"] - one[0]["loss"]) > 10 * LOSS_ATOL
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], abs=LOSS_ATOL), (a, b)
    # Held-out loss: each rank scores its share of the rows, the sums are all-reduced, so every rank (and the
    # record) has the loss one process computes over all of them; the best step follows.
    assert [r["step"] for r in two if "eval_loss" in r] == [r["step"] for r in one if "eval_loss" in r] == [2, 4, 6]
    for a, b in zip(one, two):
        assert b.get("eval_loss", 0.0) == pytest.approx(a.get("eval_loss", 0.0), abs=LOSS_ATOL), (a, b)
    assert (two_summary["best_step"], two_summary["evaluations"]) == (one_summary["best_step"], 3)
