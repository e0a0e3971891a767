"""Evaluate a causal LM on the eval split: response-only loss / perplexity over every eval example,
and greedy generations for the first ``max_samples`` prompts scored by exact match and ROUGE-L.

Snakemake calls these functions from ``run:`` blocks; there is no CLI.
"""

from __future__ import annotations

import copy
import math
import os
import time
from typing import Any, Iterable, Sequence

import pandas as pd
import torch

from . import precision as precisions
from .config import defaults
from .device import autocast, pick_device
from .examples import IGNORE_INDEX, Examples
from .io import read_json, read_parquet, write_json, write_parquet
from .loss import labelled_rows, response_loss_sum
from .report import md_table, write_text

# The keyword defaults here are the schema's evaluate.* defaults, written only there.
DEFAULTS = defaults("evaluate")

METRIC_KEYS = (
    "eval_loss",
    "perplexity",
    "exact_match",
    "rouge_l",
    "chrf",
    "eos_rate",
    "length_ratio",
    "n",
    "n_loss_rows",
    "n_loss_tokens",
    "generation_seconds",
    "generation_tokens_per_s",
)


# --------------------------------------------------------------------------------------- scoring
def normalize(text: str) -> str:
    """Strip and collapse internal whitespace (case and punctuation are kept)."""
    return " ".join(str(text).split())


_SCORER = None


def _rouge_scorer():
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer

        # rouge_score's default tokenizer lower-cases and keeps only ASCII letters and digits
        # (everything else is a separator and non-ASCII text vanishes). For the demo data, numbers
        # and English words, that is fine; for other scripts pass a custom tokenizer here.
        _SCORER = rouge_scorer.RougeScorer(["rougeL"])
    return _SCORER


def score(predictions: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    """Exact match, ROUGE-L F1 and chrF of predictions against references.

    Returns ``{"exact_match": mean, "rouge_l": mean, "chrf": corpus chrF, "n": count, "exact": [bool],
    "rouge_l_each": [float], "chrf_each": [float]}``; the aggregates are None when there is nothing to score.
    chrF is sacrebleu's (character n-gram F-score, 0-100, as papers report it): the corpus score over all
    rows, and one sentence score per row. A normalised exact match always scores ROUGE-L 1.0 and chrF 100
    (both libraries give 0 when both sides are empty).
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    scorer = _rouge_scorer()
    exact: list[bool] = []
    rouge: list[float] = []
    for pred, ref in zip(predictions, references):
        p, r = normalize(pred), normalize(ref)
        same = p == r
        exact.append(same)
        rouge.append(1.0 if same else float(scorer.score(r, p)["rougeL"].fmeasure))
    n = len(exact)
    from sacrebleu.metrics import CHRF

    chrf = CHRF()
    chrf_each = [100.0 if same else float(chrf.sentence_score(p, [r]).score)
                 for same, p, r in zip(exact, predictions, references)]
    corpus = float(chrf.corpus_score(list(predictions), [list(references)]).score) if n else None
    return {
        "exact_match": (sum(exact) / n) if n else None,
        "rouge_l": (sum(rouge) / n) if n else None,
        "chrf": 100.0 if n and all(exact) else corpus,
        "n": n,
        "exact": exact,
        "rouge_l_each": rouge,
        "chrf_each": chrf_each,
    }


# ---------------------------------------------------------------------------------- model loading
def _resolve_bf16(precision: str, device: torch.device) -> bool:
    """Whether to evaluate in bf16 (the model's weights cast once: ``evaluation_model``): evaluate.precision,
    resolved as train.precision is."""
    return precisions.resolve(precision, device, key="evaluate.precision") == "bf16"


def load_model(model_dir: str | os.PathLike, device: torch.device | None = None):
    """The model (fp32, attention checked against eager: modeling.py) and its tokenizer."""
    from transformers import AutoTokenizer

    from .modeling import load_model as load_checked

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model, _ = load_checked(model_dir, device=device or pick_device())
    model.config.use_cache = True
    model.eval()
    return model, tokenizer


def evaluation_model(model_dir: str | os.PathLike, device: torch.device, bf16: bool):
    """``load_model``, cast to bf16 once where ``bf16``: autocast over fp32 weights converts every weight
    again at each generated token (a third of generation's time for SmolLM2 on a 2-core CPU). The numerics
    are those of the bf16 model that full fine-tuning trains by default (train.advanced.bf16_mode)."""
    model, tokenizer = load_model(model_dir, device)
    if bf16:
        model.to(torch.bfloat16)
    return model, tokenizer


def loss_function(model):
    """The response loss: the fused form that projects only labelled positions (kernels/) where it
    computes the same loss for this model, else the plain one over the model's own logits."""
    from .kernels import linear_cross_entropy

    return linear_cross_entropy.response_loss_sum if linear_cross_entropy.agrees(model) is None else response_loss_sum


# ------------------------------------------------------------------------------------------ loss
def _batches(order: Sequence[int], batch_size: int) -> Iterable[list[int]]:
    for start in range(0, len(order), batch_size):
        yield list(order[start : start + batch_size])


@torch.inference_mode()
def eval_loss(model, examples: Examples, *, batch_size: int = DEFAULTS["batch_size"],
              use_bf16: bool = False, rows: Sequence[int] | None = None) -> dict[str, Any]:
    """Mean CE over every labelled (response + EOS) token of ``examples`` (of ``rows`` of it, where given):
    right-padded, length-sorted batches, summed per batch and divided by the total count once at the end."""
    sums = loss_sums(model, examples, batch_size=batch_size, use_bf16=use_bf16, rows=rows)
    return loss_metrics(*sums)


def loss_metrics(total: float, count: int, rows: int) -> dict[str, Any]:
    """eval_loss's figures from a summed loss, its labelled tokens and the rows that had any."""
    return {"eval_loss": total / count if count else float("nan"), "n_loss_rows": rows, "n_loss_tokens": count}


@torch.inference_mode()
def loss_sums(model, examples: Examples, *, batch_size: int, use_bf16: bool = False,
              rows: Sequence[int] | None = None, loss_of=None) -> tuple[float, int, int]:
    """The summed loss over ``rows`` (default: all) of ``examples``, its labelled tokens and the rows that had any;
    ``loss_of``: ``loss_function(model)`` where the caller has it already."""
    device = next(model.parameters()).device
    pad = examples.pad_token_id
    lengths = examples.lengths.tolist()
    order = sorted(range(len(examples)) if rows is None else rows, key=lambda i: lengths[i])
    total = 0.0
    count = 0
    n_rows = 0
    loss_sum_of = loss_of or loss_function(model)
    for idx in _batches(order, batch_size):
        width = max(lengths[i] for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        labels = torch.full((len(idx), width), IGNORE_INDEX, dtype=torch.long)
        for b, i in enumerate(idx):
            x, y = examples.get(i)
            ids[b, : len(x)] = x.long()
            labels[b, : len(y)] = y.long()
        with autocast(device, enabled=use_bf16):
            loss_sum, n = loss_sum_of(model, ids.to(device), labels.to(device))
        total += float(loss_sum)
        count += n
        n_rows += labelled_rows(labels)
    return total, count, n_rows


# ------------------------------------------------------------------------------------ generation
def eos_ids(first: int | None, model) -> list[int]:
    """The token ids that end an answer: ``first`` (the EOS training appended) and the model's configured ones."""
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids = [first, *(configured if isinstance(configured, (list, tuple)) else [configured])]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def stopped_with_eos(new_tokens: Sequence[int], max_new_tokens: int) -> bool:
    """``generate`` stops at EOS or at max_new_tokens: fewer new tokens than that means it stopped with EOS."""
    return len(new_tokens) < int(max_new_tokens)


def generation_config(model, eos_token_ids: Sequence[int], pad_token_id: int, max_new_tokens: int):
    """Greedy decoding up to ``max_new_tokens``, stopping at any of ``eos_token_ids``."""
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=int(max_new_tokens),
        eos_token_id=list(eos_token_ids),
        pad_token_id=int(pad_token_id),
        bos_token_id=getattr(model.generation_config, "bos_token_id", None),
        use_cache=True,
    )


def left_padded(prompts: Sequence[torch.Tensor], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``prompts`` (1-D token tensors) as one left-padded batch: ids and attention mask."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), int(pad_token_id), dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):] = p.long()
        mask[b, width - len(p):] = 1
    return ids, mask


@torch.inference_mode()
def generate_batch(model, ids: torch.Tensor, mask: torch.Tensor, gen_cfg) -> list[list[int]]:
    """Greedy continuations of one left-padded batch, each up to (not including) its first EOS."""
    # transformers 5 merges the model's own generation_config (e.g. a checkpoint's sampling
    # temperature/top_p, max_length) into the one passed in, which warns and could override
    # what we set; swapping ours in for the call makes greedy decoding exactly what we ask for.
    saved_cfg = model.generation_config
    model.generation_config = copy.deepcopy(gen_cfg)
    try:
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=copy.deepcopy(gen_cfg))
    finally:
        model.generation_config = saved_cfg
    eos = {int(e) for e in gen_cfg.eos_token_id}
    results = []
    for new in out[:, ids.shape[1]:].tolist():
        toks: list[int] = []
        for t in new:
            if t in eos:
                break
            toks.append(t)
        results.append(toks)
    return results


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def generate(
    model,
    prompts: Sequence[torch.Tensor],
    *,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
    max_new_tokens: int = DEFAULTS["max_new_tokens"],
    batch_size: int = DEFAULTS["batch_size"],
    use_bf16: bool = False,
    progress: bool = False,
) -> tuple[list[list[int]], float]:
    """Greedy continuations of ``prompts`` (1-D token tensors), in input order.

    Batches are length-sorted and LEFT-padded with an attention mask. Each returned list holds the
    new tokens up to (not including) the first EOS. Also returns the seconds spent in generate.
    ``progress``: a progress bar over the batches (on stderr).
    """
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    gen_cfg = generation_config(model, eos_token_ids, pad_token_id, max_new_tokens)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[list[int] | None] = [None] * len(prompts)
    seconds = 0.0
    batches = list(_batches(order, batch_size))
    for idx in tqdm(batches, desc="generate", unit="batch", disable=not progress):
        ids, mask = left_padded([prompts[i] for i in idx], pad_token_id)
        synchronize(device)
        t0 = time.perf_counter()
        with autocast(device, enabled=use_bf16):
            new = generate_batch(model, ids.to(device), mask.to(device), gen_cfg)
        synchronize(device)
        seconds += time.perf_counter() - t0
        for i, toks in zip(idx, new):
            results[i] = toks
    return [r or [] for r in results], seconds


# ------------------------------------------------------------------------------------- evaluation
def _text(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def _finite_or_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def loss_and_generations(model, examples: Examples, n_gen: int, eos_token_ids: Sequence[int], pad_token_id: int, *,
                         max_new_tokens: int, batch_size: int) -> tuple[dict[str, Any], list[list[int]], float]:
    """eval_loss over every row and generate for the first ``n_gen`` rows' prompts: for those rows in one pass
    over their prompts where kernels/shared_prefill.py's check passes for this model, else in two."""
    from .kernels import _warn, shared_prefill
    from .modeling import architecture

    loss_of = loss_function(model)
    fused = loss_of is not response_loss_sum
    why = shared_prefill.agrees(model, fused=fused)
    if why is not None:
        _warn(f"evaluation runs the prompts twice for {architecture(model)} (loss, then generation): {why}")
        loss = loss_metrics(*loss_sums(model, examples, batch_size=batch_size, loss_of=loss_of))
        generated, seconds = generate(model, [examples.prompt(i) for i in range(n_gen)], eos_token_ids=eos_token_ids,
                                      pad_token_id=pad_token_id, max_new_tokens=max_new_tokens, batch_size=batch_size)
        return loss, generated, seconds
    gen_cfg = generation_config(model, eos_token_ids, pad_token_id, max_new_tokens)
    shared, generated, seconds = shared_prefill.loss_and_generate(model, examples, range(n_gen), gen_cfg,
                                                                  batch_size=batch_size, fused=fused)
    rest = loss_sums(model, examples, batch_size=batch_size, rows=range(n_gen, len(examples)), loss_of=loss_of)
    return loss_metrics(*(a + b for a, b in zip(shared, rest))), generated, seconds


def evaluate_model(
    model_dir: str | os.PathLike,
    examples_path: str | os.PathLike,
    prompts_path: str | os.PathLike,
    *,
    max_new_tokens: int = DEFAULTS["max_new_tokens"],
    batch_size: int = DEFAULTS["batch_size"],
    max_samples: int | None = DEFAULTS["max_samples"],
    precision: str = DEFAULTS["precision"],
) -> tuple[dict, pd.DataFrame]:
    """Loss/perplexity over all eval examples and greedy-generation scores over the first
    ``max_samples`` of them. Returns (metrics dict, per-sample DataFrame)."""
    device = pick_device()
    model, tokenizer = evaluation_model(model_dir, device, _resolve_bf16(precision, device))
    examples = Examples.load(examples_path)

    texts = read_parquet(prompts_path)
    missing_cols = {"row", "prompt", "response"} - set(texts.columns)
    if missing_cols:
        raise ValueError(f"{prompts_path} lacks columns {sorted(missing_cols)}")
    if texts["row"].duplicated().any():
        raise ValueError(f"{prompts_path} has duplicate row ids")
    texts = texts.set_index("row")

    n_gen = len(examples) if max_samples is None else min(int(max_samples), len(examples))
    rows = [int(r) for r in examples.row[:n_gen].tolist()]
    absent = [r for r in rows if r not in texts.index]
    if absent:
        raise KeyError(f"rows {absent[:10]} of {examples_path} are not in {prompts_path}")

    pad_id = examples.pad_token_id if "pad_token_id" in examples.metadata else tokenizer.pad_token_id
    stop_ids = eos_ids(examples.eos_token_id if "eos_token_id" in examples.metadata else None, model)
    if "end_of_turn_token_id" in examples.metadata:  # a chat template's own end of an assistant turn
        stop_ids.append(int(examples.metadata["end_of_turn_token_id"]))
    loss, generated, seconds = loss_and_generations(model, examples, n_gen, stop_ids, int(pad_id),
                                                    max_new_tokens=max_new_tokens, batch_size=batch_size)
    predictions = [tokenizer.decode(toks, skip_special_tokens=True) for toks in generated]
    references = [_text(texts.at[r, "response"]) for r in rows]
    scores = score(predictions, references)
    n_new = sum(len(t) for t in generated)
    stopped = [stopped_with_eos(t, max_new_tokens) for t in generated]
    reference_tokens = [len(tokenizer.encode(r, add_special_tokens=False)) for r in references]

    samples = pd.DataFrame(
        {
            "row": pd.Series(rows, dtype="int64"),
            "prompt": pd.Series([_text(texts.at[r, "prompt"]) for r in rows], dtype="object"),
            "reference": pd.Series(references, dtype="object"),
            "prediction": pd.Series(predictions, dtype="object"),
            "exact": pd.Series(scores["exact"], dtype="bool"),
            "rouge_l": pd.Series(scores["rouge_l_each"], dtype="float64"),
            "chrf": pd.Series(scores["chrf_each"], dtype="float64"),
            "stopped_with_eos": pd.Series(stopped, dtype="bool"),
            "generated_tokens": pd.Series([len(t) for t in generated], dtype="int64"),
            "reference_tokens": pd.Series(reference_tokens, dtype="int64"),
        }
    )
    eval_loss_value = loss["eval_loss"]
    try:
        perplexity = math.exp(eval_loss_value)
    except OverflowError:
        perplexity = float("inf")
    metrics = {
        "eval_loss": eval_loss_value,
        "perplexity": perplexity,
        "exact_match": scores["exact_match"],
        "rouge_l": scores["rouge_l"],
        "chrf": scores["chrf"],
        # The share of generations that end with EOS (the rest ran into max_new_tokens: "never stops").
        "eos_rate": (sum(stopped) / n_gen) if n_gen else None,
        # Generated tokens over reference tokens, summed over the rows (1.0: as long as the references).
        "length_ratio": (n_new / sum(reference_tokens)) if sum(reference_tokens) else None,
        "n": n_gen,
        "n_loss_rows": loss["n_loss_rows"],
        "n_loss_tokens": loss["n_loss_tokens"],
        "generation_seconds": seconds,
        "generation_tokens_per_s": (n_new / seconds) if seconds > 0 else None,
    }
    return metrics, samples


def run_evaluate(
    model_dir,
    examples_path,
    prompts_path,
    out_metrics,
    out_samples,
    **kw,
) -> dict:
    """evaluate_model, then write the metrics JSON (non-finite numbers as null) and samples Parquet."""
    metrics, samples = evaluate_model(model_dir, examples_path, prompts_path, **kw)
    metrics = {k: _finite_or_none(v) for k, v in metrics.items()}
    write_parquet(out_samples, samples)
    write_json(out_metrics, metrics)
    return metrics


# --------------------------------------------------------------------------------------- compare
def _delta(base, tuned):
    numeric = (int, float)
    if isinstance(base, bool) or isinstance(tuned, bool):
        return None
    if isinstance(base, numeric) and isinstance(tuned, numeric):
        return _finite_or_none(tuned - base)
    return None


def _truncate(text: str, limit: int = 200) -> str:
    text = str(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _compared(base: dict, tuned: dict) -> dict:
    keys = [k for k in base if k in tuned] + [k for k in tuned if k not in base]
    return {"base": base, "tuned": tuned, "delta": {k: _delta(base.get(k), tuned.get(k)) for k in keys}}


def compare(
    base_metrics_path,
    tuned_metrics_path,
    base_samples_path,
    tuned_samples_path,
    out_metrics,
    out_samples_md,
    test_sets: dict | None = None,
) -> dict:
    """Write {"base", "tuned", "delta"} metrics JSON of the held-out split and a side-by-side Markdown
    samples table. ``test_sets``: name -> {"path": the set's file, "base": and "tuned": its metrics JSON
    files}; the JSON then also holds "test_sets": name -> {"path", "base", "tuned", "delta"}."""
    combined = _compared(read_json(base_metrics_path), read_json(tuned_metrics_path))
    if test_sets:
        combined["test_sets"] = {name: {"path": files["path"], **_compared(read_json(files["base"]),
                                                                           read_json(files["tuned"]))}
                                 for name, files in test_sets.items()}
    write_json(out_metrics, combined)

    b = read_parquet(base_samples_path)
    t = read_parquet(tuned_samples_path)
    merged = b.merge(
        t[["row", "prediction"]].rename(columns={"prediction": "tuned"}),
        on="row",
        how="outer",
        sort=False,
    )
    # Outer merge keeps base order first; fill prompt/reference of tuned-only rows from tuned.
    if len(merged) and merged["prompt"].isna().any():
        extra = t.set_index("row")
        for col in ("prompt", "reference"):
            merged[col] = merged[col].fillna(merged["row"].map(extra[col]))
    rows = [
        [int(r.row), _truncate(r.prompt if isinstance(r.prompt, str) else ""), r.reference, r.prediction, r.tuned]
        for r in merged.itertuples(index=False)
    ]
    md = md_table(["row", "prompt", "reference", "base", "tuned"], rows) if rows else "_No samples._\n"
    write_text(out_samples_md, md)
    return combined
