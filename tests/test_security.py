"""Security: no pickle anywhere (caches are safetensors, NumPy or Parquet; models safetensors),
trust_remote_code off unless the config turns it on, and no config value can make the workflow write
outside results/."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from instructflow import config as ifconfig
from instructflow.prepare_model import prepare_model
from instructflow.templates import bundled_path

REPO = Path(__file__).resolve().parents[1]
CODE = sorted((REPO / "src" / "instructflow").glob("*.py")) + sorted((REPO / "workflow").rglob("*.smk")) + [
    REPO / "Snakefile"]

# Each of these loads or writes pickle, or runs code shipped with a model.
FORBIDDEN = {
    r"\bimport pickle\b|\bpickle\.|\bcloudpickle\b|\bjoblib\b|\bdill\b": "pickle",
    r"\.to_pickle\(|\bread_pickle\(": "pandas pickle",
    r"allow_pickle\s*=\s*True": "numpy pickle",
    r"safe_serialization\s*=\s*False": "a model saved as pickle",
    r"trust_remote_code\s*=\s*True": "remote code turned on in code, not by the config",
}


@pytest.mark.parametrize("path", CODE, ids=lambda p: str(p.relative_to(REPO)))
def test_no_pickle_and_no_hard_wired_remote_code(path):
    text = path.read_text(encoding="utf-8")
    for pattern, what in FORBIDDEN.items():
        assert not re.search(pattern, text), f"{path.name}: {what}"
    for call in re.findall(r"torch\.load\([^)]*\)", text):
        assert "weights_only=True" in call, f"{path.name}: {call} can unpickle arbitrary objects"


def test_trust_remote_code_is_off_by_default_and_documented():
    schema = ifconfig.load_schema()["properties"]["model"]["properties"]["trust_remote_code"]
    assert schema["default"] is False and "trust" in schema["description"]
    config_text = (REPO / "config" / "config.yaml").read_text()
    assert re.search(r"#.*code.*\n.*#?.*\n?\s*trust_remote_code: false", config_text)
    config = ifconfig.validate({})
    assert config["model"]["trust_remote_code"] is False


def test_prepare_model_passes_trust_remote_code_only_when_asked(tiny_model_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    seen = []
    for cls in (AutoModelForCausalLM, AutoTokenizer):
        real = cls.from_pretrained.__func__

        def spy(klass, *args, _real=real, **kwargs):
            seen.append(kwargs.get("trust_remote_code"))
            return _real(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    out = prepare_model(str(tiny_model_dir("llama")), tmp_path / "model")
    assert seen == [False, False]
    files = {p.name for p in out.iterdir()}
    assert "model.safetensors" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]


# --------------------------------------------------------------------------------- paths from config

def load(tmp_path, **edits) -> dict:
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    (tmp_path / "data.csv").write_text("instruction,input,output\nSay hi,,hi\n")
    config["data"]["path"] = "data.csv"
    config.update(edits)
    return ifconfig.load(config, tmp_path)[1]


@pytest.mark.parametrize("run", ["..", "../escape", "a/b", ".hidden", "/abs"])
def test_run_names_cannot_be_paths(tmp_path, run):
    with pytest.raises(ifconfig.ConfigError, match=r"^config key runs"):
        load(tmp_path, runs={run: {}})


def test_template_file_name_cannot_climb_out_of_results(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "..yaml").write_text(bundled_path("alpaca").read_text())
    with pytest.raises(ifconfig.ConfigError, match=r"^config key template: gives the folder name '\.-[0-9a-f]{8}'"):
        load(tmp_path, template="t/..yaml")


def test_model_file_name_cannot_climb_out_of_results(tmp_path):
    # "results/models/.." is results/ itself, which prepare_model would replace.
    (tmp_path / "...gguf").write_bytes(b"")
    with pytest.raises(ifconfig.ConfigError, match=r"^config key model\.base: gives the folder name '\.\.'"):
        load(tmp_path, model={"base": "./...gguf"})
    with pytest.raises(ifconfig.ConfigError, match=r"^config key runs\.x\.model\.base: gives the folder name"):
        load(tmp_path, runs={"x": {"model": {"base": "./...gguf"}}})


def test_ordinary_names_pass(tmp_path, tiny_model_dir):
    runs = load(tmp_path, model={"base": str(tiny_model_dir("llama"))}, runs={"lr1e-4": {}, "b.2": {}})
    for run in runs.values():
        assert ifconfig.SAFE_NAME.fullmatch(run["model_key"])
