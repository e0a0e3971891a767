"""``instructflow train``: start the trainer under ``accelerate launch`` with the environment it needs.

What the train rule used to compute in bash, here in Python and unit-tested:
  * the thread split: ``OMP_NUM_THREADS = max(1, threads // processes)`` (threads: what the job holds);
  * the rendezvous port: stable per run name (``29500 + crc32(run) % 2000``: a port that changed with
    the set of runs would rerun every training), or under SLURM from the job id
    (``20000 + SLURM_JOB_ID % 12000``, below the kernel's ephemeral range), so concurrent trainings on
    one node, of this workflow or another user's, never collide;
  * the accelerate config: ``default.yaml`` for one process (accelerate 1.15 starts exactly one from
    it, whatever ``--num_processes`` says), ``ddp.yaml`` for several (DDP over GPUs, or gloo over CPU
    processes); both ship inside the package (``instructflow/accelerate/``);
  * ``LD_PRELOAD`` with jemalloc where one is found (``kernels.allocator.preload``), unless the settings
    turn the fast path off (``train.advanced.fast_path: false``: the plain path, the default allocator).
The worker it launches is ``python -m instructflow.train`` with the arguments given here.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

if TYPE_CHECKING:  # never imported here: the worker runs in accelerate's processes; codedeps counts it
    from . import train  # noqa: F401

from .kernels import allocator

WORKER = "instructflow.train"
ACCELERATE_CONFIGS = Path(__file__).resolve().parent / "accelerate"
SHUTDOWN_TIMEOUT_S = 300  # how long torch's elastic agent waits for stopping trainers (launch_env)
WORKER_ARGS = ("settings", "model", "train", "out", "metrics", "summary", "workdir")
OPTIONAL_WORKER_ARGS = ("eval",)  # the held-out tokens train.eval_every scores


def process_count(gpus: int | str | None, configured: int) -> int:
    """One process per GPU the job holds (resource ``gpu``, set by a cluster profile), else
    ``train.processes``: the same config trains on a laptop and on a GPU node."""
    gpus = int(gpus or 0)
    return gpus if gpus > 0 else int(configured)


def omp_threads(threads: int, processes: int) -> int:
    return max(1, int(threads) // max(1, int(processes)))


def rendezvous_port(run: str, env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    job = env.get("SLURM_JOB_ID", "").strip()
    if job.isdigit():
        return 20000 + int(job) % 12000
    return 29500 + zlib.crc32(run.encode()) % 2000


def accelerate_config(processes: int, folder: Path = ACCELERATE_CONFIGS) -> Path:
    return Path(folder) / ("ddp.yaml" if processes > 1 else "default.yaml")


def accelerate_configs(folder: Path = ACCELERATE_CONFIGS) -> list[str]:
    """The files the launcher may pick: the train rule's inputs, so editing one reruns training."""
    return [str(accelerate_config(n, folder)) for n in (1, 2)]


def launch_env(threads: int, processes: int, env: Mapping[str, str] | None = None,
               fast_path: bool = True) -> dict[str, str]:
    env = dict(os.environ if env is None else env)
    env["OMP_NUM_THREADS"] = str(omp_threads(threads, processes))
    preload = allocator.preload(env) if fast_path else env.get("LD_PRELOAD", "")
    if preload:
        env["LD_PRELOAD"] = preload
    else:
        env.pop("LD_PRELOAD", None)
    # Several processes run under torch's elastic agent, which starts each trainer in a session of its own (a signal
    # to the launcher's process group reaches them only through it): on SIGTERM it passes the signal on and kills
    # the trainers TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds later, 30 by default, which a large model's checkpoint
    # can outlast. It gets the time SLURM's warning leaves (profiles/slurm: 120 s) and more.
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(SHUTDOWN_TIMEOUT_S))
    return env


def launch_command(worker_args: Sequence[str], *, run: str, processes: int, env: Mapping[str, str] | None = None,
                   config_folder: Path = ACCELERATE_CONFIGS, python: str = sys.executable) -> list[str]:
    """The ``accelerate launch`` command line, on this interpreter, so the workers run in the same environment as
    the launcher whatever PATH holds: ``python -m accelerate.commands.launch`` is what the ``accelerate-launch``
    entry point runs (``accelerate launch`` through accelerate's CLI module also imports its other commands: 3.4 s
    against 1.9 s on a 2-core CPU)."""
    # --quiet: a failed worker ends in its own one-line error, not in accelerate's CalledProcessError traceback.
    return [python, "-m", "accelerate.commands.launch", "--quiet",
            "--config_file", str(accelerate_config(processes, config_folder)),
            "--num_processes", str(processes), "--main_process_port", str(rendezvous_port(run, env)),
            "-m", WORKER, *worker_args]


def worker_args(**paths) -> list[str]:
    """``--settings ... --model ... --train ... --out ... --metrics ... --summary ... --workdir ...``, then
    ``--eval ...`` where given."""
    missing = [k for k in WORKER_ARGS if paths.get(k) in (None, "")]
    if missing:
        raise ValueError(f"missing worker arguments: {', '.join(missing)}")
    given = [k for k in OPTIONAL_WORKER_ARGS if paths.get(k) not in (None, "")]
    return [item for k in (*WORKER_ARGS, *given) for item in (f"--{k}", str(paths[k]))]


def fast_path(settings: str) -> bool:
    """Whether the train settings (a JSON string or file, as the worker takes them) keep the fast path on."""
    import json

    text = settings if settings.lstrip().startswith("{") else Path(settings).read_text()
    return bool(json.loads(text).get("advanced", {}).get("fast_path", True))


def run(worker: Sequence[str], *, run: str, threads: int, processes: int,
        config_folder: Path = ACCELERATE_CONFIGS) -> int:
    """Launch the training and return accelerate's exit code."""
    for path in (accelerate_config(processes, config_folder),):
        if not path.is_file():
            raise FileNotFoundError(2, "accelerate config not found", str(path))
    env = launch_env(threads, processes, fast_path=fast_path(worker[worker.index("--settings") + 1]))
    cmd = launch_command(worker, run=run, processes=processes, env=env, config_folder=config_folder)
    print(f"instructflow train: OMP_NUM_THREADS={env['OMP_NUM_THREADS']} LD_PRELOAD={env.get('LD_PRELOAD', '')} "
          + " ".join(cmd), file=sys.stderr, flush=True)
    # SLURM's warning before the time limit (profiles/slurm: --signal=TERM@120) reaches every process of the
    # job step at once. Only the trainer acts on it (finish the step, checkpoint, exit 1); the processes above
    # it must outlive it, or the step ends and SLURM kills the trainer mid-checkpoint. So this launcher and
    # accelerate's (SIG_IGN is inherited through exec) ignore SIGTERM; the trainer installs its own handler.
    # Ctrl-C (SIGINT to the terminal's process group) reaches the trainer directly.
    old = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        return subprocess.run(cmd, env=env).returncode
    finally:
        signal.signal(signal.SIGTERM, old)
