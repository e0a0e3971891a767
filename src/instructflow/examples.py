"""The on-disk format of tokenized examples: one safetensors file per split (never pickle).

Rows of different lengths are stored ragged: every row's tokens concatenated into one flat tensor,
with ``offsets`` marking where each row starts, so nothing is padded on disk and a batch pads (or
packs) only what it needs.

Tensors:
    input_ids      int32  [total_tokens]  prompt + response + EOS of every row, concatenated
    labels         int32  [total_tokens]  -100 on prompt tokens, the token id on response + EOS
    offsets        int64  [n_rows + 1]    row i is input_ids[offsets[i]:offsets[i+1]]
    prompt_lengths int32  [n_rows]        tokens of row i that belong to the prompt
    row            int64  [n_rows]        the row number from the clean stage
    source         int64  [n_rows]        the row's source: an index into the metadata's ``sources``
Metadata (strings): eos_token_id, pad_token_id, sources (a JSON list of the data sources' names; absent where
the rows name none, all rows then source 0), and anything the tokenizer stage wants to record.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from safetensors import safe_open

IGNORE_INDEX = -100


@dataclass
class Examples:
    input_ids: torch.Tensor
    labels: torch.Tensor
    offsets: torch.Tensor
    prompt_lengths: torch.Tensor
    row: torch.Tensor
    metadata: dict[str, str] = field(default_factory=dict)
    source: torch.Tensor | None = None  # None: every row from source 0

    def __post_init__(self):
        if self.source is None:
            self.source = torch.zeros(len(self), dtype=torch.int64)

    def __len__(self) -> int:
        return int(self.offsets.numel() - 1)

    @property
    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def get(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.input_ids[start:end], self.labels[start:end]

    def prompt(self, i: int) -> torch.Tensor:
        start = int(self.offsets[i])
        return self.input_ids[start : start + int(self.prompt_lengths[i])]

    def head(self, n: int) -> "Examples":
        """The first ``n`` rows (all of them where there are fewer), as views of these tensors."""
        n = min(n, len(self))
        end = int(self.offsets[n])
        return Examples(self.input_ids[:end], self.labels[:end], self.offsets[: n + 1], self.prompt_lengths[:n],
                        self.row[:n], self.metadata, self.source[:n])

    @property
    def source_names(self) -> list[str]:
        """The data sources' names, in the order of the source indices (empty where none was recorded)."""
        return json.loads(self.metadata.get("sources", "[]"))

    @property
    def eos_token_id(self) -> int:
        return int(self.metadata["eos_token_id"])

    @property
    def pad_token_id(self) -> int:
        return int(self.metadata["pad_token_id"])

    @classmethod
    def from_rows(
        cls,
        rows: list[tuple[list[int], list[int]]],
        row_ids: list[int],
        prompt_lengths: list[int],
        metadata: dict[str, str],
        sources: list[int] | None = None,
    ) -> "Examples":
        lengths = np.array([len(ids) for ids, _ in rows], dtype=np.int64)
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat_ids = np.fromiter((t for ids, _ in rows for t in ids), dtype=np.int32, count=int(offsets[-1]))
        flat_labels = np.fromiter((t for _, lab in rows for t in lab), dtype=np.int32, count=int(offsets[-1]))
        return cls(
            input_ids=torch.from_numpy(flat_ids),
            labels=torch.from_numpy(flat_labels),
            offsets=torch.from_numpy(offsets),
            prompt_lengths=torch.tensor(prompt_lengths, dtype=torch.int32),
            row=torch.tensor(row_ids, dtype=torch.int64),
            metadata={k: str(v) for k, v in metadata.items()},
            source=None if sources is None else torch.tensor(sources, dtype=torch.int64),
        )

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(
            {
                "input_ids": self.input_ids.contiguous(),
                "labels": self.labels.contiguous(),
                "offsets": self.offsets.contiguous(),
                "prompt_lengths": self.prompt_lengths.contiguous(),
                "row": self.row.contiguous(),
                "source": self.source.contiguous(),
            },
            str(tmp),
            metadata=self.metadata,
        )
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Examples":
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
        return cls(metadata=metadata, **tensors)
