"""render stage: cleaned rows -> prompt/response Parquet."""

from __future__ import annotations

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


def test_file_template_counts_the_chat_turns_it_leaves_out(tmp_path, capsys):
    """Under a non-chat template a chat row keeps only its last user and assistant turns: the system
    prompt and earlier turns it leaves out are counted and named in the render log, never lost unseen."""
    import json

    import pandas as pd

    from instructflow.render import render_prompts

    def chat(*turns):
        return json.dumps([{"role": r, "content": c} for r, c in turns])

    clean = pd.DataFrame({
        "row": [1, 2], "instruction": ["2+2?", "Hi"], "input": ["", ""], "output": ["4", "Hello"],
        "messages": [chat(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello"), ("user", "2+2?"),
                          ("assistant", "4")),
                     chat(("user", "Hi"), ("assistant", "Hello"))],
        "split": ["train", "train"]})
    rendered = render_prompts(clean, load_template("alpaca"))
    assert rendered.attrs == {"chat_rows_cut": 1, "chat_turns_dropped": 3}
    assert "Be brief." not in rendered["prompt"].iloc[0] and "2+2?" in rendered["prompt"].iloc[0]
    write_parquet(tmp_path / "clean.parquet", clean)
    run_render(tmp_path / "clean.parquet", TEMPLATES / "alpaca.yaml", tmp_path / "out.parquet")
    log = capsys.readouterr().err
    assert "chat_turns_dropped=3 in chat_rows_cut=1 of 2 rows" in log and "template: chat" in log
    # Alpaca rows (no messages) lose nothing and log nothing.
    assert render_prompts(clean.assign(messages=""), load_template("alpaca")).attrs["chat_turns_dropped"] == 0
