"""`instructflow generate`: answers to a file of instructions, prompted as in training, checked against the
model's own unbatched greedy generate."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import build_model, end_of_turn_tokenizer
from instructflow import cli
from instructflow.generate import RUN_TEMPLATE, TunedModel
from instructflow.io import read_jsonl
from instructflow.templates import bundled_path, render_prompt

ROWS = [
    {"instruction": "Add the numbers.", "input": "2, 3"},
    {"instruction": "Say hello", "input": ""},
    {"instruction": "Name a colour that is often used for the sky on a clear summer day", "input": ""},
]


def reference_answer(model, tokenizer, prompt: str, max_new_tokens: int) -> tuple[str, bool]:
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    stopped = tokenizer.eos_token_id in new
    if stopped:
        new = new[: new.index(tokenizer.eos_token_id)]
    return tokenizer.decode(new, skip_special_tokens=True), stopped


@pytest.fixture(scope="module")
def run_model(tiny_model_dir, tmp_path_factory):
    """A model folder as a run exports it: with the template it was trained with beside it."""
    folder = tmp_path_factory.mktemp("run") / "model"
    shutil.copytree(tiny_model_dir("llama"), folder)
    shutil.copy(bundled_path("alpaca"), folder / RUN_TEMPLATE)
    return folder


def test_answers_match_the_models_own_generate_in_input_order(run_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "answers.jsonl"
    assert cli.main(["generate", "--model", str(run_model), "--input", str(questions), "--out", str(out),
                     "--max-new-tokens", "5", "--batch-size", "2"]) == 0
    answers = read_jsonl(out)
    assert [a["row"] for a in answers] == [1, 2, 3]  # records numbered from 1, as clean's source_row
    assert [(a["instruction"], a["input"]) for a in answers] == [(r["instruction"], r["input"]) for r in ROWS]
    model = AutoModelForCausalLM.from_pretrained(run_model).eval()
    tokenizer = AutoTokenizer.from_pretrained(run_model)
    for row, answer in zip(ROWS, answers):
        prompt = render_prompt(bundled_path("alpaca"), row["instruction"], row["input"])
        text, stopped = reference_answer(model, tokenizer, prompt, 5)
        assert answer["output"] == text and answer["stopped_with_eos"] == stopped, row
        assert answer["generated_tokens"] <= 5


def test_csv_with_other_column_names_and_an_explicit_template(tiny_model_dir, tmp_path):
    questions = tmp_path / "q.csv"
    questions.write_text("prompt,context\nWhat is 1 + 1?,\nTranslate,chat\n")
    out = tmp_path / "a.jsonl"
    assert cli.main(["generate", "--model", str(tiny_model_dir("llama")), "--input", str(questions), "--out",
                     str(out), "--template", "alpaca", "--max-new-tokens", "3"]) == 0
    answers = read_jsonl(out)
    assert [(a["instruction"], a["input"]) for a in answers] == [("What is 1 + 1?", ""), ("Translate", "chat")]


def test_clear_errors_for_a_folder_without_template_a_non_model_and_a_file_without_instructions(
        tiny_model_dir, tmp_path, capsys):
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"instruction": "hi"}) + "\n")

    def last_line(*argv):
        assert cli.main(["generate", *argv, "--out", str(tmp_path / "a.jsonl")]) != 0
        return capsys.readouterr().err.strip().splitlines()[-1]

    line = last_line("--model", str(tiny_model_dir("llama")), "--input", str(questions))
    assert line.startswith("instructflow generate:") and f"holds no {RUN_TEMPLATE}" in line and "--template" in line
    line = last_line("--model", str(tmp_path), "--input", str(questions))
    assert "is not a model folder (no config.json)" in line
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "hi"}) + "\n")
    line = last_line("--model", str(tiny_model_dir("llama")), "--input", str(tmp_path / "bad.jsonl"),
                     "--template", "alpaca")
    assert "bad.jsonl: cannot find the instruction column" in line and "['text']" in line
    assert not (tmp_path / "a.jsonl").exists()


def test_answers_stop_at_the_chat_templates_end_of_turn_token(tmp_path):
    """A model trained with a chat template whose end-of-turn token is not EOS (SmolLM2's "<|im_end|>") ends its
    answers with that token: generate, chat and serve stop there, as evaluate does."""
    tokenizer = end_of_turn_tokenizer()
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    model = build_model("phi", len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
    with torch.no_grad():  # phi's output layer has a bias: this model answers "<|end|>" whatever it is asked
        model.lm_head.weight.zero_()
        model.lm_head.bias.zero_()
        model.lm_head.bias[end] = 10.0
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    shutil.copy(bundled_path("chat"), folder / RUN_TEMPLATE)
    # Stopping at EOS alone, it would say "<|end|>" until max_new_tokens.
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        plain = model.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    assert plain[0, len(ids):].tolist() == [end] * 5

    questions = tmp_path / "questions.jsonl"
    questions.write_text(json.dumps({"instruction": "Hi"}) + "\n")
    out = tmp_path / "answers.jsonl"
    assert cli.main(["generate", "--model", str(folder), "--input", str(questions), "--out", str(out),
                     "--max-new-tokens", "5"]) == 0
    [answer] = read_jsonl(out)
    assert (answer["output"], answer["stopped_with_eos"], answer["generated_tokens"]) == ("", True, 0)
    tuned = TunedModel(folder)  # chat's and serve's model
    reply = tuned.answer(tuned.prompt_ids([{"role": "user", "content": "Hi"}]), max_new_tokens=5)
    assert (reply.text(), reply.tokens, reply.finish) == ("", [], "stop")
