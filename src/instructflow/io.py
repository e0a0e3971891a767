"""Small file helpers shared by the stages: atomic writes so a killed job never leaves a
half-written file that a later stage trusts."""

from __future__ import annotations

import contextlib
import json
import warnings
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary name beside ``path``; once the block succeeds, the file is moved over
    ``path`` (same filesystem, so atomic). On any error the temporary file is removed and ``path``
    is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_parquet(path: str | os.PathLike, df: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp)


def read_parquet(path: str | os.PathLike) -> pd.DataFrame:
    return pq.read_table(path).to_pandas()


def append_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_jsonl(path: str | os.PathLike, *, skip_damaged: bool = False) -> list[dict]:
    """The records of a JSON-lines file. ``skip_damaged``: a line that does not parse as a JSON object
    (torn by a kill mid-write) is skipped with a warning instead of raising."""
    records = []
    with open(path, encoding="utf-8", errors="replace" if skip_damaged else "strict") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if skip_damaged and not isinstance(record, dict):
                    raise ValueError("not a JSON object")
            except ValueError as err:
                if not skip_damaged:
                    raise
                warnings.warn(f"instructflow: skipping damaged line {number} of {path}: {err}", RuntimeWarning,
                              stacklevel=2)
                continue
            records.append(record)
    return records
