"""The benchmark's data, built by the project's own stages (clean -> render -> tokenize), and the
preprocessing benchmark: those three stages on many rows, with HF `datasets` `.map` tokenization of
the same rendered rows timed beside them as the peer."""

from __future__ import annotations

import random
import time
from pathlib import Path

from instructflow.clean import run_clean
from instructflow.demo_data import WORDS, generate, write_csv
from instructflow.examples import Examples
from instructflow.io import read_json, read_parquet
from instructflow.render import run_render
from instructflow.templates import bundled_path
from instructflow.tokenization import run_tokenize

TEMPLATE = bundled_path("alpaca")
MAX_LENGTH = 512


def synthetic_rows(n: int, seed: int = 7) -> list[tuple[str, str, str]]:
    """Distinct Alpaca-shaped rows of the length Alpaca has (a sentence-long instruction, an input on
    about half the rows, a response of a few dozen words). The demo generator's task families hold
    only a few thousand distinct rows, too few for the preprocessing benchmark."""
    rng = random.Random(seed)

    def words(lo: int, hi: int) -> str:
        return " ".join(rng.choices(WORDS, k=rng.randint(lo, hi)))

    return [(f"Task {i}: {words(5, 20)}.", words(5, 40) if rng.random() < 0.5 else "", words(5, 80) + ".")
            for i in range(n)]


def build(work: Path, model_dir: Path, rows: int | list | Path, *, seed: int = 1234,
          eval_fraction: float = 0.1) -> dict:
    """Run the three stages into ``work`` on ``rows`` demo rows, the given rows, or a data file in any
    format the clean stage reads; returns their wall times and paths."""
    work.mkdir(parents=True, exist_ok=True)
    if isinstance(rows, Path):
        csv = rows
    else:
        csv = work / "instructions.csv"
        table = generate(rows, seed) if isinstance(rows, int) else rows
        write_csv(csv, table)
    seconds = {}
    t0 = time.perf_counter()
    run_clean(csv, work / "clean.parquet", work / "clean_rejected.parquet", work / "clean_report.json",
              eval_fraction=eval_fraction)
    seconds["clean"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    run_render(work / "clean.parquet", TEMPLATE, work / "prompts.parquet")
    seconds["render"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    run_tokenize(work / "prompts.parquet", model_dir, work / "train.safetensors", work / "eval.safetensors",
                 work / "tokenize_rejected.parquet", work / "audit.json", max_length=MAX_LENGTH)
    seconds["tokenize"] = time.perf_counter() - t0
    rows = read_json(work / "clean_report.json")["rows_in"]
    return {"rows": rows, "seconds": seconds, "total_seconds": sum(seconds.values()),
            "prompts": work / "prompts.parquet", "train": work / "train.safetensors", "eval": work / "eval.safetensors"}


def datasets_map_seconds(prompts_path: Path, model_dir: Path) -> float:
    """The peer: tokenize the same rendered prompts and responses with `datasets.Dataset.map`
    (batched, the way HF examples do it), without our label building and audit."""
    from datasets import Dataset, disable_caching
    from transformers import AutoTokenizer

    disable_caching()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    table = read_parquet(prompts_path)[["prompt", "response"]]
    t0 = time.perf_counter()
    dataset = Dataset.from_pandas(table, preserve_index=False)

    def tok(batch):
        prompt = tokenizer(batch["prompt"], add_special_tokens=True)["input_ids"]
        response = tokenizer(batch["response"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [p + r + [tokenizer.eos_token_id] for p, r in zip(prompt, response)],
                "prompt_length": [len(p) for p in prompt]}

    dataset.map(tok, batched=True, remove_columns=["prompt", "response"])
    return time.perf_counter() - t0


def describe(examples: Examples) -> dict:
    lengths = examples.lengths.float()
    trained = int((examples.labels != -100).sum())
    return {"rows": len(examples), "tokens": int(lengths.sum()), "mean_tokens": round(float(lengths.mean()), 1),
            "max_tokens": int(lengths.max()), "trained_tokens": trained,
            "trained_fraction": round(trained / float(lengths.sum()), 3)}
