"""Several data sources (data.sources): the config's list form, cleaning each file on its own into one
table (per-source counts, rejects naming source and row, duplicates across sources), the token cache
carrying each row's source, the weighted batch plan, a run's own data (runs.NAME.data, keyed so runs with
equal data share the stages before training), and one tiny workflow run of two sources."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import TEST_DATA, build_tokenizer, copy_code
from instructflow.batching import BatchPlanner
from instructflow.clean import CleanError, run_clean
from instructflow.config import ConfigError, load
from instructflow.examples import IGNORE_INDEX, Examples
from instructflow.render import render_prompts
from instructflow.templates import load_template
from instructflow.tokenization import tokenize_prompts

ALPACA = "instruction,input,output\nSay hi.,,hi\nSay bye.,,bye\nAdd 1 and 2.,,3\n"
QA = [{"question": "What is 2 + 2?", "answer": "4"}, {"question": "Say hi.", "answer": "hi"},  # 2: in alpaca.csv
      {"question": "Name a colour.", "answer": ""}, {"question": "Spell cat.", "answer": "c a t"}]


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "alpaca.csv").write_text(ALPACA)
    (tmp_path / "qa.jsonl").write_text("\n".join(json.dumps(r) for r in QA) + "\n")
    return tmp_path


def _sources(**second):
    return [{"path": "alpaca.csv"}, {"path": "qa.jsonl", "columns": {"instruction": "question", "output": "answer"},
                                     **second}]


# ------------------------------------------------------------------------------------------ config

def test_config_list_form_and_one_file_form_give_the_same_sources_shape(workdir):
    config, _ = load({"data": {"sources": _sources(weight=2)}}, workdir)
    assert config["data"]["sources"] == [
        {"name": "alpaca", "path": "alpaca.csv", "columns": {}, "weight": 1, "config_key": "data.sources[0]"},
        {"name": "qa", "path": "qa.jsonl", "columns": {"instruction": "question", "output": "answer"}, "weight": 2,
         "config_key": "data.sources[1]"}]
    config, _ = load({"data": {"path": "alpaca.csv", "columns": {"output": "output"}}}, workdir)
    assert config["data"]["sources"] == [{"name": "alpaca", "path": "alpaca.csv", "columns": {"output": "output"},
                                          "weight": 1, "config_key": "data"}]
    # data.sources replaces data.path and data.columns (which config/config.yaml sets, under any --configfile).
    config, _ = load({"data": {"path": "missing.csv", "columns": {"output": "x"},
                               "sources": [{"path": "alpaca.csv", "name": "mine", "weight": 0.25}]}}, workdir)
    assert config["data"]["sources"] == [{"name": "mine", "path": "alpaca.csv", "columns": {}, "weight": 0.25,
                                          "config_key": "data.sources[0]"}]


@pytest.mark.parametrize("weight, why", [(0, "less than or equal to the minimum of 0"),
                                         (-1, "less than or equal to the minimum of 0"),
                                         ("two", "is not of type 'number'"), (True, "is not of type 'number'")])
def test_a_weight_that_is_not_a_positive_number_names_its_key(workdir, weight, why):
    with pytest.raises(ConfigError, match=rf"^config key data\.sources\[1\]\.weight: .*{why}"):
        load({"data": {"sources": _sources(weight=weight)}}, workdir)


@pytest.mark.parametrize("data, message", [
    ({"sources": [{"path": "alpaca.csv"}, {"path": "missing.jsonl"}]},
     r"^config key data\.sources\[1\]\.path: file 'missing.jsonl' not found"),
    ({"sources": [{"path": "alpaca.csv"}, {"path": "sub/alpaca.csv"}]},
     r"^config key data\.sources\[1\]\.name: data\.sources\[0\] is also named 'alpaca'"),
    ({"sources": [{"columns": {}}]}, r"^config key data\.sources\[0\]: 'path' is a required property"),
    ({"sources": [{"path": "qa.jsonl", "colums": {}}]}, r"^config key data\.sources\[0\]\.colums: unknown key"),
])
def test_source_mistakes_stop_before_any_work_naming_the_key(workdir, data, message):
    (workdir / "sub").mkdir()
    (workdir / "sub" / "alpaca.csv").write_text(ALPACA)
    with pytest.raises(ConfigError, match=message):
        load({"data": data}, workdir)


# ------------------------------------------------------------------------------------------ a run's own data

def test_runs_with_equal_data_share_a_data_key(workdir):
    config, runs = load({"data": {"path": "alpaca.csv"}, "runs": {
        "base": {}, "same": {"data": {"path": "alpaca.csv"}, "train": {"seed": 1}},
        "qa": {"data": {"path": "qa.jsonl", "columns": {"instruction": "question", "output": "answer"}}},
        "qa_weighted": {"data": {"sources": [{"path": "qa.jsonl", "columns": {"instruction": "question",
                                                                             "output": "answer"}, "weight": 3}]}},
        "strict": {"data": {"max_chars": 100}},
    }}, workdir)
    assert {name: run["data_key"] for name, run in runs.items()} == {
        "base": "default", "same": "default", "qa": "qa", "qa_weighted": "qa", "strict": "strict"}
    assert runs["base"]["data"] is config["data"]
    assert runs["qa"]["data"]["sources"] == [{"name": "qa", "path": "qa.jsonl", "weight": 1, "config_key": "runs.qa.data",
                                              "columns": {"instruction": "question", "output": "answer"}}]
    assert runs["qa_weighted"]["data"]["sources"][0]["weight"] == 3  # a training setting: same key as qa
    assert runs["strict"]["data"]["sources"] == config["data"]["sources"] and runs["strict"]["data"]["max_chars"] == 100
    assert runs["qa"]["data"]["eval_fraction"] == config["data"]["eval_fraction"]


@pytest.mark.parametrize("data, message", [
    ({"path": "missing.csv"}, r"^config key runs\.x\.data\.path: file 'missing.csv' not found"),
    ({"sources": [{"path": "qa.jsonl", "weight": -2}]}, r"^config key runs\.x\.data\.sources\[0\]\.weight: -2 is less"),
    ({"colums": {}}, r"^config key runs\.x\.data\.colums: unknown key"),
    ({"columns": {"output": "answer"}}, r"^config key runs\.x\.data\.columns: give it with runs\.x\.data\.path"),
])
def test_a_runs_data_mistakes_name_the_run(workdir, data, message):
    with pytest.raises(ConfigError, match=message):
        load({"data": {"path": "alpaca.csv"}, "runs": {"x": {"data": data}}}, workdir)


def test_only_the_data_runs_train_on_must_exist(workdir):
    _, runs = load({"data": {"path": "gone.csv"}, "runs": {"qa": {"data": {"path": "qa.jsonl"}}}}, workdir)
    assert runs["qa"]["data_key"] == "qa"
    with pytest.raises(ConfigError, match=r"^config key data\.path: file 'gone.csv' not found"):
        load({"data": {"path": "gone.csv"}, "runs": {"qa": {"data": {"path": "qa.jsonl"}}, "plain": {}}}, workdir)


def test_a_run_named_default_with_other_data_beside_runs_on_data_is_refused(workdir):
    runs = {"default": {"data": {"path": "qa.jsonl"}}}
    assert load({"data": {"path": "alpaca.csv"}, "runs": runs}, workdir)[1]["default"]["data_key"] == "default"
    with pytest.raises(ConfigError, match=r"^config key runs\.default\.data: .* rename the run"):
        load({"data": {"path": "alpaca.csv"}, "runs": {"other": {}, **runs}}, workdir)


# ------------------------------------------------------------------------------------------ clean

def _clean(workdir, sources=None):
    config, _ = load({"data": {"sources": sources or _sources()}}, workdir)
    out = workdir / "out"
    with contextlib.chdir(workdir):  # the config's paths are relative to the workflow's directory
        return run_clean(config["data"]["sources"], out / "clean.parquet", out / "rejected.parquet",
                         out / "clean_report.json", eval_fraction=0.0)


def test_each_source_is_cleaned_with_its_own_columns_and_counted(workdir):
    result = _clean(workdir)
    report = json.loads((workdir / "out" / "clean_report.json").read_text())
    assert report == result.report
    a, q = report["sources"]["alpaca"], report["sources"]["qa"]
    assert (a["rows_in"], a["rows_kept"], a["rows_rejected"]) == (3, 3, 0)
    assert (q["rows_in"], q["rows_kept"], q["rows_rejected"]) == (4, 2, 2)
    assert q["path"] == "qa.jsonl" and q["columns"] == {"instruction": "question", "output": "answer"}
    assert q["rejected_by_reason"] == {"duplicate": 1, "empty_output": 1}
    assert (report["rows_in"], report["rows_kept"], report["rows_rejected"]) == (7, 5, 2)
    assert report["rows_in"] == report["rows_kept"] + report["rows_rejected"]
    assert report["rejected_by_reason"] == {"duplicate": 1, "empty_output": 1}
    assert report["splits"] == {"train": 5, "eval": 0}

    kept = pd.read_parquet(workdir / "out" / "clean.parquet")
    assert kept[["row", "source", "source_row", "instruction"]].values.tolist() == [
        [1, "alpaca", 1, "Say hi."], [2, "alpaca", 2, "Say bye."], [3, "alpaca", 3, "Add 1 and 2."],
        [4, "qa", 1, "What is 2 + 2?"], [7, "qa", 4, "Spell cat."]]
    rejected = pd.read_parquet(workdir / "out" / "rejected.parquet")
    assert rejected[["row", "source", "source_row", "reason", "detail"]].values.tolist() == [
        [5, "qa", 2, "duplicate", "duplicate of row 1 of source 'alpaca'"], [6, "qa", 3, "empty_output", ""]]


def test_the_first_source_listed_keeps_a_row_both_have(workdir):
    result = _clean(workdir, list(reversed(_sources())))
    assert result.rejected[["source", "source_row", "detail"]].values.tolist() == [
        ["qa", 3, ""], ["alpaca", 1, "duplicate of row 2 of source 'qa'"]]
    assert result.kept["source"].tolist() == ["qa", "qa", "qa", "alpaca", "alpaca"]


def test_a_sources_mistakes_name_its_file_and_key(workdir):
    with pytest.raises(CleanError, match=r"qa\.jsonl: data\.sources\[1\]\.columns\.output is 'reply'"):
        _clean(workdir, [{"path": "alpaca.csv"}, {"path": "qa.jsonl", "columns": {"output": "reply"}}])
    (workdir / "empty.csv").write_text("instruction,output\nno answer,\n")
    with pytest.raises(CleanError, match=r"empty\.csv: all 1 rows were rejected .*'row': 1, 'reason': 'empty_output'.*"
                                         r"fix the data or data\.sources\[1\]\.columns"):
        _clean(workdir, [{"path": "alpaca.csv"}, {"path": "empty.csv"}])


# ------------------------------------------------------------------------------------------ tokens

def test_the_token_cache_carries_each_rows_source(workdir, tmp_path):
    result = _clean(workdir)
    prompts = render_prompts(result.kept, load_template("alpaca"))
    assert prompts["source"].tolist() == ["alpaca"] * 3 + ["qa"] * 2
    train = tokenize_prompts(prompts, build_tokenizer(), max_length=256).splits["train"]
    train.save(tmp_path / "train.safetensors")
    back = Examples.load(tmp_path / "train.safetensors")
    assert back.source_names == ["alpaca", "qa"]
    assert back.source.tolist() == [0, 0, 0, 1, 1] and back.row.tolist() == [1, 2, 3, 4, 7]


# ------------------------------------------------------------------------------------------ batch plan

def _examples(sources: list[int], names: list[str] | None, seed=0) -> Examples:
    rng = np.random.default_rng(seed)
    rows, plens = [], []
    for _ in sources:
        p, r = int(rng.integers(1, 9)), int(rng.integers(1, 7))
        ids = rng.integers(2, 100, p + r).tolist() + [1]
        rows.append((ids, [IGNORE_INDEX] * p + ids[p:]))
        plens.append(p)
    metadata = {"eos_token_id": 1, "pad_token_id": 0, **({"sources": json.dumps(names)} if names else {})}
    return Examples.from_rows(rows, list(range(1, len(sources) + 1)), plens, metadata, sources=sources)


def _epoch_rows(planner, epoch):
    steps = range(epoch * planner.steps_per_epoch, (epoch + 1) * planner.steps_per_epoch)
    return [r for s in steps for micro in planner.step(s).micro_batches[0] for r in micro]


def test_each_epoch_takes_round_weight_times_rows_of_each_source():
    ex = _examples([0] * 30 + [1] * 10 + [2] * 7, ["big", "small", "third"])
    planner = BatchPlanner(ex, batch_size=6, micro_batch_size=2, world_size=1, seed=3,
                           source_weights={"big": 0.5, "small": 2, "third": 1.5})
    assert planner.rows_per_epoch() == {"big": 15, "small": 20, "third": 11}  # 10.5 rounds up
    assert planner.steps_per_epoch == 46 // 6
    epochs = []
    for epoch in range(3):
        rows = np.array(_epoch_rows(planner, epoch))
        assert len(rows) == 7 * 6  # the last partial batch (4 rows) is left out
        counts = np.bincount(ex.source.numpy()[rows], minlength=3)
        assert abs(counts - [15, 20, 11]).sum() <= 4, counts
        big = rows[rows < 30]
        assert len(big) == len(set(big.tolist()))  # below the source's size: no row twice
        assert np.bincount(rows[(rows >= 30) & (rows < 40)] - 30).max() <= 2  # weight 2: at most twice
        epochs.append(rows.tolist())
    assert epochs[0] != epochs[1]
    again = BatchPlanner(ex, batch_size=6, micro_batch_size=2, world_size=1, seed=3,
                         source_weights={"big": 0.5, "small": 2, "third": 1.5})
    assert [again.step(s) for s in (20, 3, 9)] == [planner.step(s) for s in (20, 3, 9)]  # resume: same plan


def test_whole_repeats_beyond_a_sources_size_without_the_cut():
    ex = _examples([0] * 5 + [1] * 4, ["a", "b"])
    planner = BatchPlanner(ex, batch_size=4, micro_batch_size=2, world_size=1, seed=0,
                           source_weights={"a": 1.6, "b": 3})  # 8 + 12 rows: 5 whole steps
    for epoch in range(2):
        rows = np.array(_epoch_rows(planner, epoch))
        assert np.bincount(rows[rows >= 5] - 5).tolist() == [3, 3, 3, 3]
        a = np.bincount(rows[rows < 5], minlength=5)
        assert a.sum() == 8 and set(a.tolist()) <= {1, 2} and (a == 2).sum() == 3


def _todays_plan(ex, batch_size, seed, steps):
    """The plan as batching.py made it before sources (one permutation of all rows per epoch), step by step."""
    lengths, per_epoch = ex.lengths.numpy(), len(ex) // batch_size
    out = []
    for step in range(steps):
        order = np.random.default_rng([seed, step // per_epoch]).permutation(len(ex))[: per_epoch * batch_size]
        rows = order[(step % per_epoch) * batch_size:][:batch_size]
        out.append(rows[np.argsort(-lengths[rows], kind="stable")].tolist())
    return out


@pytest.mark.parametrize("sources, names, weights", [
    ([0] * 43, None, None),                          # a hand-made cache: no sources named
    ([0] * 43, ["data"], {"data": 1}),               # data.path: one source, weight 1
    ([0] * 20 + [1] * 23, ["a", "b"], {"a": 1, "b": 1}),  # every weight 1: each row once, as before
])
def test_one_source_of_weight_one_plans_exactly_as_before(sources, names, weights):
    ex = _examples(sources, names)
    planner = BatchPlanner(ex, batch_size=8, micro_batch_size=8, world_size=1, seed=7, source_weights=weights)
    assert planner.steps_per_epoch == 5
    got = [[r for micro in planner.step(s).micro_batches[0] for r in micro] for s in range(12)]
    assert got == _todays_plan(ex, 8, 7, 12)


def test_weights_must_cover_the_caches_sources():
    ex = _examples([0] * 10 + [1] * 10, ["a", "b"])
    with pytest.raises(ValueError, match=r"no weight is given for \['b'\]"):
        BatchPlanner(ex, batch_size=4, micro_batch_size=2, world_size=1, seed=0, source_weights={"a": 2})
    with pytest.raises(ValueError, match="only 3 training rows per epoch"):
        BatchPlanner(ex, batch_size=4, micro_batch_size=2, world_size=1, seed=0, source_weights={"a": 0.1, "b": 0.2})


# ------------------------------------------------------------------------------------------ workflow

@pytest.mark.slow
def test_workflow_trains_on_two_weighted_sources_and_a_new_weight_reruns_training_only(tmp_path, tiny_model_dir):
    from test_workflow import TINY_CONFIG, planned_jobs, snakemake

    code = copy_code(tmp_path / "code")
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    (work / "config").mkdir()
    rows = pd.read_csv(TEST_DATA, keep_default_na=False)
    rows.iloc[:60].to_csv(work / "data" / "arith.csv", index=False)
    # The second source under other column names, with one row of the first among its own.
    qa = rows.iloc[[0] + list(range(60, 100))].rename(columns={"instruction": "question", "output": "answer"})
    qa.to_json(work / "data" / "qa.jsonl", orient="records", lines=True)

    def write_config(weight):
        sources = [{"path": "data/arith.csv"},
                   {"path": "data/qa.jsonl", "columns": {"instruction": "question", "output": "answer"},
                    "weight": weight}]
        config = {**TINY_CONFIG, "data": {"sources": sources, "eval_fraction": 0.2},
                  "model": {"base": str(tiny_model_dir("llama"))}}
        (work / "config" / "config.yaml").write_text(yaml.safe_dump(config))

    write_config(2)
    snakemake(code, work, timeout=900)
    report = json.loads((work / "results" / "data" / "default" / "clean_report.json").read_text())
    assert report["sources"]["arith"]["rows_in"] == 60 and report["sources"]["qa"]["rows_in"] == 41
    assert report["sources"]["qa"]["rejected_by_reason"].get("duplicate") == 1
    rejected = pd.read_parquet(work / "results" / "data" / "default" / "rejected.parquet")
    assert "duplicate of row 1 of source 'arith'" in rejected.loc[rejected["source"] == "qa", "detail"].tolist()
    summary = json.loads((work / "results" / "runs" / "default" / "train" / "summary.json").read_text())
    arith, qa_plan = summary["sources"]["arith"], summary["sources"]["qa"]
    assert qa_plan["weight"] == 2 and qa_plan["rows_per_epoch"] == 2 * qa_plan["train_rows"]
    assert arith["rows_per_epoch"] == arith["train_rows"] > 0
    html = (work / "results" / "runs" / "default" / "report.html").read_text()
    assert "data/qa.jsonl" in html and "rows per epoch" in html
    assert not planned_jobs(code, work)  # a finished tree has nothing to do

    write_config(0.5)
    rules = {rule for rule, _ in planned_jobs(code, work)}
    assert rules == {"train", "evaluate", "compare", "report", "compare_runs"}, rules  # compare_runs shows the weight

    # Runs on their own data: one more clean, render and tokenize for the two runs that share it, none for
    # the run on data's (already done); each run trains on its own data's tokens.
    write_config(2)  # back to the weight the default run was trained with
    config = yaml.safe_load((work / "config" / "config.yaml").read_text())
    qa_only = {"path": "data/qa.jsonl", "columns": {"instruction": "question", "output": "answer"}}
    config["runs"] = {"default": {}, "qa": {"data": qa_only}, "qa_lr": {"data": qa_only, "train": {"learning_rate": 0.001}}}
    (work / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    jobs = planned_jobs(code, work)
    before_training = {(rule, output) for rule, output in jobs if rule in ("clean", "render", "tokenize", "evaluate_base")}
    assert {rule for rule, _ in before_training} == {"clean", "render", "tokenize", "evaluate_base"}
    assert all("/qa/" in output for _, output in before_training) and len(before_training) == 4, before_training
    assert {output.split("/")[2] for rule, output in jobs if rule == "train"} == {"qa", "qa_lr"}
