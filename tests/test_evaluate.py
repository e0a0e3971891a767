"""Evaluation on a tiny random Llama + WordLevel tokenizer built in the test (no Hub access)."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from instructflow.evaluate import (
    METRIC_KEYS,
    compare,
    eval_loss,
    evaluate_model,
    generate,
    load_model,
    normalize,
    run_evaluate,
    score,
)
from instructflow.examples import IGNORE_INDEX, Examples
from instructflow.io import read_json, read_parquet, write_parquet

PAD, EOS, UNK = 0, 1, 2
N_ROWS = 11


def _build_model_dir(path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "<eos>": EOS, "<unk>": UNK}
    for w in [f"w{i}" for i in range(40)]:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(path)

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        initializer_range=0.3,  # decisive logits: greedy choices are not near-ties
        pad_token_id=PAD,
        eos_token_id=EOS,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    return len(vocab)


def _write_data(tmp_path, vocab_size, responses=None):
    g = torch.Generator().manual_seed(1)
    rows, row_ids, prompt_lengths, texts = [], [], [], []
    for i in range(N_ROWS):
        p_len = int(torch.randint(2, 9, (1,), generator=g))
        r_len = int(torch.randint(1, 5, (1,), generator=g))
        prompt = torch.randint(3, vocab_size, (p_len,), generator=g).tolist()
        resp = torch.randint(3, vocab_size, (r_len,), generator=g).tolist()
        ids = prompt + resp + [EOS]
        labels = [IGNORE_INDEX] * p_len + resp + [EOS]
        rows.append((ids, labels))
        row_ids.append(100 + 7 * i)
        prompt_lengths.append(p_len)
        texts.append((" ".join(f"w{t - 3}" for t in prompt), " ".join(f"w{t - 3}" for t in resp)))
    ex = Examples.from_rows(rows, row_ids, prompt_lengths, {"eos_token_id": EOS, "pad_token_id": PAD})
    ex_path = tmp_path / "eval.safetensors"
    ex.save(ex_path)
    df = pd.DataFrame(
        {
            "row": row_ids[::-1],  # a different order than the token file: the join must use `row`
            "prompt": [t[0] for t in texts][::-1],
            "response": (responses if responses is not None else [t[1] for t in texts])[::-1],
            "split": ["eval"] * N_ROWS,
        }
    )
    prompts_path = tmp_path / "prompts.parquet"
    write_parquet(prompts_path, df)
    return ex_path, prompts_path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    model_dir = tmp / "model"
    vocab_size = _build_model_dir(model_dir)
    ex_path, prompts_path = _write_data(tmp, vocab_size)
    metrics, samples = evaluate_model(
        model_dir, ex_path, prompts_path, max_new_tokens=6, batch_size=4, max_samples=9, precision="fp32"
    )
    return dict(tmp=tmp, model_dir=model_dir, vocab_size=vocab_size, ex_path=ex_path,
                prompts_path=prompts_path, metrics=metrics, samples=samples)


def test_score_unit():
    s = score(["  a  b\n c ", "x y", "p q r", "", "Δ"], ["a b c", "x z", "p q r s", "", "Δ"])
    assert s["n"] == 5
    assert s["exact"] == [True, False, False, True, True]
    assert s["exact_match"] == pytest.approx(3 / 5)
    assert s["rouge_l_each"][0] == 1.0
    assert s["rouge_l_each"][1] == pytest.approx(0.5)
    # LCS 3 of pred 3 / ref 4 -> P=1, R=.75, F=6/7
    assert s["rouge_l_each"][2] == pytest.approx(6 / 7)
    assert s["rouge_l_each"][3] == 1.0 and s["rouge_l_each"][4] == 1.0  # exact match implies 1.0
    assert s["rouge_l"] == pytest.approx(sum(s["rouge_l_each"]) / 5)
    assert score([], []) == {"exact_match": None, "rouge_l": None, "chrf": None, "n": 0, "exact": [],
                             "rouge_l_each": [], "chrf_each": []}
    # chrF (sacrebleu, 0-100): exact matches score 100 (empty ones too), a closer answer scores higher.
    assert s["chrf_each"][0] == s["chrf_each"][3] == s["chrf_each"][4] == 100.0
    assert 0.0 <= s["chrf_each"][1] < s["chrf_each"][2] < 100.0
    assert 0.0 < s["chrf"] < 100.0
    assert score(["the cat sat"], ["the cat sat"])["chrf"] == 100.0
    assert score(["zzzz"], ["the cat sat"])["chrf"] == 0.0
    assert normalize(" a\t b \n") == "a b"
    with pytest.raises(ValueError):
        score(["a"], [])


def test_metrics_and_samples(setup):
    m, s = setup["metrics"], setup["samples"]
    assert set(m) == set(METRIC_KEYS)
    assert m["perplexity"] == pytest.approx(math.exp(m["eval_loss"]), rel=1e-12)
    assert 0.0 <= m["exact_match"] <= 1.0 and 0.0 <= m["rouge_l"] <= 1.0
    assert m["n"] == 9 and len(s) == 9
    assert m["n_loss_rows"] == N_ROWS
    ex = Examples.load(setup["ex_path"])
    assert m["n_loss_tokens"] == int((ex.labels != IGNORE_INDEX).sum())
    assert m["generation_seconds"] > 0 and m["generation_tokens_per_s"] > 0
    assert list(s.columns) == ["row", "prompt", "reference", "prediction", "exact", "rouge_l", "chrf",
                               "stopped_with_eos", "generated_tokens", "reference_tokens"]
    assert 0.0 <= m["chrf"] <= 100.0
    assert m["eos_rate"] == pytest.approx(s["stopped_with_eos"].mean())
    assert m["length_ratio"] == pytest.approx(s["generated_tokens"].sum() / s["reference_tokens"].sum())
    assert s["row"].tolist() == ex.row[:9].tolist()  # file order, not prompt-length order
    # joined on row: the prompt text is the decoded prompt tokens of that row
    texts = read_parquet(setup["prompts_path"]).set_index("row")
    for r, p in zip(s["row"], s["prompt"]):
        assert p == texts.at[r, "prompt"]
    assert s["exact"].dtype == bool
    assert any(len(p) for p in s["prediction"])  # the random model does generate something


def test_stopped_with_eos_is_whether_greedy_generation_emits_eos_in_time(setup):
    """Checked against the model's own generate, row by row, unbatched: EOS among the first max_new_tokens
    (6) new tokens exactly where the samples say the generation stopped with EOS."""
    model, _ = load_model(setup["model_dir"], torch.device("cpu"))
    ex = Examples.load(setup["ex_path"])
    s = setup["samples"]
    for i in range(len(s)):
        prompt = ex.prompt(i).long()[None]
        with torch.inference_mode():
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                                 eos_token_id=EOS, pad_token_id=PAD)
        new = out[0, prompt.shape[1]:].tolist()
        assert bool(s["stopped_with_eos"][i]) == (EOS in new), i
        assert s["generated_tokens"][i] == (new.index(EOS) if EOS in new else len(new)), i


def test_loss_matches_hand_computation(setup):
    model, _ = load_model(setup["model_dir"], torch.device("cpu"))
    ex = Examples.load(setup["ex_path"])
    total, count = 0.0, 0
    for i in range(len(ex)):
        ids, labels = ex.get(i)
        with torch.inference_mode():
            out = model(input_ids=ids.long()[None], labels=labels.long()[None])
        n = int((labels[1:] != IGNORE_INDEX).sum())
        total += float(out.loss) * n
        count += n
        if i == 0:  # one row on its own
            single = Examples.from_rows([(ids.tolist(), labels.tolist())], [0], [int(ex.prompt_lengths[0])],
                                        dict(ex.metadata))
            one = eval_loss(model, single, batch_size=1)
            assert one["eval_loss"] == pytest.approx(float(out.loss), rel=1e-5)
            assert one["n_loss_tokens"] == n
    assert setup["metrics"]["eval_loss"] == pytest.approx(total / count, rel=1e-5)


def test_left_padded_batches_match_one_at_a_time(setup):
    model, _ = load_model(setup["model_dir"], torch.device("cpu"))
    ex = Examples.load(setup["ex_path"])
    prompts = [ex.prompt(i) for i in range(len(ex))]
    assert len({len(p) for p in prompts}) > 1  # padding really happens
    kw = dict(eos_token_ids=[EOS], pad_token_id=PAD, max_new_tokens=8)
    batched, _ = generate(model, prompts, batch_size=5, **kw)
    single, _ = generate(model, prompts, batch_size=1, **kw)
    assert batched == single
    assert all(len(b) == 8 for b in batched if EOS not in b)

    # Stop at EOS: declare row 0's first greedy token an EOS; row 0 then yields nothing, and the
    # rows it shares a batch with are unaffected.
    stop = single[0][0]
    batched2, _ = generate(model, prompts, batch_size=len(prompts), eos_token_ids=[EOS, stop], pad_token_id=PAD,
                           max_new_tokens=8)
    # one-at-a-time greedy output cut at the first `stop` is what the batch must give
    expected = [s[: s.index(stop)] if stop in s else s for s in single]
    assert batched2[0] == [] and batched2 == expected
    assert all(stop not in b for b in batched2)

    # A checkpoint whose generation_config asks for sampling still decodes greedily, and its
    # config is left as it was.
    model.generation_config.do_sample = True
    model.generation_config.temperature = 1.5
    model.generation_config.max_length = 3
    again, _ = generate(model, prompts, batch_size=len(prompts), **kw)
    assert again == batched
    assert model.generation_config.do_sample is True and model.generation_config.temperature == 1.5


def test_exact_match_one_on_own_output(setup, tmp_path):
    own = setup["samples"]["prediction"].tolist()
    ex = Examples.load(setup["ex_path"])
    # references := the model's own greedy output (rows past max_samples keep something else)
    refs = own + ["unused"] * (N_ROWS - len(own))
    ex_path, prompts_path = _write_data(tmp_path, setup["vocab_size"], responses=refs)
    m, s = evaluate_model(setup["model_dir"], ex_path, prompts_path, max_new_tokens=6, batch_size=3,
                          max_samples=9, precision="fp32")
    assert m["exact_match"] == 1.0 and m["rouge_l"] == 1.0
    assert s["exact"].all()
    assert m["eval_loss"] == pytest.approx(setup["metrics"]["eval_loss"], rel=1e-5)  # batching-independent
    assert len(ex) == N_ROWS


def test_run_evaluate_compare_and_auto_dtype(setup, tmp_path):
    d = setup["tmp"]
    metrics = run_evaluate(setup["model_dir"], setup["ex_path"], setup["prompts_path"],
                           tmp_path / "base.json", tmp_path / "base.parquet",
                           max_new_tokens=4, batch_size=8, max_samples=5, precision="auto")
    assert read_json(tmp_path / "base.json") == metrics
    assert set(metrics) == set(METRIC_KEYS) and metrics["n"] == 5
    base = read_parquet(tmp_path / "base.parquet")
    assert len(base) == 5

    # a "tuned" run whose samples contain Markdown-hostile text
    tuned = base.copy()
    tuned.loc[0, "prediction"] = "a | b\nc"
    tuned.loc[1, "prediction"] = "x" * 10
    write_parquet(tmp_path / "tuned.parquet", tuned)
    tuned_metrics = dict(metrics, eval_loss=metrics["eval_loss"] - 0.5, exact_match=1.0)
    (tmp_path / "tuned.json").write_text(json.dumps(tuned_metrics))
    base_prompt = base.loc[0, "prompt"]
    long_prompt_rows = base.copy()
    long_prompt_rows.loc[0, "prompt"] = "p " * 300
    write_parquet(tmp_path / "base.parquet", long_prompt_rows)

    out = compare(tmp_path / "base.json", tmp_path / "tuned.json", tmp_path / "base.parquet",
                  tmp_path / "tuned.parquet", tmp_path / "combined.json", tmp_path / "samples.md")
    saved = read_json(tmp_path / "combined.json")
    assert saved == out and set(saved) == {"base", "tuned", "delta"}
    assert saved["delta"]["eval_loss"] == pytest.approx(-0.5)
    assert saved["delta"]["exact_match"] == pytest.approx(1.0 - metrics["exact_match"])
    assert saved["delta"]["n"] == 0
    md = (tmp_path / "samples.md").read_text()
    lines = md.strip().splitlines()
    assert lines[0] == "| row | prompt | reference | base | tuned |"
    assert len(lines) == 2 + 5
    assert "a \\| b<br>c" in lines[2]
    assert len(lines[2].split(" | ")) == 5  # the escaped pipe does not split the cell
    assert "p " * 50 in lines[2] and "p " * 120 not in lines[2]  # prompt truncated
    assert base_prompt  # unused otherwise
    assert d.exists()


def test_chat_rows_are_evaluated_on_their_last_assistant_turn(tmp_path, tiny_model_dir):
    """A held-out conversation: the loss covers its last assistant turn only, and the model generates that turn
    from everything before it (the rendered prompt); the reference is that turn."""
    from conftest import build_tokenizer
    from instructflow.render import render_prompts
    from instructflow.templates import load_template
    from instructflow.tokenization import check_audit, tokenize_prompts

    tok = build_tokenizer()
    conversations = [[{"role": "system", "content": "Be brief."}]
                     + [t for k in range(n) for t in ({"role": "user", "content": f"What is {k} plus {k}?"},
                                                      {"role": "assistant", "content": f"It is {2 * k}."})]
                     for n in (1, 2, 3)]
    clean = pd.DataFrame({"row": [1, 2, 3], "instruction": "", "input": "", "output": "",
                          "messages": [json.dumps(c) for c in conversations], "split": "eval"})
    prompts = render_prompts(clean, load_template("chat"), tokenizer=tok)
    result = tokenize_prompts(prompts, tok, max_length=512, train_on="all_assistant_turns")
    check_audit(result.audit)
    held_out = result.splits["eval"]
    assert result.audit["assistant_turns_trained"] == 3  # one per held-out row
    held_out.save(tmp_path / "eval.safetensors")
    write_parquet(tmp_path / "prompts.parquet", prompts)
    metrics, samples = evaluate_model(tiny_model_dir("llama"), tmp_path / "eval.safetensors",
                                      tmp_path / "prompts.parquet", max_new_tokens=4, precision="fp32")
    last_turns = [c[-1]["content"] for c in conversations]
    assert samples["reference"].tolist() == last_turns and metrics["n"] == 3
    assert metrics["n_loss_tokens"] == sum(len(tok(t, add_special_tokens=False)["input_ids"]) + 1 for t in last_turns)
    for i, row in enumerate(samples["row"]):
        prompt = samples["prompt"].iloc[i]
        assert prompt.endswith("<|assistant|>\n") and conversations[row - 1][-2]["content"] in prompt
        # The model generates from the row's tokens before its last turn: the prompt, with the EOS put after
        # each earlier turn (this template writes no end-of-turn token of its own).
        assert tok.decode(held_out.prompt(i)).replace("<|endoftext|>", "") == prompt


def test_bf16_evaluation_casts_the_model_once_and_scores_close_to_fp32(setup):
    """dtype bf16 evaluates a bf16 copy of the model (no autocast re-converting weights at every token);
    its held-out loss stays within bf16's rounding of fp32's."""
    from instructflow.evaluate import evaluation_model

    model, _ = evaluation_model(setup["model_dir"], torch.device("cpu"), bf16=True)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in evaluation_model(setup["model_dir"], torch.device("cpu"), bf16=False)[0].parameters()} \
        == {torch.float32}
    metrics, samples = evaluate_model(setup["model_dir"], setup["ex_path"], setup["prompts_path"], max_new_tokens=6,
                                      batch_size=4, max_samples=9, precision="bf16")
    assert metrics["eval_loss"] == pytest.approx(setup["metrics"]["eval_loss"], rel=0.02)
    assert metrics["n"] == setup["metrics"]["n"] == len(samples)


def test_evaluate_precision_is_a_config_key(monkeypatch):
    """evaluate.precision (auto by default) decides the evaluation model's dtype; auto follows the hardware and
    another value is refused by the schema, naming the key."""
    from instructflow import evaluate as evaluate_module, precision
    from instructflow.config import ConfigError, validate

    assert validate({})["evaluate"]["precision"] == "auto"
    assert validate({"evaluate": {"precision": "fp32"}})["evaluate"]["precision"] == "fp32"
    with pytest.raises(ConfigError, match="evaluate.precision"):
        validate({"evaluate": {"precision": "fp16"}})
    cpu = torch.device("cpu")
    assert evaluate_module._resolve_bf16("fp32", cpu) is False and evaluate_module._resolve_bf16("bf16", cpu) is True
    for native in (True, False):
        monkeypatch.setattr(precision, "bf16_supported", lambda device, native=native: native)
        assert evaluate_module._resolve_bf16("auto", cpu) is native


def test_one_pass_over_the_prompts_gives_the_two_passes_results(setup):
    """kernels/shared_prefill.py: evaluate_model ran the rows it generates for in one pass over their prompts; the
    loss and the generations are those of eval_loss and generate (fp32). (Every architecture: test_architectures.)"""
    from instructflow.kernels import shared_prefill
    from instructflow.evaluate import loss_function
    from instructflow.loss import response_loss_sum

    model, _ = load_model(setup["model_dir"], torch.device("cpu"))
    ex = Examples.load(setup["ex_path"])
    for fused in (True, False):  # the loss from the backbone's hidden states, and from the model's logits
        assert shared_prefill.agrees(model, fused=fused) is None
    assert loss_function(model) is not response_loss_sum  # evaluate_model took the fused form
    assert setup["metrics"]["eval_loss"] == pytest.approx(eval_loss(model, ex, batch_size=4)["eval_loss"], rel=1e-5)
    plain, _ = generate(model, [ex.prompt(i) for i in range(9)], eos_token_ids=[EOS], pad_token_id=PAD,
                        max_new_tokens=6, batch_size=4)
    assert setup["samples"]["generated_tokens"].tolist() == [len(t) for t in plain]
    tok = __import__("transformers").AutoTokenizer.from_pretrained(setup["model_dir"])
    assert setup["samples"]["prediction"].tolist() == [tok.decode(t, skip_special_tokens=True) for t in plain]


def test_a_model_whose_forward_drops_the_cache_keeps_two_passes(setup):
    """A forward that ignores the cache it is given (as remote code written for another cache API might) computes
    the responses without their prompts: the check sees it, and evaluation warns and runs the prompts twice."""
    from transformers import LlamaForCausalLM

    from instructflow import kernels
    from instructflow.evaluate import loss_and_generations
    from instructflow.kernels import shared_prefill

    class DropsCache(LlamaForCausalLM):
        def forward(self, *args, cache=None, **kwargs):
            return super().forward(*args, **kwargs)

    model = DropsCache.from_pretrained(setup["model_dir"]).eval()
    why = shared_prefill.agrees(model, fused=False)
    assert why is not None and "differs from the rows' own" in why
    assert "cache does not continue" in shared_prefill.agrees(model, fused=True)
    ex = Examples.load(setup["ex_path"])
    kernels._warned.clear()
    with pytest.warns(RuntimeWarning, match="evaluation runs the prompts twice for llama"):
        loss, generated, _ = loss_and_generations(model, ex, 9, [EOS], PAD, max_new_tokens=6, batch_size=4)
    assert loss["eval_loss"] == pytest.approx(setup["metrics"]["eval_loss"], rel=1e-5)
    assert [len(t) for t in generated] == setup["samples"]["generated_tokens"].tolist()


def test_prompt_batches_decode_together_and_finished_rows_leave(setup, monkeypatch):
    """kernels/decode.py: the prompt batches (4 + 4 + 1 rows) decode as one batch of 9, a row leaves it at its
    EOS, and every row's tokens are generate's; held under a cache size of one byte, or allowed no padding, each
    batch decodes alone."""
    from instructflow.evaluate import loss_and_generations, loss_function
    from instructflow.kernels import decode, shared_prefill

    model, _ = load_model(setup["model_dir"], torch.device("cpu"))
    ex = Examples.load(setup["ex_path"])
    assert loss_function(model) is not None and shared_prefill.agrees(model, fused=True) is None
    monkeypatch.setattr(shared_prefill, "agrees", lambda *a, **k: None)  # its probe's calls would count below
    prompts = [ex.prompt(i) for i in range(9)]
    first, _ = generate(model, prompts, eos_token_ids=[EOS], pad_token_id=PAD, max_new_tokens=6, batch_size=4)
    stop = [EOS, first[0][1], first[3][3]]  # tokens some rows pick early: those rows end there
    plain, _ = generate(model, prompts, eos_token_ids=stop, pad_token_id=PAD, max_new_tokens=6, batch_size=4)
    assert 2 <= len({len(t) for t in plain}) and min(len(t) for t in plain) < 6
    sizes: list[int] = []
    def one_column(_module, _args, kw):  # a decode step (the checks' calls run whole rows)
        if kw["input_ids"].shape[1] == 1:
            sizes.append(kw["input_ids"].shape[0])
    model.register_forward_pre_hook(one_column, with_kwargs=True)
    default = (decode.MAX_CACHE_BYTES, decode.MAX_PADDING)
    for cap, padding, first_sizes in ((*default, [9]), (1, default[1], [4, 4, 1]), (default[0], 0.0, [4, 4, 1])):
        monkeypatch.setattr(decode, "MAX_CACHE_BYTES", cap)
        monkeypatch.setattr(decode, "MAX_PADDING", padding)
        sizes.clear()
        _, generated, _ = loss_and_generations(model, ex, 9, stop, PAD, max_new_tokens=6, batch_size=4)
        assert generated == plain, cap
        # The loss's passes run the backbone (the fused loss), not the whole model.
        assert sizes[0] == first_sizes[0], (cap, padding, sizes)
        assert sum(s in first_sizes for s in sizes) >= len(first_sizes), (cap, padding, sizes)
        # Each row ran until its EOS (or 6 tokens), no step further: finished rows left the batch.
        assert sum(sizes) == sum(min(len(t) + 1, 6) for t in plain), (cap, padding, sizes)


def test_rows_are_grouped_by_the_prompt_prefix_they_share():
    """kernels/shared_prefill.py: a way the rows part at holds a group of its own where it has min_rows rows;
    a smaller one goes back to the rows of the prefix before it; a row's limit ends its prefix."""
    from instructflow.kernels.shared_prefill import prefix_limit, shared_prefixes

    prompts = {0: [1, 2, 3, 4, 5], 1: [1, 2, 3, 4, 6], 2: [1, 2, 3, 9, 9], 3: [1, 2, 7, 7, 7], 4: [1, 2, 3, 4, 8]}
    limits = {r: 4 for r in prompts}
    assert shared_prefixes(prompts, limits, 2) == [(4, [0, 1, 4]), (2, [2, 3])]
    assert shared_prefixes(prompts, limits, 3) == [(4, [0, 1, 4]), (2, [2, 3])]
    assert shared_prefixes(prompts, limits, 4) == [(3, [0, 1, 2, 4]), (2, [3])]
    assert shared_prefixes(prompts, limits, 6) == [(2, [0, 1, 2, 3, 4])]
    assert shared_prefixes(prompts, {**limits, 1: 3}, 2) == [(4, [0, 4]), (3, [1, 2]), (2, [3])]
    assert shared_prefixes({}, {}, 2) == []
    # Rows of like width run together where a call's cost (CALL_COLUMNS columns) is less than the padding saved.
    from instructflow.kernels import shared_prefill

    assert shared_prefill.CALL_COLUMNS == 16
    runs = shared_prefill.width_runs
    assert runs([]) == [] and runs([3]) == [slice(0, 1)] and runs([2, 3, 4, 5]) == [slice(0, 4)]
    assert runs([2, 3, 4, 40, 41]) == [slice(0, 3), slice(3, 5)]  # 5 x 41 = 205 columns against 12 + 82 + 2 x 16
    assert runs([1] * 30 + [60, 61]) == [slice(0, 30), slice(30, 32)]
    assert runs([10, 20, 40]) == [slice(0, 2), slice(2, 3)]  # 40 + 40 + 2 x 16 = 112 against 120 + 16
    assert runs([10, 12, 14]) == [slice(0, 3)]  # 42 + 16 = 58 against 24 + 14 + 2 x 16
    # Not the last prompt token (decoding starts there), nor a token that is a label's target.
    assert prefix_limit(torch.tensor([5, 6, 7, 8, 9]).masked_fill(torch.arange(5) < 3, IGNORE_INDEX), 3) == 2
    assert prefix_limit(torch.tensor([IGNORE_INDEX, 6, IGNORE_INDEX, 8, 9]), 3) == 0


def test_a_prompt_prefix_the_rows_share_runs_once(setup, monkeypatch):
    """Rows whose prompts start alike: the backbone runs that prefix once, for one row (45 token columns fewer
    than running each row's whole prompt, less the prefix's own 5), and the loss and the generations are still
    those of the two passes (fp32)."""
    from instructflow.evaluate import loss_and_generations
    from instructflow.kernels import shared_prefill

    model, _ = load_model(setup["model_dir"], torch.device("cpu"))
    ex = Examples.load(setup["ex_path"])
    preamble = [7, 8, 9, 10, 11]
    rows = [([*preamble, *ex.get(i)[0].tolist()], [IGNORE_INDEX] * 5 + ex.get(i)[1].tolist()) for i in range(9)]
    shared = Examples.from_rows(rows, list(range(9)), [5 + int(p) for p in ex.prompt_lengths[:9]],
                                {"eos_token_id": EOS, "pad_token_id": PAD})
    assert shared_prefill.agrees(model, fused=True) is None
    columns: list[int] = []  # the token columns each call of the backbone ran

    def count(_module, _args, kw):
        columns.append(kw["input_ids"].numel())
    model.model.register_forward_pre_hook(count, with_kwargs=True)
    loss, generated, _ = loss_and_generations(model, shared, 9, [EOS], PAD, max_new_tokens=6, batch_size=4)
    with_prefix = sum(columns)
    columns.clear()
    monkeypatch.setattr(shared_prefill, "shared_prefixes", lambda prompts, limits, n: [(0, list(prompts))])
    assert loss_and_generations(model, shared, 9, [EOS], PAD, max_new_tokens=6, batch_size=4)[1] == generated
    assert sum(columns) - with_prefix >= 9 * len(preamble) - len(preamble), (sum(columns), with_prefix)
    assert loss["eval_loss"] == pytest.approx(eval_loss(model, shared, batch_size=4)["eval_loss"], rel=1e-5)
    plain, _ = generate(model, [shared.prompt(i) for i in range(9)], eos_token_ids=[EOS], pad_token_id=PAD,
                        max_new_tokens=6, batch_size=4)
    assert generated == plain
