"""`instructflow train`'s launcher (launch.py): what the train rule computed in bash, computed in Python."""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest

from instructflow import cli, launch


@pytest.mark.parametrize("threads, processes, expected", [(2, 1, 2), (8, 2, 4), (7, 2, 3), (1, 4, 1), (0, 1, 1)])
def test_threads_are_split_among_processes_never_below_one(threads, processes, expected):
    assert launch.omp_threads(threads, processes) == expected


def test_port_is_stable_per_run_and_within_range():
    assert launch.rendezvous_port("default", {}) == 29500 + zlib.crc32(b"default") % 2000
    assert launch.rendezvous_port("default", {}) == launch.rendezvous_port("default", {"OTHER": "1"})
    ports = {launch.rendezvous_port(f"run{i}", {}) for i in range(50)}
    assert len(ports) > 40 and all(29500 <= p < 31500 for p in ports)


def test_port_under_slurm_comes_from_the_job_id():
    assert launch.rendezvous_port("default", {"SLURM_JOB_ID": "123456"}) == 20000 + 123456 % 12000
    assert launch.rendezvous_port("a", {"SLURM_JOB_ID": "7"}) == launch.rendezvous_port("b", {"SLURM_JOB_ID": "7"})
    assert all(20000 <= launch.rendezvous_port("x", {"SLURM_JOB_ID": str(j)}) < 32768 for j in (0, 11999, 10**9))


def test_accelerate_config_one_process_or_ddp_and_both_ship_in_the_package():
    assert launch.accelerate_config(1).name == "default.yaml"
    assert launch.accelerate_config(2).name == launch.accelerate_config(8).name == "ddp.yaml"
    assert all(Path(p).is_file() for p in launch.accelerate_configs())


def test_processes_follow_the_jobs_gpus_else_the_config():
    assert launch.process_count(0, 2) == 2
    assert launch.process_count(None, 1) == 1
    assert launch.process_count("4", 1) == 4


def test_environment_splits_threads_and_preloads_the_allocator(monkeypatch):
    monkeypatch.setattr(launch.allocator, "preload", lambda env: "/lib/libjemalloc.so.2")
    env = launch.launch_env(8, 2, {"PATH": "/bin"})
    assert env["OMP_NUM_THREADS"] == "4" and env["LD_PRELOAD"] == "/lib/libjemalloc.so.2" and env["PATH"] == "/bin"
    # The plain path (train.advanced.fast_path: false) keeps the default allocator.
    assert "LD_PRELOAD" not in launch.launch_env(8, 2, {"PATH": "/bin"}, fast_path=False)
    monkeypatch.setattr(launch.allocator, "preload", lambda env: "")
    assert "LD_PRELOAD" not in launch.launch_env(2, 1, {"LD_PRELOAD": ""})
    # Several processes: torch's elastic agent waits 300 s, not its 30, for trainers finishing a checkpoint after
    # SIGTERM (test_faults.py stops two); a value the user set stays.
    assert env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "300"
    assert launch.launch_env(8, 2, {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "45"})["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "45"


def test_fast_path_is_read_from_the_settings(tmp_path):
    assert launch.fast_path("{}") and launch.fast_path('{"advanced": {"packing": false}}')
    assert not launch.fast_path('{"advanced": {"fast_path": false}}')
    (tmp_path / "s.json").write_text('{"advanced": {"fast_path": false}}')
    assert not launch.fast_path(str(tmp_path / "s.json"))


def test_command_is_accelerate_launch_of_the_worker_module():
    worker = launch.worker_args(settings="{}", model="m dir", train="t", out="o", metrics="x", summary="s", workdir="w")
    cmd = launch.launch_command(worker, run="default", processes=2, env={}, python="/py")
    assert cmd[:4] == ["/py", "-m", "accelerate.commands.launch", "--quiet"]
    assert cmd[cmd.index("--config_file") + 1].endswith("ddp.yaml")
    assert cmd[cmd.index("--num_processes") + 1] == "2"
    assert cmd[cmd.index("--main_process_port") + 1] == str(launch.rendezvous_port("default", {}))
    assert cmd[cmd.index("-m", 3):] == ["-m", "instructflow.train", "--settings", "{}", "--model", "m dir", "--train",
                                        "t", "--out", "o", "--metrics", "x", "--summary", "s", "--workdir", "w"]
    with pytest.raises(ValueError, match="workdir"):
        launch.worker_args(settings="{}", model="m", train="t", out="o", metrics="x", summary="s")


def test_train_subcommand_runs_the_launcher_and_returns_its_status(monkeypatch, capsys):
    seen = {}

    def fake_run(worker, **kwargs):
        seen.update(kwargs, worker=worker)
        return 3

    monkeypatch.setattr(launch, "run", fake_run)
    argv = ["train", "--run", "r1", "--threads", "6", "--processes", "2", "--settings", "{}", "--model", "m",
            "--train", "t", "--out", "o", "--metrics", "x", "--summary", "s", "--workdir", "w"]
    assert cli.main(argv) == 3
    assert seen["run"] == "r1" and seen["threads"] == 6 and seen["processes"] == 2
    assert seen["worker"][-2:] == ["--workdir", "w"]
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("instructflow train: the training processes exited with status 3")
    monkeypatch.setattr(launch, "run", lambda worker, **kwargs: 0)
    assert cli.main(argv) == 0
