"""The clean stage: read a raw instruction table in whatever shape it comes, normalise the text, reject
rows that would teach the model nothing (or teach it twice), and give every kept row a train/eval split.

The split is a function of a row's content alone, so appending rows to the source file never moves an
existing row between train and eval (and never leaks an evaluated row into training on a re-run).

Several source files (data.sources) are cleaned one by one, each with its own column map, into one table
whose rows say their source; a row equal to one kept from an earlier source is rejected as its duplicate.

No Snakemake here: the workflow rule is a thin call into :func:`run_clean`.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import math
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from instructflow.config import defaults
from instructflow.io import write_json, write_parquet

CANONICAL = ("instruction", "input", "output")
CHAT_COLUMNS = ("messages", "conversations")

# The keyword defaults of clean_table: the schema's data.* defaults, written only there.
DEFAULTS = defaults("data")
# Only the `input` column is checked against these: Alpaca-style data uses them to mean "no input",
# but an instruction or an output of "None" or "-" can be a real answer (e.g. "what does print(None)
# show?"), so emptying those would corrupt data.
DEFAULT_PLACEHOLDERS = DEFAULTS["placeholders"]

# Candidate source column names, in order of preference, matched case-insensitively.
AUTO_COLUMNS = {
    "instruction": ["instruction", "prompt", "question", "query"],
    "input": ["input", "context"],  # "context" is Dolly's name for it
    "output": ["output", "response", "answer", "completion"],
}

KEPT_COLUMNS = ["row", "instruction", "input", "output", "messages", "split"]
REJECTED_COLUMNS = ["row", "reason", "detail", "instruction", "input", "output", "messages"]
# Added to both when sources are merged: `row` then numbers the rows of all sources in order (unique, the
# key later stages join on), `source` names a row's source and `source_row` is its row in that file.
SOURCE_COLUMNS = ["source", "source_row"]

ROLE_MAP = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "bot": "assistant", "model": "assistant", "chatgpt": "assistant",
    "system": "system",
}

_ZERO_WIDTH = re.compile("[\u200b\u200c\u200d\u2060\ufeff]")
# A lead byte of a 2/3-byte UTF-8 sequence decoded as cp1252/latin-1 ("Ã", "Â", "â", ...) followed by a
# continuation byte decoded the same way: the fingerprint of UTF-8 text that was decoded twice.
_CONT = "\u0080-\u00bf\u0152\u0153\u0160\u0161\u0178\u017d\u017e\u0192\u02c6\u02dc\u2013\u2014\u2018-\u201a\u201c-\u201e\u2020-\u2022\u2026\u2030\u2039\u203a\u20ac\u2122"
_MOJIBAKE = re.compile(f"[\u00c2-\u00ef][{_CONT}]")


class CleanError(ValueError):
    """A source file that cannot be read or mapped; the message names the file and what to fix."""


@dataclass
class CleanResult:
    kept: pd.DataFrame
    rejected: pd.DataFrame
    report: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------- reading

def _decode(path: Path, raw: bytes) -> str:
    if raw.startswith(codecs.BOM_UTF8):
        enc, body = "utf-8", raw[len(codecs.BOM_UTF8):]
    elif raw.startswith(codecs.BOM_UTF32_LE) or raw.startswith(codecs.BOM_UTF32_BE):
        enc, body = "utf-32", raw
    elif raw.startswith(codecs.BOM_UTF16_LE) or raw.startswith(codecs.BOM_UTF16_BE):
        enc, body = "utf-16", raw
    else:
        enc, body = "utf-8", raw
    try:
        return body.decode(enc)
    except UnicodeDecodeError as e:
        # Guessing Latin-1/cp1252 would "succeed" on any byte string and silently corrupt text that is
        # really in some other encoding, so refuse and say how to fix it.
        line = body[: e.start].count(b"\n") + 1
        where = ""
        if path.suffix.lower() in {".csv", ".tsv"}:
            prefix = body[: e.start].decode(enc, errors="replace")
            where = f", {_csv_position(prefix, _detect_sep(prefix, _sep(path)))}"
        raise CleanError(
            f"{path}: not valid {enc.upper()} at byte {e.start} (line {line}{where}): "
            f"{body[e.start:e.start + 1]!r}. The file is probably Latin-1/cp1252 or another legacy encoding; "
            "re-save it as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)."
        ) from None


def _sep(path: Path) -> str:
    return "\t" if path.suffix.lower() == ".tsv" else ","


SEPARATORS = (",", ";", "\t", "|")


def _header_fields(text: str, sep: str) -> int:
    try:
        return len(next(csv.reader(io.StringIO(text), delimiter=sep), []))
    except csv.Error:
        return 0


def _detect_sep(text: str, default: str) -> str:
    """The separator of a delimited file: `default` (from the extension) unless the header is a single
    field under it and splits into more fields under another of , ; tab | (a spreadsheet saved with
    semicolons, as much of Europe does, or a .csv that is really tab- or pipe-separated)."""
    if _header_fields(text, default) != 1:
        return default
    best, most = default, 1
    for sep in SEPARATORS:
        n = _header_fields(text, sep) if sep != default else 1
        if n > most:
            best, most = sep, n
    return best


def _record_line(text: str, sep: str, record: int) -> int | None:
    """The line (1-based, of the file) that data record `record` (1-based, header not counted, blank
    lines skipped as pandas does) starts on; None where the csv module cannot get that far."""
    reader = csv.reader(io.StringIO(text), delimiter=sep)
    seen, previous_end = -1, 0  # the header is record 0
    try:
        for fields in reader:
            if fields:
                seen += 1
                if seen == record:
                    return previous_end + 1
            previous_end = reader.line_num
    except csv.Error:
        return None
    return None


def _extra_field_message(text: str, sep: str, record: int, want: int, got: int) -> str:
    header = next(csv.reader(io.StringIO(text), delimiter=sep))
    line = _record_line(text, sep, record)
    where = f" (the record starts on line {line})" if line else ""
    return (f"record {record} has {got} fields but the header has {want}{where}: the extra field comes "
            f"after column {header[-1]!r}. Quote fields that contain the separator {sep!r} (write \"red, blue\")")


def _csv_position(text: str, sep: str) -> str:
    """"record N, column 'name'" for the field that `text` (a file's beginning) ends inside: the csv
    module reads a field cut off mid-quote as a field, so the last parsed record locates it."""
    rows = list(csv.reader(io.StringIO(text), delimiter=sep))
    if len(rows) < 2:
        return "in the header"
    header, last = rows[0], rows[-1]
    index = max(len(last) - 1, 0)
    column = repr(header[index]) if index < len(header) else f"{index + 1} (past the last header column)"
    return f"record {len(rows) - 1}, column {column}"


class _JsonNumber(str):
    """A JSON number as the text it was written as: 5 stays "5", 1.50 "1.50" and 12345678901234567 never
    passes through a float (pandas makes a column float64 as soon as one value in it is missing)."""


def _json_constant(name: str) -> Any:
    # NaN is how Python's json module (and pandas' NaN) writes a missing value; Infinity is kept as written.
    return None if name == "NaN" else _JsonNumber(name)


def _json_loads(text: str) -> Any:
    return json.loads(text, parse_int=_JsonNumber, parse_float=_JsonNumber, parse_constant=_json_constant)


def _json_text(value: Any) -> str:
    """JSON text of a nested value (an object or a list in a text column), numbers as they were written."""
    if isinstance(value, _JsonNumber):
        return str(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k), ensure_ascii=False)}: {_json_text(v)}"
                               for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_json_text(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False, default=str)


def _to_py(value: Any) -> Any:
    """Parquet/numpy containers -> plain Python lists/dicts, recursively."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, dict):
        return {k: _to_py(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_py(v) for v in value]
    return value


def _cell_to_str(value: Any) -> Any:
    value = _to_py(value)
    if value is None:
        return ""
    if isinstance(value, float) and math.isnan(value):
        return ""
    if isinstance(value, str):
        return str(value)  # a plain str, also for a _JsonNumber
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return value  # chat turns; parsed later
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def _frame(names: list, columns: list[list]) -> pd.DataFrame:
    """A DataFrame of object columns built from Python values as they are: no dtype inference, so a
    missing value never turns a column of ints into floats. Cells become str (chat lists stay lists)."""
    if not names:
        return pd.DataFrame()
    df = pd.DataFrame({i: pd.Series([_cell_to_str(v) for v in col], dtype=object)
                       for i, col in enumerate(columns)})
    df.columns = [str(n) for n in names]
    return df


def _stringify(df: pd.DataFrame) -> pd.DataFrame:
    df = df.reset_index(drop=True)
    return _frame(list(df.columns), [df[c].tolist() for c in df.columns]) if len(df.columns) else df


def _records_frame(path: Path, records: list, what: str) -> pd.DataFrame:
    names: dict = {}
    for i, rec in enumerate(records, start=1):
        if not isinstance(rec, dict):
            raise CleanError(f"{path}: {what} {i} is a {type(rec).__name__}, expected an object with named fields")
        names.update(dict.fromkeys(rec))
    return _frame(list(names), [[rec.get(name) for rec in records] for name in names])


def _explain_csv_error(msg: str, text: str, sep: str) -> str:
    """Restate pandas' parser errors in record numbers (1-based, header not counted), the same
    numbering as the `row` column, because pandas counts from the header and says "row"/"line" for both;
    name the column and say how to fix the file."""
    msg = msg.strip()
    m = re.search(r"EOF inside string starting at row (\d+)", msg)
    if m:
        return (f"unbalanced quote: the quoted field in record {int(m.group(1))} is never closed "
                f"({_csv_position(text, sep)}). Close the quote, or write a quote inside a quoted field "
                f"as two quotes (\"\") ({msg})")
    m = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", msg)
    if m:
        want, line, got = (int(g) for g in m.groups())
        return _extra_field_message(text, sep, line - 1, want, got)  # pandas' own words count lines otherwise
    return msg


def _arrow_values(column: pa.ChunkedArray) -> list:
    """A Parquet column as Python values by its own type: int64 with nulls gives ints (never 5.0), decimals
    their digits; float32/float16 the shortest text of that width (0.1, not 0.10000000149011612)."""
    kind = column.type
    if pa.types.is_dictionary(kind):
        column = column.cast(kind.value_type)
        kind = column.type
    if pa.types.is_float32(kind) or pa.types.is_float16(kind):
        width = np.float32 if pa.types.is_float32(kind) else np.float16
        return [None if v is None else str(width(v)) for v in column.to_pylist()]
    return column.to_pylist()


def _read_parquet(path: Path) -> pd.DataFrame:
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several unrelated types for a broken file
        raise CleanError(f"{path}: could not read Parquet: {e}") from None
    # A named pandas index (written by DataFrame.to_parquet) is not a column of the data.
    index = {c for c in (table.schema.pandas_metadata or {}).get("index_columns", []) if isinstance(c, str)}
    names = [n for n in table.column_names if n not in index]
    return _frame(names, [_arrow_values(table.column(n)) for n in names])


def _read_csv(path: Path, text: str) -> pd.DataFrame:
    sep = _detect_sep(text, _sep(path))
    kind = path.suffix[1:].upper()
    try:
        df = pd.read_csv(io.StringIO(text), sep=sep, dtype=str, keep_default_na=False, na_filter=False,
                         engine="c")
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise CleanError(f"{path}: could not parse {kind}: {_explain_csv_error(str(e), text, sep)}") from None
    if not isinstance(df.index, pd.RangeIndex):
        # pandas reads a first record with more fields than the header as "the first column is the
        # index", shifting every row one column; a later record like that is a parser error, so both are.
        want = len(df.columns)
        raise CleanError(f"{path}: could not parse {kind}: "
                         f"{_extra_field_message(text, sep, 1, want, want + df.index.nlevels)}")
    return _stringify(df)


def _one_record(obj: dict) -> bool:
    """Whether a JSON file's top-level object is one record rather than columns of values: no value is a list
    of cells (text, numbers, or chat lists), each is text, a number, null, or a list of chat turns (objects)."""
    def record_value(value):
        return not isinstance(value, (list, dict)) or (
            isinstance(value, list) and bool(value) and all(isinstance(turn, dict) for turn in value))
    return bool(obj) and all(record_value(v) for v in obj.values())


def read_table(path, config_key: str = "data") -> pd.DataFrame:
    """Read CSV/TSV, JSON, JSONL/NDJSON or Parquet into a DataFrame whose text cells are all `str`.

    Every cell is read as written: CSV cells as their text (literal strings such as "nan", "None" or
    "NA" kept); JSON numbers as the text of the number ("5", "1.50", "12345678901234567"), booleans as
    "true"/"false"; Parquet values by their column's type, never through a float. Missing values (JSON
    null or an absent key, Parquet null) become "" (never NaN). Chat columns (lists of turns) keep their
    list values. A .csv whose header is one field under "," but splits under ";", tab or "|" is read
    with that separator. Rows are records: for CSV the header is not counted, for JSONL blank lines are
    not counted; JSONL records are split on "\n" only (a U+2028 inside a string is text). A .json file holding one
    object is one record where its values are text or chat turns (a ShareGPT file of one conversation), else
    columns (name -> list of values). ``config_key``: the
    config section that names the file (``data``, or a test set's ``evaluate.test_sets.NAME``), for messages.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in {".csv", ".tsv", ".json", ".jsonl", ".ndjson", ".parquet", ".pq"}:
        raise CleanError(
            f"{path}: unsupported file extension {suffix or '(none)'!r}; "
            "use .csv, .tsv, .json, .jsonl, .ndjson or .parquet"
        )
    if not path.exists():
        raise CleanError(f"{path}: file not found")

    if suffix in {".parquet", ".pq"}:
        return _read_parquet(path)

    raw = path.read_bytes()
    text = _decode(path, raw)
    if not text.strip():
        raise CleanError(f"{path}: file is empty (no header, no rows); point {config_key}.path at the file with your data")

    if suffix in {".csv", ".tsv"}:
        return _read_csv(path, text)

    if suffix == ".json":
        try:
            obj = _json_loads(text)
        except json.JSONDecodeError as e:
            raise CleanError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        if isinstance(obj, list):
            return _records_frame(path, obj, "record")
        if isinstance(obj, dict):
            if _one_record(obj):  # {"conversations": [turn, ...]} or {"instruction": ..., "output": ...}
                return _records_frame(path, [obj], "record")
            lists = {k: v for k, v in obj.items() if isinstance(v, list)}
            if len(lists) != len(obj) or not obj:
                raise CleanError(f"{path}: a JSON object must be one record (text values, chat turns) or map every "
                                 "column name to a list of values")
            lengths = {k: len(v) for k, v in lists.items()}
            if len(set(lengths.values())) > 1:
                raise CleanError(f"{path}: JSON columns have different lengths: {lengths}")
            return _frame(list(lists), list(lists.values()))
        raise CleanError(f"{path}: JSON must be an array of objects or an object of lists, got {type(obj).__name__}")

    records = []
    # Records end at "\n" (a "\r" before it is JSON whitespace); str.splitlines would also split inside
    # strings at U+2028/U+2029, U+0085 or a form feed, which JSON allows unescaped.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rec = _json_loads(line)
        except json.JSONDecodeError as e:
            raise CleanError(f"{path}: invalid JSON on line {lineno}, column {e.colno}: {e.msg}") from None
        if not isinstance(rec, dict):
            raise CleanError(f"{path}: line {lineno} is a {type(rec).__name__}, expected a JSON object")
        records.append(rec)
    return _records_frame(path, records, "record")


# --------------------------------------------------------------------------------------------- columns

def resolve_columns(df: pd.DataFrame, columns: dict | None, source: str, config_key: str = "data") -> dict[str, str]:
    """Map canonical names to the file's columns.

    Alpaca-style data gives {"instruction", "input", "output"} (input may be missing: it is then
    optional and absent from the mapping). Chat data gives {"messages": <column>} for a `messages`
    (role/content) or `conversations` (ShareGPT from/value) column. `columns` (from the config's
    data.columns, or a test set's columns: ``config_key`` names that section in messages) may name any of
    instruction/input/output/messages; the rest are auto-detected.
    """
    columns = {k: v for k, v in (columns or {}).items() if v}
    unknown = set(columns) - set(CANONICAL) - {"messages"}
    if unknown:
        raise CleanError(
            f"{source}: unknown key(s) in {config_key}.columns: {sorted(unknown)}; "
            "allowed: instruction, input, output, messages"
        )
    found = [str(c) for c in df.columns]
    for name, col in columns.items():
        if col not in found:
            raise CleanError(
                f"{source}: {config_key}.columns.{name} is {col!r}, but the file has no such column; "
                f"columns found: {found}"
            )
    lower = {c.strip().lower(): c for c in reversed(found)}  # first spelling wins on case clashes

    if "messages" in columns:
        return {"messages": columns["messages"]}

    mapping: dict[str, str] = {}
    for name in CANONICAL:
        if name in columns:
            mapping[name] = columns[name]
            continue
        for cand in AUTO_COLUMNS[name]:
            if cand in lower:
                mapping[name] = lower[cand]
                break

    if "instruction" in mapping and "output" in mapping:
        return mapping
    if not set(columns) & set(CANONICAL):
        for cand in CHAT_COLUMNS:
            if cand in lower:
                return {"messages": lower[cand]}

    missing = next(k for k in ("instruction", "output") if k not in mapping)
    raise CleanError(
        f"{source}: cannot find the {missing!r} column; columns found: {found}. "
        f"Set {config_key}.columns.{missing} in the config to the column that holds it "
        f"(auto-detected names: {', '.join(AUTO_COLUMNS[missing])}; chat data needs a "
        f"'messages' or 'conversations' column)."
    )


# --------------------------------------------------------------------------------------------- text

def _mojibake_score(s: str) -> int:
    return len(_MOJIBAKE.findall(s))


def _repair_mojibake(s: str) -> str:
    """Undo UTF-8 text that was decoded as cp1252/latin-1 (at most twice over); else return s as is.

    A repair is accepted only when re-encoding round-trips exactly and leaves fewer suspicious pairs,
    so genuine text such as "café" or "Ã la carte" is never touched by mistake.
    """
    for _ in range(2):
        score = _mojibake_score(s)
        if not score:
            break
        best = None
        for enc in ("cp1252", "latin-1"):
            try:
                cand = s.encode(enc).decode("utf-8")
            except (UnicodeEncodeError, UnicodeDecodeError):
                continue
            if _mojibake_score(cand) < score:
                best = cand
                break
        if best is None:
            break
        s = best
    return s


_INDENT = re.compile(r"[ \t]*\Z")


def _trim(s: str, keep_indent: bool) -> str:
    """Trailing whitespace and leading blank lines off; the first line's indentation (spaces and tabs)
    stays where `keep_indent` (inputs, outputs and assistant turns: code whose answer starts indented
    means something else without it), else all leading whitespace goes. Whitespace is str.isspace."""
    s = s.rstrip()
    body = s.lstrip()
    if not keep_indent:
        return body
    return _INDENT.search(s[: len(s) - len(body)]).group() + body


def _normalise(s: Any, keep_indent: bool = False) -> tuple[str, bool]:
    """Returns (normalised text, whether mojibake was repaired)."""
    if not isinstance(s, str):
        s = "" if s is None else str(s)
    s = s.replace("\r\n", "\n").replace("\r", "\n")
    s = _ZERO_WIDTH.sub("", s)
    fixed = _repair_mojibake(s)
    repaired = fixed != s
    s = unicodedata.normalize("NFC", fixed)
    return _trim(s, keep_indent), repaired


def _raw_str(v: Any) -> str:
    if isinstance(v, str):
        return str(v)
    if v is None:
        return ""
    return _json_text(v) if isinstance(v, (list, dict)) else str(v)


def _split_of(instruction: str, input_: str, output: str, eval_fraction: float) -> str:
    digest = hashlib.sha256(f"{instruction}\x1f{input_}\x1f{output}".encode("utf-8")).digest()
    return "eval" if int.from_bytes(digest[:8], "big") / 2**64 < eval_fraction else "train"


TEXT_PART_TYPES = ("text", "input_text", "output_text")  # the Chat Completions and Responses APIs' text parts


def _text_of_parts(parts: list, turn: int) -> tuple[str | None, str]:
    """OpenAI-style content parts (``[{"type": "text", "text": "..."}, ...]``) -> their texts concatenated
    in order, exactly as written (no separator added); None and why for a part that is not text (an
    image, audio, a file): this pipeline trains text only, and dropping the part would change the row."""
    texts = []
    for j, part in enumerate(parts, start=1):
        kind = part.get("type", "text" if "text" in part else None) if isinstance(part, dict) else type(part).__name__
        if kind not in TEXT_PART_TYPES or not isinstance(part.get("text"), str):
            return None, (f"turn {turn} content part {j} is {kind!r}, not text: only text parts can be trained; "
                          "remove the row's non-text parts or the row")
        texts.append(part["text"])
    return "".join(texts), ""


def _parse_chat(value: Any) -> tuple[list[dict] | None, str | tuple[str, str], int]:
    """(normalised turns, or None with why: a detail of reason bad_chat, or a (reason, detail) pair; mojibake
    repairs). The turns end with an assistant turn or go on after the last one (see _after_last_answer)."""
    if isinstance(value, str):
        if not value.strip():
            return None, "no turns", 0
        try:
            value = _json_loads(value)
        except json.JSONDecodeError as e:
            shown = value if len(value) <= 40 else value[:39] + "…"
            return None, (f"the chat column holds text, not a list of turns ({shown!r}; as JSON text: {e.msg} at "
                          f"character {e.pos + 1})"), 0
    if not isinstance(value, list):
        return None, f"the chat column holds {type(value).__name__}, not a list of turns", 0
    if not value:
        return None, "no turns", 0
    turns, repairs = [], 0
    for i, turn in enumerate(value, start=1):
        if not isinstance(turn, dict):
            return None, f"turn {i} is not an object", 0
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if role is None or content is None:
            return None, f"turn {i} lacks role/content (or from/value)", 0
        role_n = str(role).strip().lower()
        role_n = ROLE_MAP.get(role_n, role_n)
        if isinstance(content, list):  # OpenAI-style content parts
            content, why = _text_of_parts(content, i)
            if content is None:
                return None, ("non_text_content", why), 0
        text, fixed = _normalise(_raw_str(content), keep_indent=role_n == "assistant")
        repairs += fixed
        turns.append({"role": role_n, "content": text})
    if not any(t["role"] == "assistant" for t in turns):
        return None, "no assistant turn", 0
    return turns, "", repairs


def _after_last_answer(turns: list[dict]) -> int:
    """How many turns follow the last assistant turn: a user's last message with no answer to train on."""
    return next(i for i, t in enumerate(reversed(turns)) if t["role"] == "assistant")


# --------------------------------------------------------------------------------------------- cleaning
# The report's counts of chat turns after a kept row's last assistant turn (left out): turns, rows.
CHAT_COUNTS = ("turns_after_last_assistant_dropped", "rows_with_turns_after_last_assistant")


def clean_table(
    df: pd.DataFrame,
    *,
    source: str,
    columns: dict | None = None,
    placeholders: list[str] = DEFAULT_PLACEHOLDERS,
    max_chars: int = DEFAULTS["max_chars"],
    eval_fraction: float = DEFAULTS["eval_fraction"],
    config_key: str = "data",
    name: str = "",
    earlier: dict | None = None,
) -> CleanResult:
    """Normalise, reject and split the rows of `df` (as returned by :func:`read_table`).

    The split hashes the normalised content, so it is stable across re-runs and appends. With a tiny
    dataset the hash may put no row in eval even though eval_fraction > 0; that is deliberate, since
    forcing one would make a row's split depend on the rest of the file.

    ``earlier``: the content of rows kept from earlier sources -> (that source's name, its row); a row equal
    to one is rejected as a duplicate naming it, and this table's kept rows are added under ``name``.
    """
    if not 0.0 <= eval_fraction <= 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1], got {eval_fraction}")
    if max_chars <= 0:
        raise ValueError(f"max_chars must be positive, got {max_chars}")
    mapping = resolve_columns(df, columns, source, config_key)
    chat = "messages" in mapping
    placeholder_set = {p.strip().lower() for p in placeholders}

    kept, rejected = [], []
    first_seen: dict[tuple, int] = {}
    placeholders_emptied = mojibake_repaired = 0
    unanswered_turns = rows_with_unanswered_turns = 0  # chat turns after a kept row's last assistant turn
    records = df.to_dict("records")

    for i, rec in enumerate(records, start=1):
        if chat:
            raw_messages = rec.get(mapping["messages"])
            raw = {"instruction": "", "input": "", "output": "", "messages": _raw_str(raw_messages)}
        else:
            raw = {k: _raw_str(rec.get(mapping[k], "")) if k in mapping else "" for k in CANONICAL}
            raw["messages"] = ""

        def reject(reason: str, detail: str = "") -> None:
            rejected.append({"row": i, "reason": reason, "detail": detail, **raw})

        if chat:
            turns, why, fixes = _parse_chat(raw_messages)
            if turns is None:
                reject(*(why if isinstance(why, tuple) else ("bad_chat", why)))
                continue
            mojibake_repaired += fixes
            unanswered = _after_last_answer(turns)
            turns = turns[: len(turns) - unanswered]
            last_user = next((t["content"] for t in reversed(turns[:-1]) if t["role"] == "user"), "")
            instruction, input_, output = last_user, "", turns[-1]["content"]
            raw.update(instruction=instruction, output=output)
            messages = json.dumps(turns, ensure_ascii=False)
            length = sum(len(t["content"]) for t in turns)  # the whole conversation is trained on
            key: tuple = ("chat", tuple((t["role"], t["content"].strip()) for t in turns))
        else:
            values = {}
            for k in CANONICAL:
                values[k], fixed = _normalise(raw[k], keep_indent=k != "instruction")
                mojibake_repaired += fixed
            instruction, input_, output = values["instruction"], values["input"], values["output"]
            if input_ and input_.strip().lower() in placeholder_set:
                input_ = ""
                placeholders_emptied += 1
            messages = ""
            length = len(instruction) + len(input_) + len(output)
            # Duplicates and the split compare content without the indentation kept above.
            key = ("alpaca", instruction, input_.strip(), output.strip())

        if not instruction:
            reject("empty_instruction", "no user turn before the last assistant turn" if chat else "")
            continue
        if not output:
            reject("empty_output")
            continue
        if length > max_chars:
            reject("too_long", f"{length} characters > max_chars {max_chars}")
            continue
        if key in first_seen:
            reject("duplicate", f"duplicate of row {first_seen[key]}")
            continue
        if earlier is not None and key in earlier:
            reject("duplicate", "duplicate of row {1} of source {0!r}".format(*earlier[key]))
            continue
        first_seen[key] = i
        if chat:
            unanswered_turns += unanswered
            rows_with_unanswered_turns += unanswered > 0
        kept.append({
            "row": i, "instruction": instruction, "input": input_, "output": output, "messages": messages,
            "split": _split_of(instruction, input_.strip(), output.strip(), eval_fraction),
        })

    if earlier is not None:
        earlier.update({key: (name, row) for key, row in first_seen.items()})
    kept_df = pd.DataFrame(kept, columns=KEPT_COLUMNS)
    kept_df["row"] = kept_df["row"].astype("int64")
    rejected_df = pd.DataFrame(rejected, columns=REJECTED_COLUMNS)
    rejected_df["row"] = rejected_df["row"].astype("int64")

    rows_in = len(records)
    assert rows_in == len(kept_df) + len(rejected_df), (rows_in, len(kept_df), len(rejected_df))
    by_reason: dict[str, int] = {}
    for r in rejected:
        by_reason[r["reason"]] = by_reason.get(r["reason"], 0) + 1
    splits = {"train": int((kept_df["split"] == "train").sum()), "eval": int((kept_df["split"] == "eval").sum())}
    report = {
        "source": str(source),
        "rows_in": rows_in,
        "rows_kept": len(kept_df),
        "rows_rejected": len(rejected_df),
        "rejected_by_reason": dict(sorted(by_reason.items())),
        "splits": splits,
        "columns": mapping,
        "placeholders_emptied": placeholders_emptied,
        "mojibake_repaired": mojibake_repaired,
    }
    if chat:  # kept rows' turns after their last assistant turn: nothing answers them, so they are left out
        report.update(zip(CHAT_COUNTS, (unanswered_turns, rows_with_unanswered_turns)))
    return CleanResult(kept=kept_df, rejected=rejected_df, report=report)


def clean_sources(tables: list[tuple[dict, pd.DataFrame]], **kwargs) -> CleanResult:
    """Clean several sources into one table: ``tables`` holds (source, its rows as read) in config order,
    a source being {"name", "path", "columns", "config_key"}. Each is cleaned on its own (its column map,
    messages naming its file and config key); a row equal to one kept from an earlier source is rejected
    as a duplicate of that row, so the first source listed keeps it. Rows get SOURCE_COLUMNS and one
    running ``row`` number over all sources (a single source's rows keep their own numbers).

    The report: totals over all sources, and under "sources" each one's counts, path and column map,
    rows_in = rows_kept + rows_rejected in both. kwargs: clean_table's placeholders, max_chars, eval_fraction."""
    names = [source["name"] for source, _ in tables]
    if len(set(names)) < len(names):
        raise ValueError(f"sources need distinct names, got {names}")
    earlier: dict = {}
    kept, rejected, reports, offset = [], [], {}, 0
    for source, df in tables:
        result = clean_table(df, source=str(source["path"]), columns=source.get("columns"),
                             config_key=source.get("config_key", "data"), name=source["name"], earlier=earlier, **kwargs)
        for part, out in ((result.kept, kept), (result.rejected, rejected)):
            out.append(part.assign(source=source["name"], source_row=part["row"], row=part["row"] + offset))
        report = dict(result.report)
        reports[source["name"]] = {"path": report.pop("source"), **report}
        offset += report["rows_in"]
    kept_df = pd.concat(kept, ignore_index=True)[KEPT_COLUMNS + SOURCE_COLUMNS]
    rejected_df = pd.concat(rejected, ignore_index=True)[REJECTED_COLUMNS + SOURCE_COLUMNS]
    by_reason: dict[str, int] = {}
    for report in reports.values():
        for reason, count in report["rejected_by_reason"].items():
            by_reason[reason] = by_reason.get(reason, 0) + count
    totals = {key: sum(r[key] for r in reports.values())
              for key in ("rows_in", "rows_kept", "rows_rejected", "placeholders_emptied", "mojibake_repaired")}
    assert totals["rows_in"] == totals["rows_kept"] + totals["rows_rejected"] == len(kept_df) + len(rejected_df)
    for key in CHAT_COUNTS:  # totals of the chat-only counts, where a source holds chats
        if any(key in r for r in reports.values()):
            totals[key] = sum(r.get(key, 0) for r in reports.values())
    report = {**totals, "rejected_by_reason": dict(sorted(by_reason.items())),
              "splits": {split: sum(r["splits"][split] for r in reports.values()) for split in ("train", "eval")},
              "sources": reports}
    return CleanResult(kept=kept_df, rejected=rejected_df, report=report)


def _all_rejected_hint(report: dict, key: str, kwargs: dict) -> str:
    """What to do when a source kept no row, by the reason its rows were rejected for where there is one."""
    reasons = list(report["rejected_by_reason"])
    if reasons == ["too_long"]:
        return (f"every row is longer than max_chars ({kwargs.get('max_chars', DEFAULTS['max_chars'])} characters): "
                "raise data.max_chars")
    if reasons == ["duplicate"]:
        return "every row repeats an earlier one (of this file or an earlier source)"
    return f"fix the data or {key}.columns"


def run_clean(sources, out_clean, out_rejected, out_report, *, columns: dict | None = None, config_key: str = "data",
              **kwargs) -> CleanResult:
    """Read the sources, clean them, and write kept rows (Parquet), rejected rows (Parquet) and the report (JSON).

    ``sources``: one file (its column map ``columns``, named in messages as ``config_key``) or a list of
    sources {"name", "path", "columns", "config_key"} (data.sources as config.normalise_data gives it).
    kwargs go to :func:`clean_table` (placeholders, max_chars, eval_fraction). A test set is cleaned with
    eval_fraction 1 (every row held out) and its config key, which the messages then name.
    """
    if isinstance(sources, (str, Path)):
        sources = [{"name": Path(sources).stem, "path": sources, "columns": columns, "config_key": config_key}]
    tables = [(source, read_table(source["path"], source.get("config_key", "data"))) for source in sources]
    result = clean_sources(tables, **kwargs)
    # Nothing to train on from a source: stop here, where the cause is known, not in training (an empty batch)
    # or never (a source whose column map is wrong would silently be left out).
    for source in sources:
        path, key, report = source["path"], source.get("config_key", "data"), result.report["sources"][source["name"]]
        if not report["rows_in"]:
            raise CleanError(f"{path}: the file has a header but no data rows; point {key}.path at the file with "
                             "your data")
        if not report["rows_kept"]:
            mine = result.rejected[result.rejected["source"] == source["name"]]
            first = mine.head(3)[["source_row", "reason"]].rename(columns={"source_row": "row"}).to_dict("records")
            raise CleanError(f"{path}: all {report['rows_in']} rows were rejected "
                             f"({report['rejected_by_reason']}; first: {first}); "
                             f"{_all_rejected_hint(report, key, kwargs)}")
    write_parquet(out_clean, result.kept)
    write_parquet(out_rejected, result.rejected)
    write_json(out_report, result.report)
    return result
