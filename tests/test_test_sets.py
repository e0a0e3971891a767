"""Your own test sets (evaluate.test_sets): config, the stages' test-set modes (clean with every row held
out, tokenize without a train split, compare and report per set), and one tiny end-to-end workflow run
with one extra set, plus a bad set stopping the workflow before training."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import yaml

from conftest import TEST_DATA, copy_code
from instructflow.clean import CleanError, run_clean
from instructflow.config import ConfigError, load
from instructflow.evaluate import compare
from instructflow.render import run_render
from instructflow.report import build_report
from instructflow.templates import bundled_path
from instructflow.tokenization import AuditError, run_tokenize

QA = "q,a\nWhat is 2 + 2?,4\nName a colour.,red\nSpell cat.,c a t\nWhat is 10 - 3?,7\nSay yes.,yes\n"


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "data.csv").write_text("instruction,input,output\nSay hi.,,hi\n")
    (tmp_path / "qa.csv").write_text(QA)
    return tmp_path


def test_config_takes_a_path_or_path_and_columns(workdir):
    config, _ = load({"data": {"path": "data.csv"}, "evaluate": {"test_sets": {
        "short": "qa.csv", "mapped": {"path": "qa.csv", "columns": {"instruction": "q", "output": "a"}}}}}, workdir)
    assert config["evaluate"]["test_sets"] == {"short": {"path": "qa.csv", "columns": {}},
                                                "mapped": {"path": "qa.csv", "columns": {"instruction": "q",
                                                                                         "output": "a"}}}
    assert load({"data": {"path": "data.csv"}}, workdir)[0]["evaluate"]["test_sets"] == {}


@pytest.mark.parametrize("test_sets, pattern", [
    ({"qa": "missing.csv"}, r"^config key evaluate\.test_sets\.qa\.path: test set 'qa': file 'missing\.csv' not found"
                            r".*point it at your evaluation file"),
    ({"qa": {"pth": "qa.csv"}}, r"^config key evaluate\.test_sets\.qa\.pth: unknown key \(valid keys here: columns, path"),
    ({"qa": {"path": "qa.csv", "columns": {"answer": "a"}}}, r"^config key evaluate\.test_sets\.qa\.columns\.answer: "),
    ({"my set": "qa.csv"}, r"^config key evaluate\.test_sets: 'my set' does not match"),
])
def test_config_mistakes_name_the_set(workdir, test_sets, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load({"data": {"path": "data.csv"}, "evaluate": {"test_sets": test_sets}}, workdir)


def clean_set(tmp_path, path, name="qa", **options):
    """run_clean as rule clean_test_set calls it."""
    out = tmp_path / "out"
    return run_clean(path, out / "clean.parquet", out / "rejected.parquet", out / "report.json", eval_fraction=1.0,
                     config_key=f"evaluate.test_sets.{name}", **options)


def test_every_row_of_a_test_set_is_held_out(workdir):
    result = clean_set(workdir, workdir / "qa.csv", columns={"instruction": "q", "output": "a"})
    assert result.kept["row"].tolist() == [1, 2, 3, 4, 5]
    assert set(result.kept["split"]) == {"eval"} and result.report["splits"] == {"train": 0, "eval": 5}


def tokenize_set(tmp_path, model_dir, max_length=512):
    clean_set(tmp_path, tmp_path / "qa.csv", columns={"instruction": "q", "output": "a"})
    run_render(tmp_path / "out" / "clean.parquet", bundled_path("alpaca"), tmp_path / "prompts.parquet")
    tokens = tmp_path / "tokens"
    return tokens, run_tokenize(tmp_path / "prompts.parquet", model_dir, None, tokens / "eval.safetensors",
                                tokens / "rejected.parquet", tokens / "audit.json", max_length=max_length,
                                test_set="qa")


def test_tokenize_writes_only_the_eval_examples_of_a_test_set(workdir, tiny_model_dir):
    from instructflow.examples import Examples

    tokens, result = tokenize_set(workdir, tiny_model_dir("llama"))
    assert Examples.load(tokens / "eval.safetensors").row.tolist() == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in tokens.iterdir()) == ["audit.json", "eval.safetensors", "rejected.parquet"]
    assert result.audit["rows_per_split"] == {"train": 0, "eval": 5}


def test_a_test_set_with_no_row_in_the_token_budget_stops(workdir, tiny_model_dir):
    with pytest.raises(AuditError, match=r"^test set 'qa': no rows left to evaluate: all 5 rows exceed "
                                         r"tokenize\.max_length 8; .*evaluate\.test_sets\.qa"):
        tokenize_set(workdir, tiny_model_dir("llama"), max_length=8)
    assert not (workdir / "tokens" / "eval.safetensors").exists()


def _metrics(path, loss, n):
    path.write_text(json.dumps({"eval_loss": loss, "exact_match": 0.0, "n": n}))
    return str(path)


def _samples(path):
    pd.DataFrame({"row": [1], "prompt": ["p"], "reference": ["r"], "prediction": ["x"]}).to_parquet(path)
    return str(path)


def test_compare_adds_each_sets_base_tuned_and_delta_and_the_report_shows_them(tmp_path):
    held = [_metrics(tmp_path / "b.json", 2.0, 4), _metrics(tmp_path / "t.json", 1.5, 4),
            _samples(tmp_path / "bs.parquet"), _samples(tmp_path / "ts.parquet")]
    plain = compare(*held, tmp_path / "plain.json", tmp_path / "plain.md")
    assert set(plain) == {"base", "tuned", "delta"}  # no sets: metrics.json as before
    sets = {"qa": {"path": "data/qa.csv", "base": _metrics(tmp_path / "qb.json", 3.0, 5),
                   "tuned": _metrics(tmp_path / "qt.json", 2.25, 5)}}
    combined = compare(*held, tmp_path / "metrics.json", tmp_path / "samples.md", test_sets=sets)
    assert combined["delta"]["eval_loss"] == -0.5  # the held-out metrics stay where they were
    assert combined["test_sets"]["qa"]["path"] == "data/qa.csv"
    assert combined["test_sets"]["qa"]["base"]["eval_loss"] == 3.0
    assert combined["test_sets"]["qa"]["delta"]["eval_loss"] == -0.75
    assert json.loads((tmp_path / "metrics.json").read_text()) == combined

    def report(metrics):
        paths = {k: tmp_path / f"missing-{k}" for k in ("metrics_jsonl", "samples_md", "clean_report", "audit",
                                                        "train_summary", "loss_png")}
        build_report("r", eval_metrics=metrics, out_md=tmp_path / "r.md", out_html=tmp_path / "r.html", **paths)
        return (tmp_path / "r.md").read_text(), (tmp_path / "r.html").read_text()

    md, html = report(tmp_path / "plain.json")
    assert "test set" not in md.lower()
    md, html = report(tmp_path / "metrics.json")
    assert "| qa (data/qa.csv) | eval_loss | 3.0000 | 2.2500 | -0.7500 |" in md
    assert "<td>qa (data/qa.csv)</td><td>eval_loss</td>" in html


def test_a_test_set_without_an_output_column_names_file_set_and_fix(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("instruction,reply_text\nSay hi,hi\n")
    with pytest.raises(CleanError, match=rf"^{path}: cannot find the 'output' column.*"
                                         r"Set evaluate\.test_sets\.qa\.columns\.output in the config"):
        clean_set(tmp_path, path)


# ------------------------------------------------------------------------------------------ workflow

def _workflow_dir(root, tiny_model_dir, test_set_csv: str, **evaluate):
    from test_workflow import TINY_CONFIG

    work = root / "work"
    (work / "data").mkdir(parents=True)
    (work / "config").mkdir()
    shutil.copy(TEST_DATA, work / "data" / "instructions.csv")
    (work / "data" / "qa.csv").write_text(test_set_csv)
    config = {**TINY_CONFIG, "model": {"base": str(tiny_model_dir("llama"))},
              "evaluate": {**TINY_CONFIG["evaluate"], **evaluate,
                           "test_sets": {"qa": {"path": "data/qa.csv", "columns": {"instruction": "q", "output": "a"}}}}}
    (work / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    return work


@pytest.mark.slow
def test_workflow_evaluates_a_test_set_for_base_and_tuned(tmp_path, tiny_model_dir):
    from test_workflow import snakemake

    code = copy_code(tmp_path / "code")
    work = _workflow_dir(tmp_path, tiny_model_dir, QA, max_samples=8)
    snakemake(code, work, timeout=600)
    run = work / "results" / "runs" / "default"
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert {"eval_loss", "exact_match", "rouge_l"} <= set(metrics["base"])  # held-out metrics where they were
    qa = metrics["test_sets"]["qa"]
    assert qa["path"] == "data/qa.csv"
    for side in ("base", "tuned"):  # over exactly the file's 5 rows: loss and generations
        assert qa[side]["n"] == qa[side]["n_loss_rows"] == 5, side
    assert qa["delta"]["eval_loss"] == pytest.approx(qa["tuned"]["eval_loss"] - qa["base"]["eval_loss"])
    assert qa["base"]["eval_loss"] != metrics["base"]["eval_loss"]
    samples = pd.read_parquet(next((work / "results" / "base_eval").glob("*/alpaca/test_sets/qa/samples.parquet")))
    assert samples["row"].tolist() == [1, 2, 3, 4, 5]
    assert sorted(samples["reference"]) == sorted(["4", "red", "c a t", "7", "yes"])
    tuned = pd.read_parquet(run / "eval" / "test_sets" / "qa" / "tuned_samples.parquet")
    assert tuned["reference"].tolist() == samples["reference"].tolist()
    assert "qa (data/qa.csv)" in (run / "report.md").read_text()
    assert "qa (data/qa.csv)" in (run / "report.html").read_text()


@pytest.mark.slow
def test_a_test_set_whose_rows_are_all_rejected_stops_the_workflow_before_training(tmp_path, tiny_model_dir):
    from test_workflow import snakemake

    code = copy_code(tmp_path / "code")
    work = _workflow_dir(tmp_path, tiny_model_dir, "q,a\nSay hi,\nSay bye,\n")
    proc = snakemake(code, work, check=False, timeout=600)
    assert proc.returncode != 0
    log = (work / "logs" / "clean_test_set" / "qa.log").read_text()
    assert "data/qa.csv: all 2 rows were rejected" in log and "evaluate.test_sets.qa.columns" in log
    assert not (work / "results" / "runs" / "default" / "model").exists()
    assert not (work / "logs" / "train").exists()
