"""tokenize stage: rendered prompts -> cached token tensors, with labels and an audit.

Prompt and response are tokenized separately and concatenated, which is exactly what the model sees
at inference (the prompt's tokens, then generated tokens), so the prompt/response boundary can never
shift inside a merged token. Labels are -100 over the prompt; the response and a final EOS are
trained, also when the tokenizer's pad token is the EOS token (padding is masked by position, at
batch time, never by token id).

A chat row rendered whole (render's ``segments``) is tokenized segment by segment, each segment once
(linear in the conversation's length), and concatenated; the end-of-turn token (render's ``end_of_turn``,
else EOS) follows every assistant turn. tokenize.train_on says which assistant turns are labelled in the
train split: all of them, or the last only (the earlier ones stay in the context, masked). Held-out rows
always label their last assistant turn only: evaluation scores that turn, generated after the rest.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from .config import ConfigError, defaults
from .examples import IGNORE_INDEX, Examples
from .io import read_parquet, write_json, write_parquet

TRUNCATION_POLICIES = ("drop", "truncate")
TRAIN_ON = ("all_assistant_turns", "last_assistant_turn")
# The keyword defaults here are the schema's tokenize.* defaults, written only there (max_length is
# required: a tokenizer's budget is the caller's choice).
DEFAULTS = defaults("tokenize")


class AuditError(RuntimeError):
    pass


@dataclass
class TokenizeResult:
    splits: dict[str, Examples]
    rejected: pd.DataFrame
    audit: dict = field(default_factory=dict)


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise AuditError("the tokenizer defines no EOS token: the model could never learn to stop")
    return int(tokenizer.eos_token_id)


def _conversations(prompts: pd.DataFrame) -> list[list[dict] | None]:
    """Each row's segments (render.py), or None for a row tokenized from its prompt and response."""
    if "segments" not in prompts:
        return [None] * len(prompts)
    return [json.loads(s) if s else None for s in prompts["segments"]]


def _labelled(segments: list[dict], split: str, train_on: str) -> list[int]:
    """The indices of the assistant turns (response segments) a row trains, in order."""
    turns = [i for i, s in enumerate(segments) if s["response"]]
    return turns if split == "train" and train_on == "all_assistant_turns" else turns[-1:]


def end_of_turn_id(tokenizer, token: str) -> int:
    """The id of the token after an assistant turn: the chat template's own ``token`` (render found it), else EOS."""
    if not token:
        return _eos_id(tokenizer)
    encoded = tokenizer(token, add_special_tokens=False)["input_ids"]
    if len(encoded) != 1:
        raise AuditError(f"the chat template's end-of-turn token {token!r} is {len(encoded)} tokens for this "
                         "tokenizer, not one: render and tokenize used different tokenizers; rerun render")
    return encoded[0]


def _end_of_turn_ids(prompts: pd.DataFrame, tokenizer, eos: int) -> list[int]:
    """Per row: the token after an assistant turn, the chat template's own (render found it), else EOS."""
    if "end_of_turn" not in prompts:
        return [eos] * len(prompts)
    ids = {token: end_of_turn_id(tokenizer, token) for token in set(prompts["end_of_turn"]) - {""}}
    return [ids[t] if t else eos for t in prompts["end_of_turn"]]


def tokenize_prompts(prompts: pd.DataFrame, tokenizer, *, max_length: int,
                     truncation: str = DEFAULTS["truncation"], train_on: str = DEFAULTS["train_on"]) -> TokenizeResult:
    if truncation not in TRUNCATION_POLICIES:
        raise ValueError(f"tokenize.truncation must be one of {TRUNCATION_POLICIES}, got {truncation!r}")
    if train_on not in TRAIN_ON:
        raise ValueError(f"tokenize.train_on must be one of {TRAIN_ON}, got {train_on!r}")
    eos = _eos_id(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    encode = _encoder(tokenizer)
    conversations = _conversations(prompts)
    plain = np.array([c is None for c in conversations], dtype=bool)
    has_special = (prompts["prompt_has_special_tokens"].to_numpy(dtype=bool) if "prompt_has_special_tokens" in prompts
                   else np.zeros(len(prompts), dtype=bool))
    # A chat template's text already carries the model's special tokens (its BOS, role markers):
    # render marks those rows (prompt_has_special_tokens) and they are encoded without adding them
    # again, as apply_chat_template(tokenize=True) does; a file template's text gets the tokenizer's own.
    prompt_ids: list = [None] * len(prompts)
    response_ids: list = [None] * len(prompts)
    for special in (True, False):
        rows = np.flatnonzero(plain & (has_special != special))
        for i, ids in zip(rows, encode(prompts["prompt"].iloc[rows], special)):
            prompt_ids[i] = ids
    for i, ids in zip(np.flatnonzero(plain), encode(prompts["response"][plain], False)):
        response_ids[i] = ids
    segment_ids = _encode_segments(conversations, has_special, encode)
    end_of_turn = _end_of_turn_ids(prompts, tokenizer, eos)

    per_split: dict[str, tuple[list, list, list]] = {}
    rejected, truncated = [], 0
    expected: dict[int, list[list[int]]] = {}  # row -> token ids of each trained turn, for the audit
    for i, (row, split) in enumerate(zip(prompts["row"], prompts["split"])):
        if plain[i]:
            ids = list(prompt_ids[i]) + list(response_ids[i]) + [eos]
            labels = [IGNORE_INDEX] * len(prompt_ids[i]) + ids[len(prompt_ids[i]):]
            first_trained = prompt_length = len(prompt_ids[i])
            expected[int(row)] = [response_ids[i]]
        else:
            ids, labels, prompt_length, trained = _assemble(conversations[i], segment_ids[i], end_of_turn[i],
                                                            _labelled(conversations[i], split, train_on))
            first_trained = next(k for k, t in enumerate(labels) if t != IGNORE_INDEX)
            expected[int(row)] = trained
        if len(ids) > max_length:
            if truncation == "drop" or first_trained >= max_length:
                rejected.append({"row": int(row), "split": split, "reason": "too_many_tokens",
                                 "detail": f"{len(ids)} tokens > tokenize.max_length {max_length}"})
                continue
            # Truncating cuts the response and its EOS: teaching EOS after half an answer would
            # teach the model to stop mid-sentence.
            ids, labels = ids[:max_length], labels[:max_length]
            prompt_length = min(prompt_length, max_length)
            truncated += 1
        rows, plens, row_ids = per_split.setdefault(split, ([], [], []))
        rows.append((ids, labels))
        plens.append(prompt_length)
        row_ids.append(int(row))

    metadata = {"eos_token_id": eos, "pad_token_id": pad, "max_length": max_length, "truncation": truncation}
    if not plain.all():
        metadata["train_on"] = train_on
        # What a generated assistant turn ends with, where the chat template's token is not EOS: evaluation
        # stops there too.
        template_ends = set(end_of_turn) - {eos}  # one token per template
        if template_ends:
            metadata["end_of_turn_token_id"] = template_ends.pop()
    splits = {name: Examples.from_rows(rows, row_ids, plens, metadata) for name, (rows, plens, row_ids) in per_split.items()}
    for name in ("train", "eval"):
        splits.setdefault(name, Examples.from_rows([], [], [], metadata))
    _record_sources(splits, prompts)
    rejected_df = pd.DataFrame(rejected, columns=["row", "split", "reason", "detail"])
    audit = audit_examples(splits, prompts, tokenizer, expected, train_on=train_on)
    audit.update({"rows_in": int(len(prompts)), "rows_kept": int(sum(len(e) for e in splits.values())),
                  "rows_rejected": int(len(rejected_df)), "rows_truncated": truncated,
                  "max_length": max_length, "truncation": truncation})
    if not plain.all():
        audit["train_on"] = train_on
    return TokenizeResult(splits, rejected_df, audit)


def _encoder(tokenizer):
    """encode(texts, special): the texts' token ids, with the tokenizer's special tokens or without. Batched
    calls go through the Rust tokenizer in parallel: the slow part of preprocessing. (A fast tokenizer fails
    on an empty batch, hence the guard.)"""
    def encode(texts, special: bool) -> list:
        if not len(texts):
            return []
        return tokenizer(list(texts), add_special_tokens=special, return_attention_mask=False)["input_ids"]

    return encode


def prompt_ids(segments: list[dict], tokenizer, *, end_of_turn: str, has_special_tokens: bool) -> list[int]:
    """The token ids of a rendered conversation before its last assistant turn, built as tokenize_prompts builds a
    row's (the prompt evaluation generates from): what chat and serve send the model (templates.render_to_answer).
    ``end_of_turn``: render's end_of_turn ("" for EOS); ``has_special_tokens``: render's prompt_has_special_tokens."""
    [ids_per_segment] = _encode_segments([segments], np.array([has_special_tokens]), _encoder(tokenizer))
    ids, _, prompt_length, _ = _assemble(segments, ids_per_segment, end_of_turn_id(tokenizer, end_of_turn), [])
    return ids[:prompt_length]


def _encode_segments(conversations: list, has_special: np.ndarray, encode) -> list[list | None]:
    """Every segment's token ids, each segment encoded once, in two batched calls: a row's first segment
    with the tokenizer's special tokens where its text holds none (as a prompt is), the rest without."""
    texts = {True: [], False: []}
    where = {True: [], False: []}
    for i, segments in enumerate(conversations):
        for j, segment in enumerate(segments or ()):
            special = j == 0 and not has_special[i]
            texts[special].append(segment["text"])
            where[special].append((i, j))
    out: list[list | None] = [None if c is None else [None] * len(c) for c in conversations]
    for special in (True, False):
        for (i, j), ids in zip(where[special], encode(texts[special], special)):
            out[i][j] = ids
    return out


def _assemble(segments: list[dict], segment_ids: list[list[int]], end_of_turn: int, labelled: list[int]):
    """One chat row's ids and labels: the segments' tokens in order, the end-of-turn token after every assistant
    turn, labels on the ``labelled`` turns and their end-of-turn tokens. Also the prompt length (the tokens
    before the last assistant turn: what evaluation generates from) and the labelled turns' token ids."""
    ids: list[int] = []
    labels: list[int] = []
    prompt_length, trained = 0, []
    labelled = set(labelled)
    last = max(j for j, s in enumerate(segments) if s["response"])
    for j, (segment, seg_ids) in enumerate(zip(segments, segment_ids)):
        if j == last:
            prompt_length = len(ids)
        piece = list(seg_ids) + [end_of_turn] if segment["response"] else list(seg_ids)
        ids += piece
        labels += piece if j in labelled else [IGNORE_INDEX] * len(piece)
        if j in labelled:
            trained.append(seg_ids)
    return ids, labels, prompt_length, trained


def _expected_turns(prompts: pd.DataFrame, tokenizer, train_on: str) -> dict[int, list[list[int]]]:
    """row -> the token ids of each turn it should train, encoded here (audit_examples without tokenize's)."""
    out = {}
    for row, split, response, segments in zip(prompts["row"], prompts["split"], prompts["response"],
                                              _conversations(prompts)):
        texts = [response] if segments is None else [segments[j]["text"] for j in _labelled(segments, split, train_on)]
        out[int(row)] = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return out


def _record_sources(splits: dict[str, Examples], prompts: pd.DataFrame) -> None:
    """Each row's source (the clean stage's ``source`` column) as an index into the metadata's
    ``sources`` (names in order of first appearance, which is data.sources' order), for training's
    per-source weights. Prompts without the column (made by hand) leave every row in source 0, unnamed."""
    if "source" not in prompts:
        return
    index = {name: i for i, name in enumerate(dict.fromkeys(prompts["source"].tolist()))}
    index_of_row = dict(zip(prompts["row"].tolist(), (index[n] for n in prompts["source"])))
    for examples in splits.values():
        examples.source = torch.tensor([index_of_row[r] for r in examples.row.tolist()], dtype=torch.int64)
        examples.metadata["sources"] = json.dumps(list(index))


def audit_examples(splits: dict[str, Examples], prompts: pd.DataFrame, tokenizer,
                   expected: dict[int, list[list[int]]] | None = None, *,
                   train_on: str = DEFAULTS["train_on"]) -> dict:
    """Check the labels the trainer will see; failures are counted here and raised by check_audit.

    Each row's labels are runs of trained tokens, one per trained turn (an Alpaca row's response, a chat
    row's assistant turns): the runs must be as many as the row's trained turns, the last one must start
    at the row's prompt length and end the row, each must end with the end-of-turn token (EOS, or the chat
    template's) and decode, without it, to its turn's text. A truncated row's cut turn is not checked.

    Vectorised over the flat token arrays, with one batched encode and decode per split: checking
    row by row in Python cost more than tokenizing itself (100k rows: minutes instead of seconds).
    ``expected`` (row -> the trained turns' token ids, as tokenize_prompts encoded them) saves encoding
    every turn a second time; the check still catches any row assembled wrongly."""
    # The Rust decoder directly: transformers' batch_decode spends longer validating token lists
    # than decoding them. Both sides of the comparison go through the same decoder.
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decode = ((lambda seqs: backend.decode_batch(seqs, skip_special_tokens=False)) if backend is not None
              else (lambda seqs: tokenizer.batch_decode(seqs, skip_special_tokens=False)))
    if expected is None:
        expected = _expected_turns(prompts, tokenizer, train_on)
    end_of_turn_of = dict(zip(prompts["row"].tolist(), _end_of_turn_ids(prompts, tokenizer, _eos_id(tokenizer))))
    zero_trained = missing_eos = mask_broken = decode_mismatch = 0
    trained_tokens = total_tokens = turns_trained = 0
    examples_checked = []
    for examples in splits.values():
        n = len(examples)
        if not n:
            continue
        ids, labels = examples.input_ids.numpy(), examples.labels.numpy()
        offsets, lengths = examples.offsets.numpy(), examples.lengths.numpy()
        plens = examples.prompt_lengths.numpy().astype(np.int64)
        rows = examples.row.numpy().tolist()
        eot = np.array([end_of_turn_of[r] for r in rows], dtype=np.int64)
        n_expected = np.array([len(expected[r]) for r in rows], dtype=np.int64)
        row_of = np.repeat(np.arange(n), lengths)
        trained = labels != IGNORE_INDEX
        # Runs of trained tokens: where one starts (the token before is not trained, or is another row's)
        # and where it ends.
        before = np.zeros_like(trained)
        before[1:] = trained[:-1]
        before[offsets[:-1][lengths > 0]] = False
        after = np.zeros_like(trained)
        after[:-1] = trained[1:]
        after[offsets[1:][lengths > 0] - 1] = False
        starts = np.flatnonzero(trained & ~before)
        ends = np.flatnonzero(trained & ~after) + 1
        run_row = row_of[starts]
        runs = np.bincount(run_row, minlength=n)
        first_run = np.concatenate([[0], np.cumsum(runs)[:-1]])
        run_number = np.arange(len(starts)) - first_run[run_row]
        last_run = np.maximum(first_run + runs - 1, 0)
        row_end = offsets[1:]

        n_trained = np.bincount(row_of, weights=trained, minlength=n)
        zero = n_trained == 0
        total_tokens += int(lengths.sum())
        trained_tokens += int(n_trained.sum())
        turns_trained += len(starts)
        zero_trained += int(zero.sum())
        ends_with_eot = ids[np.maximum(ends - 1, 0)] == eot[run_row]
        # A row cut at max_length (its last run cut, or turns missing after a complete one).
        last_complete = (runs > 0) & ends_with_eot[last_run] if len(starts) else np.zeros(n, dtype=bool)
        truncated = (lengths == int(examples.metadata["max_length"])) & (~last_complete | (runs < n_expected))
        cut_run = truncated[run_row] & (run_number == runs[run_row] - 1) & ~ends_with_eot
        has_runs = runs > 0
        last_starts = np.where(has_runs, starts[last_run] if len(starts) else 0, -1)
        last_ends = np.where(has_runs, ends[last_run] if len(ends) else 0, -1)
        whole = (runs == n_expected) & (last_starts == offsets[:-1] + plens) & (last_ends == row_end)
        cut_ok = ((runs <= n_expected) & ((runs < n_expected) | (last_starts == offsets[:-1] + plens))
                  & (np.bincount(run_row, weights=cut_run & (ends != row_end[run_row]), minlength=n) == 0))
        relabelled = np.bincount(row_of, weights=trained & (labels != ids), minlength=n) > 0
        broken = ~zero & (relabelled | np.where(truncated, ~cut_ok, ~whole))
        mask_broken += int(broken.sum())
        missing_eos += int((np.bincount(run_row, weights=~ends_with_eot & ~cut_run, minlength=n) > 0).sum())

        # Decode every complete run (its end-of-turn token left off) against the turn it should be.
        check = np.flatnonzero(~cut_run & (run_number < n_expected[run_row]) & ~(~truncated & ~whole)[run_row])
        texts = decode([ids[starts[k] : ends[k] - 1].tolist() for k in check])
        wanted = decode([expected[rows[run_row[k]]][run_number[k]] for k in check])
        mismatched = set()
        for k, text, want in zip(check, texts, wanted):
            if text != want:
                row = rows[run_row[k]]
                mismatched.add(row)
                if len(examples_checked) < 5:
                    examples_checked.append({"row": row, "turn": int(run_number[k]) + 1, "decoded": text,
                                             "expected": want})
        decode_mismatch += len(mismatched)
    audit = {
        "rows_with_zero_trained_tokens": zero_trained,
        "rows_missing_eos": missing_eos,
        "rows_with_broken_prompt_mask": mask_broken,
        "rows_where_trained_tokens_do_not_decode_to_response": decode_mismatch,
        "mismatch_examples": examples_checked,
        "tokens": total_tokens,
        "trained_tokens": trained_tokens,
        "rows_per_split": {name: len(e) for name, e in splits.items()},
    }
    if "segments" in prompts:
        audit["assistant_turns_trained"] = turns_trained
        audit["end_of_turn_tokens"] = sorted({tokenizer.convert_ids_to_tokens(int(t)) for t in end_of_turn_of.values()})
    return audit


def check_audit(audit: dict) -> None:
    problems = [key for key in ("rows_with_zero_trained_tokens", "rows_missing_eos", "rows_with_broken_prompt_mask",
                                "rows_where_trained_tokens_do_not_decode_to_response") if audit.get(key)]
    if problems:
        raise AuditError("tokenization audit failed, training on these labels would be wrong: "
                         + ", ".join(f"{key}={audit[key]}" for key in problems)
                         + (f"; first mismatches: {audit['mismatch_examples']}" if audit.get("mismatch_examples") else ""))


def check_max_length(config, max_length: int, model_dir) -> None:
    """Before any work: rows longer than a model's position table fail in training, minutes later (a
    traceback on a CPU, a device-side assert on a GPU); rotary models run past their trained length."""
    from .modeling import position_limit, positions_are_hard

    limit = position_limit(config)
    if limit is None or max_length <= limit:
        return
    if positions_are_hard(config):
        raise ConfigError(f"tokenize.max_length {max_length} is more than the {limit} positions the model in "
                          f"{model_dir} takes; set tokenize.max_length to {limit} or less")
    warnings.warn(f"tokenize.max_length {max_length} is more than the {limit} positions the model in {model_dir} "
                  "was trained with: rows that long train and generate, at lengths the model has not seen",
                  stacklevel=2)


def run_tokenize(prompts_path, model_dir, out_train, out_eval, out_rejected, out_audit, *,
                 max_length: int, truncation: str = DEFAULTS["truncation"], train_on: str = DEFAULTS["train_on"],
                 test_set: str | None = None) -> TokenizeResult:
    """Tokenize rendered prompts into the train and eval examples. ``test_set`` (its name): the prompts are
    one of evaluate.test_sets, every row held out, so only ``out_eval`` is written (``out_train`` is None)."""
    from transformers import AutoConfig, AutoTokenizer

    check_max_length(AutoConfig.from_pretrained(model_dir), max_length, model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    result = tokenize_prompts(read_parquet(prompts_path), tokenizer, max_length=max_length, truncation=truncation,
                              train_on=train_on)
    write_parquet(out_rejected, result.rejected)
    write_json(out_audit, result.audit)
    # Snakemake deletes a failed job's outputs, so the error message itself carries the evidence.
    check_audit(result.audit)
    if test_set is not None:
        return _save_test_set(result, test_set, out_train, out_eval, max_length)
    if not len(result.splits["train"]):
        raise AuditError(f"no rows left to train on: {len(result.rejected)} of {result.audit['rows_in']} rows exceed "
                         f"tokenize.max_length {max_length} and {len(result.splits['eval'])} are held out for eval; "
                         "raise tokenize.max_length, set tokenize.truncation: truncate, or lower data.eval_fraction")
    result.splits["train"].save(out_train)
    result.splits["eval"].save(out_eval)
    return result


def _save_test_set(result: TokenizeResult, name: str, out_train, out_eval, max_length: int) -> TokenizeResult:
    if out_train is not None or len(result.splits["train"]):
        raise ValueError(f"test set {name!r}: every row is evaluated, none trained: give no train output and "
                         "prompts whose rows are all in the eval split (clean with eval_fraction 1)")
    if not len(result.splits["eval"]):
        raise AuditError(f"test set {name!r}: no rows left to evaluate: all {result.audit['rows_in']} rows exceed "
                         f"tokenize.max_length {max_length}; raise tokenize.max_length, set tokenize.truncation: "
                         f"truncate, or shorten the rows of evaluate.test_sets.{name}")
    result.splits["eval"].save(out_eval)
    return result
