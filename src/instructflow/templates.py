"""Prompt templates: YAML files with a prompt for rows with an input, one for rows without, and
the response format; or ``chat: true`` to use the model's own chat template.

Chat rows (a conversation) are rendered as segments, masked context and assistant turns in turn
(:func:`render_conversation`), so every assistant turn can be trained. A file template renders a
conversation as a sequence of prompt/response pairs when it has ``prompt_next_turn`` (the prompt of each
exchange after the first); ``prompt_system`` is the first prompt of a conversation with a system prompt.

The template is a file, so Snakemake declares it as an input and editing it reruns render onwards.
The bundled ones (alpaca, alpaca_pl, chat) ship inside the package, in ``prompt_templates/``, and are
found with importlib.resources, so they load from an installed wheel as from a clone.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

_PLACEHOLDER = re.compile(r"\{(instruction|input|output|system)\}")


# The templates shipped with the package. Its files are real files in every install Snakemake can run
# from (a clone, an editable or a wheel install), so a bundled template has a path a rule can declare.
BUNDLED_DIR = resources.files(__package__) / "prompt_templates"


class TemplateError(ValueError):
    pass


def is_bundled_name(template: str) -> bool:
    """Whether ``template`` names a bundled template ("alpaca") rather than a file ("my.yaml", "t/x")."""
    return "/" not in template and not template.endswith((".yaml", ".yml"))


def bundled_names() -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in BUNDLED_DIR.iterdir() if p.name.endswith(".yaml"))


def bundled_path(name: str) -> Path:
    """The file of the bundled template ``name``; TemplateError naming the bundled ones if there is none."""
    path = BUNDLED_DIR / f"{name}.yaml"
    if not path.is_file():
        raise TemplateError(f"unknown template {name!r} (bundled: {', '.join(bundled_names())}; "
                            "or give a path to a YAML file)")
    return Path(str(path))


@dataclass(frozen=True)
class Template:
    name: str
    response: str
    prompt_input: str = ""
    prompt_no_input: str = ""
    chat: bool = False
    user_message_input: str = "{instruction}\n\n{input}"
    user_message_no_input: str = "{instruction}"
    description: str = ""
    # A conversation's first prompt when it starts with a system turn: {system} and {instruction}.
    prompt_system: str = ""
    # The prompt of every exchange after a conversation's first: {instruction} is that user turn.
    prompt_next_turn: str = ""

    @property
    def multi_turn(self) -> bool:
        """Whether a conversation renders whole (every assistant turn trainable), not as its last exchange."""
        return self.chat or bool(self.prompt_next_turn)


def fill(text: str, values: dict[str, str]) -> str:
    """Replace {instruction}/{input}/{output} (and {system} where ``values`` has it) in one pass. Unlike
    str.format, other braces in the template and any braces or Jinja syntax inside the data stay exactly
    as written; {system} outside the keys that take it stays as written too."""
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), "" if m.group(1) != "system" else m.group(0)), text)


def load_template(path: str | Path) -> Template:
    """A template file, or a bundled template by name (``load_template("alpaca")``)."""
    path = bundled_path(path) if isinstance(path, str) and is_bundled_name(path) else Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise TemplateError(f"template {path}: cannot read it: {err}") from err
    if not isinstance(data, dict):
        raise TemplateError(f"template {path}: expected a mapping of keys to strings")
    known = set(Template.__dataclass_fields__) - {"name"}
    unknown = set(data) - known
    if unknown:
        raise TemplateError(f"template {path}: unknown keys {sorted(unknown)}; valid keys are {sorted(known)}")
    data.setdefault("response", "{output}")
    template = Template(name=path.stem, **data)
    if not template.chat and not (template.prompt_input and template.prompt_no_input):
        raise TemplateError(f"template {path}: needs both prompt_input and prompt_no_input (or chat: true)")
    if "{output}" not in template.response:
        raise TemplateError(f"template {path}: response must contain {{output}}")
    for key in ("prompt_system", "prompt_next_turn"):
        text = getattr(template, key)
        if text and "{instruction}" not in text:
            raise TemplateError(f"template {path}: {key} must contain {{instruction}} (the user's turn)")
    if template.prompt_system and "{system}" not in template.prompt_system:
        raise TemplateError(f"template {path}: prompt_system must contain {{system}} (the system prompt)")
    if template.prompt_system and not template.prompt_next_turn:
        raise TemplateError(f"template {path}: prompt_system renders whole conversations, which needs "
                            "prompt_next_turn too")
    return template


def render_row(template: Template, instruction: str, input: str, output: str, *,
               messages: str = "", tokenizer=None) -> tuple[str, str]:
    """(prompt, response) for one row. The response carries no EOS: tokenize appends the token."""
    values = {"instruction": instruction, "input": input, "output": output}
    response = fill(template.response, values)
    if not template.chat:
        prompt = fill(template.prompt_input if input else template.prompt_no_input, values)
        return prompt, response
    _require_chat_template(tokenizer)
    if messages:
        turns = json.loads(messages)[:-1]  # the last turn is the assistant response being trained
    else:
        user = fill(template.user_message_input if input else template.user_message_no_input, values)
        turns = [{"role": "user", "content": user}]
    prompt = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    return prompt, response


# A conversation rendered for training: context the model reads (``response`` False, labels masked) and
# assistant turns (``response`` True), in order; the text is their concatenation. Tokenize puts the
# end-of-turn token after every assistant turn (the chat template's own, else the tokenizer's EOS).
Segment = dict


@dataclass(frozen=True)
class ChatMarkers:
    """What a model's chat template writes around an assistant turn's content."""

    assistant_header: str  # before the content: the generation prompt ("<|im_start|>assistant\n")
    end_of_turn: str  # the special token right after the content ("<|im_end|>"); "" if none: EOS is put there


_PROBE = ("\u2063probe user\u2063", "\u2063probe assistant\u2063")


def _special_tokens(tokenizer) -> list[str]:
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    names = set(tokenizer.all_special_tokens) | {t.content for t in added.values() if getattr(t, "special", False)}
    return sorted((n for n in names if n), key=len, reverse=True)  # longest first: "<|im_end|>" before "<|im"


def chat_markers(tokenizer) -> ChatMarkers:
    """Find the assistant header and end-of-turn token by rendering a probe conversation (user, assistant,
    user): the header is what add_generation_prompt adds, the end-of-turn token the special token the
    template writes right after the assistant's content (SmolLM2: "<|im_end|>"), if it writes one."""
    _require_chat_template(tokenizer)
    user, assistant = _PROBE
    render = tokenizer.apply_chat_template
    text = render([{"role": "user", "content": user}, {"role": "assistant", "content": assistant},
                   {"role": "user", "content": user}], tokenize=False)
    bare = render([{"role": "user", "content": user}], tokenize=False)
    prompted = render([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
    header = prompted[len(bare):] if prompted.startswith(bare) else ""
    if header + assistant not in text:  # the history writes the turn differently from the generation prompt
        header = ""
    if assistant not in text:
        raise TemplateError("the model's chat template does not write an assistant message's content as given; "
                            "use a file template (template: alpaca) for this model")
    after = text[text.index(assistant) + len(assistant):]
    end = next((token for token in _special_tokens(tokenizer) if after.startswith(token)), "")
    return ChatMarkers(header, end)


def _merged(segments: list[Segment]) -> list[Segment]:
    """Adjacent context segments joined (an empty assistant turn leaves context next to context)."""
    out: list[Segment] = []
    for segment in segments:
        if out and not segment["response"] and not out[-1]["response"]:
            out[-1] = {"text": out[-1]["text"] + segment["text"], "response": False}
        elif segment["text"] or segment["response"]:
            out.append(segment)
    return out


def _file_segments(template: Template, turns: list[dict]) -> tuple[list[Segment], int]:
    """A conversation as prompt/response pairs of a file template; also the turns it cannot render (a system
    turn without prompt_system, or one after the first turn). The user turns before an assistant turn are
    its {instruction}; roles other than system and assistant count as user turns."""
    segments: list[Segment] = []
    system, users, dropped = None, [], 0
    for i, turn in enumerate(turns):
        role, content = turn["role"], turn["content"]
        if role == "system":
            if i == 0 and template.prompt_system:
                system = content
            else:
                dropped += 1
            continue
        if role != "assistant":
            users.append(content)
            continue
        values = {"instruction": "\n\n".join(users), "input": "", "output": content}
        if segments:
            prompt = fill(template.prompt_next_turn, values)
        elif system is not None:
            prompt = fill(template.prompt_system, {**values, "system": system})
        else:
            prompt = fill(template.prompt_no_input, values)
        # An empty assistant turn stays in the conversation as context: training it would teach silence.
        segments += [{"text": prompt, "response": False}, {"text": fill(template.response, values), "response": bool(content)}]
        users = []
    return _merged(segments), dropped


def _chat_segments(turns: list[dict], tokenizer, markers: ChatMarkers) -> list[Segment]:
    """The conversation rendered once by the chat template, cut at each assistant turn's content (found
    after the assistant header, where the generation prompt ends); the end-of-turn token after it is left
    out of the text (tokenize puts its id there) and so is whatever the template writes after the last
    assistant turn (a newline): the row ends with the last turn's end-of-turn token, as a generation does."""
    text = tokenizer.apply_chat_template(turns, tokenize=False)
    segments: list[Segment] = []
    cursor = 0
    for number, turn in enumerate(turns, start=1):
        content = turn["content"]
        if turn["role"] != "assistant" or not content:
            continue
        at = text.find(markers.assistant_header + content, cursor)
        if at < 0:
            raise TemplateError(f"the model's chat template does not write assistant turn {number} as given (after "
                                f"{markers.assistant_header!r}): it changes the content, so its tokens cannot be "
                                "trained; use a file template (template: alpaca) for this data")
        start = at + len(markers.assistant_header)
        end = start + len(content)
        if not text.startswith(markers.end_of_turn, end):
            raise TemplateError(f"the model's chat template does not end assistant turn {number} with "
                                f"{markers.end_of_turn!r} as it ends other turns; use a file template for this data")
        segments += [{"text": text[cursor:start], "response": False}, {"text": content, "response": True}]
        cursor = end + len(markers.end_of_turn)
    return _merged(segments)


def render_conversation(template: Template, turns: list[dict], tokenizer=None,
                        markers: ChatMarkers | None = None) -> tuple[list[Segment], int]:
    """A cleaned conversation (role/content turns ending with an assistant turn) as segments, and the number
    of turns the template left out. ``markers``: chat_markers(tokenizer), computed once by the caller."""
    if template.chat:
        return _chat_segments(turns, tokenizer, markers or chat_markers(tokenizer)), 0
    if not template.prompt_next_turn:
        raise TemplateError(f"template {template.name!r} renders one exchange; give it prompt_next_turn to render "
                            "whole conversations")
    return _file_segments(template, turns)


# Where a conversation awaits the assistant's answer, this stands in for it: the model's prompt is the rendered
# conversation before it, as evaluation's prompt is the text before a row's last assistant turn.
_AWAITED_ANSWER = _PROBE[1]


def render_to_answer(template: Template, messages: list[dict], tokenizer=None,
                     markers: ChatMarkers | None = None) -> tuple[list[Segment], int]:
    """A conversation that awaits the assistant's answer (it ends with a user turn), rendered as training renders
    one (render_conversation) with a stand-in for that answer as its last assistant turn; the prompt is every
    segment before it (tokenization.prompt_ids builds its ids as tokenize does). Also the turns the template
    leaves out, as in training. For templates that render whole conversations (``template.multi_turn``)."""
    if not messages or messages[-1]["role"] in ("system", "assistant"):
        raise TemplateError("the conversation must end with the user's message, the one to answer")
    return render_conversation(template, [*messages, {"role": "assistant", "content": _AWAITED_ANSWER}],
                               tokenizer, markers)


def _require_chat_template(tokenizer) -> None:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise TemplateError("template 'chat' needs a tokenizer with a chat template; this model has none, "
                            "use template: alpaca")


def render_prompt(template_path: str | Path, instruction: str, input: str = "", tokenizer=None) -> str:
    """The prompt a fine-tuned model expects, for use at inference time."""
    prompt, _ = render_row(load_template(template_path), instruction, input, "", tokenizer=tokenizer)
    return prompt
