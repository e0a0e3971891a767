"""Prompt templates: literal placeholder filling, input/no-input variants, bundled files, chat."""

from __future__ import annotations

import json

import pytest

from instructflow.templates import (ChatMarkers, Template, TemplateError, chat_markers, load_template, render_conversation,
                                    render_prompt, render_row)

from conftest import REPO, build_tokenizer, end_of_turn_tokenizer

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
        ("prompt_input: a\nprompt_no_input: b\nprompt_next_turn: 'next'\n", r"prompt_next_turn must contain \{instruction\}"),
        ("prompt_input: a\nprompt_no_input: b\nprompt_next_turn: '{instruction}'\nprompt_system: '{instruction}'\n",
         r"prompt_system must contain \{system\}"),
        ("prompt_input: a\nprompt_no_input: b\nprompt_system: '{system} {instruction}'\n", "needs prompt_next_turn"),
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


TURNS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "4"}]


def _text(segments):
    return "".join(s["text"] for s in segments)


def test_a_file_template_renders_a_conversation_as_prompt_response_pairs():
    """alpaca's prompt_system takes the preamble's place, prompt_next_turn continues the text after each answer;
    a conversation of one exchange without a system prompt is exactly the Alpaca row it would have been."""
    segments, dropped = render_conversation(ALPACA, TURNS)
    assert dropped == 0
    assert [s["response"] for s in segments] == [False, True, False, True]
    assert _text(segments) == ("Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello"
                               "\n\n### Instruction:\n2+2?\n\n### Response:\n4")
    one, _ = render_conversation(ALPACA, TURNS[1:3])
    assert [s["text"] for s in one] == list(render_row(ALPACA, "Hi", "", "Hello"))
    # Braces in the data stay as written, {system} in a user turn too.
    braces, _ = render_conversation(ALPACA, [{"role": "user", "content": "{system} {output}"},
                                             {"role": "assistant", "content": "{instruction}"}])
    assert "### Instruction:\n{system} {output}\n" in braces[0]["text"] and braces[1]["text"] == "{instruction}"
    # An empty assistant turn stays as untrained context; a later system turn has no place and is counted.
    odd = TURNS[:2] + [{"role": "assistant", "content": ""}, {"role": "system", "content": "x"}] + TURNS[3:]
    segments, dropped = render_conversation(ALPACA, odd)
    assert dropped == 1 and [s["response"] for s in segments] == [False, True]
    assert segments[0]["text"].endswith("### Response:\n\n\n### Instruction:\n2+2?\n\n### Response:\n")
    with pytest.raises(TemplateError, match="prompt_next_turn"):
        render_conversation(Template(name="qa", response="{output}", prompt_input="a", prompt_no_input="b"), TURNS)


def test_chat_markers_find_the_assistant_header_and_end_of_turn_token():
    tok = build_tokenizer()
    assert chat_markers(tok) == ChatMarkers("<|assistant|>\n", "")  # the tiny template ends a turn with "\n"
    tok = end_of_turn_tokenizer()
    assert chat_markers(tok) == ChatMarkers("<|assistant|>\n", "<|end|>")


def test_a_chat_template_conversation_is_cut_at_each_assistant_turn():
    """Rendered once, cut where each assistant turn's content is: the pieces are the template's own text
    (without the end-of-turn tokens tokenize puts back, and the newline after the last turn), and the text
    before the last turn is the prompt the model gets at inference."""
    tok = end_of_turn_tokenizer()
    chat = load_template(TEMPLATES / "chat.yaml")
    whole = tok.apply_chat_template(TURNS, tokenize=False)
    segments, _ = render_conversation(chat, TURNS, tok)
    assert [s["response"] for s in segments] == [False, True, False, True]
    assert whole == segments[0]["text"] + "Hello<|end|>" + segments[2]["text"] + "4<|end|>\n"
    assert segments[0]["text"] + "Hello<|end|>" + segments[2]["text"] == tok.apply_chat_template(
        TURNS[:-1], tokenize=False, add_generation_prompt=True)
    # The user says exactly what the assistant answers: the answer is still found after the assistant header.
    echo = [{"role": "user", "content": "Say 4"}, {"role": "assistant", "content": "4"}]
    segments, _ = render_conversation(chat, echo, tok)
    assert segments[0]["text"].endswith("Say 4<|end|>\n<|assistant|>\n") and segments[1]["text"] == "4"
