"""render stage: cleaned rows -> Parquet with separate ``prompt`` and ``response`` text columns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .io import read_parquet, write_parquet
from .templates import Template, load_template, render_row


def render_prompts(clean: pd.DataFrame, template: Template, tokenizer=None) -> pd.DataFrame:
    prompts, responses = [], []
    messages = clean["messages"] if "messages" in clean else [""] * len(clean)
    for instruction, input_, output, chat in zip(clean["instruction"], clean["input"], clean["output"], messages):
        prompt, response = render_row(template, instruction, input_, output, messages=chat, tokenizer=tokenizer)
        prompts.append(prompt)
        responses.append(response)
    # prompt_has_special_tokens: the chat template's text already holds the model's special tokens
    # (BOS and all), so tokenize must not add them again; a file template's text holds none.
    return pd.DataFrame({"row": clean["row"].to_numpy(), "prompt": prompts, "response": responses,
                         "split": clean["split"].to_numpy(),
                         "prompt_has_special_tokens": np.full(len(prompts), template.chat, dtype=bool)})


def run_render(clean_path, template_path, out_path, model_dir: str | Path | None = None) -> pd.DataFrame:
    template = load_template(template_path)
    tokenizer = None
    if template.chat:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rendered = render_prompts(read_parquet(clean_path), template, tokenizer)
    write_parquet(out_path, rendered)
    return rendered
