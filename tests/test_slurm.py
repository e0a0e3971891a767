"""The .test workflow on a real SLURM (Debian's slurm-wlm on this host, started by
scripts/slurm/local-slurm.sh) through --profile profiles/slurm, compared with a local run of the same
config: every job but the localrule prepare_model must go through sbatch, and the outputs must match.

A tiny random model replaces SmolLM2 (model.base is a local folder), so the test measures the
workflow and the scheduler, not a 135M model: the local and the SLURM run take about a minute each.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import REPO, build_model, build_tokenizer
from instructflow.checkpoint import list_checkpoints
from instructflow.io import read_jsonl

START = REPO / "scripts" / "slurm" / "local-slurm.sh"
CANNOT_START = 3  # local-slurm.sh: not root, or no Debian mirror to install from
# What a single-host SLURM without accounting and without GPUs needs on top of the profile; a real
# cluster needs none of these (docs/cluster.md). The node has 2 CPUs, so jobs ask for at most 2.
CLUSTER_OVERRIDES = [
    "--slurm-no-account", "--slurm-status-command", "squeue", "--slurm-keep-successful-logs",
    "--slurm-init-seconds-before-status-checks", "1", "--seconds-between-status-checks", "2",
    "--latency-wait", "5", "--retries", "0",
    "--set-resources", "train:gpu=0", "train:mem_mb=4000", "evaluate:mem_mb=3000", "evaluate_base:mem_mb=3000",
    "--set-threads", "train=2", "evaluate=2", "evaluate_base=2",
]


@pytest.fixture(scope="module")
def slurm():
    was_up = subprocess.run([str(START), "status"], capture_output=True, timeout=120).returncode == 0
    done = subprocess.run([str(START), "start"], capture_output=True, text=True, timeout=900)
    if done.returncode == CANNOT_START:
        pytest.skip(f"SLURM cannot be started on this machine: {done.stderr.strip()}")
    assert done.returncode == 0, f"local SLURM failed to start:\n{done.stdout}\n{done.stderr}"
    yield
    # Daemons this test started are not left running; a SLURM that was already up stays up.
    if not was_up:
        subprocess.run([str(START), "stop"], timeout=60)


def _workdir(root: Path, model_dir: Path) -> Path:
    shutil.copytree(REPO / ".test" / "config", root / "config")
    shutil.copytree(REPO / ".test" / "data", root / "data")
    # The .test config with the tiny model as the base: the only difference from `.test` itself.
    (root / "config" / "tiny.yaml").write_text(json.dumps({"model": {"base": str(model_dir)}}))
    return root


def _snakemake(workdir: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(workdir / "config" / "config.yaml"), str(workdir / "config" / "tiny.yaml"), *extra]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)


@pytest.fixture(scope="module")
def runs(slurm, tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm")
    tok = build_tokenizer()
    model = build_model("llama", len(tok), tok.eos_token_id, tok.pad_token_id)
    model.save_pretrained(root / "tiny", safe_serialization=True)
    tok.save_pretrained(root / "tiny")
    local = _workdir(root / "local", root / "tiny")
    cluster = _workdir(root / "cluster", root / "tiny")
    done = _snakemake(local, "--cores", "2")
    assert done.returncode == 0, done.stderr[-5000:]
    done = _snakemake(cluster, "--profile", str(REPO / "profiles" / "slurm"), *CLUSTER_OVERRIDES)
    assert done.returncode == 0, done.stderr[-5000:]
    return local, cluster, done.stderr


@pytest.mark.slow
def test_every_job_but_prepare_model_goes_through_sbatch(runs):
    _, cluster, log = runs
    submitted = re.findall(r"Job (\d+) has been submitted with SLURM jobid (\d+)", log)
    finished = re.findall(r"Finished jobid: (\d+)", log)
    # clean, render, tokenize, evaluate_base, train, evaluate, compare?, report... all but prepare_model
    # and the target rule `all` (both local) went to SLURM.
    local_rules = set(re.findall(r"localrule (\w+):", log))
    assert local_rules == {"prepare_model", "all"}, local_rules
    assert len(submitted) >= 6 and len(submitted) == len(finished) - len(local_rules), (submitted, finished)
    for _, slurm_id in submitted:
        # slurmctld itself confirms each id was a real job that completed (accounting is off, so
        # scontrol rather than sacct; MinJobAge keeps finished jobs listed for 5 minutes).
        info = subprocess.run(["scontrol", "show", "job", slurm_id], capture_output=True, text=True)
        assert "JobState=COMPLETED" in info.stdout, info.stdout + info.stderr
        # The plugin's per-job log, named by the SLURM job id, is where sbatch sent the output.
        assert list((cluster / ".snakemake" / "slurm_logs").rglob(f"{slurm_id}.log")), slurm_id
    train_log = (cluster / "logs" / "train" / "default.log").read_text()
    assert "Traceback" not in train_log


@pytest.mark.slow
def test_cluster_outputs_match_local(runs):
    local, cluster, _ = runs
    for table in ("results/data/default/clean.parquet", "results/data/default/rejected.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(local / table), pd.read_parquet(cluster / table))
    prompts = sorted((local / "results" / "prompts").rglob("*.parquet"))
    tokens = sorted((local / "results" / "tokens").rglob("*.safetensors"))
    assert prompts and tokens
    for path in prompts:
        rel = path.relative_to(local)
        pd.testing.assert_frame_equal(pd.read_parquet(path), pd.read_parquet(cluster / rel))
    for path in tokens:
        a, b = load_file(path), load_file(cluster / path.relative_to(local))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    run = Path("results/runs/default")
    one, two = read_jsonl(local / run / "train/metrics.jsonl"), read_jsonl(cluster / run / "train/metrics.jsonl")
    # Same threads and one process on the same host: the arithmetic is the same, so are the losses.
    assert [(r["step"], r["loss"], r["tokens"]) for r in one] == [(r["step"], r["loss"], r["tokens"]) for r in two]
    wa, wb = load_file(local / run / "model/model.safetensors"), load_file(cluster / run / "model/model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    ea, eb = (json.loads((d / run / "eval/metrics.json").read_text()) for d in (local, cluster))
    for model in ("base", "tuned"):
        # Generation speed is a measurement, not a result.
        quality = {k: v for k, v in ea[model].items() if not k.startswith("generation_")}
        assert quality == pytest.approx({k: eb[model][k] for k in quality}, rel=1e-6), model


@pytest.mark.slow
def test_reports_after_a_cluster_run(runs):
    local, cluster, _ = runs
    run_report = Path("results/runs/default/report.html")
    for d in (local, cluster):
        assert "<html" in (d / run_report).read_text().lower()
    # Snakemake's own report reads the run's metadata, wherever the jobs ran.
    done = _snakemake(cluster, "--report", str(cluster / "report.zip"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert (cluster / "report.zip").stat().st_size > 0


def _train_log_until(path: Path, pattern: str, proc: subprocess.Popen, timeout: float) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(pattern, path.read_text(errors="replace")) if path.exists() else None
        if found:
            return found
        assert proc.poll() is None, f"snakemake ended before {pattern!r}:\n{proc.stderr.read()[-3000:]}"
        time.sleep(1)
    raise AssertionError(f"no {pattern!r} in {path} after {timeout} s")


@pytest.mark.slow
def test_a_time_limit_mid_training_ends_in_a_checkpoint_and_the_rerun_resumes_there(slurm, tmp_path):
    """The profile asks SLURM for SIGTERM before the time limit; SLURM sends it to every process of the job
    step (snakemake's, the launcher, accelerate's, the trainer). The trainer finishes its step, checkpoints and
    exits 1 (not killed at the limit: the job FAILED, not TIMEOUT), and the rerun resumes at that step."""
    profile = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    extra = profile["set-resources"]["train"]["slurm_extra"]
    # Every process of the step, not "B:" (the batch shell only, which the trainer never hears of).
    assert re.fullmatch(r"'--signal=TERM@\d+'", extra), extra
    tok = build_tokenizer()
    build_model("llama", len(tok), tok.eos_token_id, tok.pad_token_id).save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    work = _workdir(tmp_path / "work", tmp_path / "tiny")
    steps = 1_000_000  # far more than fits in the limit: the signal always comes mid-training
    (work / "config" / "tiny.yaml").write_text(json.dumps({
        "model": {"base": str(tmp_path / "tiny")}, "train": {"max_steps": steps, "checkpoint_every": 0}}))
    # A 3-minute limit and the warning 70 s before it (the profile's 120 s would leave too little to train
    # in a test); SLURM may send it up to a minute early, so the trainer gets 50 to 110 s.
    limit = ["--set-resources", "train:runtime=3", "train:slurm_extra='--signal=TERM@70'", "--until", "train"]
    overrides = CLUSTER_OVERRIDES  # with --retries 0: the rerun below is started by hand, to watch it
    log = work / "logs" / "train" / "default.log"
    checkpoints = work / "results" / "runs" / "default" / "checkpoints"

    done = _snakemake(work, "--profile", str(REPO / "profiles" / "slurm"), *overrides, *limit)
    assert done.returncode != 0, "training cannot have finished a million steps"
    text = log.read_text(errors="replace")
    stop = re.search(rf"instructflow train: stopped by SIGTERM after step (\d+) of {steps}; checkpoint written to "
                     rf"(\S+); rerun to resume", text)
    assert stop, text[-3000:]
    k = int(stop.group(1))
    assert Path(stop.group(2)) == Path("results/runs/default/checkpoints") / f"step-{k:08d}"
    assert [int(p.name.split("-")[1]) for p in list_checkpoints(checkpoints)] == [k]
    assert [r["step"] for r in read_jsonl(checkpoints / "metrics.jsonl")] == list(range(1, k + 1))  # none lost
    slurm_id = re.search(r"rule train:.*?has been submitted with SLURM jobid (\d+)", done.stderr, re.S).group(1)
    info = subprocess.run(["scontrol", "show", "job", slurm_id], capture_output=True, text=True).stdout
    assert "JobState=FAILED" in info and "ExitCode=1:0" in info, info  # it stopped itself: not TIMEOUT

    # The rerun (what --retries or the user's next snakemake does) resumes at step k; stopped again by hand
    # (scancel --signal=TERM, as a preemption would) once it trained a step, it checkpoints that one.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    rerun = subprocess.Popen(
        [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(work), "--configfile",
         str(work / "config" / "config.yaml"), str(work / "config" / "tiny.yaml"), "--profile",
         str(REPO / "profiles" / "slurm"), *overrides, *limit],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _train_log_until(log, rf"resuming from checkpoint at step {k}\b", rerun, timeout=120)
        _train_log_until(checkpoints / "metrics.jsonl", rf'"step": {k + 1}\b', rerun, timeout=120)
        [job] = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()
        subprocess.run(["scancel", "--signal=TERM", job], check=True)
        assert rerun.wait(timeout=300) != 0
    finally:
        if rerun.poll() is None:
            rerun.kill()
    again = re.search(rf"stopped by SIGTERM after step (\d+) of {steps}", log.read_text(errors="replace"))
    assert again and int(again.group(1)) > k
    assert [r["step"] for r in read_jsonl(checkpoints / "metrics.jsonl")] == list(range(1, int(again.group(1)) + 1))
    assert list_checkpoints(checkpoints)[-1].name == f"step-{int(again.group(1)):08d}"
