"""Faults: kill -9 mid-training then resume, corrupt or partial checkpoints, a NaN loss, a full disk or
an unwritable folder. Training runs on a tiny random LLaMA and tokens made by the library itself."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from instructflow import train as train_module
from instructflow.checkpoint import BackgroundWriter, CheckpointError, latest_valid, list_checkpoints, load_checkpoint, save_checkpoint
from instructflow.io import read_jsonl
from instructflow.tokenization import tokenize_prompts

REPO = Path(__file__).resolve().parents[1]
# Resumed and uninterrupted runs are the same fp32 computation on the same batches from the same
# state; they agree to rounding (measured: identical on this CPU). The tolerance allows a different
# thread count to reorder float sums.
LOSS_TOLERANCE = 1e-4
SETTINGS = {"max_steps": 120, "batch_size": 4, "micro_batch_size": 4, "warmup_steps": 2, "learning_rate": 1e-3,
            "log_every": 1, "checkpoint_every": 10, "precision": "fp32", "seed": 0}


@pytest.fixture(scope="module")
def job(tiny_model_dir, alpaca_prompts, tmp_path_factory):
    """A tiny model folder and its train tokens, as the train rule gets them."""
    from transformers import AutoTokenizer

    model_dir = tiny_model_dir("llama")
    tokens = tmp_path_factory.mktemp("tokens") / "train.safetensors"
    result = tokenize_prompts(alpaca_prompts, AutoTokenizer.from_pretrained(model_dir), max_length=256)
    result.splits["train"].save(tokens)
    return {"model": model_dir, "train": tokens}


def train_args(job, out: Path, settings: dict) -> list[str]:
    return ["--settings", json.dumps(settings), "--model", str(job["model"]), "--train", str(job["train"]),
            "--out", str(out / "model"), "--metrics", str(out / "metrics.jsonl"),
            "--summary", str(out / "summary.json"), "--workdir", str(out / "checkpoints")]


def start_training(job, out: Path, settings: dict = SETTINGS) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "instructflow.train", *train_args(job, out, settings)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_checkpoint(proc: subprocess.Popen, folder: Path, past_step: int) -> None:
    while not any(int(p.name.split("-")[1]) > past_step for p in list_checkpoints(folder)):
        assert proc.poll() is None, "training ended before a checkpoint was written:\n" + proc.stdout.read()
        time.sleep(0.02)


def losses(path: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(path)}


@pytest.mark.slow
def test_kill_9_then_rerun_resumes_and_matches_an_uninterrupted_run(job, tmp_path):
    reference = start_training(job, tmp_path / "reference")
    out = tmp_path / "killed"
    proc = start_training(job, out)
    wait_for_checkpoint(proc, out / "checkpoints", past_step=1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "model").exists() and not (out / "summary.json").exists()
    last_logged = max(losses(out / "checkpoints" / "metrics.jsonl"))
    assert last_logged < SETTINGS["max_steps"], "killed too late to test resuming"

    rerun = start_training(job, out)
    assert rerun.wait() == 0, rerun.stdout.read()
    assert reference.wait() == 0, reference.stdout.read()
    summary = json.loads((out / "summary.json").read_text())
    resumed = summary["resumed_from_step"]
    assert resumed > 1 and resumed % SETTINGS["checkpoint_every"] == 0
    assert last_logged - resumed <= SETTINGS["checkpoint_every"]  # at most one interval lost
    assert summary["steps"] == SETTINGS["max_steps"]

    got, want = losses(out / "metrics.jsonl"), losses(tmp_path / "reference" / "metrics.jsonl")
    assert list(got) == list(range(1, SETTINGS["max_steps"] + 1))  # the step count continues, no repeats
    assert max(abs(got[s] - want[s]) for s in got) <= LOSS_TOLERANCE
    tuned = load_file(str(out / "model" / "model.safetensors"))
    ref = load_file(str(tmp_path / "reference" / "model" / "model.safetensors"))
    assert max(float((tuned[k] - ref[k]).abs().max()) for k in ref) <= LOSS_TOLERANCE


def metric_lines(path: Path) -> int:
    try:
        return sum(1 for line in path.read_text().splitlines() if line.endswith("}"))
    except OSError:
        return 0


@pytest.mark.slow
def test_sigterm_mid_training_checkpoints_the_step_and_the_rerun_matches_an_uninterrupted_run(job, tmp_path):
    k = random.Random(20261202).randint(3, 60)  # the step to signal after (fixed seed: reproducible)
    reference = start_training(job, tmp_path / "reference")
    out = tmp_path / "stopped"
    proc = start_training(job, out)
    log = out / "checkpoints" / "metrics.jsonl"
    while metric_lines(log) < k:
        assert proc.poll() is None, "training ended before the signal:\n" + proc.stdout.read()
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # on SLURM the launcher and Snakemake pass theirs on too: still one stop
    output = proc.communicate()[0]
    assert proc.returncode == 1, output
    [line] = [line for line in output.splitlines() if "stopped by SIGTERM" in line]
    ckpt = load_checkpoint(list_checkpoints(out / "checkpoints")[-1])
    assert ckpt["step"] >= k  # the step running when the signal came, or the next: none lost
    assert f"stopped by SIGTERM after step {ckpt['step']} of {SETTINGS['max_steps']}" in line
    assert f"step-{ckpt['step']:08d}" in line and "rerun to resume" in line
    assert ckpt["step"] < SETTINGS["max_steps"], "signalled too late to test resuming"
    assert not (out / "model").exists() and not (out / "summary.json").exists()

    rerun = start_training(job, out)
    assert rerun.wait() == 0, rerun.stdout.read()
    assert reference.wait() == 0, reference.stdout.read()
    assert json.loads((out / "summary.json").read_text())["resumed_from_step"] == ckpt["step"]
    got, want = losses(out / "metrics.jsonl"), losses(tmp_path / "reference" / "metrics.jsonl")
    assert list(got) == list(range(1, SETTINGS["max_steps"] + 1))
    assert max(abs(got[s] - want[s]) for s in got) <= LOSS_TOLERANCE
    tuned = load_file(str(out / "model" / "model.safetensors"))
    ref = load_file(str(tmp_path / "reference" / "model" / "model.safetensors"))
    assert max(float((tuned[k] - ref[k]).abs().max()) for k in ref) <= LOSS_TOLERANCE


def test_sigint_in_process_stops_after_the_step_and_restores_the_old_handlers(job, tmp_path, monkeypatch, capsys):
    real_loss = train_module.response_loss_sum
    calls = []

    def loss_then_ctrl_c(model, ids, labels, pos, **kwargs):  # one micro-batch per step: call 3 is step 3
        calls.append(1)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGINT)
        return real_loss(model, ids, labels, pos, **kwargs)

    monkeypatch.setattr(train_module, "response_loss_sum", loss_then_ctrl_c)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    settings = {**SETTINGS, "max_steps": 6, "checkpoint_every": 0, "advanced": {"fast_path": False}}
    code, err = run_main(job, tmp_path, settings, capsys)
    assert code == 1
    assert f"stopped by SIGINT after step 3 of 6; checkpoint written to {tmp_path / 'checkpoints' / 'step-00000003'}" \
        in err and "rerun to resume" in err
    assert {s: signal.getsignal(s) for s in before} == before
    assert [load_checkpoint(p)["step"] for p in list_checkpoints(tmp_path / "checkpoints")] == [3]
    assert [r["step"] for r in read_jsonl(tmp_path / "checkpoints" / "metrics.jsonl")] == [1, 2, 3]
    monkeypatch.setattr(train_module, "response_loss_sum", real_loss)
    code, err = run_main(job, tmp_path, settings, capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "summary.json").read_text())["resumed_from_step"] == 3


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_to_every_process_of_the_launch_still_ends_in_a_checkpoint(job, tmp_path, processes):
    """What SLURM's warning signal does (test_slurm.py runs the real one): SIGTERM to the launcher, accelerate's
    launcher and the trainers at once. The trainers act; the launchers wait for them, so none is killed while
    the checkpoint is written, and the stage's status is the trainers' 1. With two processes (gloo on the CPU)
    torch's elastic agent passes the signal on and waits (launch.py gives it 300 s), both stop after the same
    step, and rank 0 writes that step's checkpoint."""
    out = tmp_path / "launched"
    args = train_args(job, out, {**SETTINGS, "max_steps": 100_000, "micro_batch_size": 4 // processes})
    proc = subprocess.Popen([sys.executable, "-m", "instructflow", "train", "--run", f"sigterm-{processes}",
                             "--threads", str(processes), "--processes", str(processes), *args],
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    while metric_lines(out / "checkpoints" / "metrics.jsonl") < 3:
        assert proc.poll() is None, "training ended before the signal:\n" + proc.stdout.read()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 1, output
    steps = {int(n) for n in re.findall(r"stopped by SIGTERM after step (\d+) of 100000", output)}
    assert len(steps) == 1, output  # every rank stops after the same step
    assert [load_checkpoint(p)["step"] for p in list_checkpoints(out / "checkpoints")][-1] == steps.pop()
    # No trainer fails otherwise (with two, torch's elastic agent itself ends on a traceback of the signal it got).
    assert "Traceback" not in output if processes == 1 else not re.search(r"\[rank\d\]:.*Traceback", output), output
    assert output.strip().splitlines()[-1].startswith("instructflow train: the training processes exited with status 1")


def test_sigterms_passed_on_after_the_stop_do_not_kill_the_exiting_process():
    """On SLURM the scheduler's SIGTERM is followed by the launcher's and Snakemake's; one that lands after
    the checkpoint is written (the loop has left StopSignals) must not turn "stopped, exit 1" into "killed"."""
    script = (
        "import os, signal, time\n"
        "from instructflow.train import StopSignals\n"
        "with StopSignals() as stop:\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "assert stop.received == signal.SIGTERM\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "time.sleep(0.2)\n"
        "raise SystemExit(1)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr


# ------------------------------------------------------------------------------------- checkpoints

def save(folder: Path, step: int, value: float = 1.0, fingerprint: str = "fp", **kw) -> Path:
    weight = torch.full((4, 4), value)
    optimizer = {"state": {0: {"step": torch.tensor(float(step)), "exp_avg": weight * 0.1}},
                 "param_groups": [{"lr": 1e-3, "params": [0]}]}
    return save_checkpoint(folder, step, trainable={"w": weight}, optimizer_state=optimizer,
                           scheduler_state={"last_epoch": step}, fingerprint=fingerprint,
                           extra={"tokens": step}, **kw)


def test_checkpoint_round_trip_holds_only_safetensors_and_json(tmp_path):
    path = save(tmp_path, 5, value=2.0)
    ckpt = load_checkpoint(path)
    assert ckpt["step"] == 5 and torch.equal(ckpt["trainable"]["w"], torch.full((4, 4), 2.0))
    assert torch.equal(ckpt["optimizer"]["state"][0]["exp_avg"], torch.full((4, 4), 0.2))
    assert {p.suffix for p in path.iterdir()} == {".safetensors", ".json"}


@pytest.mark.parametrize("damage", ["flip_a_weight", "truncate", "no_manifest", "missing_file", "bad_manifest"])
def test_a_damaged_newest_checkpoint_is_skipped(tmp_path, damage):
    save(tmp_path, 10, value=1.0)
    newest = save(tmp_path, 20, value=2.0)
    weights = newest / "trainable.safetensors"
    if damage == "flip_a_weight":  # still a valid safetensors file: only the checksum can tell
        save_file({"w": torch.full((4, 4), 3.0)}, str(weights))
    elif damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:40])
    elif damage == "no_manifest":
        (newest / "manifest.json").unlink()
    elif damage == "missing_file":
        (newest / "rng.safetensors").unlink()
    else:
        (newest / "manifest.json").write_text('{"step": 20')
    with pytest.raises(CheckpointError):
        load_checkpoint(newest)
    skipped = []
    ckpt = latest_valid(tmp_path, "fp", log=skipped.append)
    assert ckpt["step"] == 10 and torch.equal(ckpt["trainable"]["w"], torch.full((4, 4), 1.0))
    assert len(skipped) == 1 and "step-00000020" in skipped[0]


def test_partial_write_and_other_runs_checkpoints_are_ignored(tmp_path):
    save(tmp_path, 10)
    partial = tmp_path / ".step-00000020.tmp"  # a process killed while writing step 20
    partial.mkdir()
    (partial / "trainable.safetensors").write_bytes(b"\0" * 10)
    save(tmp_path, 30, fingerprint="other settings")
    assert latest_valid(tmp_path, "fp", log=lambda _: None)["step"] == 10
    save(tmp_path, 40)
    assert not partial.exists()  # the next write clears what a killed one left
    # keep=2 per fingerprint: this run's 10 and 40, the other run's 30
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000010", "step-00000030", "step-00000040"]


def test_retention_never_deletes_this_runs_checkpoints_for_an_older_runs_higher_steps(tmp_path):
    # An older run (other settings) got to step 90 and left its checkpoints; a new run starts over.
    for step in (80, 90):
        save(tmp_path, step, fingerprint="older run")
    for step in (10, 20, 30):
        save(tmp_path, step, fingerprint="new run")
        assert latest_valid(tmp_path, "new run", log=lambda _: None)["step"] == step
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["step-00000020", "step-00000030", "step-00000080", "step-00000090"]
    assert latest_valid(tmp_path, "older run", log=lambda _: None)["step"] == 90


def test_a_torn_last_line_of_the_metrics_log_does_not_stop_a_resume(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.9}\n{"step": 3, "lo')
    with pytest.warns(RuntimeWarning, match="skipping damaged line 3"):
        train_module.start_log(log, 2)
    assert read_jsonl(log) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.9}]
    log.write_text('{"step": 1, "lo\n')
    with pytest.raises(ValueError):  # elsewhere a damaged file still raises
        read_jsonl(log)


def test_unwritable_checkpoint_folder_is_a_clear_error(tmp_path):
    # Running as root ignores permission bits, so the unwritable folder is a path under a regular file.
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*file/ckpt/step-00000005.*Free disk space"):
        save(blocker / "ckpt", 5)


def test_background_writer_stores_the_state_at_submit_and_hands_its_error_to_wait(tmp_path):
    weight = torch.full((4, 4), 2.0)
    optimizer = {"state": {0: {"exp_avg": weight * 0.1}}, "param_groups": [{"lr": 1e-3, "params": [0]}]}
    extra = {"tokens": 7}
    with BackgroundWriter() as writer:
        writer.submit(tmp_path, 3, trainable={"w": weight}, optimizer_state=optimizer,
                      scheduler_state={"last_epoch": 3}, fingerprint="fp", extra=extra)
        rng = torch.get_rng_state()
        extra["tokens"] = 8  # the small parts are copied at submit (the tensors are not: the caller waits)
        torch.rand(3)  # the RNG moves on, as the next step's dropout would
    # Leaving the block waited for the write: the checkpoint is complete, with the RNG state of the submit.
    ckpt = load_checkpoint(tmp_path / "step-00000003")
    assert torch.equal(ckpt["trainable"]["w"], weight) and torch.equal(ckpt["rng"], rng)
    assert torch.equal(ckpt["optimizer"]["state"][0]["exp_avg"], weight * 0.1)
    assert ckpt["extra"] == {"tokens": 7} and not list(tmp_path.glob(".*.tmp"))

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    writer = BackgroundWriter()
    writer.submit(blocker / "ckpt", 4, trainable={"w": weight}, optimizer_state=optimizer, scheduler_state={},
                  fingerprint="fp")
    with pytest.raises(CheckpointError, match="cannot write checkpoint"):
        writer.wait()
    writer.wait()  # the error is handed over once


# ------------------------------------------------------------------------------------- NaN, disk

def run_main(job, out: Path, settings: dict, capsys) -> tuple[int, str]:
    try:
        train_module.main(train_args(job, out, settings))
    except SystemExit as exit_:
        return int(exit_.code), capsys.readouterr().err
    return 0, capsys.readouterr().err


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(job, tmp_path, monkeypatch, capsys):
    real_loss = train_module.response_loss_sum
    calls = []

    def loss_that_turns_nan(model, ids, labels, pos, **kwargs):  # one micro-batch per step: call 7 is step 7
        calls.append(1)
        loss, count = real_loss(model, ids, labels, pos, **kwargs)
        return (loss * float("nan"), count) if len(calls) >= 7 else (loss, count)

    monkeypatch.setattr(train_module, "response_loss_sum", loss_that_turns_nan)
    # The plain path: its loss is the one replaced here.
    settings = {**SETTINGS, "max_steps": 10, "checkpoint_every": 5, "advanced": {"fast_path": False}}
    code, err = run_main(job, tmp_path, settings, capsys)
    assert code == 1
    assert "loss became nan at step 7" in err and "last good checkpoint" in err and "learning_rate" in err
    [ckpt] = list_checkpoints(tmp_path / "checkpoints")
    assert load_checkpoint(ckpt)["step"] == 5
    assert torch.isfinite(load_checkpoint(ckpt)["trainable"]["model.embed_tokens.weight"]).all()
    assert not (tmp_path / "model").exists() and not (tmp_path / "summary.json").exists()


def test_non_finite_gradients_with_a_finite_loss_stop_before_the_step(job, tmp_path, monkeypatch, capsys):
    real_loss = train_module.response_loss_sum
    calls = []

    def loss_with_inf_gradients(model, ids, labels, pos, **kwargs):  # call 7 is step 7
        calls.append(1)
        loss, count = real_loss(model, ids, labels, pos, **kwargs)
        if len(calls) >= 7:
            loss.register_hook(lambda grad: grad * float("inf"))  # the value stays finite
        return loss, count

    monkeypatch.setattr(train_module, "response_loss_sum", loss_with_inf_gradients)
    settings = {**SETTINGS, "max_steps": 10, "checkpoint_every": 5, "advanced": {"fast_path": False}}
    code, err = run_main(job, tmp_path, settings, capsys)
    assert code == 1
    assert "gradient norm became" in err and "at step 7" in err and "was finite" in err
    assert "last good checkpoint" in err and "learning_rate" in err
    [ckpt] = list_checkpoints(tmp_path / "checkpoints")
    assert load_checkpoint(ckpt)["step"] == 5
    assert not (tmp_path / "model").exists() and not (tmp_path / "summary.json").exists()


@pytest.mark.parametrize("strategy", ["plain", "masters"])
def test_precision_strategies_refuse_a_non_finite_gradient_before_stepping(strategy):
    from instructflow.kernels.master_weights import Masters
    from instructflow.precision import NonFiniteGradient, Plain

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    precision = Plain(model, lr=0.1, weight_decay=0.0, autocast=False) if strategy == "plain" else \
        Masters(model, lr=0.1, weight_decay=0.0)
    before = {k: v.clone() for k, v in precision.state_dict()["trainable"].items()}
    model(torch.randn(2, 4, dtype=next(model.parameters()).dtype)).float().sum().backward()
    next(model.parameters()).grad[0, 0] = float("nan")
    with pytest.raises(NonFiniteGradient):
        precision.step(1.0)
    after = precision.state_dict()
    assert all(torch.equal(before[k], after["trainable"][k]) for k in before)
    assert not after["optimizer"]["state"]  # the optimiser never stepped
    for p in model.parameters():
        p.grad = None
    model(torch.randn(2, 4, dtype=next(model.parameters()).dtype)).float().sum().backward()
    assert precision.step(1.0) > 0  # a finite one steps as before


def assert_no_model_left(out: Path) -> None:
    assert not (out / "model").exists() and not (out / "model.tmp").exists()
    assert not (out / "summary.json").exists()


def test_unwritable_model_folder_is_a_clear_error(job, tmp_path, capsys):
    # As root, chmod does not stop writes: a regular file where the model's parent folder should be does.
    (tmp_path / "blocked").write_text("a file, not a folder")
    out = tmp_path / "blocked" / "run"
    args = train_args(job, out, {**SETTINGS, "max_steps": 2})
    args[args.index("--metrics") + 1] = str(tmp_path / "metrics.jsonl")
    args[args.index("--workdir") + 1] = str(tmp_path / "checkpoints")
    with pytest.raises(SystemExit) as exit_:
        train_module.main(args)
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert f"cannot write the tuned model to {out / 'model'}" in err and "Free disk space" in err
    assert not (tmp_path / "blocked" / "run").exists()


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs, smaller than the tiny model: a real ENOSPC. Needs root and mount rights; skipped where they are missing."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_full_disk_leaves_no_model_and_keeps_checkpoints(job, tmp_path, small_disk, capsys):
    from instructflow.clean import run_clean

    out = small_disk / "run"
    settings = {**SETTINGS, "max_steps": 2}
    args = train_args(job, out, settings)
    args[args.index("--workdir") + 1] = str(tmp_path / "checkpoints")
    with pytest.raises(SystemExit) as exit_:
        train_module.main(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and "No space left on device" in err and "cannot write the tuned model" in err
    assert_no_model_left(out)

    # A checkpoint that does not fit: a clear error and the earlier checkpoint stays loadable.
    save(small_disk / "ckpt", 1)
    with pytest.raises(CheckpointError, match="No space left on device"):
        save_checkpoint(small_disk / "ckpt", 2, trainable={"w": torch.zeros(1 << 16)},
                        optimizer_state={"state": {}, "param_groups": []}, scheduler_state={}, fingerprint="fp")
    assert latest_valid(small_disk / "ckpt", "fp")["step"] == 1
    assert not list((small_disk / "ckpt").glob(".*.tmp"))

    # The other stages write atomically too: no half-written table for the next stage.
    big = tmp_path / "big.csv"
    rng = random.Random(0)  # random text, so Parquet cannot compress it below the disk's size
    big.write_text("instruction,input,output\n" + "".join(f"Echo {i},,{rng.randbytes(150).hex()}\n" for i in range(2000)))
    with pytest.raises(OSError):
        run_clean(big, small_disk / "clean.parquet", small_disk / "rejected.parquet", small_disk / "report.json")
    assert not list(small_disk.glob("*clean.parquet*"))


# ------------------------------------------------------------------------------------- through Snakemake

def training_pids(work: Path) -> list[int]:
    """The python processes running the train entry point (not accelerate's launcher) inside `work`."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            cwd = (proc / "cwd").resolve()
        except OSError:
            continue
        if argv[1:3] == [b"-m", b"instructflow.train"] and cwd == work:
            pids.append(int(proc.name))
    return pids


@pytest.mark.slow
def test_snakemake_after_kill_9_of_training_resumes(tiny_model_dir, tmp_path):
    import shutil

    import yaml

    work = tmp_path / "wf"
    (work / "config").mkdir(parents=True)
    shutil.copy(REPO / ".test" / "data" / "instructions.csv", work / "data.csv")
    train = {**SETTINGS, "max_steps": 40}  # the other stages' processes make this test slow enough already
    (work / "config" / "config.yaml").write_text(yaml.safe_dump({
        "data": {"path": "data.csv", "eval_fraction": 0.2}, "model": {"base": str(tiny_model_dir("llama"))},
        "tokenize": {"max_length": 256}, "train": train}))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(work),
               "--cores", "2", "results/runs/default/train/summary.json"]
    checkpoints = work / "results" / "runs" / "default" / "checkpoints"

    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_checkpoint(first, checkpoints, past_step=1)
    [pid] = training_pids(work.resolve())
    os.kill(pid, signal.SIGKILL)
    assert first.wait() != 0
    assert not (work / "results" / "runs" / "default" / "model").exists()  # Snakemake removed the failed outputs
    last_logged = max(losses(checkpoints / "metrics.jsonl"))

    rerun = subprocess.run(command, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    run = work / "results" / "runs" / "default"
    summary = json.loads((run / "train" / "summary.json").read_text())
    assert 1 < summary["resumed_from_step"] and last_logged - summary["resumed_from_step"] <= train["checkpoint_every"]

    # The same training uninterrupted, with the settings and threads the rule used.
    settings = json.loads((run / "model" / "instructflow_training.json").read_text())
    for key in ("template", "template_sha256"):  # the export's record of the template (its name and hash)
        settings.pop(key, None)
    [model] = (work / "results" / "models").iterdir()
    [tokens] = (work / "results" / "tokens").glob("*/*/*/train.safetensors")
    reference = subprocess.run(
        [sys.executable, "-m", "instructflow.train",
         *train_args({"model": model, "train": tokens}, tmp_path / "reference", settings)],
        env={**os.environ, "OMP_NUM_THREADS": "2"}, capture_output=True, text=True)
    assert reference.returncode == 0, reference.stderr
    got, want = losses(run / "train" / "metrics.jsonl"), losses(tmp_path / "reference" / "metrics.jsonl")
    assert list(got) == list(want) == list(range(1, train["max_steps"] + 1))
    assert abs(got[train["max_steps"]] - want[train["max_steps"]]) <= LOSS_TOLERANCE
