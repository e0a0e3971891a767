"""Property-based tests: rows_in = rows_kept + rows_rejected, with every source row accounted for
exactly once, on any input, through clean, render and tokenize."""

from __future__ import annotations

import csv
import unicodedata

import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from instructflow.clean import DEFAULT_PLACEHOLDERS, clean_table, read_table
from instructflow.render import render_prompts
from instructflow.templates import load_template
from instructflow.tokenization import tokenize_prompts

ALPACA = load_template("alpaca")
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Cells drawn from the troublemakers (placeholders, NaN-likes, template syntax, invisible characters,
# NFD forms, whitespace) mixed with arbitrary text, so duplicates and near-duplicates are common.
TRICKY = DEFAULT_PLACEHOLDERS + ["", " ", "None", "NaN", "nan", "N/A", "{instruction}", "{{ x }}", "{% if a %}",
                                 "\u200b", "caf\u00e9", unicodedata.normalize("NFD", "caf\u00e9"), "caf\u00c3\u00a9",
                                 "a\r\nb", "\t", "x" * 50]
CELL = st.one_of(st.sampled_from(TRICKY), st.text(max_size=20))
ROW = st.tuples(CELL, CELL, CELL)
ROWS = st.lists(ROW, max_size=25)


def check_clean(result, n_rows):
    report = result.report
    assert report["rows_in"] == n_rows == report["rows_kept"] + report["rows_rejected"]
    rows = sorted(result.kept["row"].tolist() + result.rejected["row"].tolist())
    assert rows == list(range(1, n_rows + 1))


@FAST
@given(rows=ROWS, max_chars=st.integers(1, 120))
def test_clean_accounts_for_every_row(rows, max_chars):
    result = clean_table(pd.DataFrame(rows, columns=["instruction", "input", "output"]), source="mem.csv",
                         max_chars=max_chars)
    check_clean(result, len(rows))
    kept = result.kept
    keys = list(zip(kept["instruction"], kept["input"], kept["output"]))
    assert len(keys) == len(set(keys))  # no duplicate survives
    for text in kept[["instruction", "input", "output"]].to_numpy().ravel():
        assert text == text.rstrip() and "\u200b" not in text and unicodedata.is_normalized("NFC", text)
        assert text.lstrip(" \t") == text.lstrip()  # leading blank lines go; only indentation may stay
    assert all(kept["instruction"] == kept["instruction"].str.strip())
    assert all(kept["instruction"] != "") and all(kept["output"] != "")


@FAST
@given(rows=ROWS)
def test_clean_accounts_for_every_row_read_back_from_csv(tmp_path_factory, rows):
    path = tmp_path_factory.mktemp("csv") / "data.csv"
    # Quote every field: pandas leaves a lone "\r" unquoted, which any CSV reader takes as a line break.
    pd.DataFrame(rows, columns=["instruction", "input", "output"]).to_csv(path, index=False, quoting=csv.QUOTE_ALL)
    check_clean(clean_table(read_table(path), source=str(path)), len(rows))


@FAST
@given(rows=ROWS)
def test_render_keeps_every_row_and_the_text_verbatim(rows):
    kept = clean_table(pd.DataFrame(rows, columns=["instruction", "input", "output"]), source="mem.csv").kept
    prompts = render_prompts(kept, ALPACA)
    assert prompts["row"].tolist() == kept["row"].tolist()
    for prompt, response, (_, row) in zip(prompts["prompt"], prompts["response"], kept.iterrows()):
        assert row["instruction"] in prompt and row["input"] in prompt and response == row["output"]


@FAST
@given(rows=ROWS, max_length=st.integers(8, 96), truncation=st.sampled_from(["drop", "truncate"]))
def test_tokenize_accounts_for_every_row(tokenizer, rows, max_length, truncation):
    kept = clean_table(pd.DataFrame(rows, columns=["instruction", "input", "output"]), source="mem.csv",
                       eval_fraction=0.3).kept
    prompts = render_prompts(kept, ALPACA)
    result = tokenize_prompts(prompts, tokenizer, max_length=max_length, truncation=truncation)
    audit = result.audit
    assert audit["rows_in"] == len(prompts) == audit["rows_kept"] + audit["rows_rejected"]
    tokenized = [int(r) for split in result.splits.values() for r in split.row]
    assert sorted(tokenized + result.rejected["row"].tolist()) == sorted(prompts["row"].tolist())
    assert all(len(split.get(i)[0]) <= max_length for split in result.splits.values() for i in range(len(split)))
    assert set(result.rejected["reason"]) <= {"too_many_tokens"}
