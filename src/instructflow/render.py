"""render stage: cleaned rows -> Parquet with separate ``prompt`` and ``response`` text columns."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from .io import read_parquet, write_parquet
from .templates import Template, load_template, render_row


def render_prompts(clean: pd.DataFrame, template: Template, tokenizer=None) -> pd.DataFrame:
    """Prompt and response per row. A file (non-chat) template renders a chat row's last user and
    assistant turns only: the turns it leaves out (system prompts, earlier exchanges) are counted in
    ``attrs["chat_rows_cut"]`` and ``attrs["chat_turns_dropped"]``, and run_render logs them."""
    prompts, responses = [], []
    messages = clean["messages"] if "messages" in clean else [""] * len(clean)
    rows_cut = turns_dropped = 0
    for instruction, input_, output, chat in zip(clean["instruction"], clean["input"], clean["output"], messages):
        prompt, response = render_row(template, instruction, input_, output, messages=chat, tokenizer=tokenizer)
        prompts.append(prompt)
        responses.append(response)
        if chat and not template.chat:
            dropped = len(json.loads(chat)) - 2  # all but the last user turn and the trained assistant turn
            rows_cut += dropped > 0
            turns_dropped += max(dropped, 0)
    # prompt_has_special_tokens: the chat template's text already holds the model's special tokens
    # (BOS and all), so tokenize must not add them again; a file template's text holds none.
    rendered = pd.DataFrame({"row": clean["row"].to_numpy(), "prompt": prompts, "response": responses,
                             "split": clean["split"].to_numpy(),
                             "prompt_has_special_tokens": np.full(len(prompts), template.chat, dtype=bool)})
    if "source" in clean:  # tokenize records each row's source, for training's per-source weights
        rendered["source"] = clean["source"].to_numpy()
    rendered.attrs.update(chat_rows_cut=int(rows_cut), chat_turns_dropped=int(turns_dropped))
    return rendered


def run_render(clean_path, template_path, out_path, model_dir: str | Path | None = None) -> pd.DataFrame:
    template = load_template(template_path)
    tokenizer = None
    if template.chat:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rendered = render_prompts(read_parquet(clean_path), template, tokenizer)
    if rendered.attrs["chat_turns_dropped"]:
        print(f"instructflow render: warning: chat_turns_dropped={rendered.attrs['chat_turns_dropped']} in "
              f"chat_rows_cut={rendered.attrs['chat_rows_cut']} of {len(rendered)} rows: template "
              f"{template.name!r} is not a chat template and renders only each conversation's last user and "
              "assistant turns (system prompts and earlier turns are left out); use template: chat to train on "
              "whole conversations", file=sys.stderr, flush=True)
    write_parquet(out_path, rendered)
    return rendered
