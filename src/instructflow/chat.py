"""`instructflow chat RUN_OR_FOLDER`: talk to a tuned model in the terminal, prompted as in training.

    instructflow chat default                       # results/runs/default/model
    instructflow chat path/to/model --compare --base results/models/smollm2
    instructflow chat default --system "Answer in one sentence."

The conversation is rendered with the run's template by the render and tokenize code training used
(generate.TunedModel) and each message answered greedily, the text printed as it is generated, up to the
end-of-turn token training put after every answer. With a template that renders whole conversations (the
chat template, or a file template with prompt_next_turn, as the bundled alpaca) the conversation is
multi-turn, ``--system`` its system prompt; with a file template without prompt_next_turn every message
is a fresh single instruction, as the model was trained. Ctrl-C stops the answer being generated and
returns to the prompt; Ctrl-D or /exit ends the session, /reset forgets the conversation. ``--compare`` answers each message with the base
model too, base first, each answer labelled.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

from .generate import MAX_NEW_TOKENS, RUN_TEMPLATE, TunedModel, check_model_folder, model_name, resolve_model

PROMPT = ">>> "


def base_folder(base: str | None) -> Path:
    """The base model for --compare: --base, else the workflow's only prepared model (results/models/*)."""
    if base:
        check_model_folder(base)
        return Path(base)
    prepared = sorted(p for p in Path("results/models").glob("*") if (p / "config.json").is_file())
    if len(prepared) == 1:
        return prepared[0]
    found = f"results/models holds {', '.join(p.name for p in prepared)}" if prepared else \
        f"there is no prepared model in {Path('results/models').resolve()}"
    raise ValueError(f"--compare needs the base model the run started from ({found}); give --base FOLDER "
                     "(results/models/<model>)")


class Interrupts:
    """While a generation runs, Ctrl-C (SIGINT) sets ``event`` (read by the generation's stopping
    criterion) instead of raising KeyboardInterrupt; the old handler comes back after."""

    def __init__(self):
        self.event = threading.Event()

    def __enter__(self):
        self.event.clear()
        self._old = signal.signal(signal.SIGINT, lambda signum, frame: self.event.set())
        return self.event

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._old)


def reply(model: TunedModel, history: list[dict], max_new_tokens: int, interrupts: Interrupts,
          label: str = "") -> str:
    """Stream one answer to stdout and return its text."""
    out = sys.stdout
    out.write(f"[{label}] " if label else "")
    out.flush()
    text = []
    with interrupts as interrupted:
        answer = model.answer(model.prompt_ids(history), max_new_tokens=max_new_tokens, interrupt=interrupted)
        for piece in answer:
            text.append(piece)
            out.write(piece)
            out.flush()
    out.write("\n[stopped]\n" if answer.finish == "interrupted" else "\n")
    out.flush()
    return "".join(text)


def chat(run_or_folder: str, *, template: str | None = None, max_new_tokens: int = MAX_NEW_TOKENS,
         compare: bool = False, base: str | None = None, system: str | None = None) -> None:
    folder = resolve_model(run_or_folder)
    base_dir = base_folder(base) if compare else None
    tuned = TunedModel(folder, template)
    models = {"tuned": tuned}
    if compare:  # the base model prompted with the tuned model's template, as the evaluate stage prompts it
        models = {"base": TunedModel(base_dir, template or str(folder / RUN_TEMPLATE)), "tuned": tuned}
    try:
        import readline  # noqa: F401 - line editing and history in input()
    except ImportError:
        pass
    template = tuned.template
    multi_turn = template.multi_turn
    print(f"instructflow chat: {model_name(folder)} ({folder}), template {template.description or template.name!r}: "
          + ("multi-turn, rendered as training rendered conversations (/reset forgets the conversation)" if multi_turn
             else "no prompt_next_turn, so each message is a fresh single instruction (earlier turns are not sent)"))
    # A system prompt the template has no place for is left out, as render leaves it out of training rows.
    start = [{"role": "system", "content": system}] if system and (template.chat or template.prompt_system) else []
    if system and not start:
        print(f"(template {template.name!r} has no prompt_system: the system prompt is left out, as in training)")
    print("Ctrl-C stops an answer; Ctrl-D or /exit ends.")
    histories = {name: list(start) for name in models}
    interrupts = Interrupts()
    while True:
        try:
            message = input(PROMPT)
        except KeyboardInterrupt:
            print()
            continue
        except EOFError:
            print()
            return
        if message.strip() == "/exit":
            return
        if message.strip() == "/reset":
            histories = {name: list(start) for name in models}
            print("(conversation forgotten)")
            continue
        if not message.strip():
            continue
        for name, model in models.items():
            turns = histories[name] if multi_turn else []
            turns.append({"role": "user", "content": message})
            try:
                text = reply(model, turns, max_new_tokens, interrupts, label=name if compare else "")
            except ValueError as err:  # a conversation longer than the model takes
                turns.pop()
                print(f"instructflow chat: {err}", file=sys.stderr, flush=True)
                continue
            turns.append({"role": "assistant", "content": text})
