"""Which rows go into which micro-batch: a deterministic plan from (seed, step), so every rank
computes the same plan without talking to the others and a resumed run continues exactly where it
stopped.

Rows are shuffled per epoch, then sorted by length inside windows of many batches, so a batch holds
rows of similar length and padding (or packing waste) stays small while batches stay random.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .examples import IGNORE_INDEX, Examples

WINDOW_BATCHES = 16


@dataclass(frozen=True)
class StepPlan:
    """One optimiser step: micro_batches[rank] is that rank's list of row-index lists."""

    micro_batches: list[list[list[int]]]
    trained_tokens: int  # labelled tokens in the whole global batch, for loss normalisation


class BatchPlanner:
    def __init__(self, examples: Examples, *, batch_size: int, micro_batch_size: int, world_size: int, seed: int):
        if batch_size % (micro_batch_size * world_size):
            raise ValueError(
                f"train.batch_size ({batch_size}) must be a multiple of train.micro_batch_size "
                f"({micro_batch_size}) x processes ({world_size})"
            )
        if len(examples) < batch_size:
            raise ValueError(f"only {len(examples)} training rows, fewer than train.batch_size ({batch_size})")
        self.lengths = examples.lengths.numpy()
        self.trained = _trained_per_row(examples)
        self.batch_size, self.micro, self.world, self.seed = batch_size, micro_batch_size, world_size, seed
        self.steps_per_epoch = len(examples) // batch_size
        self._epoch_cache: tuple[int, list[np.ndarray]] | None = None

    def _epoch(self, epoch: int) -> list[np.ndarray]:
        if self._epoch_cache and self._epoch_cache[0] == epoch:
            return self._epoch_cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.lengths))[: self.steps_per_epoch * self.batch_size]
        window = self.batch_size * WINDOW_BATCHES
        batches = []
        for start in range(0, len(order), window):
            chunk = order[start : start + window]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            batches.extend(chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size))
        batches = [batches[i] for i in rng.permutation(len(batches))]
        self._epoch_cache = (epoch, batches)
        return batches

    def step(self, step: int) -> StepPlan:
        rows = self._epoch(step // self.steps_per_epoch)[step % self.steps_per_epoch]
        per_rank = []
        for rank in range(self.world):
            # Interleaving the length-sorted rows gives every rank a similar amount of work.
            mine = rows[rank :: self.world]
            per_rank.append([mine[i : i + self.micro].tolist() for i in range(0, len(mine), self.micro)])
        return StepPlan(per_rank, int(self.trained[rows].sum()))


def _trained_per_row(examples: Examples) -> np.ndarray:
    labelled = (examples.labels != IGNORE_INDEX).to(torch.int64)
    cums = torch.cat([torch.zeros(1, dtype=torch.int64), labelled.cumsum(0)])
    return (cums[examples.offsets[1:]] - cums[examples.offsets[:-1]]).numpy()


def collate(examples: Examples, rows: list[int], *, pack: bool) -> dict[str, torch.Tensor]:
    """Right-padded [B, L] tensors (pad label -100, no attention mask needed under causal attention),
    or with ``pack`` one [1, sum(L)] row whose position ids restart at 0 for each source row, which
    transformers turns into a block-diagonal mask so rows never attend to each other."""
    pieces = [examples.get(i) for i in rows]
    if pack:
        ids = torch.cat([p[0] for p in pieces]).long().unsqueeze(0)
        labels = torch.cat([p[1] for p in pieces]).long().unsqueeze(0)
        position_ids = torch.cat([torch.arange(len(p[0])) for p in pieces]).unsqueeze(0)
        return {"input_ids": ids, "labels": labels, "position_ids": position_ids}
    width = max(len(p[0]) for p in pieces)
    ids = torch.full((len(pieces), width), examples.pad_token_id, dtype=torch.long)
    labels = torch.full((len(pieces), width), IGNORE_INDEX, dtype=torch.long)
    for b, (row_ids, row_labels) in enumerate(pieces):
        ids[b, : len(row_ids)] = row_ids
        labels[b, : len(row_labels)] = row_labels
    return {"input_ids": ids, "labels": labels, "position_ids": None}
