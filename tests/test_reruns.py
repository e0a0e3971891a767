"""Reruns right by construction: each rule's code inputs come from codedeps.py, so touching any module
of the package reruns exactly the rules whose command imports it and what follows them; and parsing
the workflow imports no torch.

A finished tree is made cheaply: every output the dry run plans is created empty and `snakemake --touch`
marks them up to date (no stage runs), then each module's mtime is bumped in turn for one dry run."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, TEST_DATA, copy_code
from instructflow import codedeps

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
# Which rules read each rule's outputs (workflow/rules/*.smk; render reads the model only for chat templates).
READERS = {
    "prepare_model": {"tokenize", "train", "evaluate_base"},
    "clean": {"render", "report"},
    "render": {"tokenize", "evaluate_base", "evaluate"},
    "tokenize": {"train", "evaluate_base", "evaluate", "report"},
    "train": {"evaluate", "report", "compare_runs", "export_gguf", "track"},
    "evaluate_base": {"compare"},
    "evaluate": {"compare"},
    "compare": {"report", "compare_runs", "track"},
    "report": {"track"},
    "compare_runs": set(),
    "export_gguf": set(),
    "track": set(),
}
STAGE = {rule: "evaluate" if rule == "evaluate_base" else rule.replace("_", "-") for rule in READERS}
CONFIG = {
    "data": {"path": "data/instructions.csv", "eval_fraction": 0.2},
    "train": {"max_steps": 2, "batch_size": 4, "micro_batch_size": 2, "precision": "fp32"},
    # so the opt-in export_gguf and track rules are in the DAG
    "runs": {"default": {"export": {"gguf": ["q8_0"]}, "tracking": {"tensorboard": True}}},
}


def make_workdir(work: Path, model: Path) -> Path:
    (work / "data").mkdir(parents=True)
    (work / "config").mkdir()
    shutil.copy(TEST_DATA, work / "data" / "instructions.csv")
    (work / "config" / "config.yaml").write_text(yaml.safe_dump({**CONFIG, "model": {"base": str(model)}}))
    return work


def fake_model(folder: Path) -> Path:
    """Enough of a save_pretrained folder for the config check (a dry run never loads it)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    return folder


def snakemake(snakefile: Path, work: Path, *args: str, python_flags: tuple = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(snakefile.parent / "src")}
    cmd = [sys.executable, *python_flags, "-m", "snakemake", "-s", str(snakefile), "--directory", str(work),
           "--cores", "1", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def planned_rules(snakefile: Path, work: Path) -> set[str]:
    out = snakemake(snakefile, work, "-n", "--quiet", "rules").stdout
    rules = {m.group(1) for m in re.finditer(r"^(\w+)\s+\d+$", out, flags=re.M)} - {"total", "all"}
    assert rules or "Nothing to be done" in out, out
    return rules


def finish_by_touch(snakefile: Path, work: Path) -> None:
    """Create every planned output (empty), then let `--touch` mark them all up to date."""
    out = snakemake(snakefile, work, "-n").stdout
    for line in re.findall(r"^\s+output: (.+)$", out, flags=re.M):
        for path in (work / p.strip() for p in line.split(",")):
            rel = path.relative_to(work).as_posix()
            if re.fullmatch(r"results/models/[^/]+|results/runs/[^/]+/(model|tensorboard)", rel):  # directory() outputs
                path.mkdir(parents=True, exist_ok=True)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
    snakemake(snakefile, work, "--touch")


def expected_rules(module: Path, root: Path) -> set[str]:
    direct = {rule for rule, stage in STAGE.items() if module in codedeps.stage_files(stage, root)}
    todo, found = list(direct), set(direct)
    while todo:
        for reader in READERS[todo.pop()] - found:
            found.add(reader)
            todo.append(reader)
    return found


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("reruns")
    code = copy_code(root / "code")
    work = make_workdir(root / "work", fake_model(root / "tiny model"))
    snakefile = code / "Snakefile"
    finish_by_touch(snakefile, work)
    return snakefile, work


def test_a_finished_tree_has_nothing_to_do_and_parsing_imports_no_torch(finished):
    snakefile, work = finished
    proc = snakemake(snakefile, work, "-n", python_flags=("-X", "importtime"))
    assert "Nothing to be done" in proc.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "instructflow.config" in imported and "instructflow.codedeps" in imported
    # (pandas is there anyway: Snakemake's SLURM executor plugin imports it at start-up)
    assert not {"torch", "transformers"} & imported


def test_the_config_chain_common_smk_imports_leaves_out_torch():
    probe = ("import sys; import instructflow.config, instructflow.templates, instructflow.codedeps, "
             "instructflow.launch; print(sorted(m for m in ('torch', 'transformers', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], env={**os.environ, "PYTHONPATH": str(REPO / "src")},
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_touching_each_module_reruns_exactly_the_rules_that_import_it(finished):
    snakefile, work = finished
    root = snakefile.parent / "src" / "instructflow"
    modules = sorted(root.rglob("*.py"))
    assert len(modules) > 20
    wrong = {}
    for module in modules:
        stat = module.stat()
        os.utime(module, (time.time() + 60, time.time() + 60))  # newer than every output
        try:
            got = planned_rules(snakefile, work)
        finally:
            os.utime(module, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        want = expected_rules(module.resolve(), root.resolve())
        if got != want:
            wrong[module.relative_to(root).as_posix()] = {"reran": sorted(got), "expected": sorted(want)}
    assert not wrong, json.dumps(wrong, indent=1)
    assert planned_rules(snakefile, work) == set()
