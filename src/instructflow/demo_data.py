"""A deterministic demo dataset in Alpaca format (instruction, input, output).

The tasks have short answers that can be checked by exact match, so a ~135M model fine-tuned for a
few minutes on a CPU visibly learns them and the evaluation stage has something to measure. A fixed
handful of deliberately dirty rows is mixed in so the clean stage's report is not empty.

    python -m instructflow.demo_data [--out PATH] [--rows N] [--seed S]
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import random
from pathlib import Path
from typing import Callable

from instructflow.io import atomic_path

DEFAULT_OUT = Path("resources/demo/instructions.csv")
DEFAULT_ROWS = 1500
DEFAULT_SEED = 1234

Row = tuple[str, str, str]

# Words are lower-case ASCII and none of them is an input placeholder ("none", "nan", "null", ...),
# which the clean stage would otherwise empty.
WORDS = (
    "apple banana cherry garden window river mountain pencil rocket silver planet castle "
    "dragon forest candle harbor island jungle kitten ladder marble needle orange pepper "
    "quartz rabbit saddle tomato violet walnut yellow zipper anchor bridge cactus desert "
    "engine falcon guitar helmet igloo jacket kettle lemon magnet napkin oyster parrot "
    "puzzle quiver ribbon spider tunnel umbrella valley wizard basket cotton donkey "
    "feather ginger hammer insect jigsaw koala lizard meadow nickel olive pillow "
    "radar salmon teapot velvet wallet copper button cookie dolphin"
).split()

NAMES = "Ann Bob Cara Dan Eve Finn Gil Hana Ivo Jan Kim Lea Max Nia Omar Pia Raj Sam Tia Uma Vic Zoe".split()
DOMAINS = ["example.com", "mail.org", "test.net", "corp.io", "school.edu"]
SUBJECTS = ["the cat", "my brother", "our team", "the old man", "a small bird", "the teacher", "every student"]
VERBS = ["likes", "sees", "builds", "paints", "finds", "carries", "watches"]
OBJECTS = ["a red ball", "the big house", "three apples", "the blue sky", "a long road", "new shoes"]
TAILS = ["today", "every morning", "in the park", "after lunch", "with great care", ""]


def _add(rng: random.Random) -> Row:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    q = rng.choice(["What is {a} + {b}?", "Add {a} and {b}.", "Compute {a} plus {b}."])
    return q.format(a=a, b=b), "", str(a + b)


def _sub(rng: random.Random) -> Row:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    a, b = max(a, b), min(a, b)
    q = rng.choice(["What is {a} - {b}?", "Subtract {b} from {a}.", "Compute {a} minus {b}."])
    return q.format(a=a, b=b), "", str(a - b)


def _sort(rng: random.Random) -> Row:
    nums = rng.sample(range(1, 100), rng.randint(3, 5))
    q = rng.choice([
        "Sort these numbers in ascending order.",
        "Put the numbers in increasing order.",
        "Arrange the list from smallest to largest.",
    ])
    return q, ", ".join(map(str, nums)), ", ".join(map(str, sorted(nums)))


def _email(rng: random.Random) -> Row:
    name = rng.choice(NAMES)
    addr = f"{name.lower()}{rng.randint(1, 99)}@{rng.choice(DOMAINS)}"
    sentence = rng.choice([
        "Please contact {n} at {e} for details.",
        "You can reach {n} via {e} any time.",
        "Send the report to {e} before Friday, says {n}.",
        "{n} wrote from {e} yesterday.",
    ]).format(n=name, e=addr)
    q = rng.choice([
        "Extract the email address from the sentence.",
        "Find the email address in the text.",
        "What email address appears in this sentence?",
    ])
    return q, sentence, addr


def _upper(rng: random.Random) -> Row:
    w = rng.choice(WORDS)
    q = rng.choice(["Convert the word to uppercase.", "Write this word in capital letters.", "Uppercase the word."])
    return q, w, w.upper()


def _reverse(rng: random.Random) -> Row:
    w = rng.choice(WORDS)
    q = rng.choice(["Reverse the letters of the word.", "Spell this word backwards.", "Write the word in reverse order."])
    return q, w, w[::-1]


def _count_words(rng: random.Random) -> Row:
    s = " ".join(p for p in (rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS), rng.choice(TAILS)) if p)
    s = s[0].upper() + s[1:] + "."
    q = rng.choice(["How many words are in this sentence?", "Count the words in the sentence.", "Give the number of words in the text."])
    return q, s, str(len(s.split()))


def _date(rng: random.Random) -> Row:
    y, m, d = rng.randint(1990, 2030), rng.randint(1, 12), rng.randint(1, 28)
    q = rng.choice([
        "Convert the date to DD/MM/YYYY format.",
        "Rewrite this ISO date as day/month/year.",
        "Change the date format from YYYY-MM-DD to DD/MM/YYYY.",
    ])
    return q, f"{y:04d}-{m:02d}-{d:02d}", f"{d:02d}/{m:02d}/{y:04d}"


def _json(rng: random.Random) -> Row:
    name, age = rng.choice(NAMES), rng.randint(18, 90)
    q = rng.choice(["Convert the record to JSON.", "Rewrite this as a JSON object.", "Turn the text into JSON."])
    return q, f"name: {name}, age: {age}", json.dumps({"name": name, "age": age})


def _larger(rng: random.Random) -> Row:
    a, b = rng.sample(range(1, 1000), 2)
    q = rng.choice(["Which number is larger, {a} or {b}?", "What is the larger of {a} and {b}?", "Give the bigger number: {a} or {b}."])
    return q.format(a=a, b=b), "", str(max(a, b))


def _first_letter(rng: random.Random) -> Row:
    w = rng.choice(WORDS)
    q = rng.choice(["What is the first letter of the word?", "Give the first letter of this word.", "Which letter does the word start with?"])
    return q, w, w[0]


FAMILIES: list[Callable[[random.Random], Row]] = [
    _add, _sub, _sort, _email, _upper, _reverse, _count_words, _date, _json, _larger, _first_letter,
]


def dirty_rows(clean: list[Row]) -> list[Row]:
    """The fixed set of problem rows; each one exercises one thing the clean stage must handle."""
    nfc, nfd = "caf\u00e9", "cafe\u0301"
    return [
        ("What is 123 + 456?", "", ""),                                   # empty output
        ("What is 321 + 654?", "", "   "),                                # whitespace-only output
        ("", "lemon", "LEMON"),                                           # blank instruction
        (" \t ", "garden", "g"),                                          # whitespace-only instruction
        clean[0],                                                         # exact duplicates
        clean[1],
        clean[2],
        ("  " + clean[3][0] + " \n", clean[3][1] + "  ", clean[3][2]),    # duplicate up to whitespace
        (clean[4][0] + "\u200b", clean[4][1], clean[4][2]),               # duplicate up to a zero-width space
        ("Convert the word to uppercase.", nfc, nfc.upper()),            # NFC "café" (kept) ...
        ("Convert the word to uppercase.", nfd, nfd.upper()),            # ... and its NFD twin (duplicate)
        ("What is 111 + 222?", "<noinput>", "333"),                       # input placeholders
        ("What is 444 + 333?", "N/A", "777"),
        ("What is 250 + 250?", "No input", "500"),
        ("Repeat the word 'data' 2000 times.", "", "data " * 2000),       # over-long (> 8000 chars)
        ("Print the template placeholder {instruction} exactly as written.", "", "{instruction}"),
        ("Copy the Jinja snippet verbatim.", "{{ input }} {% if output %}x{% endif %}",
         "{{ input }} {% if output %}x{% endif %}"),
        ("Uppercase the word.", "r\u00c3\u00a9sum\u00c3\u00a9", "R\u00c3\u2030SUM\u00c3\u2030"),  # mojibake of résumé
        ("List the numbers 1 to 3, one per line.", "", "1\r\n2\r\n3"),  # CRLF inside a cell
        ("What does Python print for print(None)?", "", "None"),          # "None" as a real answer
    ]


def generate(rows: int = DEFAULT_ROWS, seed: int = DEFAULT_SEED) -> list[Row]:
    """`rows` distinct clean rows, round-robin over the task families, with the dirty rows scattered in."""
    if rows < 10:
        raise ValueError(f"rows must be >= 10 (the dirty rows duplicate some clean ones), got {rows}")
    rng = random.Random(seed)
    seen: set[Row] = set()
    clean: list[Row] = []
    attempts = 0
    while len(clean) < rows:
        attempts += 1
        if attempts > rows * 50:
            raise ValueError(f"cannot generate {rows} distinct rows from the task families")
        row = FAMILIES[len(clean) % len(FAMILIES)](rng)
        if row not in seen:
            seen.add(row)
            clean.append(row)
    out = list(clean)
    # Dirty rows go after the first few clean rows so every duplicate follows the row it copies,
    # and the report's "duplicate of row N" points at a real earlier row.
    for row in dirty_rows(clean):
        out.insert(rng.randint(10, len(out)), row)
    return out


def to_csv(rows: list[Row]) -> bytes:
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
    writer.writerow(["instruction", "input", "output"])
    writer.writerows(rows)
    return buf.getvalue().encode("utf-8")


def write_csv(path: str | Path, rows: list[Row]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(to_csv(rows))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(DEFAULT_OUT), help=f"CSV to write (default {DEFAULT_OUT})")
    ap.add_argument("--rows", type=int, default=DEFAULT_ROWS, help="number of clean rows (dirty rows come on top)")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = ap.parse_args(argv)
    rows = generate(args.rows, args.seed)
    write_csv(args.out, rows)
    print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
