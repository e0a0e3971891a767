import csv
import io
from pathlib import Path

import pytest

from instructflow import demo_data
from instructflow.clean import read_table, run_clean

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "resources" / "demo" / "instructions.csv"


def test_same_seed_same_bytes(tmp_path):
    a, b, c = tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "c.csv"
    demo_data.main(["--out", str(a)])
    demo_data.main(["--out", str(b)])
    demo_data.main(["--out", str(c), "--seed", "7"])
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_committed_file_matches_generator():
    assert COMMITTED.read_bytes() == demo_data.to_csv(demo_data.generate()), (
        "resources/demo/instructions.csv is stale; run `python -m instructflow.demo_data`"
    )


def test_rows_option_and_shape(tmp_path):
    out = tmp_path / "small.csv"
    demo_data.main(["--out", str(out), "--rows", "200", "--seed", "3"])
    rows = list(csv.reader(io.StringIO(out.read_text(encoding="utf-8"))))
    assert rows[0] == ["instruction", "input", "output"]
    n_dirty = len(demo_data.dirty_rows(demo_data.generate(200, 3)))
    assert len(rows) - 1 == 200 + n_dirty
    with pytest.raises(ValueError):
        demo_data.generate(rows=3)


def test_contains_dirty_rows_and_task_mix():
    df = read_table(COMMITTED)
    assert (df["output"].str.strip() == "").any()
    assert (df["instruction"].str.strip() == "").any()
    assert df.duplicated(["instruction", "input", "output"]).any()
    assert {"<noinput>", "N/A"} <= set(df["input"])
    assert (df["output"].str.len() > 8000).any()
    assert (df["instruction"].str.contains("{instruction}", regex=False)).any()
    assert df["input"].str.contains("cafe\u0301").any() and df["input"].str.contains("caf\u00e9").any()
    with_input = (df["input"] != "").mean()
    assert 0.3 < with_input < 0.9
    assert df["instruction"].nunique() > 25  # several phrasings per family


def test_cleaning_demo(tmp_path):
    res = run_clean(COMMITTED, tmp_path / "c.parquet", tmp_path / "r.parquet", tmp_path / "rep.json")
    r = res.report
    assert r["rows_rejected"] > 0 and r["rows_kept"] > 1000
    assert r["rows_in"] == r["rows_kept"] + r["rows_rejected"]
    assert set(r["rejected_by_reason"]) == {"duplicate", "empty_instruction", "empty_output", "too_long"}
    assert r["placeholders_emptied"] >= 2 and r["mojibake_repaired"] >= 1
    assert r["splits"]["eval"] > 50
    kept = res.kept
    assert (kept["output"] == "{instruction}").any()
    assert (kept["output"] == "None").any()
    assert (kept["output"] == "1\n2\n3").any()
    # answers are short enough for exact match on a tiny model
    assert kept["output"].str.len().quantile(0.95) < 40
