"""`instructflow serve RUN_OR_FOLDER`: a tuned model behind an OpenAI-compatible HTTP API, on localhost.

    instructflow serve default --port 8000          # results/runs/default/model
    # openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused").chat.completions.create(...)

``POST /v1/chat/completions`` (``stream`` true or false: Server-Sent Events ``data: {...}`` chunks ending
with ``data: [DONE]``, as OpenAI's API sends them) and ``GET /v1/models``. The messages are rendered
with the run's template by the render and tokenize code training used (generate.TunedModel): where the
template renders whole conversations (the chat template, or a file template with prompt_next_turn, as the
bundled alpaca) the whole conversation, ending with the user's message, exactly as training rendered one
(a system turn where the template has a place for it); with a file template without prompt_next_turn only
the last user message, as the instruction, since that is all such a model was trained on. The answer stops
at the end-of-turn token training put after every answer (the chat template's own, else EOS). ``max_tokens`` (or ``max_completion_tokens``; default --max-new-tokens), ``temperature``
(0: greedy; default 1, as OpenAI's) and ``top_p`` are honoured; ``model`` is not checked, one model is
served; other fields are ignored. Requests are answered one at a time. The standard library's
ThreadingHTTPServer, no authentication: for a local machine, not the internet.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .generate import MAX_NEW_TOKENS, TunedModel, model_name, resolve_model

ROLES = ("system", "user", "assistant")


class BadRequest(ValueError):
    pass


def _text(content) -> str:
    """A message's content: a string, or OpenAI's list of parts of which the text ones count."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        return "".join(p.get("text", "") for p in content if p.get("type") == "text")
    raise BadRequest("a message's content must be a string or a list of text parts")


def _number(body: dict, key: str, default, low: float, high: float | None = None, kind=float):
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise BadRequest(f"{key} must be a number" if kind is float else f"{key} must be an integer")
    if value < low or (high is not None and value > high):
        raise BadRequest(f"{key} must be between {low} and {high}" if high is not None else f"{key} must be >= {low}")
    return kind(value)


def parse_request(body, max_new_tokens: int) -> dict:
    """The fields used from a chat completion request; BadRequest saying what is wrong."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list of {role, content} objects")
    turns = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise BadRequest(f"each message needs a role, one of {', '.join(ROLES)}")
        turns.append({"role": m["role"], "content": _text(m.get("content", ""))})
    if _number(body, "n", 1, 1, 1, int) != 1:
        raise BadRequest("n must be 1")
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    return {"messages": turns, "stream": bool(body.get("stream", False)),
            "usage_chunk": bool((body.get("stream_options") or {}).get("include_usage")),
            "max_new_tokens": _number({"max_tokens": limit}, "max_tokens", max_new_tokens, 1, kind=int),
            "temperature": _number(body, "temperature", 1.0, 0, 2), "top_p": _number(body, "top_p", 1.0, 0, 1)}


def make_handler(model: TunedModel, name: str, max_new_tokens: int):
    class Handler(BaseHTTPRequestHandler):
        server_version = "instructflow"

        def send_json(self, status: int, obj: dict) -> None:
            data = json.dumps(obj, ensure_ascii=False).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def send_error_json(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
            self.send_json(status, {"error": {"message": message, "type": kind, "param": None, "code": None}})

        def do_GET(self):
            if self.path.rstrip("/") != "/v1/models":
                return self.send_error_json(404, f"no such endpoint: GET {self.path}", "not_found_error")
            self.send_json(200, {"object": "list", "data": [
                {"id": name, "object": "model", "created": int(time.time()), "owned_by": "instructflow"}]})

        def do_POST(self):
            if self.path.rstrip("/") != "/v1/chat/completions":
                return self.send_error_json(404, f"no such endpoint: POST {self.path}", "not_found_error")
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"null")
            except ValueError as err:
                return self.send_error_json(400, f"the request body is not JSON: {err}")
            try:
                request = parse_request(body, max_new_tokens)
                ids = model.prompt_ids(request["messages"])
                answer = model.answer(ids, max_new_tokens=request["max_new_tokens"],
                                      temperature=request["temperature"], top_p=request["top_p"])
            except ValueError as err:  # BadRequest, a prompt longer than the model takes
                return self.send_error_json(400, str(err))
            meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": name}
            if request["stream"]:
                return self.stream(answer, ids, meta, request["usage_chunk"])
            try:
                text = answer.text()
            except Exception as err:  # noqa: BLE001 - the client gets the error, the server goes on
                return self.send_error_json(500, f"generation failed: {type(err).__name__}: {err}", "server_error")
            self.send_json(200, {**meta, "object": "chat.completion", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                 "finish_reason": finish_reason(answer)}], "usage": usage(ids, answer)})

        def stream(self, answer, ids, meta, usage_chunk: bool) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()

            def send(choices, **extra):
                chunk = {**meta, "object": "chat.completion.chunk", "choices": choices, **extra}
                self.wfile.write(f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode("utf-8"))
                self.wfile.flush()

            def delta(content: dict, finish=None):
                return [{"index": 0, "delta": content, "logprobs": None, "finish_reason": finish}]

            try:
                send(delta({"role": "assistant", "content": ""}))
                for piece in answer:
                    send(delta({"content": piece}))
                send(delta({}, finish_reason(answer)))
                if usage_chunk:
                    send([], usage=usage(ids, answer))
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):  # the client went away: stop its generation
                answer.pieces.close()
                self.log_message("the client went away; its answer stopped after %d tokens", len(answer.tokens))

    return Handler


def finish_reason(answer) -> str:
    return "stop" if answer.finish == "stop" else "length"


def usage(ids: list[int], answer) -> dict:
    return {"prompt_tokens": len(ids), "completion_tokens": len(answer.tokens),
            "total_tokens": len(ids) + len(answer.tokens)}


def serve(run_or_folder: str, *, host: str = "127.0.0.1", port: int = 8000, template: str | None = None,
          max_new_tokens: int = MAX_NEW_TOKENS) -> None:
    folder = resolve_model(run_or_folder)
    model = TunedModel(folder, template)
    name = model_name(folder)
    server = ThreadingHTTPServer((host, port), make_handler(model, name, max_new_tokens))
    server.daemon_threads = True
    host, port = server.server_address[:2]
    print(f"instructflow serve: {name} ({folder}, template {model.template.description or model.template.name!r}) "
          f"on http://{host}:{port}/v1 (POST /v1/chat/completions, GET /v1/models); Ctrl-C stops",
          file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
