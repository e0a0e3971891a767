"""The command line, run as the rules run it (`python -m instructflow STAGE ...` in a subprocess): a
failing stage ends with one line on stderr that says what went wrong and what to do, not a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

SRC = REPO / "src"
BAD = REPO / "tests" / "bad_inputs"


def instructflow(*args: str, debug: bool = False, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    env.pop("INSTRUCTFLOW_DEBUG", None)
    if debug:
        env["INSTRUCTFLOW_DEBUG"] = "1"
    return subprocess.run([sys.executable, "-m", "instructflow", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def clean(data: Path, out: Path, *extra: str, **kwargs) -> subprocess.CompletedProcess:
    return instructflow("clean", "--data", str(data), "--clean", str(out / "clean.parquet"), "--rejected",
                        str(out / "rejected.parquet"), "--report", str(out / "report.json"), *extra, **kwargs)


def last_line(proc: subprocess.CompletedProcess) -> str:
    return proc.stderr.strip().splitlines()[-1]


def test_bad_input_file_ends_in_one_line_naming_the_file_and_the_fix(tmp_path):
    proc = clean(BAD / "missing_output_column.csv", tmp_path / "out dir")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    line = last_line(proc)
    assert line.startswith("instructflow clean: ") and "missing_output_column.csv" in line
    assert "data.columns.output" in line  # what to do
    assert not (tmp_path / "out dir" / "clean.parquet").exists()


def test_missing_input_file_names_the_path(tmp_path):
    proc = clean(tmp_path / "no such.csv", tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert last_line(proc).startswith("instructflow clean: ") and "no such.csv" in last_line(proc)


def test_malformed_options_say_so(tmp_path):
    proc = clean(REPO / ".test" / "data" / "instructions.csv", tmp_path, "--options", "{not json")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert last_line(proc).startswith("instructflow clean: ") and "JSON is malformed" in last_line(proc)


def test_debug_env_adds_the_traceback_and_keeps_the_last_line(tmp_path):
    proc = clean(BAD / "missing_output_column.csv", tmp_path, debug=True)
    assert proc.returncode == 1 and "Traceback" in proc.stderr
    assert last_line(proc).startswith("instructflow clean: ")


def test_bad_model_spec(tmp_path):
    proc = instructflow("prepare-model", "--spec", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "m"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert last_line(proc).startswith("instructflow prepare-model: ") and "model.base" in last_line(proc)


def test_subcommands_are_the_rules_names():
    from instructflow.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    tools = {"generate", "chat", "serve"}  # for users of a trained model, not stages
    assert set(sub.choices) - tools == {"prepare-model", "clean", "render", "tokenize", "train", "evaluate", "compare",
                                        "report", "compare-runs", "export-gguf", "track"}
    rules = set()
    for smk in (REPO / "workflow" / "rules").glob("*.smk"):
        rules.update(line.split()[1].rstrip(":") for line in smk.read_text().splitlines() if line.startswith("rule "))
    # evaluate_base runs `evaluate` on the base model, X_test_set runs X on a test set (evaluate.test_sets);
    # every other rule is its command's namesake.
    assert {r.removesuffix("_test_set").replace("_", "-") for r in rules} - {"evaluate-base"} == set(sub.choices) - tools


def test_console_script_is_declared():
    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["instructflow"] == "instructflow.cli:main"


@pytest.mark.parametrize("smk", sorted(set((REPO / "workflow" / "rules").glob("*.smk")) - {REPO / "workflow" / "rules" / "common.smk"}),
                         ids=lambda p: p.name)
def test_rules_quote_every_path_and_call_the_cli(smk):
    import re

    text = smk.read_text()
    shell = re.findall(r'^\s+shell:\n((?:\s+".*"\n)+)', text, flags=re.M)
    assert shell, smk
    for block in shell:
        assert "python -m instructflow " in block and "instructflow.cli" not in block
        fields = re.findall(r"\{(input|output|log)(\.[A-Za-z_]+)?(:q)?\}", block)
        assert fields and all(q == ":q" for _, _, q in fields), (smk.name, fields)


def test_unexpected_errors_still_end_in_one_line():
    from instructflow.cli import describe

    assert describe(ModuleNotFoundError("No module named 'pandas'")).startswith("a dependency is missing")
    assert "INSTRUCTFLOW_DEBUG=1" in describe(TypeError("bad"))
    assert "\n" not in describe(ValueError("two\nlines"))
