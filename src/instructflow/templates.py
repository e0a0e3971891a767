"""Prompt templates: YAML files with a prompt for rows with an input, one for rows without, and
the response format; or ``chat: true`` to use the model's own chat template.

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

_PLACEHOLDER = re.compile(r"\{(instruction|input|output)\}")


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


def fill(text: str, values: dict[str, str]) -> str:
    """Replace {instruction}/{input}/{output} in one pass. Unlike str.format, other braces in the
    template and any braces or Jinja syntax inside the data stay exactly as written."""
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), ""), text)


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
    return template


def render_row(template: Template, instruction: str, input: str, output: str, *,
               messages: str = "", tokenizer=None) -> tuple[str, str]:
    """(prompt, response) for one row. The response carries no EOS: tokenize appends the token."""
    values = {"instruction": instruction, "input": input, "output": output}
    response = fill(template.response, values)
    if not template.chat:
        prompt = fill(template.prompt_input if input else template.prompt_no_input, values)
        return prompt, response
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise TemplateError("template 'chat' needs a tokenizer with a chat template; this model has none, "
                            "use template: alpaca")
    if messages:
        turns = json.loads(messages)[:-1]  # the last turn is the assistant response being trained
    else:
        user = fill(template.user_message_input if input else template.user_message_no_input, values)
        turns = [{"role": "user", "content": user}]
    prompt = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    return prompt, response


def render_prompt(template_path: str | Path, instruction: str, input: str = "", tokenizer=None) -> str:
    """The prompt a fine-tuned model expects, for use at inference time."""
    prompt, _ = render_row(load_template(template_path), instruction, input, "", tokenizer=tokenizer)
    return prompt
