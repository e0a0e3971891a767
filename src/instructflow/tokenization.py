"""tokenize stage: rendered prompts -> cached token tensors, with labels and an audit.

Prompt and response are tokenized separately and concatenated, which is exactly what the model sees
at inference (the prompt's tokens, then generated tokens), so the prompt/response boundary can never
shift inside a merged token. Labels are -100 over the prompt; the response and a final EOS are
trained, also when the tokenizer's pad token is the EOS token (padding is masked by position, at
batch time, never by token id).
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


def tokenize_prompts(prompts: pd.DataFrame, tokenizer, *, max_length: int,
                     truncation: str = DEFAULTS["truncation"]) -> TokenizeResult:
    if truncation not in TRUNCATION_POLICIES:
        raise ValueError(f"tokenize.truncation must be one of {TRUNCATION_POLICIES}, got {truncation!r}")
    eos = _eos_id(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    # Batched calls go through the Rust tokenizer in parallel: the slow part of preprocessing.
    # (A fast tokenizer fails on an empty batch, hence the guard.)
    def encode(texts, special: bool) -> list:
        if not len(texts):
            return []
        return tokenizer(list(texts), add_special_tokens=special, return_attention_mask=False)["input_ids"]

    # A chat template's text already carries the model's special tokens (its BOS, role markers):
    # render marks those rows (prompt_has_special_tokens) and they are encoded without adding them
    # again, as apply_chat_template(tokenize=True) does; a file template's text gets the tokenizer's own.
    prompt_ids = encode(prompts["prompt"], True)
    if "prompt_has_special_tokens" in prompts and len(prompts):
        marked = np.flatnonzero(prompts["prompt_has_special_tokens"].to_numpy(dtype=bool))
        for i, ids in zip(marked, encode(prompts["prompt"].iloc[marked], False)):
            prompt_ids[i] = ids
    response_ids = encode(prompts["response"], False)

    per_split: dict[str, tuple[list, list, list]] = {}
    rejected, truncated = [], 0
    for row, split, p_ids, r_ids in zip(prompts["row"], prompts["split"], prompt_ids, response_ids):
        ids = list(p_ids) + list(r_ids) + [eos]
        if len(ids) > max_length:
            if truncation == "drop" or len(p_ids) >= max_length:
                rejected.append({"row": int(row), "split": split, "reason": "too_many_tokens",
                                 "detail": f"{len(ids)} tokens > tokenize.max_length {max_length}"})
                continue
            # Truncating cuts the response and its EOS: teaching EOS after half an answer would
            # teach the model to stop mid-sentence.
            ids = ids[:max_length]
            truncated += 1
        labels = [IGNORE_INDEX] * len(p_ids) + ids[len(p_ids):]
        rows, plens, row_ids = per_split.setdefault(split, ([], [], []))
        rows.append((ids, labels))
        plens.append(len(p_ids))
        row_ids.append(int(row))

    metadata = {"eos_token_id": eos, "pad_token_id": pad, "max_length": max_length, "truncation": truncation}
    splits = {name: Examples.from_rows(rows, row_ids, plens, metadata) for name, (rows, plens, row_ids) in per_split.items()}
    for name in ("train", "eval"):
        splits.setdefault(name, Examples.from_rows([], [], [], metadata))
    _record_sources(splits, prompts)
    rejected_df = pd.DataFrame(rejected, columns=["row", "split", "reason", "detail"])
    audit = audit_examples(splits, prompts, tokenizer, dict(zip(prompts["row"].tolist(), response_ids)))
    audit.update({"rows_in": int(len(prompts)), "rows_kept": int(sum(len(e) for e in splits.values())),
                  "rows_rejected": int(len(rejected_df)), "rows_truncated": truncated,
                  "max_length": max_length, "truncation": truncation})
    return TokenizeResult(splits, rejected_df, audit)


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
                   response_ids: dict[int, list[int]] | None = None) -> dict:
    """Check the labels the trainer will see; failures are counted here and raised by check_audit.

    Vectorised over the flat token arrays, with one batched encode and decode per split: checking
    row by row in Python cost more than tokenizing itself (100k rows: minutes instead of seconds).
    ``response_ids`` (row -> the response's token ids, as tokenize_prompts encoded them) saves
    encoding every response a second time; the check still catches any row assembled wrongly."""
    # The Rust decoder directly: transformers' batch_decode spends longer validating token lists
    # than decoding them. Both sides of the comparison go through the same decoder.
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decode = ((lambda seqs: backend.decode_batch(seqs, skip_special_tokens=False)) if backend is not None
              else (lambda seqs: tokenizer.batch_decode(seqs, skip_special_tokens=False)))
    responses = dict(zip(prompts["row"], prompts["response"]))
    zero_trained = missing_eos = mask_broken = decode_mismatch = 0
    trained_tokens = total_tokens = 0
    examples_checked = []
    for examples in splits.values():
        n = len(examples)
        if not n:
            continue
        ids, labels = examples.input_ids.numpy(), examples.labels.numpy()
        offsets, lengths = examples.offsets.numpy(), examples.lengths.numpy()
        plens = examples.prompt_lengths.numpy().astype(np.int64)
        row_of = np.repeat(np.arange(n), lengths)
        pos = np.arange(len(ids)) - offsets[row_of]
        trained = labels != IGNORE_INDEX
        is_prompt = pos < plens[row_of]
        n_trained = np.bincount(row_of, weights=trained, minlength=n)
        bad = (trained & is_prompt) | (~trained & ~is_prompt) | (trained & (labels != ids))
        zero = n_trained == 0
        total_tokens += int(lengths.sum())
        trained_tokens += int(n_trained.sum())
        zero_trained += int(zero.sum())
        mask_broken += int(((np.bincount(row_of, weights=bad, minlength=n) > 0) & ~zero).sum())
        eos = examples.eos_token_id
        last = labels[offsets[1:] - 1]
        truncated = (lengths == int(examples.metadata["max_length"])) & (last != eos)
        check = np.flatnonzero(~zero & ~truncated)
        missing_eos += int((last[check] != eos).sum())
        texts = decode([ids[offsets[i] + plens[i] : offsets[i + 1] - 1].tolist() for i in check])
        rows = examples.row.numpy()[check].tolist()
        if response_ids is not None:
            encoded = [response_ids[r] for r in rows]
        else:
            encoded = tokenizer([responses[r] for r in rows], add_special_tokens=False)["input_ids"] if rows else []
        for row, text, expected in zip(rows, texts, decode(encoded)):
            if text != expected:
                decode_mismatch += 1
                if len(examples_checked) < 5:
                    examples_checked.append({"row": row, "decoded": text, "expected": expected})
    return {
        "rows_with_zero_trained_tokens": zero_trained,
        "rows_missing_eos": missing_eos,
        "rows_with_broken_prompt_mask": mask_broken,
        "rows_where_trained_tokens_do_not_decode_to_response": decode_mismatch,
        "mismatch_examples": examples_checked,
        "tokens": total_tokens,
        "trained_tokens": trained_tokens,
        "rows_per_split": {name: len(e) for name, e in splits.items()},
    }


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
                 max_length: int, truncation: str = DEFAULTS["truncation"], test_set: str | None = None) -> TokenizeResult:
    """Tokenize rendered prompts into the train and eval examples. ``test_set`` (its name): the prompts are
    one of evaluate.test_sets, every row held out, so only ``out_eval`` is written (``out_train`` is None)."""
    from transformers import AutoConfig, AutoTokenizer

    check_max_length(AutoConfig.from_pretrained(model_dir), max_length, model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    result = tokenize_prompts(read_parquet(prompts_path), tokenizer, max_length=max_length, truncation=truncation)
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
