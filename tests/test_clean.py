import json
import math

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from instructflow.clean import (
    DEFAULT_PLACEHOLDERS,
    KEPT_COLUMNS,
    SOURCE_COLUMNS,
    CleanError,
    clean_table,
    read_table,
    resolve_columns,
    run_clean,
)


def write_csv(path, rows, header=("instruction", "input", "output")):
    df = pd.DataFrame(rows, columns=list(header))
    df.to_csv(path, index=False)
    return path


def clean_rows(rows, **kw):
    df = pd.DataFrame(rows, columns=["instruction", "input", "output"])
    return clean_table(df, source="mem.csv", **kw)


def check_invariant(res):
    r = res.report
    assert r["rows_in"] == r["rows_kept"] + r["rows_rejected"]
    assert r["rows_kept"] == len(res.kept) and r["rows_rejected"] == len(res.rejected)
    assert sorted(res.kept["row"].tolist() + res.rejected["row"].tolist()) == list(range(1, r["rows_in"] + 1))


# ----------------------------------------------------------------------------------------- reading

def test_csv_never_yields_nan(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("instruction,input,output\nnan,,None\nNA,null,\n", encoding="utf-8")
    df = read_table(p)
    cells = df.to_numpy().ravel().tolist()
    assert all(isinstance(c, str) for c in cells)
    assert not any(isinstance(c, float) and math.isnan(c) for c in cells)
    assert df.loc[0].tolist() == ["nan", "", "None"]
    assert df.loc[1].tolist() == ["NA", "null", ""]


def test_missing_trailing_field_is_empty_string(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("instruction,input,output\na,b\n", encoding="utf-8")
    assert read_table(p).loc[0].tolist() == ["a", "b", ""]


def test_all_formats_read_the_same(tmp_path):
    rows = [{"instruction": "Say hi", "input": "", "output": "hi"}, {"instruction": "Add 1 and 2", "input": "x", "output": "3"}]
    df = pd.DataFrame(rows)
    (tmp_path / "a.csv").write_text(df.to_csv(index=False), encoding="utf-8")
    (tmp_path / "a.tsv").write_text(df.to_csv(index=False, sep="\t"), encoding="utf-8")
    (tmp_path / "a.json").write_text(json.dumps(rows), encoding="utf-8")
    (tmp_path / "b.json").write_text(json.dumps({k: [r[k] for r in rows] for k in rows[0]}), encoding="utf-8")
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    (tmp_path / "a.ndjson").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    pq.write_table(pa.Table.from_pandas(df), tmp_path / "a.parquet")
    for name in ["a.csv", "a.tsv", "a.json", "b.json", "a.jsonl", "a.ndjson", "a.parquet"]:
        got = read_table(tmp_path / name)
        assert got[["instruction", "input", "output"]].to_dict("records") == rows, name


def test_json_nulls_and_numbers_become_str(tmp_path):
    p = tmp_path / "a.json"
    p.write_text(json.dumps([{"instruction": "Age?", "input": None, "output": 31}]), encoding="utf-8")
    assert read_table(p).loc[0].tolist() == ["Age?", "", "31"]


def test_parquet_nulls_become_empty(tmp_path):
    p = tmp_path / "a.parquet"
    pq.write_table(pa.table({"instruction": ["q", None], "output": ["a", "b"]}), p)
    assert read_table(p)["instruction"].tolist() == ["q", ""]


def test_utf8_bom_and_utf16_bom(tmp_path):
    text = "instruction,input,output\nUppercase,café,CAFÉ\n"
    (tmp_path / "bom8.csv").write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    (tmp_path / "bom16.csv").write_bytes(text.encode("utf-16"))  # Python writes a BOM
    (tmp_path / "be16.csv").write_bytes(b"\xfe\xff" + text.encode("utf-16-be"))
    for name in ["bom8.csv", "bom16.csv", "be16.csv"]:
        df = read_table(tmp_path / name)
        assert list(df.columns) == ["instruction", "input", "output"], name
        assert df.loc[0, "input"] == "café", name


def test_latin1_is_a_clear_error(tmp_path):
    p = tmp_path / "legacy.csv"
    p.write_bytes("instruction,input,output\nok,x,y\nUppercase,café,CAFÉ\n".encode("latin-1"))
    with pytest.raises(CleanError) as e:
        read_table(p)
    msg = str(e.value)
    assert "legacy.csv" in msg and "line 3" in msg and "UTF-8" in msg and "Latin-1" in msg


def test_unbalanced_quotes_name_file_and_record(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text('instruction,input,output\na,"multi\nline",c\nx,y,z\n"oops,b,c\nd,e,f\n', encoding="utf-8")
    with pytest.raises(CleanError, match=r"bad\.csv.*unbalanced quote.*record 3"):
        read_table(p)


def test_ragged_row_names_record(tmp_path):
    p = tmp_path / "rag.csv"
    p.write_text("instruction,input,output\na,b,c\nd,e,f\ng,h,i,j\n", encoding="utf-8")
    with pytest.raises(CleanError, match=r"rag\.csv.*record 3 has 4 fields"):
        read_table(p)


@pytest.mark.parametrize("name,content,pattern", [
    ("empty.csv", "", "empty"),
    ("blank.jsonl", "\n  \n", "empty"),
    ("data.xlsx", "x", "unsupported file extension"),
    ("bad.json", '[{"instruction": "a",}]', "line 1, column"),
    ("bad.jsonl", '{"instruction": "a", "output": "b"}\n{oops}\n', "line 2"),
    ("scalars.json", "[1, 2]", "record 1"),
])
def test_bad_files_raise_clean_error(tmp_path, name, content, pattern):
    p = tmp_path / name
    p.write_text(content, encoding="utf-8")
    with pytest.raises(CleanError, match=pattern) as e:
        read_table(p)
    assert name in str(e.value)
    assert isinstance(e.value, ValueError)


def test_broken_parquet(tmp_path):
    p = tmp_path / "x.parquet"
    p.write_bytes(b"not parquet at all")
    with pytest.raises(CleanError, match=r"x\.parquet"):
        read_table(p)


# ----------------------------------------------------------------------------------------- columns

def test_dolly_columns_auto_mapped(tmp_path):
    p = tmp_path / "dolly.jsonl"
    p.write_text(json.dumps({"instruction": "Who?", "context": "Ann wrote it.", "response": "Ann", "category": "qa"}) + "\n",
                 encoding="utf-8")
    df = read_table(p)
    assert resolve_columns(df, None, str(p)) == {"instruction": "instruction", "input": "context", "output": "response"}
    res = clean_table(df, source=str(p))
    assert res.kept.loc[0, ["instruction", "input", "output"]].tolist() == ["Who?", "Ann wrote it.", "Ann"]


def test_prompt_completion_without_input():
    df = pd.DataFrame({"Prompt": ["q"], "completion": ["a"]})
    assert resolve_columns(df, None, "x.csv") == {"instruction": "Prompt", "output": "completion"}
    assert clean_table(df, source="x.csv").kept.loc[0, "input"] == ""


def test_explicit_column_mapping():
    df = pd.DataFrame({"task": ["Say hi"], "ctx": [""], "target": ["hi"], "output": ["WRONG"]})
    cols = {"instruction": "task", "input": "ctx", "output": "target"}
    assert resolve_columns(df, cols, "x.csv") == cols
    res = clean_table(df, source="x.csv", columns=cols)
    assert res.kept.loc[0, "output"] == "hi"
    assert res.report["columns"] == cols


def test_unmappable_column_message():
    df = pd.DataFrame({"question": ["q"], "label": ["a"]})
    with pytest.raises(CleanError) as e:
        resolve_columns(df, None, "data/raw.csv")
    msg = str(e.value)
    assert "data/raw.csv" in msg and "'output'" in msg and "label" in msg and "data.columns.output" in msg


def test_config_names_missing_column():
    df = pd.DataFrame({"instruction": ["q"], "output": ["a"]})
    with pytest.raises(CleanError, match=r"raw\.csv.*data\.columns\.output.*'answer_text'.*found"):
        resolve_columns(df, {"output": "answer_text"}, "raw.csv")


# ----------------------------------------------------------------------------------------- cleaning

def test_each_rejection_reason_with_row_number():
    rows = [
        ("Say hi", "", "hi"),            # 1 kept
        ("", "x", "y"),                  # 2 empty_instruction
        ("Say yo", "", "  "),            # 3 empty_output
        ("Say hi", "", "hi"),            # 4 duplicate of 1
        ("Long", "", "x" * 100),         # 5 too_long
    ]
    res = clean_rows(rows, max_chars=50)
    check_invariant(res)
    rej = {r["row"]: (r["reason"], r["detail"]) for r in res.rejected.to_dict("records")}
    assert rej[2][0] == "empty_instruction"
    assert rej[3][0] == "empty_output"
    assert rej[4] == ("duplicate", "duplicate of row 1")
    assert rej[5][0] == "too_long"
    assert res.kept["row"].tolist() == [1]
    assert res.report["rejected_by_reason"] == {"duplicate": 1, "empty_instruction": 1, "empty_output": 1, "too_long": 1}
    assert list(res.kept.columns) == KEPT_COLUMNS
    # rejected rows keep their text as it was in the file
    assert res.rejected.set_index("row").loc[3, "output"] == "  "


def test_too_long_is_sum_of_fields():
    res = clean_rows([("a" * 10, "b" * 10, "c" * 10)], max_chars=29)
    assert res.rejected["reason"].tolist() == ["too_long"]
    assert clean_rows([("a" * 10, "b" * 10, "c" * 10)], max_chars=30).report["rows_kept"] == 1


def test_placeholders_emptied_in_input_only():
    rows = [
        ("Q1", "<noinput>", "a"), ("Q2", " N/A ", "b"), ("Q3", "None", "c"), ("Q4", "nan", "d"),
        ("Q5", "-", "e"), ("Q6", "real input", "f"), ("None", "", "None"),
    ]
    res = clean_rows(rows)
    check_invariant(res)
    k = res.kept.set_index("instruction")
    assert [k.loc[q, "input"] for q in ["Q1", "Q2", "Q3", "Q4", "Q5"]] == [""] * 5
    assert k.loc["Q6", "input"] == "real input"
    assert k.loc["None", "output"] == "None"  # a real instruction/answer, not a placeholder
    assert res.report["placeholders_emptied"] == 5
    assert "<noinput>" in DEFAULT_PLACEHOLDERS


def test_custom_placeholders():
    res = clean_rows([("Q", "<noinput>", "a"), ("R", "EMPTY", "b")], placeholders=["empty"])
    assert res.kept["input"].tolist() == ["<noinput>", ""]


def test_nfc_whitespace_and_zero_width_duplicates():
    rows = [
        ("Uppercase the word.", "caf\u00e9", "CAF\u00c9"),
        ("  Uppercase the word.\n", "cafe\u0301 ", "CAFE\u0301"),
        ("Uppercase\u200b the word.", "caf\u00e9\ufeff", "CAF\u00c9"),
        ("Line\r\nbreak", "", "x"),
        ("Line\nbreak", "", "x"),
    ]
    res = clean_rows(rows)
    check_invariant(res)
    assert res.kept["row"].tolist() == [1, 4]
    assert res.rejected["detail"].tolist() == ["duplicate of row 1", "duplicate of row 1", "duplicate of row 4"]
    assert res.kept.loc[0, "input"] == "caf\u00e9"
    assert res.kept.loc[1, "instruction"] == "Line\nbreak"


def test_braces_survive_verbatim():
    tricky = "{instruction} {{ input }} {% if x %}y{% endif %} {0} }{"
    res = clean_rows([(tricky, tricky, tricky)])
    assert res.kept.loc[0, ["instruction", "input", "output"]].tolist() == [tricky] * 3


def test_mojibake_repaired_but_real_text_untouched():
    rows = [
        ("Uppercase", "r\u00c3\u00a9sum\u00c3\u00a9", "R\u00c3\u2030SUM\u00c3\u2030"),
        ("Quote", "", "it\u00e2\u20ac\u2122s"),                       # it’s, decoded twice
        ("Keep", "\u00c3 la carte, caf\u00e9\u2026 na\u00efve", "\u00c2 ok"),  # genuine text
    ]
    res = clean_rows(rows)
    k = res.kept
    assert k.loc[0, ["input", "output"]].tolist() == ["r\u00e9sum\u00e9", "R\u00c9SUM\u00c9"]
    assert k.loc[1, "output"] == "it\u2019s"
    assert k.loc[2, ["input", "output"]].tolist() == ["\u00c3 la carte, caf\u00e9\u2026 na\u00efve", "\u00c2 ok"]
    assert res.report["mojibake_repaired"] == 3


def test_split_is_content_hash_and_stable_when_appending(tmp_path):
    base = [(f"What is {i} + {i}?", "", str(2 * i)) for i in range(300)]
    more = [(f"What is {i} * 3?", "", str(3 * i)) for i in range(200)]
    p = tmp_path / "d.csv"
    write_csv(p, base)
    first = run_clean(p, tmp_path / "c.parquet", tmp_path / "r.parquet", tmp_path / "rep.json")
    write_csv(p, more[:100] + base + more[100:])  # new rows before and after: positions all move
    second = run_clean(p, tmp_path / "c.parquet", tmp_path / "r.parquet", tmp_path / "rep.json")
    key = ["instruction", "input", "output"]
    old = first.kept.set_index(key)["split"]
    new = second.kept.set_index(key)["split"]
    assert (new.loc[old.index] == old).all()
    assert 0 < first.report["splits"]["eval"] < 90  # ~10% of 300
    assert first.report["splits"]["train"] + first.report["splits"]["eval"] == 300
    # a fraction of 0 or 1 is honoured exactly
    assert set(clean_rows(base, eval_fraction=0.0).kept["split"]) == {"train"}
    assert set(clean_rows(base, eval_fraction=1.0).kept["split"]) == {"eval"}


def test_invalid_parameters():
    with pytest.raises(ValueError):
        clean_rows([("a", "", "b")], eval_fraction=1.5)
    with pytest.raises(ValueError):
        clean_rows([("a", "", "b")], max_chars=0)


def test_empty_table_keeps_columns():
    res = clean_table(pd.DataFrame(columns=["instruction", "input", "output"]), source="x.csv")
    assert list(res.kept.columns) == KEPT_COLUMNS and len(res.kept) == 0
    assert res.report["rows_in"] == 0


# ----------------------------------------------------------------------------------------- chat

def test_chat_messages_rows(tmp_path):
    recs = [
        {"messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": " 2+2? "},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "thanks"},  # trailing non-assistant turn: dropped
        ]},
        {"messages": [{"role": "user", "content": "only a question"}]},   # bad_chat
        {"messages": []},                                                 # bad_chat
        {"messages": [{"role": "assistant", "content": "unprompted"}]},   # no user turn
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": "4"}]},           # duplicate of 1 after normalisation
    ]
    p = tmp_path / "chat.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in recs), encoding="utf-8")
    res = run_clean(p, tmp_path / "c.parquet", tmp_path / "r.parquet", tmp_path / "rep.json")
    check_invariant(res)
    assert res.report["sources"]["chat"]["columns"] == {"messages": "messages"}
    row = res.kept.iloc[0]
    assert (row["row"], row["instruction"], row["input"], row["output"]) == (1, "2+2?", "", "4")
    msgs = json.loads(row["messages"])
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant"]
    assert msgs[-1] == {"role": "assistant", "content": "4"}
    rej = dict(zip(res.rejected["row"], res.rejected["reason"]))
    assert rej == {2: "bad_chat", 3: "bad_chat", 4: "empty_instruction", 5: "duplicate"}
    report = json.loads((tmp_path / "rep.json").read_text())
    assert report["rows_kept"] == 1
    # The unanswered "thanks" is left out of the kept row, and counted (the duplicate row had none).
    assert (report["turns_after_last_assistant_dropped"], report["rows_with_turns_after_last_assistant"]) == (1, 1)
    back = pd.read_parquet(tmp_path / "c.parquet")
    assert list(back.columns) == KEPT_COLUMNS + SOURCE_COLUMNS


def test_openai_content_parts_are_flattened_and_non_text_parts_rejected(tmp_path):
    """Text parts are concatenated in order, exactly as written, never JSON-dumped into the text; a row
    with an image (or any non-text part) is rejected with a reason, never trained without its image."""
    recs = [
        {"messages": [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                      {"role": "user", "content": [{"type": "text", "text": "Add "}, {"type": "text", "text": "2+2."}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "4"}]}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                                   {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]},
                      {"role": "assistant", "content": "A cat."}]},
    ]
    p = tmp_path / "parts.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in recs), encoding="utf-8")
    for res in (clean_table(read_table(p), source=str(p)),
                clean_table(pd.DataFrame({"messages": [json.dumps(r["messages"]) for r in recs]}), source="m.csv")):
        check_invariant(res)
        row = res.kept.iloc[0]
        assert (row["instruction"], row["output"]) == ("Add 2+2.", "4")
        assert json.loads(row["messages"]) == [{"role": "system", "content": "Be brief."},
                                               {"role": "user", "content": "Add 2+2."},
                                               {"role": "assistant", "content": "4"}]
        assert res.rejected["reason"].tolist() == ["non_text_content"]
        assert "turn 1 content part 2 is 'image_url'" in res.rejected["detail"].iloc[0]
        assert res.report["rejected_by_reason"] == {"non_text_content": 1}


def test_sharegpt_conversations(tmp_path):
    recs = [{"id": "a", "conversations": [
        {"from": "system", "value": "sys"},
        {"from": "human", "value": "Name a colour."},
        {"from": "gpt", "value": "Blue"},
    ]}]
    p = tmp_path / "sg.json"
    p.write_text(json.dumps(recs), encoding="utf-8")
    res = clean_table(read_table(p), source=str(p))
    assert res.report["columns"] == {"messages": "conversations"}
    k = res.kept.iloc[0]
    assert (k["instruction"], k["output"]) == ("Name a colour.", "Blue")
    assert json.loads(k["messages"]) == [
        {"role": "system", "content": "sys"}, {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue"},
    ]


def test_a_json_file_of_one_object_is_one_record(tmp_path):
    """A .json file holding one conversation ({"conversations": [turn, ...]}, as axolotl's fixtures are) or one
    Alpaca record is one row, not a column per key with a row per turn; an object of lists stays columns."""
    turns = [{"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Blue"},
             {"from": "human", "value": "Another?"}, {"from": "gpt", "value": "Red"}]
    p = tmp_path / "one_chat.json"
    p.write_text(json.dumps({"conversations": turns}), encoding="utf-8")
    res = clean_table(read_table(p), source=str(p))
    assert res.report["rows_in"] == 1 and len(res.kept) == 1, res.rejected
    assert [t["content"] for t in json.loads(res.kept.iloc[0]["messages"])] == [t["value"] for t in turns]
    p = tmp_path / "one_row.json"
    p.write_text(json.dumps({"instruction": "Age?", "input": None, "output": 31}), encoding="utf-8")
    assert read_table(p).to_dict("records") == [{"instruction": "Age?", "input": "", "output": "31"}]
    p = tmp_path / "columns.json"
    p.write_text(json.dumps({"instruction": ["a", "b"], "output": ["1", "2"]}), encoding="utf-8")
    assert read_table(p)["output"].tolist() == ["1", "2"]
    p = tmp_path / "mixed.json"
    p.write_text(json.dumps({"instruction": ["a", "b"], "output": "1"}), encoding="utf-8")
    with pytest.raises(CleanError, match=r"mixed\.json: a JSON object must be one record .* or map every column"):
        read_table(p)


def test_chat_from_parquet_and_json_string(tmp_path):
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    p = tmp_path / "c.parquet"
    pq.write_table(pa.table({"messages": [msgs]}), p)
    assert clean_table(read_table(p), source=str(p)).kept.loc[0, "output"] == "a"
    df = pd.DataFrame({"messages": [json.dumps(msgs), "not json", json.dumps({"role": "user"})]})
    res = clean_table(df, source="m.csv")
    assert res.kept.loc[0, "instruction"] == "q"
    assert res.rejected["reason"].tolist() == ["bad_chat", "bad_chat"]
    assert res.rejected["detail"].tolist() == [
        "the chat column holds text, not a list of turns ('not json'; as JSON text: Expecting value at character 1)",
        "the chat column holds dict, not a list of turns"]


def test_alpaca_columns_preferred_over_chat():
    df = pd.DataFrame({"instruction": ["q"], "output": ["a"], "messages": [""]})
    assert resolve_columns(df, None, "x") == {"instruction": "instruction", "output": "output"}
    result = clean_table(df, source="x")
    assert result.kept.loc[0, "messages"] == ""
    assert "turns_after_last_assistant_dropped" not in result.report  # a chat-only count


# ----------------------------------------------------------------------------------------- run_clean

def test_run_clean_writes_outputs(tmp_path):
    p = write_csv(tmp_path / "d.csv", [("Say hi", "", "hi"), ("", "", "x")])
    res = run_clean(p, tmp_path / "out" / "clean.parquet", tmp_path / "out" / "rej.parquet",
                    tmp_path / "out" / "report.json", eval_fraction=0.0)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report == res.report
    assert report["sources"]["d"]["path"] == str(p)
    kept = pd.read_parquet(tmp_path / "out" / "clean.parquet")
    rej = pd.read_parquet(tmp_path / "out" / "rej.parquet")
    assert kept["row"].tolist() == [1] and kept["row"].dtype == "int64"
    assert rej[["row", "reason"]].values.tolist() == [[2, "empty_instruction"]]
    assert not list(tmp_path.glob("out/*.tmp"))


def test_a_file_with_nothing_kept_says_what_to_change(tmp_path):
    """Every row rejected: one error whose advice follows the reason (the limit to raise for over-long rows)."""
    p = write_csv(tmp_path / "long.csv", [("Say hi", "", "hi there"), ("Say bye", "", "bye now")])
    outputs = [tmp_path / "out" / name for name in ("clean.parquet", "rej.parquet", "report.json")]
    with pytest.raises(CleanError, match=r"long\.csv: all 2 rows were rejected \({'too_long': 2}.*longer than "
                                         r"max_chars \(10 characters\): raise data\.max_chars"):
        run_clean(p, *outputs, max_chars=10)
    p = write_csv(tmp_path / "blank.csv", [("Say hi", "", ""), ("Say bye", "", "")])
    with pytest.raises(CleanError, match=r"all 2 rows were rejected .*fix the data or data\.columns"):
        run_clean(p, *outputs)


# ----------------------------------------------------------------------------------------- cells as written

def test_json_numbers_keep_their_text_when_a_value_is_missing(tmp_path):
    """One null made pandas read the column as float: 5 came out as "5.0", 12345678901234567 as "1.23e+16"."""
    text = ('[{"instruction": "a", "output": 5}, {"instruction": "b", "output": null},'
            ' {"instruction": "c", "output": 12345678901234567}, {"instruction": "d", "output": 1.50},'
            ' {"instruction": "e", "output": true}, {"instruction": "f", "output": -0}, {"instruction": "g"}]')
    (tmp_path / "a.json").write_text(text, encoding="utf-8")
    assert read_table(tmp_path / "a.json")["output"].tolist() == ["5", "", "12345678901234567", "1.50", "true", "-0", ""]
    columns = '{"instruction": ["a", "b"], "output": [5, null]}'
    (tmp_path / "b.json").write_text(columns, encoding="utf-8")
    assert read_table(tmp_path / "b.json")["output"].tolist() == ["5", ""]
    lines = '{"instruction": "a", "output": 5}\n{"instruction": "b"}\n{"instruction": "c", "output": 1e5}\n'
    (tmp_path / "a.jsonl").write_text(lines, encoding="utf-8")
    assert read_table(tmp_path / "a.jsonl")["output"].tolist() == ["5", "", "1e5"]
    # NaN is how Python's json module writes a missing float; Infinity is kept as written
    (tmp_path / "c.jsonl").write_text('{"instruction": "a", "output": NaN}\n{"instruction": "b", "output": -Infinity}\n')
    assert read_table(tmp_path / "c.jsonl")["output"].tolist() == ["", "-Infinity"]


def test_json_object_in_a_text_column_keeps_its_numbers(tmp_path):
    (tmp_path / "a.json").write_text('[{"instruction": "a", "output": {"n": 12345678901234567, "x": [1.0, null]}}]')
    kept = clean_table(read_table(tmp_path / "a.json"), source="a.json").kept
    assert json.loads(kept.loc[0, "output"]) == {"n": 12345678901234567, "x": [1.0, None]}
    assert kept.loc[0, "output"] == '{"n": 12345678901234567, "x": [1.0, null]}'


def test_parquet_nullable_ints_and_other_types_without_float(tmp_path):
    p = tmp_path / "a.parquet"
    pq.write_table(pa.table({
        "instruction": ["a", "b", "c"],
        "output": pa.array([5, None, 12345678901234567], pa.int64()),
        "f32": pa.array([0.1, None, 2.5], pa.float32()),
        "flag": pa.array([True, None, False]),
    }), p)
    df = read_table(p)
    assert df["output"].tolist() == ["5", "", "12345678901234567"]
    assert df["f32"].tolist() == ["0.1", "", "2.5"]
    assert df["flag"].tolist() == ["true", "", "false"]


def test_parquet_written_by_pandas_with_an_index_has_no_extra_column(tmp_path):
    p = tmp_path / "a.parquet"
    pd.DataFrame({"instruction": ["a"], "output": ["b"]}, index=[7]).to_parquet(p)
    assert list(read_table(p).columns) == ["instruction", "output"]


def test_jsonl_splits_records_on_newline_only(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_bytes('{"instruction": "one\u2028two\u2029three\x85four", "output": "x"}\r\n'
                  '{"instruction": "b", "output": "y"}\r\n'.encode("utf-8"))
    df = read_table(p)
    assert df["instruction"].tolist() == ["one\u2028two\u2029three\x85four", "b"]
    assert df["output"].tolist() == ["x", "y"]


def test_first_record_with_an_extra_field_is_an_error_like_any_other_record(tmp_path):
    """pandas took the first column as the index: every row shifted one column and was rejected."""
    p = tmp_path / "first.csv"
    p.write_text("instruction,input,output\nList two colours,,red, blue\nSay hi,,hi\n", encoding="utf-8")
    with pytest.raises(CleanError, match=r"first\.csv.*record 1 has 4 fields but the header has 3 "
                                         r"\(the record starts on line 2\).*after column 'output'.*Quote fields"):
        read_table(p)
    later = tmp_path / "later.csv"
    later.write_text('instruction,input,output\na,"two\nlines",c\nd,e,f,g\n', encoding="utf-8")
    with pytest.raises(CleanError, match=r"later\.csv.*record 2 has 4 fields but the header has 3 "
                                         r"\(the record starts on line 4\)"):
        read_table(later)


@pytest.mark.parametrize("sep", [";", "\t", "|"])
def test_csv_delimiter_is_detected_from_the_header(tmp_path, sep):
    p = tmp_path / "europe.csv"
    p.write_text(f"instruction{sep}input{sep}output\nSay hi{sep}{sep}hi\nList two{sep}{sep}\"red{sep} blue, green\"\n",
                 encoding="utf-8")
    df = read_table(p)
    assert df[["instruction", "input", "output"]].values.tolist() == [
        ["Say hi", "", "hi"], ["List two", "", f"red{sep} blue, green"]]


def test_comma_csv_with_semicolons_in_the_header_names_stays_comma(tmp_path):
    p = tmp_path / "c.csv"
    p.write_text("instruction,input,output;notes\nSay hi,,hi\n", encoding="utf-8")
    assert list(read_table(p).columns) == ["instruction", "input", "output;notes"]


def test_output_indentation_is_kept():
    code = "    return sorted(xs)\n    # done  \n\n"
    res = clean_rows([("  Finish the function ", "\n\n    def f(xs):\n", code)])
    row = res.kept.iloc[0]
    assert row["output"] == "    return sorted(xs)\n    # done"
    assert row["input"] == "    def f(xs):"
    assert row["instruction"] == "Finish the function"


def test_split_and_duplicates_ignore_surrounding_whitespace():
    a = clean_rows([("Q", "", "    x")], eval_fraction=0.5)
    b = clean_rows([("Q", "", "x")], eval_fraction=0.5)
    assert a.kept["split"].tolist() == b.kept["split"].tolist()
    both = clean_rows([("Q", "", "x"), ("Q", "", "  x")])
    assert both.rejected["detail"].tolist() == ["duplicate of row 1"]
