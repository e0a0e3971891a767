"""Prompt templates: literal placeholder filling, input/no-input variants, bundled files, chat."""

from __future__ import annotations

import json

import pytest

from instructflow.templates import TemplateError, load_template, render_prompt, render_row

from conftest import REPO, build_tokenizer

TEMPLATES = REPO / "src" / "instructflow" / "prompt_templates"
ALPACA = load_template(TEMPLATES / "alpaca.yaml")


def test_braces_and_jinja_in_data_reach_the_prompt_verbatim():
    instruction = "Fill {input} and {{ name }} and {% if x %}y{% endif %} and {0} and {output}"
    data_input = "{instruction} {}"
    prompt, response = render_row(ALPACA, instruction, data_input, "answer {output} {{x}}")
    assert instruction in prompt
    assert "### Input:\n" + data_input + "\n" in prompt
    assert response == "answer {output} {{x}}"


def test_input_and_no_input_variants():
    with_input, _ = render_row(ALPACA, "Sum these.", "1, 2", "3")
    without, _ = render_row(ALPACA, "Say hi.", "", "hi")
    assert "### Input:\n1, 2\n" in with_input and "paired with an input" in with_input
    assert "### Input:" not in without and "paired with an input" not in without
    for prompt in (with_input, without):
        assert prompt.endswith("### Response:\n")


def test_alpaca_pl_carries_the_polish_preamble():
    template = load_template(TEMPLATES / "alpaca_pl.yaml")
    with_input, _ = render_row(template, "Policz.", "1, 2", "3")
    without, _ = render_row(template, "Powiedz cześć.", "", "cześć")
    assert with_input.startswith("Poniżej znajduje się instrukcja opisująca zadanie, połączona z danymi wejściowymi")
    assert without.startswith("Poniżej znajduje się instrukcja opisująca zadanie.")
    assert "### Instruction:\nPowiedz cześć.\n" in without


def test_chat_template_uses_the_tokenizers_chat_template():
    tok = build_tokenizer()
    template = load_template(TEMPLATES / "chat.yaml")
    prompt, response = render_row(template, "Sum these.", "1, 2", "3", tokenizer=tok)
    expected = tok.apply_chat_template([{"role": "user", "content": "Sum these.\n\n1, 2"}], tokenize=False,
                                       add_generation_prompt=True)
    assert prompt == expected == "<|user|>\nSum these.\n\n1, 2\n<|assistant|>\n"
    assert response == "3"


def test_chat_rows_keep_earlier_turns_and_train_the_last_assistant_turn():
    tok = build_tokenizer()
    turns = [{"role": "system", "content": "Be short."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "2+2?"},
             {"role": "assistant", "content": "4"}]
    prompt, response = render_row(load_template(TEMPLATES / "chat.yaml"), "2+2?", "", "4",
                                  messages=json.dumps(turns), tokenizer=tok)
    assert prompt == tok.apply_chat_template(turns[:-1], tokenize=False, add_generation_prompt=True)
    assert "<|assistant|>\nHello\n" in prompt and response == "4"


def test_chat_template_without_tokenizer_chat_template_is_a_clear_error():
    tok = build_tokenizer()
    tok.chat_template = None
    with pytest.raises(TemplateError, match="chat template"):
        render_row(load_template(TEMPLATES / "chat.yaml"), "x", "", "y", tokenizer=tok)


@pytest.mark.parametrize(
    "text, message",
    [
        ("prompt_input: a\nprompt_no_input: b\nresponse: '{output}'\nsystem: c\n", r"unknown keys \['system'\]"),
        ("prompt_input: a\nresponse: '{output}'\n", "prompt_no_input"),
        ("prompt_input: a\nprompt_no_input: b\nresponse: answer\n", r"\{output\}"),
        ("- a list\n", "mapping"),
    ],
)
def test_bad_template_files_are_rejected(tmp_path, text, message):
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    with pytest.raises(TemplateError, match=message):
        load_template(path)


def test_custom_template_file_and_inference_prompt(tmp_path):
    path = tmp_path / "qa.yaml"
    path.write_text('prompt_input: "Q: {instruction} ({input})\\nA: "\nprompt_no_input: "Q: {instruction}\\nA: "\n')
    template = load_template(path)
    assert template.name == "qa" and template.response == "{output}"
    prompt, response = render_row(template, "Why?", "", "Because.")
    assert (prompt, response) == ("Q: Why?\nA: ", "Because.")
    # The prompt used at inference is the training prompt without the response.
    assert render_prompt(path, "Why?", "ctx") == "Q: Why? (ctx)\nA: "
