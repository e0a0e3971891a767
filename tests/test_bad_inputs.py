"""The bad-input corpus (tests/bad_inputs/) through the clean, render and tokenize stages, and config
mistakes: each ends in a clear error naming file, row and column with what to do, or in rejected rows
with a reason. Row-level rules themselves are unit-tested in test_clean.py."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from instructflow import config as ifconfig
from instructflow.clean import CleanError, run_clean
from instructflow.render import render_prompts
from instructflow.templates import bundled_path, load_template
from instructflow.tokenization import AuditError, run_tokenize, tokenize_prompts

CORPUS = Path(__file__).parent / "bad_inputs"
REPO = Path(__file__).resolve().parents[1]
ALPACA = bundled_path("alpaca")

sys.path.insert(0, str(CORPUS))
from make_corpus import corpus  # noqa: E402


def clean(tmp_path, name, **options):
    out = tmp_path / "out"
    return run_clean(CORPUS / name, out / "clean.parquet", out / "rejected.parquet", out / "report.json", **options)


def test_committed_corpus_matches_its_generator():
    files = corpus()
    assert {p.name for p in CORPUS.iterdir() if p.is_file() and p.suffix != ".py"} == set(files)
    for name, data in files.items():
        if name.endswith(".parquet"):  # the bytes name the pyarrow version that wrote them: compare content
            assert pq.read_table(CORPUS / name).equals(pq.read_table(pa.BufferReader(data))), name
        else:
            assert (CORPUS / name).read_bytes() == data, name


# Every fatal file: the message names the file, where in it (record and column, or the header) and a fix.
FATAL = {
    "unbalanced_quote.csv": [r"record 2, column 'input'", r"never closed", r'two quotes \(""\)'],
    "extra_field.csv": [r"record 2 has 4 fields", r"after column 'output'", r"Quote fields",
                        r"^(?!.*in line)"],  # not pandas' own line count beside ours
    "extra_field_first.csv": [r"record 1 has 4 fields but the header has 3 \(the record starts on line 2\)",
                              r"after column 'output'", r"Quote fields that contain the separator ','"],
    "latin1.csv": [r"line 3, record 2, column 'input'", r"iconv -f latin1 -t utf-8"],
    "missing_output_column.csv": [r"cannot find the 'output' column", r"reply_text", r"data\.columns\.output"],
    "empty.csv": [r"file is empty", r"data\.path"],
    "header_only.csv": [r"header but no data rows", r"data\.path"],
    "all_rejected.csv": [r"all 2 rows were rejected", r"empty_output': 2", r"'row': 1"],
}


@pytest.mark.parametrize("name", sorted(FATAL))
def test_fatal_files_name_file_place_and_fix(tmp_path, name):
    with pytest.raises(CleanError) as err:
        clean(tmp_path, name)
    message = str(err.value)
    assert message.startswith(str(CORPUS / name))
    for pattern in FATAL[name]:
        assert re.search(pattern, message), (pattern, message)
    assert not (tmp_path / "out" / "clean.parquet").exists()  # nothing half-done for render to trust


# The same files as a test set (evaluate.test_sets.qa, cleaned as rule clean_test_set does): the fix names the set.
TEST_SET_FATAL = {
    "missing_output_column.csv": r"cannot find the 'output' column.*Set evaluate\.test_sets\.qa\.columns\.output",
    "empty.csv": r"file is empty.*point evaluate\.test_sets\.qa\.path at",
    "header_only.csv": r"header but no data rows; point evaluate\.test_sets\.qa\.path at",
    "all_rejected.csv": r"all 2 rows were rejected.*fix the data or evaluate\.test_sets\.qa\.columns",
}


@pytest.mark.parametrize("name", sorted(TEST_SET_FATAL))
def test_fatal_files_as_a_test_set_name_the_set(tmp_path, name):
    with pytest.raises(CleanError) as err:
        clean(tmp_path, name, eval_fraction=1.0, config_key="evaluate.test_sets.qa")
    assert str(err.value).startswith(str(CORPUS / name))
    assert re.search(TEST_SET_FATAL[name], str(err.value)), str(err.value)
    assert "data." not in str(err.value)


def test_misnamed_column_in_config(tmp_path):
    with pytest.raises(CleanError, match=r"placeholders\.csv: data\.columns\.output is 'answer'.*columns found"):
        clean(tmp_path, "placeholders.csv", columns={"output": "answer"})


# Files that clean: what is kept, what is rejected and why; rows_in = kept + rejected always.
def test_recoverable_files(tmp_path):
    outcomes = {}
    for name in ["utf16_bom.csv", "mojibake.csv", "placeholders.csv", "nan_like.csv", "near_duplicates.csv",
                 "long_field.csv", "braces.csv"]:
        result = clean(tmp_path / name, name)
        report = result.report
        assert report["rows_in"] == report["rows_kept"] + report["rows_rejected"], name
        assert json.loads((tmp_path / name / "out" / "report.json").read_text()) == report
        outcomes[name] = (result.kept, result.rejected, report)

    kept, _, _ = outcomes["utf16_bom.csv"]
    assert kept[["instruction", "input", "output"]].values.tolist() == [["Uppercase", "café", "CAFÉ"]]
    kept, _, report = outcomes["mojibake.csv"]
    assert kept[["input", "output"]].values.tolist() == [["café", "CAFÉ"]] and report["mojibake_repaired"] == 2

    kept, _, report = outcomes["placeholders.csv"]
    assert kept["input"].tolist() == ["", "", ""] and report["placeholders_emptied"] == 2
    assert kept["output"].tolist()[-1] == "None"  # a placeholder word in the output is an answer

    kept, _, _ = outcomes["nan_like.csv"]
    assert kept["output"].tolist() == ["nan", "None", "NaN"]
    assert all(isinstance(v, str) for v in kept[["instruction", "input", "output"]].to_numpy().ravel())

    kept, rejected, _ = outcomes["near_duplicates.csv"]
    assert kept[["row", "instruction", "output"]].values.tolist() == [[1, "Say café", "café"]]
    assert rejected[["row", "reason", "detail"]].values.tolist() == [
        [r, "duplicate", "duplicate of row 1"] for r in (2, 3, 4)]

    kept, rejected, _ = outcomes["long_field.csv"]
    assert kept["row"].tolist() == [1]
    assert rejected[["row", "reason", "detail"]].values.tolist() == [
        [2, "too_long", "9011 characters > max_chars 8000"]]


def test_files_whose_cells_were_changed_or_lost_on_reading(tmp_path):
    """Each of these lost or changed what the user wrote before the cells were read as written."""
    outcomes = {}
    for name in ["semicolon.csv", "line_separator.jsonl", "ints_nulls.json", "nullable_ints.parquet"]:
        result = clean(tmp_path / name, name)
        report = result.report
        assert report["rows_in"] == report["rows_kept"] + report["rows_rejected"], name
        outcomes[name] = (result.kept, result.rejected)

    kept, rejected = outcomes["semicolon.csv"]
    assert kept[["instruction", "input", "output"]].values.tolist() == [
        ["Say hi", "", "hi"], ["List two colours", "", "red; blue"], ["Write three and a half", "", "3,5"]]
    assert rejected.empty

    kept, _ = outcomes["line_separator.jsonl"]
    assert kept[["instruction", "input", "output"]].values.tolist() == [["Join the lines", "one\u2028two", "one two"]]

    kept, rejected = outcomes["ints_nulls.json"]
    assert kept["output"].tolist() == ["5", "12345678901234567", "1.50"]
    assert rejected[["row", "reason", "instruction"]].values.tolist() == [[3, "empty_output", "Say nothing"]]

    kept, rejected = outcomes["nullable_ints.parquet"]
    assert kept[["row", "output"]].values.tolist() == [[1, "5"], [3, "12345678901234567"]]
    assert rejected[["row", "reason"]].values.tolist() == [[2, "empty_output"]]


def test_braces_and_jinja_reach_the_prompt_verbatim(tmp_path, tokenizer):
    kept = clean(tmp_path, "braces.csv").kept
    row = kept.iloc[0]
    assert row["instruction"] == "Explain {instruction} in a template"
    assert row["input"] == "{{ input }} and {% if x %}y{% endif %}"
    file_prompts = render_prompts(kept, load_template(ALPACA))
    chat_prompts = render_prompts(kept, load_template("chat"), tokenizer)
    for prompts in (file_prompts, chat_prompts):
        assert row["instruction"] in prompts["prompt"][0] and row["input"] in prompts["prompt"][0]
        assert prompts["response"][0] == "It is replaced by {output}, {0} and {}"


def test_rows_over_the_token_budget_are_rejected_with_a_reason(tmp_path, tokenizer):
    kept = clean(tmp_path, "over_budget.csv", eval_fraction=0.0).kept
    prompts = render_prompts(kept, load_template(ALPACA))
    result = tokenize_prompts(prompts, tokenizer, max_length=128)
    assert result.audit["rows_in"] == result.audit["rows_kept"] + result.audit["rows_rejected"] == 2
    assert result.splits["train"].row.tolist() == [1]
    [rejected] = result.rejected.to_dict("records")
    assert rejected["row"] == 2 and rejected["reason"] == "too_many_tokens"
    assert re.fullmatch(r"\d+ tokens > tokenize\.max_length 128", rejected["detail"])

    truncated = tokenize_prompts(prompts, tokenizer, max_length=128, truncation="truncate")
    assert truncated.audit["rows_truncated"] == 1 and len(truncated.splits["train"]) == 2


def test_no_row_within_the_token_budget_stops_tokenize(tmp_path, tiny_model_dir):
    kept = clean(tmp_path, "over_budget.csv", eval_fraction=0.0).kept
    prompts_path = tmp_path / "prompts.parquet"
    render_prompts(kept, load_template(ALPACA)).to_parquet(prompts_path)
    out = tmp_path / "tokens"
    with pytest.raises(AuditError, match=r"no rows left to train on: 2 of 2 rows exceed tokenize\.max_length 8"
                                         r".*raise tokenize\.max_length"):
        run_tokenize(prompts_path, tiny_model_dir("llama"), out / "train.safetensors", out / "eval.safetensors",
                     out / "rejected.parquet", out / "audit.json", max_length=8)
    assert not (out / "train.safetensors").exists()



@pytest.mark.parametrize("arch", ["gpt2", "opt"])  # learned position tables: a longer row is an IndexError
def test_max_length_above_a_position_table_stops_tokenize_before_any_work(tmp_path, tiny_model_dir, arch):
    from transformers import AutoConfig

    from instructflow.modeling import position_limit

    model_dir = tiny_model_dir(arch)
    limit = position_limit(AutoConfig.from_pretrained(model_dir))
    prompts_path = tmp_path / "prompts.parquet"
    render_prompts(clean(tmp_path, "braces.csv", eval_fraction=0.0).kept, load_template(ALPACA)).to_parquet(prompts_path)
    out = tmp_path / "tokens"
    paths = (out / "train.safetensors", out / "eval.safetensors", out / "rejected.parquet", out / "audit.json")
    with pytest.raises(ifconfig.ConfigError, match=rf"tokenize\.max_length {limit + 1} is more than the {limit} "
                                                   rf"positions the model in {re.escape(str(model_dir))} takes; "
                                                   rf"set tokenize\.max_length to {limit} or less"):
        run_tokenize(prompts_path, model_dir, *paths, max_length=limit + 1)
    assert not out.exists()
    run_tokenize(prompts_path, model_dir, *paths, max_length=limit)
    assert (out / "train.safetensors").is_file()


def test_max_length_above_a_rotary_models_trained_length_warns_and_tokenizes(tmp_path, tiny_model_dir):
    model_dir = tiny_model_dir("llama")  # rotary: transformers computes any position, so longer rows run
    prompts_path = tmp_path / "prompts.parquet"
    render_prompts(clean(tmp_path, "braces.csv", eval_fraction=0.0).kept, load_template(ALPACA)).to_parquet(prompts_path)
    out = tmp_path / "tokens"
    with pytest.warns(UserWarning, match=r"tokenize\.max_length 4096 is more than the 512 positions .* trained with"):
        run_tokenize(prompts_path, model_dir, out / "train.safetensors", out / "eval.safetensors",
                     out / "rejected.parquet", out / "audit.json", max_length=4096)
    assert (out / "train.safetensors").is_file()


# ---------------------------------------------------------------------------------------------- config

def default_config() -> dict:
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def load_config(tmp_path, edit) -> None:
    """ifconfig.load on the default config, edited, from a work folder holding the demo data."""
    config = default_config()
    (tmp_path / "data.csv").write_text("instruction,input,output\nSay hi,,hi\n")
    config["data"]["path"] = "data.csv"
    edit(config)
    ifconfig.load(config, tmp_path)


def set_key(path: str, value):
    def edit(config):
        *parents, last = path.split(".")
        node = config
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return edit


@pytest.mark.parametrize("path,value,pattern", [
    ("train.learnig_rate", 1e-4, r"^config key train\.learnig_rate: unknown key \(valid keys here: .*learning_rate"),
    ("train.max_steps", "ten", r"^config key train\.max_steps: 'ten' is not of type 'integer'"),
    ("tokenize.truncation", "cut", r"^config key tokenize\.truncation: 'cut' is not one of"),
    ("model.trust_remote_code", "yes", r"^config key model\.trust_remote_code: 'yes' is not of type 'boolean'"),
    ("data.path", "missing.csv", r"^config key data\.path: file 'missing\.csv' not found"),
    ("data.path", ".", r"^config key data\.path: '\.' is a folder .*; name one file in it, or list several as "
                       r"data\.sources"),
    ("evaluate.test_sets", {"qa": "."}, r"^config key evaluate\.test_sets\.qa\.path: test set 'qa': '\.' is a folder "
                                        r".*; name one file in it; point it at your evaluation file"),
    ("template", "mine.yaml", r"^config key template: file 'mine\.yaml' not found"),
    ("train.args_file", "args.json", r"^config key train\.args_file: cannot read 'args\.json'"),
    ("model.base", "pkg://no_such_package/m.gguf", r"^config key model\.base: .*'no_such_package' is not installed"),
    ("model.base", "models/tiny.gguf", r"^config key model\.base: .*GGUF file not found"),
    ("model.base", "./models/tiny", r"^config key model\.base: .*no such folder"),
    ("runs.sweep", {"model": {"base": "/nonexistent/model"}},
     r"^config key runs\.sweep\.model\.base: .*no such folder"),
])
def test_config_errors_name_the_key(tmp_path, path, value, pattern):
    with pytest.raises(ifconfig.ConfigError, match=pattern):
        load_config(tmp_path, set_key(path, value))


def test_model_folder_that_cannot_load(tmp_path):
    folder = tmp_path / "models" / "broken"
    folder.mkdir(parents=True)
    with pytest.raises(ifconfig.ConfigError, match=r"^config key model\.base: .*no config\.json"):
        load_config(tmp_path, set_key("model.base", "models/broken"))
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ifconfig.ConfigError, match=r"^config key model\.base: .*unreadable config\.json"):
        load_config(tmp_path, set_key("model.base", "models/broken"))
    (folder / "config.json").write_text("{}")
    with pytest.raises(ifconfig.ConfigError, match=r"^config key model\.base: .*names no model_type"):
        load_config(tmp_path, set_key("model.base", "models/broken"))


def test_config_errors_stop_snakemake_before_any_job(tmp_path):
    """The workflow's own entry: a bad key ends `snakemake -n` with the one message, no job runs."""
    import subprocess

    config = tmp_path / "bad.yaml"
    config.write_text("train:\n  max_step: 10\n")
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--snakefile", str(REPO / "Snakefile"),
                           "--directory", str(REPO), "--configfile", str(config), "--cores", "1"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode != 0
    assert "instructflow: config key train.max_step: unknown key" in proc.stdout + proc.stderr
    assert "Job stats" not in proc.stdout + proc.stderr
    assert 'File "' not in proc.stdout + proc.stderr  # the message alone, no traceback of the Snakefile's line


def test_runs_in_a_configfile_replace_the_default_run(tmp_path):
    """The README's sweep: a --configfile listing runs plans those runs only. (config/config.yaml sets no runs:
    Snakemake merges configfiles key by key, so a default run written there would be added to every sweep.)"""
    import subprocess

    def planned_runs(*configfiles):
        extra = [arg for path in configfiles for arg in ("--configfile", str(path))]
        proc = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--forceall", "--snakefile",
                               str(REPO / "Snakefile"), "--directory", str(REPO), *extra, "--cores", "1"],
                              capture_output=True, text=True, cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return set(re.findall(r"results/runs/([A-Za-z0-9._-]+)/report\.html", proc.stdout))

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"runs": {"full": {}, "lora": {"train": {"method": "lora",
                                                                               "learning_rate": 0.001}}}}))
    assert planned_runs(sweep) == {"full", "lora"}
    assert planned_runs() == {"default"}
