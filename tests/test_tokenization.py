"""tokenize stage: labels, EOS, truncation policies, the audit, and the files it writes."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from instructflow.examples import IGNORE_INDEX, Examples
from instructflow.io import read_json, read_parquet, write_parquet
from instructflow.tokenization import AuditError, audit_examples, check_audit, run_tokenize, tokenize_prompts

from conftest import EOS, build_tokenizer


def _rows(examples: Examples):
    for i in range(len(examples)):
        ids, labels = examples.get(i)
        yield i, ids, labels, int(examples.prompt_lengths[i])


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_trained_tokens_decode_to_response_plus_eos(alpaca_prompts, pad_is_eos):
    tok = build_tokenizer(pad_is_eos=pad_is_eos)
    assert (tok.pad_token_id == tok.eos_token_id) is pad_is_eos
    result = tokenize_prompts(alpaca_prompts, tok, max_length=1024)
    check_audit(result.audit)
    by_row = alpaca_prompts.set_index("row")
    seen = 0
    for split, examples in result.splits.items():
        for i, ids, labels, plen in _rows(examples):
            source = by_row.loc[int(examples.row[i])]
            assert source["split"] == split
            assert (labels[:plen] == IGNORE_INDEX).all()
            assert ids[:plen].tolist() == tok(source["prompt"])["input_ids"]
            trained = labels[labels != IGNORE_INDEX].tolist()
            # The EOS is trained even when it is also the pad token.
            assert trained[-1] == tok.eos_token_id
            assert tok.decode(trained) == source["response"] + EOS
            assert labels[plen:].tolist() == ids[plen:].tolist()
            seen += 1
    assert seen == len(alpaca_prompts) == result.audit["rows_in"] == result.audit["rows_kept"]
    assert result.audit["trained_tokens"] == sum(int((e.labels != IGNORE_INDEX).sum()) for e in result.splits.values())


def _max_length_between(prompts, tok):
    """A max_length that some rows exceed with their response, none with their prompt alone."""
    totals = [len(tok(p)["input_ids"]) + len(tok(r, add_special_tokens=False)["input_ids"]) + 1
              for p, r in zip(prompts["prompt"], prompts["response"])]
    prompt_max = max(len(tok(p)["input_ids"]) for p in prompts["prompt"])
    limit = max(prompt_max + 1, sorted(totals)[len(totals) // 2])
    assert any(t > limit for t in totals)
    return limit, totals


def test_drop_rejects_long_rows_with_a_reason(alpaca_prompts):
    tok = build_tokenizer()
    limit, totals = _max_length_between(alpaca_prompts, tok)
    result = tokenize_prompts(alpaca_prompts, tok, max_length=limit, truncation="drop")
    too_long = sum(t > limit for t in totals)
    audit = result.audit
    assert audit["rows_rejected"] == len(result.rejected) == too_long
    assert audit["rows_truncated"] == 0
    assert audit["rows_in"] == audit["rows_kept"] + audit["rows_rejected"] == len(alpaca_prompts)
    assert set(result.rejected["reason"]) == {"too_many_tokens"}
    assert result.rejected["detail"].str.contains(f"> tokenize.max_length {limit}").all()
    kept_rows = {int(r) for e in result.splits.values() for r in e.row}
    assert kept_rows.isdisjoint(set(result.rejected["row"]))
    check_audit(audit)


def test_truncate_cuts_the_response_and_its_eos_and_counts_it(alpaca_prompts):
    tok = build_tokenizer()
    limit, totals = _max_length_between(alpaca_prompts, tok)
    result = tokenize_prompts(alpaca_prompts, tok, max_length=limit, truncation="truncate")
    audit = result.audit
    assert audit["rows_truncated"] == sum(t > limit for t in totals) > 0
    assert audit["rows_rejected"] == 0 and audit["rows_in"] == audit["rows_kept"]
    cut = 0
    for examples in result.splits.values():
        for _, ids, labels, plen in _rows(examples):
            assert len(ids) <= limit
            if int(labels[-1]) != tok.eos_token_id:
                cut += 1
                assert len(ids) == limit and (labels[plen:] != IGNORE_INDEX).all()
    assert cut == audit["rows_truncated"]
    check_audit(audit)


def test_prompt_alone_over_the_limit_is_rejected_even_when_truncating():
    tok = build_tokenizer()
    prompts = pd.DataFrame({"row": [1, 2], "prompt": ["word " * 50, "short"], "response": ["a", "b"],
                            "split": ["train", "train"]})
    result = tokenize_prompts(prompts, tok, max_length=10, truncation="truncate")
    assert result.rejected["row"].tolist() == [1]
    assert result.audit["rows_kept"] == 1


def test_unknown_truncation_policy_and_missing_eos_are_errors(alpaca_prompts):
    tok = build_tokenizer()
    with pytest.raises(ValueError, match="truncation"):
        tokenize_prompts(alpaca_prompts, tok, max_length=64, truncation="clip")
    tok.eos_token = None
    with pytest.raises(AuditError, match="EOS"):
        tokenize_prompts(alpaca_prompts, tok, max_length=64)


def _single(prompt_ids, response_ids, labels, eos):
    ids = prompt_ids + response_ids
    return {"train": Examples.from_rows([(ids, labels)], [7], [len(prompt_ids)],
                                        {"eos_token_id": eos, "pad_token_id": eos, "max_length": 1024})}


def test_audit_catches_broken_labels():
    tok = build_tokenizer()
    eos = tok.eos_token_id
    prompt = "### Instruction:\nSay hi.\n### Response:\n"
    p = tok(prompt)["input_ids"]
    r = tok("hi there", add_special_tokens=False)["input_ids"]
    frame = pd.DataFrame({"row": [7], "prompt": [prompt], "response": ["hi there"], "split": ["train"]})
    good = _single(p, r + [eos], [IGNORE_INDEX] * len(p) + r + [eos], eos)
    check_audit(audit_examples(good, frame, tok))

    broken = {
        # the prompt's last token is trained
        "rows_with_broken_prompt_mask": _single(p, r + [eos], [IGNORE_INDEX] * (len(p) - 1) + [p[-1]] + r + [eos], eos),
        # no EOS at the end: the model would never learn to stop
        "rows_missing_eos": _single(p, r, [IGNORE_INDEX] * len(p) + r, eos),
        # everything masked
        "rows_with_zero_trained_tokens": _single(p, r + [eos], [IGNORE_INDEX] * (len(p) + len(r) + 1), eos),
        # labels point at a different response than the data row
        "rows_where_trained_tokens_do_not_decode_to_response": _single(
            p, r[:-1] + [eos], [IGNORE_INDEX] * len(p) + r[:-1] + [eos], eos),
    }
    for key, splits in broken.items():
        audit = audit_examples(splits, frame, tok)
        assert audit[key] == 1, key
        with pytest.raises(AuditError, match=key):
            check_audit(audit)


def test_run_tokenize_writes_loadable_splits_and_refuses_a_broken_audit(tmp_path, alpaca_prompts, tiny_model_dir,
                                                                          monkeypatch):
    model_dir = tiny_model_dir("llama")  # rotary: rows over its 512 positions run
    write_parquet(tmp_path / "prompts.parquet", alpaca_prompts)
    paths = [tmp_path / n for n in ("train.safetensors", "eval.safetensors", "rejected.parquet", "audit.json")]
    result = run_tokenize(tmp_path / "prompts.parquet", model_dir, *paths, max_length=1024)
    train = Examples.load(paths[0])
    assert torch.equal(train.input_ids, result.splits["train"].input_ids)
    assert torch.equal(train.labels, result.splits["train"].labels)
    assert train.eos_token_id == build_tokenizer().eos_token_id
    assert len(train) + len(Examples.load(paths[1])) == len(alpaca_prompts)
    assert read_json(paths[3])["rows_in"] == len(alpaca_prompts)
    assert len(read_parquet(paths[2])) == 0

    # A broken audit stops the stage before the token files are written, with the evidence in the error.
    for p in paths:
        p.unlink()
    import instructflow.tokenization as tokenization

    monkeypatch.setattr(tokenization, "audit_examples",
                        lambda *a: {"rows_missing_eos": 3, "mismatch_examples": []})
    with pytest.raises(AuditError, match="rows_missing_eos=3"):
        run_tokenize(tmp_path / "prompts.parquet", model_dir, *paths, max_length=1024)
    assert paths[3].exists() and not paths[0].exists()


BOS = "<s>"


def _bos_tokenizer():
    """conftest's tokenizer with a BOS the post-processor adds (add_special_tokens=True), as Llama's does,
    and a chat template that writes the BOS itself, as real ones do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from conftest import CHAT_TEMPLATE, PAD, _corpus

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=[EOS, PAD, BOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, tok.token_to_id(BOS))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, bos_token=BOS, unk_token=None,
                                   chat_template="{{ bos_token }}" + CHAT_TEMPLATE)


@pytest.mark.parametrize("template", ["chat", "alpaca"])
def test_exactly_one_bos_starts_every_row(clean_rows, template):
    """The chat template's text already holds the BOS: tokenize must not add a second one; a file
    template's text holds none, and the tokenizer adds its own."""
    from instructflow.render import render_prompts
    from instructflow.templates import load_template

    tok = _bos_tokenizer()
    bos = tok.bos_token_id
    assert tok("x")["input_ids"][0] == bos  # the tokenizer does add a BOS
    prompts = render_prompts(clean_rows, load_template(template), tokenizer=tok)
    assert prompts["prompt_has_special_tokens"].tolist() == [template == "chat"] * len(prompts)
    if template == "chat":
        assert prompts["prompt"].str.startswith(BOS).all()
    result = tokenize_prompts(prompts, tok, max_length=4096)
    assert result.audit["rows_kept"] == len(prompts)
    for examples in result.splits.values():
        for _, ids, _, _ in _rows(examples):
            ids = ids.tolist()
            assert ids[0] == bos and ids.count(bos) == 1, tok.decode(ids[:8])
    check_audit(result.audit)


def test_prompts_without_the_marker_column_keep_the_tokenizers_special_tokens(alpaca_prompts):
    """Prompts written before render marked chat rows: every prompt gets the tokenizer's special tokens."""
    tok = _bos_tokenizer()
    old = alpaca_prompts.drop(columns=["prompt_has_special_tokens"])
    result = tokenize_prompts(old, tok, max_length=4096)
    first = result.splits["train"].get(0)[0].tolist()
    assert first[0] == tok.bos_token_id and first.count(tok.bos_token_id) == 1


@pytest.mark.parametrize("arch", sorted(__import__("architectures").ARCHITECTURES))
def test_positions_are_hard_exactly_where_a_longer_row_fails(arch, tokenizer):
    """tokenize refuses a max_length over the model's positions only where training would then fail."""
    from conftest import build_model
    from instructflow.modeling import position_limit, positions_are_hard

    model = build_model(arch, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
    limit = position_limit(model.config)
    if limit is None:
        pytest.skip(f"{arch} has no position limit (ALiBi)")
    try:
        with torch.no_grad():
            model(torch.zeros(1, limit + 1, dtype=torch.long))
        fails = False
    except (IndexError, RuntimeError):
        fails = True
    assert positions_are_hard(model.config) == fails
