"""Training in-process on a tiny random LLaMA: metrics contract, export, LoRA merge, gradient
accumulation invariance, packing, and resuming from a checkpoint."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

from instructflow.io import read_jsonl
from instructflow.templates import bundled_path
from instructflow.train import train


METRIC_KEYS = {"step", "loss", "lr", "grad_norm", "tokens", "trained_tokens", "elapsed_s"}
BASE = {"max_steps": 3, "batch_size": 4, "micro_batch_size": 2, "learning_rate": 1e-3, "warmup_steps": 1,
        "log_every": 1, "checkpoint_every": 0, "precision": "fp32", "seed": 1}


@pytest.fixture(scope="module")
def train_tokens(train_examples):
    return train_examples[1]


@pytest.fixture(scope="module")
def held_out_tokens(tmp_path_factory, alpaca_prompts):
    """The .test rows' held-out split, tokenized as train_examples is (19 rows)."""
    from conftest import build_tokenizer
    from instructflow.tokenization import tokenize_prompts

    path = tmp_path_factory.mktemp("held-out") / "eval.safetensors"
    tokenize_prompts(alpaca_prompts, build_tokenizer(), max_length=1024).splits["eval"].save(path)
    return path


def _train(tmp_path, model_dir, tokens, name="run", eval_path=None, **settings):
    run = tmp_path / name
    summary = train({**BASE, **settings}, model_dir=model_dir, train_path=tokens, out_dir=run / "model",
                    metrics_path=run / "metrics.jsonl", summary_path=run / "summary.json", workdir=run / "work",
                    eval_path=eval_path)
    return run, summary


def _losses(run):
    return [r["loss"] for r in read_jsonl(run / "metrics.jsonl")]


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_full_training_writes_metrics_and_a_loadable_model(tmp_path, tiny_model_dir, train_tokens):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = tiny_model_dir("llama")
    template = bundled_path("alpaca")
    run, summary = _train(tmp_path, model_dir, train_tokens, template_path=str(template))
    records = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert METRIC_KEYS <= set(r) and all(isinstance(r[k], (int, float)) for k in METRIC_KEYS)
        assert 0 < r["trained_tokens"] < r["tokens"] and r["grad_norm"] > 0
    assert [r["trained_tokens"] for r in records] == sorted(r["trained_tokens"] for r in records)
    assert summary["steps"] == 3 and summary["resumed_from_step"] == 0
    assert summary["trained_tokens"] == records[-1]["trained_tokens"]
    assert json.loads((run / "summary.json").read_text()) == summary

    out = run / "model"
    assert (out / "instructflow_template.yaml").read_text() == template.read_text()
    # The exported folder records the template's file name and content hash, no local absolute path.
    record = json.loads((out / "instructflow_training.json").read_text())
    assert "template_path" not in record and str(tmp_path) not in json.dumps(record) and str(template) not in json.dumps(record)
    assert record["template"] == "alpaca.yaml"
    assert record["template_sha256"] == hashlib.sha256(template.read_bytes()).hexdigest()
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    assert not torch.equal(model.model.embed_tokens.weight, base.model.embed_tokens.weight)
    ids = tok("### Instruction:\nWhat is 1 + 1?\n### Response:\n", return_tensors="pt")["input_ids"]
    generated = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] > ids.shape[1]


def test_epochs_decide_the_steps_and_every_row_is_seen_once_per_epoch(tmp_path, tiny_model_dir, train_tokens,
                                                                      monkeypatch):
    from instructflow import train as train_module
    from instructflow.examples import Examples

    rows = len(Examples.load(train_tokens))
    per_epoch = rows // BASE["batch_size"]  # full batches; an epoch's remainder rows wait for the next epoch
    seen = []
    real_step = train_module.train_step

    def counting_step(setup, wrapped, accelerator, examples, plan):
        seen.extend(r for micro in plan.micro_batches[0] for r in micro)
        return real_step(setup, wrapped, accelerator, examples, plan)

    monkeypatch.setattr(train_module, "train_step", counting_step)
    run, summary = _train(tmp_path, tiny_model_dir("llama"), train_tokens, epochs=2, max_steps=1)
    assert summary["steps"] == 2 * per_epoch and summary["epochs"] == 2.0
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == list(range(1, 2 * per_epoch + 1))
    first, second = seen[: per_epoch * BASE["batch_size"]], seen[per_epoch * BASE["batch_size"]:]
    assert len(set(first)) == len(first) == len(set(second)) == per_epoch * BASE["batch_size"]
    _, half = _train(tmp_path, tiny_model_dir("llama"), train_tokens, name="half", epochs=0.5)
    assert half["steps"] == math.ceil(per_epoch / 2)


def test_lora_exports_a_merged_plain_model(tmp_path, tiny_model_dir, train_tokens):
    from transformers import AutoModelForCausalLM

    model_dir = tiny_model_dir("llama")
    run, summary = _train(tmp_path, model_dir, train_tokens, method="lora", lora={"r": 4, "alpha": 8, "dropout": 0.0})
    out = run / "model"
    assert not list(out.glob("adapter_*"))
    weights = _weights(out)
    assert not any("lora" in name for name in weights)
    base = _weights(model_dir)
    assert set(weights) == set(base)
    changed = [name for name in base if not torch.equal(base[name], weights[name])]
    assert changed and all("proj" in name for name in changed)  # LoRA only touches the linear layers
    assert summary["trainable_parameters"] < sum(t.numel() for t in base.values()) / 5
    # Loading needs no peft: the class is the plain transformers model.
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__module__.startswith("transformers.models.llama")
    # The adapter alone, as a peft folder beside the merged weights: on the base model it gives the same logits.
    from peft import PeftModel

    adapter = out / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert str(tmp_path) not in (adapter / "adapter_config.json").read_text()  # no local path recorded
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter).eval()
    ids = torch.tensor([[5, 9, 12, 40, 7, 3]])
    with torch.no_grad():
        merged, adapted = model.eval()(ids).logits, with_adapter(ids).logits
    base_logits = AutoModelForCausalLM.from_pretrained(model_dir).eval()(ids).logits.detach()
    assert (merged - base_logits).abs().max() > 1e-4  # the adapter changes the model ...
    torch.testing.assert_close(adapted, merged, atol=1e-5, rtol=1e-5)  # ... and both ways agree


def test_lora_under_bf16_keeps_frozen_weights_in_bf16_and_merges_into_the_fp32_originals(tmp_path, tiny_model_dir,
                                                                                          train_tokens):
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    from instructflow.config import train_settings
    from instructflow.kernels.master_weights import bf16_frozen_weights
    from instructflow.modeling import load_model
    from instructflow.train import add_lora, merged_lora

    def build_model(model_dir, settings):
        return add_lora(load_model(model_dir)[0], settings)

    model_dir = tiny_model_dir("llama")
    settings = train_settings({"method": "lora", "lora": {"r": 4, "alpha": 8}})
    light = build_model(model_dir, settings)
    weights_file = str((model_dir / "model.safetensors").resolve())

    def mapped() -> bool:
        import gc

        gc.collect()
        return weights_file in Path("/proc/self/maps").read_text()
    assert mapped()  # loaded tensors view the file's memory map
    bf16_frozen_weights(light)
    # ... and none does once the frozen weights are bf16: the fp32 pages are no longer held resident.
    assert not mapped()
    dtypes = {name: p.dtype for name, p in light.named_parameters()}
    assert dtypes["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"] == torch.bfloat16
    assert dtypes["base_model.model.model.embed_tokens.weight"] == torch.float32
    assert all(dtype == torch.float32 for name, dtype in dtypes.items() if "lora_" in name)
    torch.manual_seed(0)
    for name, p in light.named_parameters():
        if "lora_B" in name:
            p.data.normal_(std=1e-3)  # an update far below bf16's resolution of the base weights
    reference = build_model(model_dir, settings)
    set_peft_model_state_dict(reference, get_peft_model_state_dict(light))
    expected = reference.merge_and_unload().state_dict()
    merged = merged_lora(light, model_dir, settings).state_dict()
    assert set(merged) == set(expected)
    for name, tensor in merged.items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, expected[name]), name

    # End to end: LoRA in bf16 exports fp32 weights; frozen, unadapted weights are the originals, bit for bit.
    run, _ = _train(tmp_path, model_dir, train_tokens, method="lora", precision="bf16", lora={"r": 4, "alpha": 8})
    assert _["precision_mode"] == "bf16-autocast"
    weights, base = _weights(run / "model"), _weights(model_dir)
    assert all(t.dtype == torch.float32 for t in weights.values())
    assert torch.equal(weights["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert not torch.equal(weights["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])


# masters: a bf16 model on fp32 masters, which export writes; kahan: bf16 weights and optimiser state,
# exported as weight + Kahan compensation.
@pytest.mark.parametrize("mode", ["masters", "kahan"])
def test_bf16_full_training_exports_fp32_weights_and_learns_as_autocast_does(tmp_path, tiny_model_dir, train_tokens,
                                                                             mode):
    model_dir = tiny_model_dir("llama")
    settings = {"max_steps": 6, "learning_rate": 3e-3, "precision": "bf16"}
    run, summary = _train(tmp_path, model_dir, train_tokens, mode, advanced={"bf16_mode": mode}, **settings)
    autocast, plain = _train(tmp_path, model_dir, train_tokens, "autocast", advanced={"bf16_mode": "autocast"},
                             **settings)
    assert summary["precision_mode"] == f"bf16-{mode}" and plain["precision_mode"] == "bf16-autocast"
    # The bf16 model gets the lean layers; under autocast the model keeps its own.
    assert summary["lean_layers"] == {"rms_norm": 5, "swiglu_mlp": 2} and plain["lean_layers"] == {}
    weights, base = _weights(run / "model"), _weights(model_dir)
    assert all(t.dtype == torch.float32 for t in weights.values())
    # fp32 values a bf16 weight cannot hold: what was exported is more than the bf16 model.
    q = weights["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(q, q.to(torch.bfloat16).float())
    assert not torch.equal(q, base["model.layers.0.self_attn.q_proj.weight"])
    # Same data, schedule and optimiser: the mixed-precision schemes learn the same.
    assert _losses(run)[-1] < _losses(run)[0]
    assert _losses(run) == pytest.approx(_losses(autocast), rel=0.02)


def test_gradient_accumulation_gives_the_same_trajectory(tmp_path, tiny_model_dir, train_tokens):
    model_dir = tiny_model_dir("llama")
    one, _ = _train(tmp_path, model_dir, train_tokens, "micro4", max_steps=4, micro_batch_size=4)
    four, _ = _train(tmp_path, model_dir, train_tokens, "micro1", max_steps=4, micro_batch_size=1)
    assert len(_losses(one)) == 4
    assert _losses(four) == pytest.approx(_losses(one), abs=1e-4)
    a, b = _weights(one / "model"), _weights(four / "model")
    # Four AdamW steps of 1e-3 move weights by ~4e-3; summation order alone leaves ~1e-5 (AdamW divides
    # by the root of tiny second moments, which amplifies rounding in a few elements of the 64-wide model).
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=3e-5)


def test_packing_gives_the_same_trajectory_as_padding(tmp_path, tiny_model_dir, train_tokens):
    model_dir = tiny_model_dir("llama")
    padded, unpacked = _train(tmp_path, model_dir, train_tokens, "padded", advanced={"packing": False})
    packed, summary = _train(tmp_path, model_dir, train_tokens, "packed")  # the default
    assert summary["packing"] is True and unpacked["packing"] is False
    assert _losses(packed) == pytest.approx(_losses(padded), abs=1e-4)


# masters: the checkpoint holds the fp32 masters; kahan: bf16 weights, the compensation in the optimiser state.
@pytest.mark.parametrize("precision, mode", [("fp32", "auto"), ("bf16", "masters"), ("bf16", "kahan")])
def test_resume_continues_where_the_checkpoint_stopped(tmp_path, tiny_model_dir, train_tokens, precision, mode):
    model_dir = tiny_model_dir("llama")
    settings = {"max_steps": 4, "checkpoint_every": 2, "precision": precision, "advanced": {"bf16_mode": mode}}
    run, first = _train(tmp_path, model_dir, train_tokens, **settings)
    assert first["resumed_from_step"] == 0
    uninterrupted = _weights(run / "model")
    losses = _losses(run)
    # Snakemake deletes a job's outputs before rerunning it; the work folder with checkpoints stays.
    import shutil

    shutil.rmtree(run / "model")
    (run / "metrics.jsonl").unlink()
    _, resumed = _train(tmp_path, model_dir, train_tokens, **settings)
    assert resumed["resumed_from_step"] == 2
    assert resumed["trained_tokens"] == first["trained_tokens"]
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3, 4]
    assert _losses(run) == pytest.approx(losses, abs=1e-5)
    weights = _weights(run / "model")
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(weights[name], tensor, rtol=1e-5, atol=1e-6)


def test_fewer_rows_than_one_batch_stops_before_the_model_loads(tmp_path, tiny_model_dir, train_tokens, monkeypatch):
    from instructflow import train as train_module
    from instructflow.examples import Examples

    rows = len(Examples.load(train_tokens))

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(train_module, "load_model", no_model)
    with pytest.raises(train_module.TrainingError) as err:
        _train(tmp_path, tiny_model_dir("llama"), train_tokens, batch_size=rows + 2, micro_batch_size=1)
    message = str(err.value)
    assert f"has {rows} rows, fewer than one batch (train.batch_size: {rows + 2})" in message
    assert "train.micro_batch_size" in message and "data.eval_fraction" in message


def test_a_batch_that_does_not_split_into_micro_batches_stops_before_the_model_loads(tmp_path, tiny_model_dir,
                                                                                      train_tokens, monkeypatch):
    """`instructflow train` run by hand (the workflow's config check says it first): one message, no traceback."""
    from instructflow import train as train_module

    monkeypatch.setattr(train_module, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(train_module.TrainingError, match=r"train.batch_size \(6\) must be a multiple of "
                       r"train.micro_batch_size \(4\) x processes \(1\) = 4: set train.batch_size to 4 or 8"):
        _train(tmp_path, tiny_model_dir("llama"), train_tokens, batch_size=6, micro_batch_size=4)


def test_fingerprint_follows_content_not_timestamps(tmp_path):
    import os
    from types import SimpleNamespace

    from instructflow.train import fingerprint

    tokens, model = tmp_path / "train.safetensors", tmp_path / "model"
    model.mkdir()
    tokens.write_bytes(b"tokens")
    (model / "model-00001-of-00002.safetensors").write_bytes(b"a")
    (model / "model-00002-of-00002.safetensors").write_bytes(b"b")
    setup = SimpleNamespace(applied={"precision_mode": "fp32"})
    first = fingerprint(BASE, setup, tokens, model)
    for path in (tokens, *model.iterdir()):
        os.utime(path, ns=(1, 1))  # touched, same bytes: the run resumes
    assert fingerprint(BASE, setup, tokens, model) == first
    tokens.write_bytes(b"tokenz")  # same size, other content
    assert fingerprint(BASE, setup, tokens, model) != first
    tokens.write_bytes(b"tokens")
    (model / "model-00002-of-00002.safetensors").write_bytes(b"c")  # a shard of the base weights
    assert fingerprint(BASE, setup, tokens, model) != first
    (model / "model-00002-of-00002.safetensors").write_bytes(b"b")
    assert fingerprint(BASE, setup, tokens, model) == first
    assert fingerprint(BASE, SimpleNamespace(applied={"precision_mode": "bf16-masters"}), tokens, model) != first


def test_fingerprint_cache_skips_unchanged_files_and_sees_an_in_place_edit(tmp_path, monkeypatch):
    import os
    from types import SimpleNamespace

    from instructflow import train as train_module

    tokens, model, cache = tmp_path / "train.safetensors", tmp_path / "model", tmp_path / "work" / "hashes.json"
    model.mkdir()
    tokens.write_bytes(b"tokens")
    (model / "model.safetensors").write_bytes(b"weights")
    setup = SimpleNamespace(applied={})
    read = []
    real = train_module.file_sha256
    monkeypatch.setattr(train_module, "file_sha256", lambda path: read.append(path.name) or real(path))
    first = train_module.fingerprint(BASE, setup, tokens, model, cache=cache)
    assert sorted(read) == ["model.safetensors", "train.safetensors"]
    read.clear()
    assert train_module.fingerprint(BASE, setup, tokens, model, cache=cache) == first and read == []
    stat = tokens.stat()
    tokens.write_bytes(b"tokenz")
    os.utime(tokens, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # mtime put back: ctime still moved
    assert train_module.fingerprint(BASE, setup, tokens, model, cache=cache) != first and read == ["train.safetensors"]
    cache.write_text("{torn")  # a damaged cache is only a cache
    assert train_module.fingerprint(BASE, setup, tokens, model, cache=cache) != first


def test_training_caps_onednn_primitive_cache_before_the_first_matmul(monkeypatch):
    """Packed micro-batches each bring new matmul shapes; oneDNN's default cache of 1,024 compiled kernels
    grows RSS over a run (the refactor that lost this cap cost ~90 MiB peak over 6 bench steps)."""
    from instructflow import train as train_module

    monkeypatch.delenv(train_module.ONEDNN_CACHE, raising=False)
    train_module.start_accelerator()
    assert train_module.os.environ[train_module.ONEDNN_CACHE] == "64"
    monkeypatch.setenv(train_module.ONEDNN_CACHE, "8")  # a user's own choice wins
    train_module.start_accelerator()
    assert train_module.os.environ[train_module.ONEDNN_CACHE] == "8"


# ------------------------------------------------------------------------------ held-out evaluation
def _evaluated(run) -> dict[int, float]:
    return {r["step"]: r["eval_loss"] for r in read_jsonl(run / "metrics.jsonl") if "eval_loss" in r}


def test_held_out_loss_every_n_steps_is_the_exported_models_loss_and_leaves_training_alone(
        tmp_path, tiny_model_dir, train_tokens, held_out_tokens):
    from transformers import AutoModelForCausalLM

    from instructflow.evaluate import eval_loss
    from instructflow.examples import Examples

    model_dir = tiny_model_dir("llama")
    settings = {"max_steps": 7, "log_every": 2, "eval_every": 3, "eval_rows": 5}
    run, summary = _train(tmp_path, model_dir, train_tokens, eval_path=held_out_tokens, **settings)
    records = read_jsonl(run / "metrics.jsonl")
    # Every third step and the last; each evaluation is a record (with the training keys: additive).
    assert list(_evaluated(run)) == [3, 6, 7]
    assert [r["step"] for r in records] == [2, 3, 4, 6, 7]
    assert all(METRIC_KEYS <= set(r) for r in records)
    assert (summary["evaluations"], summary["eval_every"], summary["eval_rows"]) == (3, 3, 5)
    losses = _evaluated(run)
    assert summary["best_eval_loss"] == min(losses.values()) and losses[summary["best_step"]] == min(losses.values())
    assert summary["exported"] == "last" and summary["exported_step"] == 7 and summary["stopped_early"] is False
    # The loss after the last step is the evaluate stage's loss of the exported model on the first 5 rows.
    held_out = Examples.load(held_out_tokens)
    first = Examples.from_rows([held_out.get(i) for i in range(5)], list(range(5)), [0] * 5, held_out.metadata)
    exported = AutoModelForCausalLM.from_pretrained(run / "model").eval()
    assert losses[7] == pytest.approx(eval_loss(exported, first)["eval_loss"], rel=1e-5)
    # Scoring held-out rows takes no gradient and no random number: the same weights as without it.
    plain, _ = _train(tmp_path, model_dir, train_tokens, "plain", **settings)
    assert not _evaluated(plain)
    weights, plain_weights = _weights(run / "model"), _weights(plain / "model")
    assert all(torch.equal(weights[name], plain_weights[name]) for name in weights)


@pytest.fixture(scope="module")
def one_answer_tokens(tmp_path_factory):
    """Train rows that all answer with token A, held-out rows of which one in four answers with token B: as
    training makes A more likely, the held-out loss falls (the A rows) and then rises again (the B rows), so the
    best step comes before the last (asserted where it matters, so a test says so if this stops holding)."""
    from conftest import build_tokenizer
    from instructflow.examples import IGNORE_INDEX, Examples

    tok = build_tokenizer()
    metadata = {"eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}

    def rows(n: int, answers: list[int], seed: int) -> Examples:
        g = torch.Generator().manual_seed(seed)
        made = []
        for i in range(n):
            prompt = torch.randint(2, len(tok), (int(torch.randint(4, 12, (1,), generator=g)),), generator=g).tolist()
            answer = [answers[i % len(answers)]] * 6
            made.append((prompt + answer, [IGNORE_INDEX] * len(prompt) + answer))
        return Examples.from_rows(made, list(range(n)), [len(ids) - 6 for ids, _ in made], metadata)

    folder = tmp_path_factory.mktemp("one-answer")
    rows(32, [100], seed=0).save(folder / "train.safetensors")
    rows(8, [100, 100, 100, 200], seed=1).save(folder / "eval.safetensors")
    return folder / "train.safetensors", folder / "eval.safetensors"


BEST = {"max_steps": 12, "lr_scheduler": "constant", "eval_every": 1, "export": "best", "checkpoint_every": 2,
        "lora": {"r": 4, "alpha": 8}}


# bf16-kahan: the checkpoint's bf16 weights and their Kahan compensation (in the optimiser state) make the fp32 export.
@pytest.mark.parametrize("method, learning_rate, precision", [("full", 0.01, "fp32"), ("lora", 0.03, "fp32"),
                                                              ("full", 0.01, "bf16")])
def test_export_best_writes_the_best_steps_weights_and_a_resumed_run_keeps_them(
        tmp_path, tiny_model_dir, one_answer_tokens, method, learning_rate, precision):
    import shutil

    model_dir, (tokens, held_out) = tiny_model_dir("llama"), one_answer_tokens
    settings = {**BEST, "method": method, "learning_rate": learning_rate, "precision": precision,
                "advanced": {"bf16_mode": "kahan"}}
    run, summary = _train(tmp_path, model_dir, tokens, eval_path=held_out, **settings)
    losses = _evaluated(run)
    best = min(losses, key=losses.get)
    assert summary["best_step"] == summary["exported_step"] == best and summary["exported"] == "best"
    assert best <= BEST["max_steps"] - 2 * BEST["checkpoint_every"], losses  # later checkpoints, pruned since
    exported = _weights(run / "model")
    # A run of exactly `best` steps (same batches and schedule up to there) exports the same weights ...
    short, _ = _train(tmp_path, model_dir, tokens, "short", **{**settings, "max_steps": best, "export": "last",
                                                               "eval_every": 0})
    assert all(torch.equal(exported[name], tensor) for name, tensor in _weights(short / "model").items())
    # ... which the last step's are not.
    _, last = _train(tmp_path, model_dir, tokens, "last", eval_path=held_out, **{**settings, "export": "last"})
    assert last["exported_step"] == 12 and last["best_step"] == best
    assert not all(torch.equal(exported[name], tensor) for name, tensor in _weights(tmp_path / "last" / "model").items())
    # The best step's checkpoint outlives the pruning (newest two kept); a rerun resumes and exports it again.
    kept = sorted(p.name for p in (run / "work").glob("step-*"))
    assert kept == [f"step-{best:08d}", "step-00000008", "step-00000010"]
    shutil.rmtree(run / "model")
    (run / "metrics.jsonl").unlink()
    _, resumed = _train(tmp_path, model_dir, tokens, eval_path=held_out, **settings)
    assert resumed["resumed_from_step"] == 10 and resumed["best_step"] == best
    assert resumed["evaluations"] == summary["evaluations"] == 12
    assert _evaluated(run) == pytest.approx(losses, abs=1e-6)
    assert all(torch.equal(exported[name], tensor) for name, tensor in _weights(run / "model").items())


def test_early_stopping_stops_after_patience_evaluations_without_a_lower_loss(
        tmp_path, tiny_model_dir, train_tokens, held_out_tokens, monkeypatch):
    model_dir = tiny_model_dir("llama")
    # A learning rate whose updates round away in fp32 (1e-30 against weights of ~0.02): the weights never
    # move, so no evaluation can beat the first one; both premises are checked below.
    settings = {"max_steps": 20, "learning_rate": 1e-30, "eval_every": 2, "early_stopping_patience": 3,
                "log_every": 5}
    run, summary = _train(tmp_path, model_dir, train_tokens, eval_path=held_out_tokens, **settings)
    losses = _evaluated(run)
    assert list(losses) == [2, 4, 6, 8] and len(set(losses.values())) == 1
    assert all(torch.equal(tensor, _weights(model_dir)[name]) for name, tensor in _weights(run / "model").items())
    assert summary["stopped_early"] is True and summary["stopped_early_at_step"] == summary["steps"] == 8
    assert summary["best_step"] == 2 and summary["exported_step"] == 8
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [2, 4, 5, 6, 8]
    # A signal after the step that stops early: training ends there as it would have (and exports), instead of
    # leaving a checkpoint that a rerun would resume past the early stop from.
    from instructflow import train as train_module

    calls = []
    monkeypatch.setattr(train_module.StopSignals, "stop_requested", lambda self, acc: calls.append(1) or len(calls) == 8)
    signalled, again = _train(tmp_path, model_dir, train_tokens, "signalled", eval_path=held_out_tokens, **settings)
    assert again["steps"] == 8 and again["stopped_early"] is True and (signalled / "model").is_dir()


def test_patience_counts_evaluations_since_the_best_one(monkeypatch):
    from instructflow import train as train_module
    from instructflow.config import train_settings

    rows = list(range(10))  # what HeldOut takes of the examples here: their count
    losses = iter([3.0, 2.0, 2.5, 1.0, 1.5, 1.0, float("nan")])
    monkeypatch.setattr(train_module, "held_out_loss", lambda *args: next(losses))
    settings = train_settings({"eval_every": 1, "early_stopping_patience": 3, "export": "best"})
    held_out = train_module.HeldOut(settings, rows, total=100, setup=None,
                                    accelerator=None)
    stops = []
    for done in range(1, 8):
        held_out.after_step(done)
        stops.append(held_out.stop_early)
    # An equal loss is no improvement, nor is nan; the counter starts over at each new best.
    assert stops == [False, False, False, False, False, False, True]
    assert (held_out.best_step, held_out.best_loss) == (4, 1.0)
    state = held_out.state_dict()
    fresh = train_module.HeldOut(settings, rows, total=100, setup=None, accelerator=None)
    fresh.load_state_dict(json.loads(json.dumps(state)))  # as a checkpoint's manifest keeps it
    assert fresh.state_dict() == state and fresh.stop_early


def test_export_best_or_early_stopping_without_held_out_rows_stops_with_the_keys(tmp_path, tiny_model_dir,
                                                                                 train_tokens):
    from instructflow.config import ConfigError, train_settings
    from instructflow.train import TrainingError

    with pytest.raises(ConfigError, match="config key export: best .*eval_every"):
        train_settings({"export": "best", "eval_every": 0})
    with pytest.raises(ConfigError, match="config key early_stopping_patience: 2 .*eval_every"):
        train_settings({"early_stopping_patience": 2, "eval_every": 0})
    with pytest.raises(TrainingError, match="train.export: best decide.*no held-out tokens"):
        _train(tmp_path, tiny_model_dir("llama"), train_tokens, export="best", eval_every=2)
