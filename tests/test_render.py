"""render stage: cleaned rows -> prompt/response Parquet."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from instructflow.io import read_parquet, write_parquet
from instructflow.render import render_prompts, run_render
from instructflow.templates import load_template, render_row

from conftest import REPO

TEMPLATES = REPO / "src" / "instructflow" / "prompt_templates"


def test_render_prompts_keeps_rows_splits_and_order(clean_rows, alpaca_prompts):
    assert list(alpaca_prompts.columns) == ["row", "prompt", "response", "split", "prompt_has_special_tokens"]
    assert not alpaca_prompts["prompt_has_special_tokens"].any()  # a file template adds no special tokens
    assert alpaca_prompts["row"].tolist() == clean_rows["row"].tolist()
    assert alpaca_prompts["split"].tolist() == clean_rows["split"].tolist()
    template = load_template(TEMPLATES / "alpaca.yaml")
    for (_, row), (_, out) in zip(clean_rows.iterrows(), alpaca_prompts.iterrows()):
        assert (out["prompt"], out["response"]) == render_row(template, row["instruction"], row["input"], row["output"])
    # The data has rows with and without input, so both variants are exercised.
    assert alpaca_prompts["prompt"].str.contains("### Input:").any()
    assert (~alpaca_prompts["prompt"].str.contains("### Input:")).any()


def test_run_render_chat_template_reads_the_models_tokenizer(tmp_path, clean_rows, tiny_model_dir):
    from transformers import AutoTokenizer

    write_parquet(tmp_path / "clean.parquet", clean_rows)
    model_dir = tiny_model_dir("llama")
    run_render(tmp_path / "clean.parquet", TEMPLATES / "chat.yaml", tmp_path / "chat.parquet", model_dir=model_dir)
    out = read_parquet(tmp_path / "chat.parquet")
    tok = AutoTokenizer.from_pretrained(model_dir)
    first = clean_rows.iloc[0]
    user = first["instruction"] + (f"\n\n{first['input']}" if first["input"] else "")
    assert out["prompt"].iloc[0] == tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                                            add_generation_prompt=True)
    assert out["response"].tolist() == clean_rows["output"].tolist()


def test_run_render_file_template_needs_no_model(tmp_path, clean_rows):
    write_parquet(tmp_path / "clean.parquet", clean_rows)
    rendered = run_render(tmp_path / "clean.parquet", TEMPLATES / "alpaca_pl.yaml", tmp_path / "pl.parquet")
    assert read_parquet(tmp_path / "pl.parquet").equals(rendered)
    assert rendered["prompt"].str.startswith("Poniżej").all()


def _chat(*turns):
    return json.dumps([{"role": r, "content": c} for r, c in turns])


CHATS = pd.DataFrame({
    "row": [1, 2], "instruction": ["2+2?", "Hi"], "input": ["", ""], "output": ["4", "Hello"],
    "messages": [_chat(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello"), ("user", "2+2?"),
                       ("assistant", "4")),
                 _chat(("user", "Hi"), ("assistant", "Hello"))],
    "split": ["train", "eval"]})


def test_a_one_exchange_file_template_counts_the_chat_turns_it_leaves_out(tmp_path, capsys):
    """Under a file template without prompt_next_turn a chat row keeps only its last user and assistant
    turns: the system prompt and earlier turns it leaves out are counted and named in the render log."""
    path = tmp_path / "qa.yaml"
    path.write_text('prompt_input: "Q: {instruction} ({input})\\nA: "\nprompt_no_input: "Q: {instruction}\\nA: "\n')
    rendered = render_prompts(CHATS, load_template(path))
    assert rendered.attrs == {"chat_rows_cut": 1, "chat_turns_dropped": 3}
    assert rendered["prompt"].tolist() == ["Q: 2+2?\nA: ", "Q: Hi\nA: "] and "segments" not in rendered
    write_parquet(tmp_path / "clean.parquet", CHATS)
    run_render(tmp_path / "clean.parquet", path, tmp_path / "out.parquet")
    log = capsys.readouterr().err
    assert "chat_turns_dropped=3 in chat_rows_cut=1 of 2 rows" in log and "prompt_next_turn" in log
    # Alpaca rows (no messages) lose nothing and log nothing.
    assert render_prompts(CHATS.assign(messages=""), load_template(path)).attrs["chat_turns_dropped"] == 0


@pytest.mark.parametrize("template", ["alpaca", "chat"])
def test_chat_rows_render_whole_with_segments_and_the_last_turn_as_prompt_and_response(template, tmp_path):
    """Every turn is rendered (system prompt included); prompt/response are the text before the last assistant
    turn and that turn (what evaluation generates and scores); Alpaca rows get no segments column."""
    from conftest import end_of_turn_tokenizer

    tok = end_of_turn_tokenizer()
    rendered = render_prompts(CHATS, load_template(template), tokenizer=tok)
    assert rendered.attrs == {"chat_rows_cut": 0, "chat_turns_dropped": 0, "empty_assistant_turns": 0}
    assert list(rendered.columns) == ["row", "prompt", "response", "split", "prompt_has_special_tokens", "segments",
                                      "end_of_turn"]
    assert rendered["end_of_turn"].tolist() == ["<|end|>" if template == "chat" else ""] * 2
    assert rendered["response"].tolist() == ["4", "Hello"]
    first = json.loads(rendered["segments"].iloc[0])
    assert [s["response"] for s in first] == [False, True, False, True]
    end = rendered["end_of_turn"].iloc[0]
    assert "Be brief." in first[0]["text"] and rendered["prompt"].iloc[0] == "".join(
        [first[0]["text"], first[1]["text"], end, first[2]["text"]])
    if template == "chat":  # the prompt is the generation prompt of the turns before the last
        turns = json.loads(CHATS["messages"].iloc[0])[:-1]
        assert rendered["prompt"].iloc[0] == tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    else:  # one exchange without a system prompt: exactly the Alpaca row
        assert rendered["prompt"].iloc[1] == render_row(load_template("alpaca"), "Hi", "", "Hello")[0]
    write_parquet(tmp_path / "clean.parquet", CHATS.assign(messages=""))
    assert "segments" not in run_render(tmp_path / "clean.parquet", TEMPLATES / "alpaca.yaml", tmp_path / "a.parquet")
