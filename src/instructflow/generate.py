"""`instructflow generate`: a model's answers to a file of instructions, prompted as in training.

    instructflow generate --model results/runs/default/model --input questions.jsonl --out answers.jsonl

The input is any file the clean stage reads (CSV/TSV, JSON, JSONL, Parquet) with an instruction column
and optionally an input column, found by the names clean finds them by. Each prompt is rendered with
the template the model was trained with (an exported run folder holds it as instructflow_template.yaml)
or the one --template names, tokenized as the tokenize stage does, and answered greedily in
length-sorted, left-padded batches with the KV cache (the evaluate stage's `generate`), each answer up to
EOS or, with the chat template, its end-of-turn token (as evaluate stops). The output holds
one JSON object per input row, in input order: row (the record's number, from 1, as the clean stage numbers
rows), instruction, input, output (the answer), stopped_with_eos and generated_tokens.

It also holds what `instructflow chat` and `instructflow serve` share: finding a run's model folder
(`resolve_model`) and `TunedModel`, a model with its tokenizer and template that renders a conversation
as training rendered conversations (templates.render_to_answer, tokenization.prompt_ids) and streams one
answer.
"""

from __future__ import annotations

import copy
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pandas as pd
import torch

from .clean import AUTO_COLUMNS, CleanError, read_table
from .config import defaults
from .io import atomic_path
from .render import render_prompts
from .templates import Template, TemplateError, chat_markers, load_template, render_row, render_to_answer

DEFAULTS = defaults("evaluate")
MAX_NEW_TOKENS = 256  # longer than evaluation's cap (evaluate.max_new_tokens): these answers are read, not scored
RUN_TEMPLATE = "instructflow_template.yaml"  # written by train.export beside the model


def read_instructions(path: str | Path) -> pd.DataFrame:
    """The file's rows as render takes them (row, instruction, input, output, split), cells as written."""
    table = read_table(path)
    lower = {str(c).strip().lower(): c for c in reversed(list(table.columns))}
    found = {key: next((lower[name] for name in AUTO_COLUMNS[key] if name in lower), None)
             for key in ("instruction", "input")}
    if found["instruction"] is None:
        raise CleanError(f"{path}: cannot find the instruction column; columns found: {list(table.columns)}. "
                         f"Name it one of: {', '.join(AUTO_COLUMNS['instruction'])}")
    return pd.DataFrame({"row": range(1, len(table) + 1), "instruction": table[found["instruction"]].to_numpy(),
                         "input": table[found["input"]].to_numpy() if found["input"] else "",
                         "output": "", "split": "generate"})


def model_template(model_dir: str | Path, template: str | None = None) -> Template:
    if template:
        return load_template(template)
    saved = Path(model_dir) / RUN_TEMPLATE
    if not saved.is_file():
        raise TemplateError(f"{model_dir} holds no {RUN_TEMPLATE} (the model folder of an instructflow run does); "
                            "name the template the model was trained with: --template alpaca, or a template file")
    return load_template(saved)


def generate_file(model_dir: str | Path, input_path: str | Path, out_path: str | Path, *,
                  template: str | None = None, max_new_tokens: int = MAX_NEW_TOKENS,
                  batch_size: int = DEFAULTS["batch_size"]) -> list[dict]:
    from .evaluate import generate, load_model, stopped_with_eos

    check_model_folder(model_dir)
    rows = read_instructions(input_path)
    chosen = model_template(model_dir, template)
    model, tokenizer = load_model(model_dir)
    prompts = render_prompts(rows, chosen, tokenizer=tokenizer)["prompt"].tolist()
    ids = encode(tokenizer, chosen, prompts) if prompts else []
    eos, pad = stop_tokens(model, tokenizer, chosen)
    answers, _ = generate(model, [torch.tensor(i) for i in ids], eos_token_ids=eos, pad_token_id=pad,
                          max_new_tokens=max_new_tokens, batch_size=batch_size, progress=True)
    records = [{"row": int(r.row), "instruction": r.instruction, "input": r.input,
                "output": tokenizer.decode(tokens, skip_special_tokens=True),
                "stopped_with_eos": stopped_with_eos(tokens, max_new_tokens), "generated_tokens": len(tokens)}
               for r, tokens in zip(rows.itertuples(index=False), answers)]
    with atomic_path(out_path) as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return records


def check_model_folder(model_dir: str | Path) -> None:
    if not (Path(model_dir) / "config.json").is_file():
        raise ValueError(f"{model_dir} is not a model folder (no config.json); give a run's model folder "
                         "(results/runs/<run>/model) or a save_pretrained folder")


def encode(tokenizer, template: Template, prompts: list[str]) -> list[list[int]]:
    """As the tokenize stage: a chat template's text already holds the special tokens, a file template's not."""
    return tokenizer(prompts, add_special_tokens=not template.chat)["input_ids"]


def stop_tokens(model, tokenizer, template: Template) -> tuple[list[int], int]:
    """The token ids that end an answer (the tokenizer's EOS, the model's configured ones and, with the chat
    template, its end-of-turn token) and the pad id."""
    from .evaluate import eos_ids
    from .tokenization import end_of_turn_id

    eos = eos_ids(tokenizer.eos_token_id, model)
    # Training put the chat template's end-of-turn token (SmolLM2's "<|im_end|>") after every answer, where it
    # is not EOS: the model ends its answers with it, and evaluate stops there too. The run folder's tokenizer
    # and template give the token render found.
    end = chat_markers(tokenizer).end_of_turn if template.chat else ""
    if end:
        eos = list(dict.fromkeys([*eos, end_of_turn_id(tokenizer, end)]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    return eos, int(pad)


# ------------------------------------------------------------------- chat and serve: one model, one answer
def resolve_model(run_or_folder: str | Path) -> Path:
    """A run name (its model, results/runs/<run>/model under the current folder) or a model folder."""
    name = str(run_or_folder)
    run_model = Path("results") / "runs" / name / "model"
    if "/" not in name and name not in (".", "..") and run_model.is_dir():
        return run_model
    folder = Path(name)
    if folder.is_dir():
        check_model_folder(folder)
        return folder
    if "/" not in name and name not in (".", ".."):
        raise ValueError(f"run {name!r} has not trained: there is no {run_model} under {Path.cwd()}; train it "
                         f"(snakemake --cores 2 {run_model}) or give a model folder")
    raise ValueError(f"{folder} is not a folder; give a run name or a model folder (results/runs/<run>/model)")


def model_name(folder: Path) -> str:
    """How the model is named to users: a run's model folder (<run>/model) by the run, else by its own name."""
    folder = Path(folder).resolve()
    return folder.parent.name if folder.name == "model" else folder.name


@dataclass
class Answer:
    """One streamed answer: iterate it for the text as it is generated; then ``tokens`` holds the new token
    ids (up to the first stop token) and ``finish`` says why it ended: "stop" (a stop token), "length"
    (max_new_tokens) or "interrupted" (``interrupt`` was set)."""

    pieces: Iterator[str]
    tokens: list[int]
    finish: str = ""

    def __iter__(self) -> Iterator[str]:
        return self.pieces

    def text(self) -> str:
        return "".join(self)


class TunedModel:
    """A model folder's model, tokenizer and prompt template (the run's own, or ``template``), loaded for
    answering conversations one at a time."""

    def __init__(self, folder: str | Path, template: str | None = None):
        from .evaluate import load_model
        from .modeling import position_limit, positions_are_hard

        self.folder = Path(folder)
        check_model_folder(self.folder)
        self.template = model_template(self.folder, template)
        if self.template.chat:  # before the model loads
            from transformers import AutoTokenizer

            if not getattr(AutoTokenizer.from_pretrained(str(self.folder)), "chat_template", None):
                raise ValueError(f"template {self.template.name!r} uses the model's chat template, but the tokenizer "
                                 f"in {self.folder} has none; give --template alpaca (or the template file the "
                                 "model was trained with)")
        self.model, self.tokenizer = load_model(self.folder)
        self.markers = chat_markers(self.tokenizer) if self.template.chat else None
        self.eos, self.pad = stop_tokens(self.model, self.tokenizer, self.template)
        # Beyond a learned position table a prompt fails; rotary positions run on (as tokenize's check).
        self.limit = position_limit(self.model.config) if positions_are_hard(self.model.config) else None
        self.lock = threading.Lock()  # one generation at a time

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """A conversation (OpenAI-style role/content dicts, ending with the user's message) as the model saw
        conversations in training: where the template renders whole conversations (the chat template, or a file
        template with prompt_next_turn) every turn, rendered and tokenized by render's and tokenize's own code
        (the end-of-turn token after each earlier answer; system turns the template has no place for left out,
        as render leaves them out); else only the last user message, as the instruction of an Alpaca row."""
        from .tokenization import prompt_ids

        if self.template.multi_turn:
            segments, _ = render_to_answer(self.template, messages, self.tokenizer, self.markers)
            return prompt_ids(segments, self.tokenizer, end_of_turn=self.markers.end_of_turn if self.markers else "",
                              has_special_tokens=self.template.chat)
        users = [m["content"] for m in messages if m["role"] == "user"]
        if not users:
            raise ValueError("there is no user message to answer")
        prompt, _ = render_row(self.template, users[-1], "", "")
        return encode(self.tokenizer, self.template, [prompt])[0]

    def answer(self, ids: list[int], *, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
               interrupt: threading.Event | None = None) -> Answer:
        """Stream the answer to ``ids``: greedy at temperature 0, else sampled; ``interrupt`` stops it."""
        from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        if self.limit is not None:
            if len(ids) >= self.limit:
                raise ValueError(f"the prompt is {len(ids)} tokens and the model takes at most {self.limit}; "
                                 "send a shorter one (in chat: /reset forgets the earlier turns)")
            max_new_tokens = min(max_new_tokens, self.limit - len(ids))
        interrupt = interrupt or threading.Event()

        class Interrupted(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), interrupt.is_set(), dtype=torch.bool, device=input_ids.device)

        sampling = dict(do_sample=True, temperature=float(temperature), top_p=float(top_p), top_k=0) \
            if temperature > 0 else dict(do_sample=False)
        config = GenerationConfig(max_new_tokens=int(max_new_tokens), eos_token_id=self.eos, pad_token_id=self.pad,
                                  use_cache=True, **sampling)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        device = next(self.model.parameters()).device
        answer = Answer(pieces=iter(()), tokens=[])
        done: dict = {}

        def work():
            # As evaluate.generate: the checkpoint's own generation_config would be merged into ours.
            saved, self.model.generation_config = self.model.generation_config, copy.deepcopy(config)
            try:
                prompt = torch.tensor([ids], device=device)
                done["out"] = self.model.generate(
                    input_ids=prompt, attention_mask=torch.ones_like(prompt), generation_config=config,
                    streamer=streamer, stopping_criteria=StoppingCriteriaList([Interrupted()]))
            except BaseException as err:  # noqa: BLE001 - raised again in the caller's thread
                done["error"] = err
                streamer.end()
            finally:
                self.model.generation_config = saved

        def finish():
            new = done["out"][0, len(ids):].tolist()
            stopped = next((i for i, t in enumerate(new) if t in self.eos), None)
            answer.tokens = new if stopped is None else new[:stopped]
            answer.finish = ("stop" if stopped is not None else "interrupted" if interrupt.is_set()
                             and len(new) < max_new_tokens else "length")

        def pieces():
            with self.lock:
                thread = threading.Thread(target=work, daemon=True)
                thread.start()
                try:
                    yield from (piece for piece in streamer if piece)  # it sends "" while a word is unfinished
                except GeneratorExit:  # the caller stopped reading (a client that went away): stop generating
                    interrupt.set()
                    raise
                finally:
                    thread.join()
                    if "out" in done:
                        finish()
            if "error" in done:
                raise done["error"]

        answer.pieces = pieces()
        return answer
