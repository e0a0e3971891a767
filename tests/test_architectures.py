"""Every architecture of the matrix (tests/architectures.py: one line each) on both training paths.

For each: the plain path and the fast path (kernels.apply) each give a micro-batch, packed where that
path packs for the architecture and padded where not, the loss of its rows run one by one (fp32, tight);
the two paths agree; three training steps on each path follow the same trajectory; a fallback warns,
naming the architecture and the reason. That every architecture also trains, evaluates and exports
through the workflow is test_workflow.py's (its runs are this matrix).
"""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch

from architectures import ARCHITECTURES
from instructflow.batching import collate
from instructflow.config import train_settings
from instructflow.io import read_jsonl
from instructflow import kernels
from instructflow.kernels import fused
from instructflow.train import build_setup, train

ROWS = list(range(4))  # 4 rows of the .test data: 400-odd tokens, within the tiny models' 512 positions
TIGHT = {"rel": 1e-5, "abs": 1e-5}
STEPS = {"max_steps": 3, "batch_size": 4, "micro_batch_size": 4, "learning_rate": 1e-3, "warmup_steps": 1,
         "log_every": 1, "checkpoint_every": 0, "precision": "fp32", "seed": 3}


@pytest.fixture(scope="module")
def examples(train_examples):
    return train_examples


@pytest.fixture(autouse=True)
def _fused_kernels_back_on():
    yield
    fused.enable(True)  # kernels.apply sets it per run: leave the process as it started


def _setup(model_dir, examples, fast: bool):
    # Unfused here, for exact fp32 comparisons; test_workflow.py runs the matrix with the compiled kernels.
    settings = train_settings({"precision": "fp32", "advanced": {"fast_path": fast, "fused_kernels": False}})
    kernels._warned.clear()  # each reason is said once per process; this asks afresh
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        setup = build_setup(settings, model_dir, torch.device("cpu"), "fp32",
                            longest_row=int(examples.lengths.max()))
    setup.model.eval()
    return setup, [str(w.message) for w in caught if "instructflow:" in str(w.message)]


def _loss(setup, examples, rows, pack: bool) -> float:
    batch = collate(examples, rows, pack=pack)
    with torch.no_grad():
        loss, _ = setup.loss(setup.model, batch["input_ids"], batch["labels"], batch["position_ids"],
                             **setup.forward_kwargs(batch, "cpu"))
    return float(loss)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_both_paths_give_each_rows_own_loss_and_agree(arch, tiny_model_dir, examples):
    examples, _ = examples
    model_dir = tiny_model_dir(arch)
    losses = {}
    for fast in (False, True):
        setup, messages = _setup(model_dir, examples, fast)
        alone = sum(_loss(setup, examples, [i], pack=False) for i in ROWS)
        assert setup.packs(int(examples.lengths[ROWS].sum())) == setup.packing
        together = _loss(setup, examples, ROWS, pack=setup.packing)
        assert together == pytest.approx(alone, **TIGHT), (arch, setup.applied)
        if setup.packing:  # a padded micro-batch is exact too (packing: false, a long micro-batch, evaluation)
            assert _loss(setup, examples, ROWS, pack=False) == pytest.approx(alone, **TIGHT), arch
        assert setup.applied["path"] == ("fast" if fast else "plain")
        # Where the fast path leaves a piece on the plain path, one warning says which architecture and why.
        assert all(arch_type(arch) in m for m in messages), messages
        losses[fast] = together
    assert losses[True] == pytest.approx(losses[False], **TIGHT), arch


def arch_type(arch: str) -> str:
    return ARCHITECTURES[arch][0]


def without_dropout(model_dir, dest):
    """A copy of the model folder with every dropout probability set to 0: the two paths draw their dropout
    masks differently, so only a deterministic model can follow one trajectory on both."""
    from transformers import AutoConfig

    shutil.copytree(model_dir, dest)
    config = AutoConfig.from_pretrained(dest)
    for name, value in vars(config).items():
        if ("dropout" in name or "pdrop" in name) and isinstance(value, float):
            setattr(config, name, 0.0)
    config.save_pretrained(dest)
    return dest


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_plain_and_fast_training_follow_the_same_trajectory(arch, tiny_model_dir, examples, tmp_path):
    _, tokens = examples
    model_dir = without_dropout(tiny_model_dir(arch), tmp_path / "model")
    runs = {}
    for fast in (False, True):
        out = tmp_path / ("fast" if fast else "plain")
        settings = {**STEPS, "advanced": {"fast_path": fast, "fused_kernels": False}}
        summary = train(settings, model_dir=model_dir, train_path=tokens, out_dir=out / "model",
                        metrics_path=out / "metrics.jsonl", summary_path=out / "summary.json", workdir=out / "work")
        runs[fast] = [r["loss"] for r in read_jsonl(out / "metrics.jsonl")], summary
    (plain, plain_summary), (fast, fast_summary) = runs[False], runs[True]
    assert plain_summary["architecture"] == fast_summary["architecture"] == arch_type(arch)
    # Stated tolerance: the same losses to 1e-4 relative after three AdamW steps in fp32 (the fused loss and
    # the lean layers round differently in the last bits, and AdamW's first steps amplify that a little).
    assert fast == pytest.approx(plain, rel=1e-4), (arch, fast_summary)
    # Where the input embedding is the output layer's weight, the fast path makes its lookup gradient sparse.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tied = model.get_input_embeddings().weight is model.get_output_embeddings().weight
    assert fast_summary["embedding_gradient"] == ("sparse (tied to the output layer)" if tied else "dense"), arch
    assert "embedding_gradient" not in plain_summary


@pytest.mark.parametrize("arch, reason", [
    ("gpt_neo", "take no registered attention function"),     # the 2023 script's model family
    ("falcon", "take no registered attention function"),
    ("stablelm", "do not pass the row boundaries"),           # its decoder layer drops them
    ("gemma2", "soft-caps scores"),
])
def test_row_by_row_attention_falls_back_with_one_warning(arch, reason, tiny_model_dir, examples):
    examples, _ = examples
    setup, messages = _setup(tiny_model_dir(arch), examples, fast=True)
    assert setup.applied["attention"] != "row-by-row (instructflow_segments)"
    [message] = [m for m in messages if "row-by-row attention" in m]
    assert arch_type(arch) in message and reason in message


def test_packing_pads_where_the_architecture_would_leak(tiny_model_dir, examples):
    # OPT and Bloom build their masks without the packed position ids: packed rows would see each other.
    examples, _ = examples
    for arch in ("opt", "bloom"):
        setup, messages = _setup(tiny_model_dir(arch), examples, fast=False)
        assert setup.packing is False and setup.applied["packing"] is False
        assert any("packed rows are not exact" in m and arch in m for m in messages), messages


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_packed_rows_may_pass_the_position_limit_only_where_positions_restart(arch, tmp_path, examples):
    """A packed row longer than the model's positions: rotary models pack it (each source row's positions
    restart at 0), still each row's own loss; a position table or GPT-Neo's causal buffer pads it instead."""
    from architectures import tiny_config
    from conftest import build_tokenizer
    from transformers import AutoModelForCausalLM

    from instructflow.modeling import position_limit, positions_are_hard

    examples, _ = examples
    lengths = [int(examples.lengths[i]) for i in ROWS]
    limit = max(lengths) + 8  # every row fits alone; the four packed do not
    assert limit < sum(lengths)
    tok = build_tokenizer()
    config = tiny_config(arch, len(tok), tok.eos_token_id, tok.pad_token_id)
    key = next((k for k in ("n_positions", "max_position_embeddings") if hasattr(config, k)), None)
    if key is None:
        pytest.skip(f"{arch} has no position limit (ALiBi): it packs any length")
    setattr(config, key, limit)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(tmp_path, safe_serialization=True)
    tok.save_pretrained(tmp_path)
    setup, _ = _setup(tmp_path, examples, fast=True)
    bounded = position_limit(setup.model.config) is not None and positions_are_hard(setup.model.config)
    assert setup.packs(sum(lengths)) == (setup.packing and not bounded), arch
    alone = sum(_loss(setup, examples, [i], pack=False) for i in ROWS)
    together = _loss(setup, examples, ROWS, pack=setup.packs(sum(lengths)))
    assert together == pytest.approx(alone, **TIGHT), (arch, setup.applied)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_evaluation_runs_the_prompts_once_with_the_same_results_or_says_why_not(arch, tiny_model_dir, examples,
                                                                                  monkeypatch):
    """kernels/shared_prefill.py: the loss and the generations from one pass over the prompts equal those of the
    two passes (fp32); where its check fails, one warning names the architecture and the two passes run. Each
    response width runs apart (the responses' pass on a selection of the prompts' cache)."""
    from instructflow.evaluate import eval_loss, generate, load_model, loss_and_generations
    from instructflow.kernels import shared_prefill

    monkeypatch.setattr(shared_prefill, "CALL_COLUMNS", 0)

    examples, _ = examples
    rows = examples.head(7)
    model, _ = load_model(tiny_model_dir(arch), torch.device("cpu"))
    kw = dict(eos_token_ids=[rows.eos_token_id], pad_token_id=rows.pad_token_id, max_new_tokens=5, batch_size=3)
    kernels._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss, generated, _ = loss_and_generations(model, rows, 5, **kw)
    messages = [str(w.message) for w in caught if "runs the prompts twice" in str(w.message)]
    plain_loss = eval_loss(model, rows, batch_size=3)
    plain_generated, _ = generate(model, [rows.prompt(i) for i in range(5)], **kw)
    assert loss["eval_loss"] == pytest.approx(plain_loss["eval_loss"], **TIGHT), (arch, messages)
    assert (loss["n_loss_tokens"], loss["n_loss_rows"]) == (plain_loss["n_loss_tokens"], plain_loss["n_loss_rows"])
    assert generated == plain_generated, (arch, messages)
    assert all(arch_type(arch) in m for m in messages), messages
    if arch in ("gpt_neo", "llama", "qwen2", "gpt_neox"):  # the 2023 script's family, SmolLM2's and the bench's
        assert not messages, messages
    print(arch, "two passes:" if messages else "one pass", *messages)


@pytest.mark.parametrize("call_columns", [16, 0])
@pytest.mark.parametrize("arch", ["mistral", "gemma2"])
def test_evaluation_in_one_pass_holds_past_a_sliding_window_and_for_one_token_prompts(arch, call_columns,
                                                                                      monkeypatch):
    """The prompts' cache is copied and continued past a 4-token sliding window (prompts of 5-15 tokens), and a
    batch of one-token prompts has no prompt pass at all: loss and generations still equal the two passes', also
    where each response width runs apart (CALL_COLUMNS 0)."""
    from architectures import tiny_config
    from conftest import build_tokenizer
    from transformers import AutoModelForCausalLM

    from instructflow.evaluate import eval_loss, generate, loss_and_generations
    from instructflow.examples import IGNORE_INDEX, Examples
    from instructflow.kernels import shared_prefill

    monkeypatch.setattr(shared_prefill, "CALL_COLUMNS", call_columns)

    tok = build_tokenizer()
    config = tiny_config(arch, len(tok), tok.eos_token_id, tok.pad_token_id)
    config.sliding_window = 4
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(1)
    rows, prompt_lengths = [], [1, 1, 1, 5, 9, 15, 7]
    for i, p in enumerate(prompt_lengths):
        ids = torch.randint(3, len(tok), (p + 2 + i % 3,), generator=generator).tolist()
        rows.append((ids, [IGNORE_INDEX] * p + ids[p:]))
    ex = Examples.from_rows(rows, list(range(len(rows))), prompt_lengths,
                            {"eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id})
    kw = dict(eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id, max_new_tokens=6, batch_size=3)
    kernels._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss, generated, _ = loss_and_generations(model, ex, 6, **kw)
    assert not [w for w in caught if "runs the prompts twice" in str(w.message)]  # the one pass was used
    assert loss["eval_loss"] == pytest.approx(eval_loss(model, ex, batch_size=3)["eval_loss"], **TIGHT)
    assert generated == generate(model, [ex.prompt(i) for i in range(6)], **kw)[0]
