"""`instructflow serve`: a tiny model folder served on 127.0.0.1 in a subprocess, queried with the `openai`
client: completions as the model's own greedy generate gives them (the conversation rendered with the
chat template), streamed as Server-Sent Events, finish reasons and token counts; the models list; a bad
request's 400; the one-line errors before it serves."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request

import openai
import pytest
import torch

from conftest import REPO
from instructflow import cli
from instructflow.generate import RUN_TEMPLATE
from instructflow.templates import bundled_path

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is 2 + 2?"}]


@pytest.fixture(scope="module")
def chat_model(tiny_model_dir, tmp_path_factory):
    """A model folder as a run trained with the chat template exports it."""
    folder = tmp_path_factory.mktemp("run") / "model"
    shutil.copytree(tiny_model_dir("llama"), folder)
    shutil.copy(bundled_path("chat"), folder / RUN_TEMPLATE)
    return folder


@pytest.fixture(scope="module")
def server(chat_model, tmp_path_factory):
    """(base URL, the served model's name, its log): `instructflow serve` on a free port (--port 0)."""
    log_path = tmp_path_factory.mktemp("serve") / "stderr.log"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "instructflow", "serve", str(chat_model), "--port", "0"],
                                env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while not (found := re.search(r"on (http://127\.0\.0\.1:\d+/v1)", log_path.read_text())):
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        yield found.group(1), chat_model.parent.name, log_path
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0], api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(chat_model):
    """The prompt's token count and the model's own greedy answer (text, token count, stopped with EOS)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(chat_model).eval()
    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]

    def answer(max_new_tokens: int):
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
        stopped = tokenizer.eos_token_id in out
        out = out[: out.index(tokenizer.eos_token_id)] if stopped else out
        return tokenizer.decode(out, skip_special_tokens=True), len(out), stopped

    return ids.shape[1], answer


def test_models_list(client, server):
    assert [m.id for m in client.models.list().data] == [server[1]]


@pytest.mark.parametrize("max_tokens", [5, 400], ids=["length", "stop"])
def test_completion_is_the_models_greedy_answer_to_the_whole_conversation(client, reference, max_tokens):
    prompt_tokens, answer = reference
    text, n, stopped = answer(max_tokens)
    assert stopped == (max_tokens == 400)  # this conversation's answer ends with EOS within 400 tokens
    reply = client.chat.completions.create(model="any", messages=CONVERSATION, max_tokens=max_tokens, temperature=0)
    [choice] = reply.choices
    assert choice.message.role == "assistant" and choice.message.content == text
    assert choice.finish_reason == ("stop" if stopped else "length")
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt_tokens, n)
    assert reply.usage.total_tokens == prompt_tokens + n


def test_streaming_sends_the_same_answer_in_chunks(client, reference, server):
    prompt_tokens, answer = reference
    text, n, _ = answer(400)
    chunks = list(client.chat.completions.create(model="any", messages=CONVERSATION, max_tokens=400, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1 and "".join(pieces) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == n and chunks[-1].usage.prompt_tokens == prompt_tokens
    # On the wire: `data: {json}` events, the last one `data: [DONE]`.
    request = urllib.request.Request(f"{server[0]}/chat/completions", method="POST", data=json.dumps(
        {"messages": CONVERSATION, "max_tokens": 3, "stream": True}).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.headers["Content-Type"] == "text/event-stream"
        events = [line for line in response.read().decode().split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[-2][len("data: "):])["choices"][0]["finish_reason"] == "length"


def test_a_client_that_goes_away_stops_its_answer(client, server):
    # This conversation's answer runs 2658 tokens to EOS; the client reads five chunks and closes.
    hello = CONVERSATION[:-1] + [{"role": "user", "content": "Hello"}]
    stream = client.chat.completions.create(model="any", messages=hello, max_tokens=3000, temperature=0, stream=True)
    for _, _ in zip(range(5), stream):
        pass
    stream.close()
    assert client.chat.completions.create(model="any", messages=hello, max_tokens=2).usage.completion_tokens == 2
    [stopped] = re.findall(r"the client went away; its answer stopped after (\d+) tokens", server[2].read_text())
    assert int(stopped) < 1000


def test_sampling_honours_max_tokens(client):
    reply = client.chat.completions.create(model="any", messages=CONVERSATION, max_tokens=4, temperature=1.5)
    assert reply.usage.completion_tokens <= 4 and reply.choices[0].finish_reason in ("stop", "length")


def test_bad_requests_get_a_400_with_an_error_object(client, server):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="any", messages=[])
    assert caught.value.status_code == 400
    assert "messages must be a non-empty list" in caught.value.body["message"]
    request = urllib.request.Request(f"{server[0]}/chat/completions", method="POST", data=b"{not json")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=60)
    assert caught.value.code == 400
    assert json.loads(caught.value.read())["error"]["message"].startswith("the request body is not JSON")


def test_clear_errors_before_serving(chat_model, tmp_path, monkeypatch, capsys):
    def last_line(target: str) -> str:
        assert cli.main(["serve", target, "--port", "0"]) == 1
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("instructflow serve: ")
        return err.strip().splitlines()[-1]

    monkeypatch.chdir(tmp_path)
    assert f"{tmp_path} is not a model folder (no config.json)" in last_line(str(tmp_path))
    assert "run 'untrained' has not trained: there is no results/runs/untrained/model" in last_line("untrained")
    # The run's template is the chat template, but this copy's tokenizer has none.
    plain = tmp_path / "plain"
    shutil.copytree(chat_model, plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    line = last_line(str(plain))
    assert "uses the model's chat template" in line and f"the tokenizer in {plain} has none" in line
