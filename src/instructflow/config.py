"""Configuration: validated against the schema (``schema.yaml``, shipped inside the package) with
defaults filled in, and resolved into one settings dict per run. Lives in the library (not the
Snakefile) so it is unit-tested on its own and every mistake stops the run before any work starts,
with a message that names the key.

The schema is the one source of defaults: the stages' keyword defaults are read from it
(:func:`defaults`), so a value lives in one place.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import re
from importlib import resources
from pathlib import Path

import jsonschema
import yaml

from .templates import TemplateError, bundled_path, is_bundled_name

# Read with importlib.resources, so a wheel install finds it as a clone does.
SCHEMA_PATH = resources.files(__package__) / "schema.yaml"

# The Hugging Face TrainingArguments keys the 2023 script read from its args file, and ours.
TRAINING_ARGUMENTS_MAP = {
    "learning_rate": "learning_rate",
    "max_steps": "max_steps",
    "per_device_train_batch_size": "micro_batch_size",
    "warmup_steps": "warmup_steps",
    "weight_decay": "weight_decay",
    "lr_scheduler_type": "lr_scheduler",
    "seed": "seed",
    "max_grad_norm": "max_grad_norm",
    "logging_steps": "log_every",
    "save_steps": "checkpoint_every",
}

# TrainingArguments keys read but not used, because they are bookkeeping this workflow does its own way
# (its outputs live under results/, its checkpoints in a work folder it prunes itself, logs in metrics.jsonl):
# accepted without a word. Any other key the map above does not cover stops the run (ConfigError).
IGNORED_TRAINING_ARGUMENTS = frozenset({
    "output_dir", "logging_dir", "report_to", "overwrite_output_dir", "do_train", "save_total_limit", "run_name",
})
# Read by _training_arguments itself (besides the map).
HANDLED_TRAINING_ARGUMENTS = frozenset({"gradient_accumulation_steps", "bf16", "num_train_epochs"})


class ConfigError(ValueError):
    pass


def _with_defaults(validator_class):
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "$ref" in sub:
                    sub = validator.resolver.resolve(sub["$ref"])[1] if hasattr(validator, "resolver") else sub
                if "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


@functools.cache
def _schema_text() -> str:
    return SCHEMA_PATH.read_text(encoding="utf-8")


def load_schema() -> dict:
    return yaml.safe_load(_schema_text())


def defaults(section: str) -> dict:
    """The schema's defaults of one config section (``data``, ``tokenize``, ``evaluate``, ``train``), as
    an empty config gets them (nested ones filled in). The stages take their keyword defaults from
    here, so the schema stays the one place a default is written."""
    return validate({})[section]


def _key(path) -> str:
    """A config key as written in messages: ``data.sources[1].weight`` (list items by their 0-based index)."""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".") or "(top level)"


def validate(config: dict, schema: dict | None = None) -> dict:
    """A copy of ``config`` with defaults filled in; ConfigError naming the first bad key."""
    import warnings

    schema = schema or load_schema()
    config = copy.deepcopy(config or {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # jsonschema's RefResolver, still the simplest
        validator = _with_defaults(jsonschema.Draft202012Validator)(schema)
        errors = sorted(validator.iter_errors(config), key=lambda e: len(e.absolute_path))
    if errors:
        err = errors[0]
        while err.validator == "oneOf" and err.context:  # the alternative that got furthest says what is wrong
            err = max(err.context, key=lambda e: (len(e.absolute_path), e.validator != "type"))
        key = _key(err.absolute_path)
        if err.validator == "additionalProperties":
            extra = sorted(set(err.instance) - set(err.schema.get("properties", {})))
            valid = sorted(err.schema.get("properties", {}))
            prefix = f"{key}." if err.absolute_path else ""
            raise ConfigError(f"config key {prefix}{extra[0]}: unknown key (valid keys here: {', '.join(valid)})")
        raise ConfigError(f"config key {key}: {err.message}")
    return config


def template_path(template: str, workdir: Path = Path(".")) -> Path:
    if is_bundled_name(template):
        try:
            return bundled_path(template)
        except TemplateError as err:
            raise ConfigError(f"config key template: {err}") from None
    path = workdir / template
    if not path.is_file():
        raise ConfigError(f"config key template: file {template!r} not found")
    return path.resolve()


def _training_arguments(path: str, workdir: Path) -> dict:
    file = workdir / path
    try:
        args = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"config key train.args_file: cannot read {path!r}: {err}") from err
    if not isinstance(args, dict):
        raise ConfigError(f"config key train.args_file: {path!r} holds no JSON object of TrainingArguments")
    unmapped = sorted(set(args) - set(TRAINING_ARGUMENTS_MAP) - IGNORED_TRAINING_ARGUMENTS
                      - HANDLED_TRAINING_ARGUMENTS)
    if unmapped:
        raise ConfigError(f"config key train.args_file: {path!r} sets {', '.join(unmapped)}, which instructflow "
                          "does not map to its own settings (it reads "
                          f"{', '.join(sorted(TRAINING_ARGUMENTS_MAP))}, gradient_accumulation_steps, "
                          "num_train_epochs and bf16); "
                          "remove those keys from the file, or set the matching train.* keys in the config "
                          "(see config/README)")
    settings = {ours: args[theirs] for theirs, ours in TRAINING_ARGUMENTS_MAP.items() if theirs in args}
    # As in TrainingArguments, a positive max_steps decides the length of training and num_train_epochs
    # counts only without one (the 2023 script trained num_train_epochs: 2).
    if isinstance(args.get("max_steps"), int) and args["max_steps"] > 0:
        settings["epochs"] = 0
    elif "num_train_epochs" in args:
        settings["epochs"] = args["num_train_epochs"]
    if "gradient_accumulation_steps" in args:
        # 8: TrainingArguments' own default for per_device_train_batch_size (not one of ours)
        settings["batch_size"] = args.get("per_device_train_batch_size", 8) * args["gradient_accumulation_steps"]
    elif "per_device_train_batch_size" in args:
        settings["batch_size"] = args["per_device_train_batch_size"]
    if args.get("bf16"):
        settings["precision"] = "bf16"
    if settings.get("max_steps", 1) <= 0:  # TrainingArguments uses -1 for "use epochs"
        settings.pop("max_steps")
    return settings


def _merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def train_schema() -> dict:
    schema = load_schema()
    return {**schema["$defs"]["train"], "$defs": schema["$defs"]}


def train_settings(settings: dict) -> dict:
    """Training settings with the schema's defaults filled in: the one source of defaults for the
    workflow and for callers of the trainer alike."""
    settings = validate(settings, train_schema())
    if settings["advanced"]["bf16_mode"] == "kahan" and settings["weight_decay"] and settings["method"] == "full":
        # kernels/kahan.py: optimi decays the bf16 weights themselves, where lr x weight_decay rounds away.
        raise ConfigError("config key advanced.bf16_mode: kahan needs weight_decay 0: its optimiser would apply the "
                          "decay to bf16 weights, where so small a step rounds away; use bf16_mode masters or auto")
    for key, on in (("export", settings["export"] == "best"), ("early_stopping_patience", settings["early_stopping_patience"])):
        if on and not settings["eval_every"]:
            raise ConfigError(f"config key {key}: {settings[key]} decides by the held-out loss during training, which "
                              "train.eval_every: 0 turns off; set eval_every (steps between evaluations) or "
                              f"{key}: {'last' if key == 'export' else 0}")
    return settings


def resolve_runs(config: dict, workdir: Path = Path(".")) -> dict[str, dict]:
    """Run name -> {"model": {...}, "model_key", "template", "template_path", "template_key", "train": {...},
    "export": {"gguf": [...]}, "tracking": {...}, "data": {...} (data with the run's overrides, sources normalised),
    "data_key"}."""
    from .prepare_model import model_key  # imports torch: only where runs are resolved, not for defaults()

    runs = {}
    for name, override in config["runs"].items():
        run = _merge({"model": config["model"], "template": config["template"], "train": {},
                      "export": config["export"], "tracking": config["tracking"]},
                     {k: v for k, v in (override or {}).items() if k != "data"})
        run["data"] = run_data(config["data"], (override or {}).get("data"), name)
        train = _merge(config["train"], run["train"])
        if train.get("args_file"):
            train = _merge(train, _training_arguments(train["args_file"], workdir))
        try:
            train = train_settings(train)
        except ConfigError as err:
            raise ConfigError(str(err).replace("config key ", f"config key runs.{name}.train.", 1)) from None
        if train["batch_size"] % (train["micro_batch_size"] * train["processes"]):
            raise ConfigError(f"config key runs.{name}.train.batch_size: {train['batch_size']} is not a multiple of "
                              f"micro_batch_size x processes ({train['micro_batch_size']} x {train['processes']})")
        run["train"] = train
        run["template_path"] = str(template_path(run["template"], workdir))
        run["template_key"] = template_key(run["template"], run["template_path"])
        run["model_key"] = model_key(run["model"]["base"])
        model_config_key = f"runs.{name}.model.base" if "base" in ((override or {}).get("model") or {}) else "model.base"
        check_model(run["model"]["base"], model_config_key, workdir)
        for key, value in ((model_config_key, run["model_key"]), ("template", run["template_key"])):
            check_folder_name(key, value)
        runs[name] = run
    assign_data_keys(config["data"], runs)
    keys: dict[str, str] = {}
    for run in runs.values():
        other = keys.setdefault(run["model_key"], run["model"]["base"])
        if other != run["model"]["base"]:
            raise ConfigError(f"config key model.base: {other!r} and {run['model']['base']!r} map to the same "
                              f"folder name {run['model_key']!r}; rename one of the files or folders")
    return runs


def run_settings(config: dict, name: str, run: dict) -> dict:
    """What run ``name`` was made with, as the track stage logs it: its model, template, training and export
    settings, its data (data with the run's overrides) and the shared tokenize and evaluate sections (tracking
    itself is left out)."""
    return {"run": name, "model": run["model"], "model_key": run["model_key"], "template": run["template"],
            "template_key": run["template_key"], "train": run["train"], "export": run["export"], "data": run["data"],
            **{section: config[section] for section in ("tokenize", "evaluate")}}


# data's keys besides its files that the clean stage reads.
CLEAN_KEYS = ("placeholders", "max_chars", "eval_fraction")


def run_data(data: dict, override: dict | None, run: str) -> dict:
    """data with a run's overrides (runs.NAME.data), validated, its sources normalised; data itself without
    any. A run's path (with its columns) or sources replace data's files; placeholders, max_chars and
    eval_fraction it does not set are data's."""
    if not override:
        return data
    key = f"runs.{run}.data"
    new_files = "path" in override or "sources" in override
    if "columns" in override and not new_files:
        raise ConfigError(f"config key {key}.columns: give it with {key}.path, the file whose columns it maps")
    schema = load_schema()
    try:
        merged = validate({**{k: data[k] for k in CLEAN_KEYS}, **override},
                          {**schema["properties"]["data"], "$defs": schema["$defs"]})
    except ConfigError as err:
        raise ConfigError(str(err).replace("config key ", f"config key {key}.", 1)) from None
    if not new_files:
        return {**merged, "sources": data["sources"]}
    return normalise_sources(merged, key)


def clean_settings(data: dict) -> dict:
    """What the clean stage's output depends on: runs whose data agree on it share clean, render and tokenize."""
    return {"sources": [{k: source[k] for k in ("name", "path", "columns")} for source in data["sources"]],
            **{k: data[k] for k in CLEAN_KEYS}}


def assign_data_keys(data: dict, runs: dict[str, dict]) -> None:
    """Each run's "data_key", the {data} folder of its cleaned, rendered and tokenized rows: ``default`` for
    data's own settings, else the name of the first run (in config order) with the run's settings, so runs
    with equal data share those stages."""
    own = {name: json.dumps(clean_settings(run["data"]), sort_keys=True) for name, run in runs.items()}
    data_settings = json.dumps(clean_settings(data), sort_keys=True)
    keys = {data_settings: "default"} if data_settings in own.values() else {}
    for name, run in runs.items():
        if own[name] not in keys:
            if name in keys.values():
                raise ConfigError(f"config key runs.{name}.data: the run's data differs from data, whose rows "
                                  f"other runs train on in results/data/{name}/; rename the run")
            keys[own[name]] = name
        run["data_key"] = keys[own[name]]


# A path component the workflow builds from the config (a run, model or template name) must be a plain
# name: "." or ".." would put outputs, and the rmtree that replaces an old output, outside results/.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_folder_name(key: str, name: str) -> None:
    if not SAFE_NAME.fullmatch(name):
        raise ConfigError(f"config key {key}: gives the folder name {name!r}, which could write outside results/; "
                          "rename the file or folder so its name starts with a letter or digit")


def check_model(spec: str, key: str, workdir: Path) -> None:
    """Stop before any work on a model spec that cannot load: a missing package, file or folder, or a
    folder without a readable config.json. A Hub id is only checked when prepare_model fetches it."""
    from .prepare_model import ModelSpecError, resolve_source

    with contextlib.chdir(workdir):
        try:
            source = resolve_source(spec)
        except ModelSpecError as err:
            raise ConfigError(f"config key {key}: {err}") from None
        if source.kind == "folder":
            try:
                model_type = json.loads((Path(source.location) / "config.json").read_text()).get("model_type")
            except (OSError, ValueError, AttributeError) as err:
                raise ConfigError(f"config key {key}: {spec!r} has an unreadable config.json: {err}") from None
            if not model_type:
                raise ConfigError(f"config key {key}: {spec!r}/config.json names no model_type; "
                                  "give a folder written by save_pretrained")


def template_key(template: str, path: str | Path | None = None) -> str:
    """The {template} wildcard: a bundled name as it is ("alpaca"); a user file's stem, "-", and the first
    8 hex digits of the sha256 of its bytes ("alpaca-1a2b3c4d"). Two files of one name (a user's
    ``my/alpaca.yaml`` beside the bundled ``alpaca``, or ``a/t.yaml`` beside ``b/t.yaml``) then never share
    one rendered-prompts file, and one file always gets the same key. ``path``: the file to hash (default
    ``template`` itself, relative to the working directory)."""
    if is_bundled_name(template):
        return template
    return f"{Path(template).stem}-{template_digest(path or template)}"


def template_digest(path: str | Path) -> str:
    """The first 8 hex digits of the sha256 of a template file's bytes."""
    import hashlib

    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:8]
    except OSError as err:
        raise ConfigError(f"config key template: cannot read {str(path)!r}: {err}") from None


def normalise_data(config: dict) -> dict:
    """config["data"] with its sources normalised (:func:`normalise_sources`)."""
    normalise_sources(config["data"])
    return config


def normalise_sources(data: dict, key: str = "data") -> dict:
    """data.sources as the list the stages read, also for the one-file form: each source {"name", "path",
    "columns", "weight", "config_key"} (config_key: the section that names it, for messages: ``data`` for
    data.path, ``data.sources[i]`` for a listed file; ``key``: that section, ``runs.NAME.data`` for a run's
    own). A non-empty data.sources replaces data.path and data.columns: Snakemake merges a --configfile over
    config/config.yaml, whose data.path stays set."""
    if data["sources"]:
        sources = [{"name": source.get("name") or Path(source["path"]).stem, **source,
                    "config_key": f"{key}.sources[{i}]"} for i, source in enumerate(data["sources"])]
    else:
        sources = [{"name": Path(data["path"]).stem, "path": data["path"], "columns": data["columns"], "weight": 1,
                    "config_key": key}]
    names: dict[str, str] = {}
    for source in sources:
        other = names.setdefault(source["name"], source["config_key"])
        if other != source["config_key"]:
            raise ConfigError(f"config key {source['config_key']}.name: {other} is also named {source['name']!r} "
                              f"(a source's name is its file's stem unless set); give one of them a name")
    data["sources"] = sources
    return data


def check_inputs(config: dict, runs: dict[str, dict], workdir: Path = Path(".")) -> None:
    """Every data file a run trains on (data's, or the run's own), every test set: there."""
    datas = {id(run["data"]): run["data"] for run in runs.values()}.values()
    for source in (source for data in datas for source in data["sources"]):
        if not (workdir / source["path"]).is_file():
            raise ConfigError(f"config key {source['config_key']}.path: "
                              f"{_not_a_file(workdir, source['path'], ', or list several as data.sources')}")
    for name, test_set in config["evaluate"]["test_sets"].items():
        if not (workdir / test_set["path"]).is_file():
            raise ConfigError(f"config key evaluate.test_sets.{name}.path: test set {name!r}: "
                              f"{_not_a_file(workdir, test_set['path'])}; point it at your evaluation file or "
                              "remove the set")


def _not_a_file(workdir: Path, path: str, several: str = "") -> str:
    """Why ``path`` is no file to read; ``several``: how to name more than one file, where the key can."""
    if (workdir / path).is_dir():
        return f"{path!r} is a folder (from {workdir.resolve()}); name one file in it{several}"
    return f"file {path!r} not found (from {workdir.resolve()})"


def normalise_test_sets(config: dict) -> dict:
    """evaluate.test_sets with every set as {"path", "columns"} (a bare string is the path)."""
    sets = config["evaluate"]["test_sets"]
    for name, test_set in sets.items():
        sets[name] = {"path": test_set, "columns": {}} if isinstance(test_set, str) else {"columns": {}, **test_set}
    return config


def load(config: dict, workdir: Path = Path(".")) -> tuple[dict, dict[str, dict]]:
    config = normalise_data(normalise_test_sets(validate(config)))
    runs = resolve_runs(config, workdir)
    check_inputs(config, runs, workdir)
    return config, runs
