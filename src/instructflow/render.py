"""render stage: cleaned rows -> Parquet with separate ``prompt`` and ``response`` text columns.

Chat rows rendered whole (``template: chat``, or a file template with ``prompt_next_turn``) also get
``segments``: the conversation as JSON, context and assistant turns in order (templates.render_conversation),
which tokenize labels turn by turn, and ``end_of_turn``: the token tokenize puts after each assistant turn
("" for the tokenizer's EOS). Their ``prompt`` is the text before the last assistant turn and ``response``
that turn, the pair evaluation generates and scores (from the segments' tokens: with a file template the
prompt text lacks the EOS tokens that follow earlier turns). Alpaca rows get neither column.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from .io import read_parquet, write_parquet
from .templates import Template, chat_markers, load_template, render_conversation, render_row


def render_prompts(clean: pd.DataFrame, template: Template, tokenizer=None) -> pd.DataFrame:
    """Prompt and response per row, and a chat row's segments where the template renders whole conversations.
    Turns a template leaves out (with a file template without prompt_next_turn, all but the last user and
    assistant turns; a system prompt it has no prompt_system for) are counted in ``attrs["chat_rows_cut"]``
    and ``attrs["chat_turns_dropped"]``; empty assistant turns, kept as untrained context, in
    ``attrs["empty_assistant_turns"]`` (where there are segments). run_render logs them."""
    prompts, responses, segments_column = [], [], []
    messages = clean["messages"] if "messages" in clean else [""] * len(clean)
    markers = chat_markers(tokenizer) if template.chat and any(messages) else None
    rows_cut = turns_dropped = empty_turns = 0
    for row, instruction, input_, output, chat in zip(clean["row"], clean["instruction"], clean["input"],
                                                      clean["output"], messages):
        dropped = 0
        if chat and template.multi_turn:
            turns = json.loads(chat)
            empty_turns += sum(t["role"] == "assistant" and not t["content"] for t in turns)
            try:
                segments, dropped = render_conversation(template, turns, tokenizer, markers)
            except ValueError as err:
                raise type(err)(f"clean row {row}: {err}") from None
            last = max(i for i, s in enumerate(segments) if s["response"])
            # The conversation's text before the last assistant turn, the chat template's end-of-turn tokens and
            # all (a file template's EOS is no text: tokenize puts it there).
            end = markers.end_of_turn if markers else ""
            prompt = "".join(s["text"] + end * s["response"] for s in segments[:last])
            response = segments[last]["text"]
            segments_column.append(json.dumps(segments, ensure_ascii=False))
        else:
            prompt, response = render_row(template, instruction, input_, output, messages=chat, tokenizer=tokenizer)
            if chat and not template.chat:
                dropped = len(json.loads(chat)) - 2  # all but the last user turn and the trained assistant turn
            segments_column.append("")
        prompts.append(prompt)
        responses.append(response)
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
    if any(segments_column):  # (pandas writes attrs into the Parquet file: Alpaca rows' file stays as it was)
        rendered["segments"] = segments_column
        rendered["end_of_turn"] = markers.end_of_turn if markers else ""
        rendered.attrs["empty_assistant_turns"] = int(empty_turns)
    return rendered


def run_render(clean_path, template_path, out_path, model_dir: str | Path | None = None) -> pd.DataFrame:
    template = load_template(template_path)
    tokenizer = None
    if template.chat:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rendered = render_prompts(read_parquet(clean_path), template, tokenizer)
    if rendered.attrs["chat_turns_dropped"]:
        what = ("renders only each conversation's last user and assistant turns (system prompts and earlier turns "
                "are left out); give it prompt_next_turn (and prompt_system), as the bundled alpaca has, or use "
                "template: chat" if not template.multi_turn else
                "has no place for these system turns (a first one needs prompt_system; later ones are never "
                "rendered)")
        print(f"instructflow render: warning: chat_turns_dropped={rendered.attrs['chat_turns_dropped']} in "
              f"chat_rows_cut={rendered.attrs['chat_rows_cut']} of {len(rendered)} rows: template "
              f"{template.name!r} {what}", file=sys.stderr, flush=True)
    if rendered.attrs.get("empty_assistant_turns"):
        print(f"instructflow render: note: {rendered.attrs['empty_assistant_turns']} empty assistant turns are kept "
              "in their conversations as context and not trained", file=sys.stderr, flush=True)
    write_parquet(out_path, rendered)
    return rendered
