"""`instructflow chat`: driven in a pseudo-terminal (pexpect) on a tiny model folder as a run exports it:
answers streamed as the model's own greedy generate gives them, Ctrl-C stops only the answer being
generated, --compare labels both models; the prompts it renders; its one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import sys

import pexpect
import pytest
import torch
import yaml

from conftest import REPO, training_prompt_ids
from instructflow import cli
from instructflow.generate import RUN_TEMPLATE, TunedModel, resolve_model
from instructflow.templates import bundled_path, render_prompt


def exported(tiny_model_dir, tmp_path_factory, template: str):
    """A model folder as a run exports it, trained (here: as if) with ``template``."""
    folder = tmp_path_factory.mktemp(f"run-{template}") / "model"
    shutil.copytree(tiny_model_dir("llama"), folder)
    shutil.copy(bundled_path(template), folder / RUN_TEMPLATE)
    return folder


@pytest.fixture(scope="module")
def alpaca_model(tiny_model_dir, tmp_path_factory):
    return exported(tiny_model_dir, tmp_path_factory, "alpaca")


@pytest.fixture(scope="module")
def chat_model(tiny_model_dir, tmp_path_factory):
    return exported(tiny_model_dir, tmp_path_factory, "chat")


def greedy(folder, prompt: str, max_new_tokens: int, special: bool = True) -> str:
    """The model's own greedy answer to ``prompt``, up to EOS."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=special)["input_ids"]
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def spawn(*args: str) -> pexpect.spawn:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "TERM": "dumb"}
    env.pop("INSTRUCTFLOW_DEBUG", None)
    return pexpect.spawn(sys.executable, ["-m", "instructflow", "chat", *args], env=env, encoding="utf-8",
                         timeout=60, dimensions=(24, 4000))


def test_answers_stream_and_ctrl_c_stops_only_the_answer(alpaca_model):
    # "Hi" does not reach EOS in this model for 1706 tokens: only Ctrl-C ends that answer in time.
    child = spawn(str(alpaca_model), "--max-new-tokens", "100000")
    child.expect("multi-turn")
    child.expect_exact(">>> ")
    child.sendline("Hi")
    child.expect_exact("Hi")  # the echo
    child.expect(r"\S{8}")  # the answer's first words, printed while it is still being generated
    child.sendintr()
    child.expect_exact("[stopped]")
    child.expect_exact(">>> ")
    # The session goes on: after /reset the next message is answered in full (it stops with EOS), as generate
    # answers it (a conversation of one exchange renders as the Alpaca row of that instruction).
    child.sendline("/reset")
    child.expect_exact("(conversation forgotten)")
    child.expect_exact(">>> ")
    child.sendline("Name a colour.")  # its answer stops with EOS after 53 tokens
    child.expect_exact(">>> ")
    shown = child.before.replace("\r\n", "\n")
    assert greedy(alpaca_model, render_prompt(bundled_path("alpaca"), "Name a colour."), 400) in shown
    assert "[stopped]" not in shown
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_compare_answers_with_the_base_model_then_the_tuned_one(alpaca_model, tiny_model_dir):
    child = spawn(str(alpaca_model), "--compare", "--base", str(tiny_model_dir("gpt2")), "--max-new-tokens", "6")
    child.expect_exact(">>> ")
    child.sendline("Say hello")
    child.expect_exact("[base] ")
    child.expect_exact("[tuned] ")
    child.expect_exact(">>> ")
    child.sendeof()  # Ctrl-D ends the session
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def two_turns(child, one: str, two: str) -> tuple[str, str]:
    """Send two messages to a multi-turn chat session and exit; return the first answer and the screen of the
    second turn."""
    child.expect("multi-turn")
    child.expect_exact(">>> ")
    child.sendline(one)
    child.expect_exact(">>> ")
    first = child.before.replace("\r\n", "\n").split("\n")[1]  # after the echo
    child.sendline(two)
    child.expect_exact(">>> ")
    shown = child.before.replace("\r\n", "\n")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    return first, shown


def test_a_chat_template_keeps_the_conversation(chat_model):
    from transformers import AutoTokenizer

    child = spawn(str(chat_model), "--max-new-tokens", "12")
    first, shown = two_turns(child, "Hi", "Say hello")
    # The second answer is the model's answer to the whole conversation so far, rendered and tokenized as
    # training did (this chat template writes no end-of-turn token: EOS follows the earlier answer).
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": first},
                    {"role": "user", "content": "Say hello"}]
    second = greedy_ids(chat_model, training_prompt_ids(chat_model, "chat", conversation), 12)
    assert second and f"Say hello\n{second}\n" in shown
    alone = AutoTokenizer.from_pretrained(chat_model).apply_chat_template(conversation[2:], tokenize=False,
                                                                           add_generation_prompt=True)
    assert greedy(chat_model, alone, 12, special=False) != second  # so the check above can tell


def greedy_ids(folder, ids: list[int], max_new_tokens: int) -> str:
    """The model's own greedy answer to the token ids ``ids``, up to EOS."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = torch.tensor([ids])
    with torch.inference_mode():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def test_a_file_template_with_next_turn_prompts_keeps_the_conversation_and_its_system_prompt(alpaca_model):
    child = spawn(str(alpaca_model), "--max-new-tokens", "12", "--system", "Be brief.")
    first, shown = two_turns(child, "Hi", "Say hello")
    # The second answer is the model's answer to the conversation so far, rendered and tokenized as training did.
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": first}, {"role": "user", "content": "Say hello"}]
    second = greedy_ids(alpaca_model, training_prompt_ids(alpaca_model, "alpaca", conversation), 12)
    assert second and f"Say hello\n{second}\n" in shown
    alone = greedy(alpaca_model, render_prompt(bundled_path("alpaca"), "Say hello"), 12)
    assert alone != second  # so the check above can tell


CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is 2 + 2?"}]


@pytest.mark.parametrize("template", ["alpaca", "alpaca_pl", "chat"])
def test_prompts_are_the_conversation_as_training_rendered_it(tiny_model_dir, tmp_path_factory, template):
    folder = exported(tiny_model_dir, tmp_path_factory, template)
    assert TunedModel(folder).prompt_ids(CONVERSATION) == training_prompt_ids(folder, template, CONVERSATION)


def test_a_conversation_prompt_in_alpaca_reads_as_its_training_text(alpaca_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(alpaca_model)
    ids = TunedModel(alpaca_model).prompt_ids(CONVERSATION)
    # The system prompt in the preamble's place, EOS after the earlier answer, the next exchange's prompt.
    assert tokenizer.decode(ids) == ("Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello!<|endoftext|>"
                                     "\n\n### Instruction:\nWhat is 2 + 2?\n\n### Response:\n")
    # One exchange without a system prompt: the Alpaca row's prompt, as before.
    one = TunedModel(alpaca_model).prompt_ids(CONVERSATION[3:])
    assert one == tokenizer(render_prompt(bundled_path("alpaca"), "What is 2 + 2?"))["input_ids"]
    with pytest.raises(ValueError, match="must end with the user's message"):
        TunedModel(alpaca_model).prompt_ids(CONVERSATION[:3])


def test_a_template_without_next_turn_prompts_sends_the_last_user_message(alpaca_model, tmp_path):
    from transformers import AutoTokenizer

    single = tmp_path / "single.yaml"  # alpaca as it was before conversations: one exchange
    data = yaml.safe_load(bundled_path("alpaca").read_text())
    single.write_text(yaml.safe_dump({k: v for k, v in data.items() if k not in ("prompt_system", "prompt_next_turn")}))
    text = render_prompt(single, "What is 2 + 2?")
    ids = TunedModel(alpaca_model, str(single)).prompt_ids(CONVERSATION)
    assert ids == AutoTokenizer.from_pretrained(alpaca_model)(text)["input_ids"]


def test_a_run_name_is_its_model_folder(alpaca_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(alpaca_model, tmp_path / "results" / "runs" / "mine" / "model")
    assert resolve_model("mine") == tmp_path.joinpath("results/runs/mine/model").relative_to(tmp_path)


def one_line_error(capsys, *argv) -> str:
    assert cli.main(["chat", *argv]) == 1
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]
    assert line.startswith("instructflow chat: ") and "Traceback" not in err
    return line


def test_clear_errors(alpaca_model, tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    line = one_line_error(capsys, str(tmp_path))
    assert f"{tmp_path} is not a model folder (no config.json)" in line and "results/runs/<run>/model" in line
    line = one_line_error(capsys, "untrained")
    assert "run 'untrained' has not trained: there is no results/runs/untrained/model" in line
    assert "snakemake" in line and "or give a model folder" in line
    # A chat template asked of a tokenizer that has none.
    plain = tmp_path / "plain"
    shutil.copytree(alpaca_model, plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    line = one_line_error(capsys, str(plain), "--template", "chat")
    assert f"the tokenizer in {plain} has none" in line and "--template alpaca" in line
    # --compare without --base, and no prepared model to take
    line = one_line_error(capsys, str(alpaca_model), "--compare")
    assert "--compare needs the base model" in line and "--base FOLDER" in line
