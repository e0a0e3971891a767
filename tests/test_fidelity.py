"""Content fidelity as a property: rows written to every format the clean stage reads (CSV with each
separator it detects, TSV, JSON array and JSON object of columns, JSONL, Parquet) are read back cell for
cell as written, and cleaning changes a kept cell only by the normalisations listed in NORMALISATIONS
(README "Cleaning"). rows_in = rows_kept + rows_rejected, and which rows are rejected, and why, follows
from those normalised cells alone."""

from __future__ import annotations

import csv
import io
import json
import re
import unicodedata

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from instructflow.clean import DEFAULT_PLACEHOLDERS, clean_table, read_table

# What cleaning may change in a kept cell, one rule each; `normalised` below is their executable form.
NORMALISATIONS = [
    "line breaks: \\r\\n and a lone \\r become \\n",
    "zero-width characters U+200B, U+200C, U+200D, U+2060 and U+FEFF are removed",
    "UTF-8 text that was decoded as cp1252/latin-1 (mojibake, e.g. 'cafÃ©') is repaired",
    "Unicode NFC",
    "trailing whitespace (str.isspace: also U+00A0, U+2028, U+2029, U+3000...) is removed",
    "leading blank lines are removed; the first line's indentation (spaces, tabs) stays in input and output",
    "the instruction loses all leading whitespace",
    "an input that is a placeholder (data.placeholders: <noinput>, N/A, none, ..., any case) becomes empty",
]

FIDELITY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                           HealthCheck.too_slow])
COLUMNS = ("instruction", "input", "output")
_ZERO_WIDTH = re.compile("[\u200b\u200c\u200d\u2060\ufeff]")
# A Latin-1/cp1252 lead byte of a UTF-8 sequence followed by a continuation byte read the same way:
# such text is repaired on purpose (and tested in test_clean.py), so generated text avoids it.
_MOJIBAKE_LIKE = re.compile("[\u00c2-\u00ef][\u0080-\u00bf\u0152-\u0161\u0178-\u0192\u02c6\u02dc\u2013-\u203a\u20ac\u2122]")

SPECIAL = [
    "    return sorted(xs)", "\tif a:\n\t\tb = 1\n", "\n\n  indented after blank lines", "  x  \n  y  ",
    "a,b;c\td|e", 'say "hi", then ";"', '"', '""', "line\nbreak", "crlf\r\nline", "lone\rcr",
    "x\u2028y", "x\u2029y", "\u2028", "emoji \U0001F600\U0001F3FD", "e\u0301", "cafe\u0301", "\u200bzero\u200dwidth",
    "", " ", "\t", "N/A", "<noinput>", "None", "nan", "NULL", "12345678901234567", "5", "-0", "1e5",
    "{instruction} {{ x }}", "\\n is not a newline", "\u00a0nbsp\u00a0", "\u3000ideographic",
]


def _no_mojibake(text: str) -> bool:
    return not _MOJIBAKE_LIKE.search(_ZERO_WIDTH.sub("", text.replace("\r\n", "\n").replace("\r", "\n")))


TEXT = st.one_of(st.sampled_from(SPECIAL),
                 st.text(st.characters(blacklist_categories=("Cs",)), max_size=24).filter(_no_mojibake))
INT = st.integers(-2**63, 2**63 - 1) | st.sampled_from([2**53 + 1, 12345678901234567, -2**63, 0])
FLOAT = st.floats(allow_nan=False, allow_infinity=False)
OUTPUT_KIND = {"text": TEXT, "int": INT, "float": FLOAT, "bool": st.booleans()}


@st.composite
def tables(draw, mixed_ok: bool = True):
    """(output column kind, rows of typed values; None is an empty/missing cell)."""
    kinds = list(OUTPUT_KIND) + (["mixed"] if mixed_ok else [])
    kind = draw(st.sampled_from(kinds))
    out = st.one_of(*OUTPUT_KIND.values()) if kind == "mixed" else OUTPUT_KIND[kind]
    row = st.tuples(TEXT, st.none() | TEXT, st.none() | out)
    rows = draw(st.lists(row, min_size=1, max_size=12))
    if draw(st.booleans()) and len(rows) > 1:  # a near-duplicate of the first row, up to whitespace
        ins, inp, outp = rows[0]
        rows.append((f" {ins}\n", inp, f"  {outp}  " if isinstance(outp, str) else outp))
    return kind, rows


def written(value) -> str:
    """The text of a cell as the user wrote it."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)  # what json.dumps, str() and a CSV writer write for a finite float
    return str(value)


def normalised(text: str, column: str) -> str:
    """NORMALISATIONS, applied to text without mojibake."""
    s = text.replace("\r\n", "\n").replace("\r", "\n")
    s = _ZERO_WIDTH.sub("", s)
    s = unicodedata.normalize("NFC", s).rstrip()
    lead = s[: len(s) - len(s.lstrip())]
    s = s.lstrip()
    if column != "instruction":
        s = lead[len(lead.rstrip(" \t")):] + s
    if column == "input" and s.strip().lower() in DEFAULT_PLACEHOLDERS:
        s = ""
    return s


def expected_outcome(texts):
    """(kept {row: cells}, rejected {row: reason}) from the normalised cells alone."""
    kept, rejected, seen = {}, {}, {}
    for i, cells in enumerate(texts, start=1):
        ins, inp, out = (normalised(t, c) for t, c in zip(cells, COLUMNS))
        key = (ins, inp.strip(), out.strip())
        if not ins:
            rejected[i] = "empty_instruction"
        elif not out:
            rejected[i] = "empty_output"
        elif len(ins) + len(inp) + len(out) > 8000:
            rejected[i] = "too_long"
        elif key in seen:
            rejected[i] = "duplicate"
        else:
            seen[key] = i
            kept[i] = [ins, inp, out]
    return kept, rejected


# ------------------------------------------------------------------------------------------- writers

def write_delimited(path, rows, sep):
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter=sep)  # QUOTE_MINIMAL: quotes fields with sep, quote, \r or \n
    writer.writerow(COLUMNS)
    writer.writerows([[written(v) for v in row] for row in rows])
    path.write_text(buf.getvalue(), encoding="utf-8", newline="")


def json_records(rows, omit_missing):
    """Records; with omit_missing a missing value is an absent key (but for the first record, so that
    every column exists in the file)."""
    return [{k: v for k, v in zip(COLUMNS, row) if not (omit_missing and i and v is None)}
            for i, row in enumerate(rows)]


def write_json(path, rows, layout, ensure_ascii, omit_missing):
    if layout == "records":
        obj = json_records(rows, omit_missing)
    else:
        obj = {k: [row[j] for row in rows] for j, k in enumerate(COLUMNS)}
    path.write_text(json.dumps(obj, ensure_ascii=ensure_ascii, allow_nan=False), encoding="utf-8")


def write_jsonl(path, rows, ensure_ascii, omit_missing, newline):
    lines = [json.dumps(r, ensure_ascii=ensure_ascii, allow_nan=False) for r in json_records(rows, omit_missing)]
    path.write_bytes((newline.join(lines) + newline).encode("utf-8"))


ARROW = {"text": pa.string(), "int": pa.int64(), "float": pa.float64(), "bool": pa.bool_()}


def write_parquet(path, rows, kind):
    pq.write_table(pa.table({
        "instruction": pa.array([r[0] for r in rows], pa.string()),
        "input": pa.array([r[1] for r in rows], pa.string()),
        "output": pa.array([r[2] for r in rows], ARROW[kind]),
    }), path)


# ------------------------------------------------------------------------------------------- the check

def check_fidelity(path, rows):
    texts = [[written(v) for v in row] for row in rows]
    df = read_table(path)
    assert df[list(COLUMNS)].values.tolist() == texts  # read exactly as written, every cell

    result = clean_table(df, source=str(path))
    report = result.report
    assert report["rows_in"] == len(rows) == report["rows_kept"] + report["rows_rejected"]
    kept, rejected = expected_outcome(texts)
    got_kept = {r["row"]: [r[c] for c in COLUMNS] for r in result.kept.to_dict("records")}
    assert got_kept == kept
    got_rejected = {r["row"]: r["reason"] for r in result.rejected.to_dict("records")}
    assert got_rejected == rejected
    for r in result.rejected.to_dict("records"):  # a rejected row keeps the text of the file
        assert [r[c] for c in COLUMNS] == texts[r["row"] - 1]


@FIDELITY
@given(table=tables(), sep=st.sampled_from([",", ";", "\t", "|"]))
def test_csv_cells_are_kept_as_written(tmp_path_factory, table, sep):
    path = tmp_path_factory.mktemp("csv") / "data.csv"
    write_delimited(path, table[1], sep)
    check_fidelity(path, table[1])


@FIDELITY
@given(table=tables())
def test_tsv_cells_are_kept_as_written(tmp_path_factory, table):
    path = tmp_path_factory.mktemp("tsv") / "data.tsv"
    write_delimited(path, table[1], "\t")
    check_fidelity(path, table[1])


@FIDELITY
@given(table=tables(), layout=st.sampled_from(["records", "columns"]), ensure_ascii=st.booleans(),
       omit_missing=st.booleans())
def test_json_cells_are_kept_as_written(tmp_path_factory, table, layout, ensure_ascii, omit_missing):
    path = tmp_path_factory.mktemp("json") / "data.json"
    write_json(path, table[1], layout, ensure_ascii, omit_missing)
    check_fidelity(path, table[1])


@FIDELITY
@given(table=tables(), ensure_ascii=st.booleans(), omit_missing=st.booleans(), newline=st.sampled_from(["\n", "\r\n"]))
def test_jsonl_cells_are_kept_as_written(tmp_path_factory, table, ensure_ascii, omit_missing, newline):
    path = tmp_path_factory.mktemp("jsonl") / "data.jsonl"
    write_jsonl(path, table[1], ensure_ascii, omit_missing, newline)
    check_fidelity(path, table[1])


@FIDELITY
@given(table=tables(mixed_ok=False))
def test_parquet_cells_are_kept_as_written(tmp_path_factory, table):
    kind, rows = table
    path = tmp_path_factory.mktemp("parquet") / "data.parquet"
    write_parquet(path, rows, kind)
    check_fidelity(path, rows)


@pytest.mark.parametrize("column", COLUMNS)
def test_code_indentation_is_not_a_normalisation(column):
    if column == "instruction":
        assert normalised("    Finish this", column) == "Finish this"
    else:
        assert normalised("\n    return x\n", column) == "    return x"
