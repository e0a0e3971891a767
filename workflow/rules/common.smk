# All the workflow's Python: config validation (in the library, so it is unit-tested), the run table
# and the input/param helpers the rules call by name. Parsing imports no torch (tests/test_reruns.py).
import json
import os
import shlex
import sys
from pathlib import Path

# The package this workflow runs is the one beside these rules (src/ of the clone, or of a local
# `module` deployment): first on sys.path for parsing and on PYTHONPATH for the jobs, so the code the
# rules declare as inputs is the code that runs. A workflow fetched from a remote source (github(...))
# has no local src/: then the installed instructflow (from envs/instructflow.yaml) runs.
_SRC = Path(workflow.current_basedir.get_path_or_uri(secret_free=True)).parents[1] / "src"
if (_SRC / "instructflow" / "__init__.py").is_file():
    sys.path.insert(0, str(_SRC))
    if os.environ.get("PYTHONPATH", "").split(os.pathsep)[0] != str(_SRC):  # set, not required: no envvars
        os.environ.update(PYTHONPATH=os.pathsep.join(filter(None, [str(_SRC), os.environ.get("PYTHONPATH")])))

from instructflow import config as ifconfig
from instructflow.codedeps import code_inputs
from instructflow.launch import accelerate_configs, process_count
from instructflow.templates import load_template

try:
    CONFIG, RUNS = ifconfig.load(config, Path.cwd())
except ifconfig.ConfigError as err:  # the message names the key; Snakemake's traceback of this line adds nothing
    sys.exit(f"instructflow: {err}")
TEMPLATES = {r["template_key"]: r["template_path"] for r in RUNS.values()}  # key -> file (config.template_key)
MODELS = {r["model_key"]: r["model"] for r in RUNS.values()}
# evaluate.test_sets: name -> {"path", "columns"}; the evaluate stage's own options are the other keys.
TEST_SETS = CONFIG["evaluate"]["test_sets"]
EVALUATE_OPTIONS = {k: v for k, v in CONFIG["evaluate"].items() if k != "test_sets"}
# Data key (config.assign_data_keys: "default" for data, else a run's name) -> that data, whose "sources" are
# [{"name", "path", "columns", "weight", "config_key"}] (one entry for a one-file data.path); the first run of
# a key gives it.
DATA = {}
for _run in RUNS.values():
    DATA.setdefault(_run["data_key"], _run["data"])


wildcard_constraints:
    run="|".join(map(lambda name: name.replace(".", r"\."), RUNS)),
    data="|".join(map(lambda name: name.replace(".", r"\."), DATA)),
    model=r"[A-Za-z0-9._-]+",
    template=r"[A-Za-z0-9._-]+",
    gguf_type="|".join(ifconfig.load_schema()["$defs"]["gguf_type"]["enum"]),
    testset="|".join(map(lambda name: name.replace(".", r"\."), TEST_SETS)) or "(?!)",


def run_paths(run):
    r = RUNS[run]
    return {"data": r["data_key"], "model": r["model_key"], "template": r["template_key"]}


def get_template(wildcards):
    return TEMPLATES[wildcards.template]


def get_render_model(wildcards):
    """The chat template needs the model's tokenizer; file templates need nothing from the model."""
    if load_template(TEMPLATES[wildcards.template]).chat:
        return f"results/models/{wildcards.model}"
    return []


def from_run(pattern):
    """An input function: ``pattern`` (a path with {data}, {model} and {template}) filled in for the run's
    data, model and template, so a run reads the shared upstream outputs it needs (and the job's own wildcards)."""
    return lambda wildcards: pattern.format(**dict(wildcards.items()), **run_paths(wildcards.run))


def get_train_settings(wildcards):
    """Everything that changes the trained weights, as one JSON string: a tracked param, so editing
    any training setting of a run (the sources' weights among them) reruns that run's train, evaluate
    and report only."""
    r = RUNS[wildcards.run]
    return shlex.quote(json.dumps({**r["train"], "template_path": r["template_path"],
                                   "trust_remote_code": r["model"]["trust_remote_code"],
                                   "source_weights": {s["name"]: s["weight"] for s in r["data"]["sources"]}},
                                  sort_keys=True))


def get_clean_options(wildcards):
    """The clean stage's options for a data key: its sources without their weights, which only training
    uses (so a new weight never reruns clean), and how to clean them."""
    data = DATA[wildcards.data]
    return json_option({**{k: data[k] for k in ifconfig.CLEAN_KEYS},
                        "sources": [{k: v for k, v in s.items() if k != "weight"} for s in data["sources"]]})


def get_data_files(wildcards):
    return [source["path"] for source in DATA[wildcards.data]["sources"]]


def get_run_template(wildcards):
    return RUNS[wildcards.run]["template_path"]


def get_run_processes(wildcards, resources):
    """One process per GPU the job holds (resource `gpu`, set by a cluster profile), else train.processes."""
    return process_count(resources.get("gpu", 0), RUNS[wildcards.run]["train"]["processes"])


def json_option(obj):
    return shlex.quote(json.dumps(obj, sort_keys=True))


def gguf_targets():
    """The GGUF files the runs ask for (export.gguf): none unless a run lists a type."""
    return [f"results/runs/{run}/gguf/model-{t}.gguf" for run, r in RUNS.items() for t in r["export"]["gguf"]]


def test_set_files(pattern):
    """An input function: ``pattern`` (with {testset}, and {run}, {model}, {template}) for every test set of
    evaluate.test_sets, in config order; none without test sets."""
    return lambda wildcards: [pattern.format(testset=name, run=wildcards.run, **run_paths(wildcards.run))
                              for name in TEST_SETS]


def get_test_sets(wildcards, input):
    """compare's --test-sets option: name -> the set's file and its base and tuned metrics (rule inputs)."""
    files = zip(TEST_SETS, input.test_sets_base, input.test_sets_tuned)
    return json_option({name: {"path": TEST_SETS[name]["path"], "base": base, "tuned": tuned}
                        for name, base, tuned in files})


def compared_settings():
    """compare_runs' --settings option: run -> the settings that make it (data, model, template, train,
    export); the page shows those in which the runs differ. A param, so a changed setting rewrites the page."""
    keys = ("data", "model", "template", "train", "export")
    return json_option({run: {key: r[key] for key in keys} for run, r in RUNS.items()})


def track_targets():
    """tracking.json of every run that logs to MLflow or TensorBoard (tracking.*): none unless turned on."""
    return [f"results/runs/{run}/tracking.json" for run, r in RUNS.items()
            if r["tracking"]["mlflow"] or r["tracking"]["tensorboard"]]


def get_run_settings(wildcards):
    """The run's resolved settings, as the track stage logs them (config.run_settings)."""
    return json_option(ifconfig.run_settings(CONFIG, wildcards.run, RUNS[wildcards.run]))


def get_tracking(wildcards):
    return json_option(RUNS[wildcards.run]["tracking"])
