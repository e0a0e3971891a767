# All the workflow's Python: config validation (in the library, so it is unit-tested), the run table
# and the input/param helpers the rules call by name.
import json
import shlex
from pathlib import Path

from instructflow import config as ifconfig
from instructflow.templates import load_template

CONFIG, RUNS = ifconfig.load(config, Path.cwd())
REPO = Path(workflow.basedir)
TEMPLATES = {ifconfig.template_key(r["template"]): r["template_path"] for r in RUNS.values()}
MODELS = {r["model_key"]: r["model"] for r in RUNS.values()}


wildcard_constraints:
    run="|".join(map(lambda name: name.replace(".", r"\."), RUNS)),
    model=r"[A-Za-z0-9._-]+",
    template=r"[A-Za-z0-9._-]+",


def lib(*modules):
    """Library modules the rule's command imports, declared as inputs so that editing one reruns that stage onwards."""
    return [str(REPO / "src" / "instructflow" / m) for m in modules]


def run_paths(run):
    r = RUNS[run]
    return {"model": r["model_key"], "template": ifconfig.template_key(r["template"])}


def get_template(wildcards):
    return TEMPLATES[wildcards.template]


def get_render_model(wildcards):
    """The chat template needs the model's tokenizer; file templates need nothing from the model."""
    if load_template(TEMPLATES[wildcards.template]).chat:
        return f"results/models/{wildcards.model}"
    return []


def from_run(pattern):
    """An input function: ``pattern`` (a path with {model} and {template}) filled in for the run's
    model and template, so a run reads the shared upstream outputs it needs."""
    return lambda wildcards: pattern.format(**run_paths(wildcards.run))


def get_train_settings(wildcards):
    """Everything that changes the trained weights, as one JSON string: a tracked param, so editing
    any training setting of a run reruns that run's train, evaluate and report only."""
    r = RUNS[wildcards.run]
    return shlex.quote(json.dumps({**r["train"], "template_path": r["template_path"],
                                   "trust_remote_code": r["model"]["trust_remote_code"]}, sort_keys=True))


def get_run_template(wildcards):
    return RUNS[wildcards.run]["template_path"]


def get_run_processes(wildcards, resources):
    """One process per GPU the job holds (resource `gpu`, set by a cluster profile), else
    train.processes: the same config trains on a laptop and on a GPU node."""
    gpus = int(resources.get("gpu", 0) or 0)
    return gpus if gpus > 0 else RUNS[wildcards.run]["train"]["processes"]


def get_accelerate_config(wildcards, resources):
    """Which config/accelerate/ file the job launches with. default.yaml starts exactly one process
    whatever --num_processes says (accelerate 1.15), so several processes need ddp.yaml: DDP over
    GPUs, or over CPU processes (gloo) on a host without GPUs."""
    return "ddp" if get_run_processes(wildcards, resources) > 1 else "default"


def json_option(obj):
    return shlex.quote(json.dumps(obj, sort_keys=True))


def get_run_port(wildcards):
    """Stable per run name (a port that changed with the set of runs would rerun every training)."""
    import zlib

    return 29500 + zlib.crc32(wildcards.run.encode()) % 2000
