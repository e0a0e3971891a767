"""`instructflow generate`: a model's answers to a file of instructions, prompted as in training.

    instructflow generate --model results/runs/default/model --input questions.jsonl --out answers.jsonl

The input is any file the clean stage reads (CSV/TSV, JSON, JSONL, Parquet) with an instruction column
and optionally an input column, found by the names clean finds them by. Each prompt is rendered with
the template the model was trained with (an exported run folder holds it as instructflow_template.yaml)
or the one --template names, tokenized as the tokenize stage does, and answered greedily in
length-sorted, left-padded batches with the KV cache (the evaluate stage's `generate`). The output holds
one JSON object per input row, in input order: row, instruction, input, output (the answer),
stopped_with_eos and generated_tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch

from .clean import AUTO_COLUMNS, CleanError, read_table
from .config import defaults
from .io import atomic_path
from .render import render_prompts
from .templates import Template, TemplateError, load_template

DEFAULTS = defaults("evaluate")
MAX_NEW_TOKENS = 256  # longer than evaluation's cap (evaluate.max_new_tokens): these answers are read, not scored
RUN_TEMPLATE = "instructflow_template.yaml"  # written by train.export beside the model


def read_instructions(path: str | Path) -> pd.DataFrame:
    """The file's rows as render takes them (row, instruction, input, output, split), cells as written."""
    table = read_table(path)
    lower = {str(c).strip().lower(): c for c in reversed(list(table.columns))}
    found = {key: next((lower[name] for name in AUTO_COLUMNS[key] if name in lower), None)
             for key in ("instruction", "input")}
    if found["instruction"] is None:
        raise CleanError(f"{path}: cannot find the instruction column; columns found: {list(table.columns)}. "
                         f"Name it one of: {', '.join(AUTO_COLUMNS['instruction'])}")
    return pd.DataFrame({"row": range(len(table)), "instruction": table[found["instruction"]].to_numpy(),
                         "input": table[found["input"]].to_numpy() if found["input"] else "",
                         "output": "", "split": "generate"})


def model_template(model_dir: str | Path, template: str | None = None) -> Template:
    if template:
        return load_template(template)
    saved = Path(model_dir) / RUN_TEMPLATE
    if not saved.is_file():
        raise TemplateError(f"{model_dir} holds no {RUN_TEMPLATE} (the model folder of an instructflow run does); "
                            "name the template the model was trained with: --template alpaca, or a template file")
    return load_template(saved)


def generate_file(model_dir: str | Path, input_path: str | Path, out_path: str | Path, *,
                  template: str | None = None, max_new_tokens: int = MAX_NEW_TOKENS,
                  batch_size: int = DEFAULTS["batch_size"]) -> list[dict]:
    from .evaluate import generate, load_model

    if not (Path(model_dir) / "config.json").is_file():
        raise ValueError(f"{model_dir} is not a model folder (no config.json); give a run's model folder "
                         "(results/runs/<run>/model) or a save_pretrained folder")
    rows = read_instructions(input_path)
    chosen = model_template(model_dir, template)
    model, tokenizer = load_model(model_dir)
    prompts = render_prompts(rows, chosen, tokenizer=tokenizer)["prompt"].tolist()
    # As the tokenize stage: a chat template's text already holds the special tokens, a file template's not.
    ids = tokenizer(prompts, add_special_tokens=not chosen.chat)["input_ids"] if prompts else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    configured = getattr(model.generation_config, "eos_token_id", None)
    eos += [e for e in (configured if isinstance(configured, (list, tuple)) else [configured]) if e is not None]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    answers, _ = generate(model, [torch.tensor(i) for i in ids], eos_token_ids=sorted(set(eos)), pad_token_id=pad,
                          max_new_tokens=max_new_tokens, batch_size=batch_size, progress=True)
    records = [{"row": int(r.row), "instruction": r.instruction, "input": r.input,
                "output": tokenizer.decode(tokens, skip_special_tokens=True),
                # generate stops at EOS or at max_new_tokens: fewer new tokens means it stopped with EOS
                "stopped_with_eos": len(tokens) < max_new_tokens, "generated_tokens": len(tokens)}
               for r, tokens in zip(rows.itertuples(index=False), answers)]
    with atomic_path(out_path) as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return records
