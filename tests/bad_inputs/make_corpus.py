"""Writes the bad-input corpus next to this file. The files are committed; this script is how the
binary ones (Latin-1, UTF-16, double-encoded UTF-8) were made, and test_bad_inputs.py checks that the
committed files still match it.

    python tests/bad_inputs/make_corpus.py
"""

from __future__ import annotations

import codecs
import json
import unicodedata
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
HEADER = "instruction,input,output\n"


def corpus() -> dict[str, bytes]:
    utf8 = {
        # The quote opened in record 2's input column is never closed.
        "unbalanced_quote.csv": HEADER + 'Say hi,,hi\nCopy this,"the text,copied\nAdd 1 and 1,,2\n',
        # Record 2 has an unquoted comma, so one field too many.
        "extra_field.csv": HEADER + "Say hi,,hi\nList two colours,,red, blue\n",
        # The same in record 1: pandas took the first column as the index and shifted every row.
        "extra_field_first.csv": HEADER + "List two colours,,red, blue\nSay hi,,hi\n",
        # A spreadsheet saved with semicolons (much of Europe): the separator is read from the header.
        "semicolon.csv": "instruction;input;output\nSay hi;;hi\nList two colours;;\"red; blue\"\n"
                         "Write three and a half;;3,5\n",
        # U+2028 (LINE SEPARATOR) is valid unescaped inside a JSON string; str.splitlines split on it.
        "line_separator.jsonl": json.dumps({"instruction": "Join the lines", "input": "one\u2028two",
                                            "output": "one two"}, ensure_ascii=False) + "\n",
        # Numbers with a null in their column: pandas made them floats ("5.0", "1.2345678901234568e+16").
        "ints_nulls.json": '[{"instruction": "Count to five", "input": null, "output": 5},\n'
                           ' {"instruction": "Write a big number", "input": null, "output": 12345678901234567},\n'
                           ' {"instruction": "Say nothing", "input": null, "output": null},\n'
                           ' {"instruction": "Give the price", "input": null, "output": 1.50}]\n',
        # No column the clean stage can take as the output.
        "missing_output_column.csv": "instruction,input,reply_text\nSay hi,,hi\n",
        "empty.csv": "",
        "header_only.csv": HEADER,
        # Every row lacks an output.
        "all_rejected.csv": HEADER + "Say hi,,\nSay bye,,\n",
        # Alpaca's "no input" markers in the input column; the same words in other columns are data.
        "placeholders.csv": HEADER + "Say hi,<noinput>,hi\nSay bye,N/A,bye\nWhat does print(None) show?,,None\n",
        # Literal strings that pandas would turn into NaN by default must stay text.
        "nan_like.csv": HEADER + "Spell the missing value marker,,nan\nWhat is Python's null?,None,None\n"
                                 "Name the float that is not a number,NaN,NaN\n",
        # Rows 2 and 3 repeat row 1 up to whitespace, Unicode form (NFD) and zero-width characters.
        "near_duplicates.csv": HEADER + "Say café,,café\n  Say café ,, café\t\n"
                                        + unicodedata.normalize("NFD", "Say café,,café\n")
                                        + "Say\u200b café,,caf\u200dé\n",
        # Template syntax inside the data must reach the prompt exactly as written.
        "braces.csv": HEADER + 'Explain {instruction} in a template,"{{ input }} and {% if x %}y{% endif %}",'
                               '"It is replaced by {output}, {0} and {}"\n',
        # Row 2 is longer than the default data.max_chars (8000).
        "long_field.csv": HEADER + "Say hi,,hi\nRepeat this,," + "x" * 9000 + "\n",
        # Row 2 fits in characters but not in a small token budget.
        "over_budget.csv": HEADER + "Say hi,,hi\nWrite a long answer,," + " ".join(["word"] * 300) + "\n",
    }
    files = {name: text.encode("utf-8") for name, text in utf8.items()}
    row = "Uppercase,café,CAFÉ\n"
    files["latin1.csv"] = (HEADER + "Say hi,,hi\n" + row).encode("latin-1")
    files["utf16_bom.csv"] = codecs.BOM_UTF16_LE + (HEADER + row).encode("utf-16-le")
    # UTF-8 bytes read as cp1252 and saved again as UTF-8: "cafÃ©".
    files["mojibake.csv"] = (HEADER + row.encode("utf-8").decode("cp1252")).encode("utf-8")
    # An int64 column with a null: to_pandas() made it float64, so 5 came out as "5.0".
    table = pa.table({"instruction": ["Count to five", "Say nothing", "Write a big number"],
                      "input": pa.array([None, None, None], pa.string()),
                      "output": pa.array([5, None, 12345678901234567], pa.int64())})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    files["nullable_ints.parquet"] = sink.getvalue().to_pybytes()
    return files


def main() -> None:
    for name, data in corpus().items():
        (HERE / name).write_bytes(data)


if __name__ == "__main__":
    main()
