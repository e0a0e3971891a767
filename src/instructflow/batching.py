"""Which rows go into which micro-batch: a deterministic plan from (seed, step), so every rank
computes the same plan without talking to the others and a resumed run continues exactly where it
stopped.

Rows are shuffled per epoch and each step takes the next batch_size of them, so every step is a
random sample of the data. With several data sources an epoch is built from per-source samples: a
source of weight w and n training rows gives round(w x n) of them (a sample without replacement below
n, whole repeats of every row and a sample for the rest above), all shuffled together; with every weight
1 that is each row once, exactly the plan of one unweighted source. (Sorting rows by length across many batches saved padding but made a step
nearly one task type on data whose tasks differ in length, and held-out loss suffered; packing now
removes the padding instead.) Inside a step the rows are ordered by length: ranks get similar amounts
of work, padded micro-batches hold rows of similar length, and packed micro-batches similar token counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .examples import IGNORE_INDEX, Examples

@dataclass(frozen=True)
class StepPlan:
    """One optimiser step: micro_batches[rank] is that rank's list of row-index lists."""

    micro_batches: list[list[list[int]]]
    trained_tokens: int  # labelled tokens in the whole global batch, for loss normalisation


def check_split(batch_size: int, micro_batch_size: int, world_size: int) -> None:
    """A ValueError, saying what to set, unless a batch splits into micro-batches on every process."""
    split = micro_batch_size * world_size
    if batch_size % split:
        below = batch_size - batch_size % split
        choices = f"{below} or {below + split}" if below else f"{split}"
        raise ValueError(f"train.batch_size ({batch_size}) must be a multiple of train.micro_batch_size "
                         f"({micro_batch_size}) x processes ({world_size}) = {split}: set train.batch_size to "
                         f"{choices}, or change train.micro_batch_size")


class BatchPlanner:
    """``source_weights``: a data source's name -> its weight (data.sources[].weight); None: every source 1.
    The sources are the ones the examples name (Examples.source_names)."""

    def __init__(self, examples: Examples, *, batch_size: int, micro_batch_size: int, world_size: int, seed: int,
                 pack: bool = False, source_weights: dict[str, float] | None = None):
        check_split(batch_size, micro_batch_size, world_size)
        self.lengths = examples.lengths.numpy()
        self.trained = _trained_per_row(examples)
        self.batch_size, self.micro, self.world, self.seed, self.pack = batch_size, micro_batch_size, world_size, seed, pack
        self.sources = source_plan(examples, source_weights)
        rows_per_epoch = sum(source["rows_per_epoch"] for source in self.sources.values())
        if rows_per_epoch < batch_size:
            raise ValueError(f"only {rows_per_epoch} training rows per epoch, fewer than train.batch_size ({batch_size})"
                             + (f" (rows per source and epoch: {self.rows_per_epoch()})" if len(self.sources) > 1 else ""))
        self._rows_of = [np.flatnonzero(examples.source.numpy() == i) for i in range(len(self.sources))]
        self.steps_per_epoch = rows_per_epoch // batch_size
        self._epoch_cache: tuple[int, list[np.ndarray]] | None = None

    def rows_per_epoch(self) -> dict[str, int]:
        """Rows each source gives an epoch (before the epoch's last partial batch is left out)."""
        return {name: source["rows_per_epoch"] for name, source in self.sources.items()}

    def _epoch(self, epoch: int) -> list[np.ndarray]:
        if self._epoch_cache and self._epoch_cache[0] == epoch:
            return self._epoch_cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        picked = []
        for rows, source in zip(self._rows_of, self.sources.values()):
            whole, rest = divmod(source["rows_per_epoch"], len(rows)) if len(rows) else (0, 0)
            picked += [rows] * whole
            if rest:
                picked.append(rng.choice(rows, rest, replace=False))
        order = rng.permutation(np.concatenate(picked))[: self.steps_per_epoch * self.batch_size]
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        self._epoch_cache = (epoch, batches)
        return batches

    def step(self, step: int) -> StepPlan:
        rows = self._epoch(step // self.steps_per_epoch)[step % self.steps_per_epoch]
        rows = rows[np.argsort(-self.lengths[rows], kind="stable")]
        per_rank = []
        for rank in range(self.world):
            # Dealing the length-sorted rows round-robin gives every rank a similar amount of work.
            mine = rows[rank :: self.world]
            n_micro = len(mine) // self.micro
            if self.pack:  # dealt again: micro-batches of similar token counts (similar peak memory)
                micro = [mine[j::n_micro] for j in range(n_micro)]
            else:  # consecutive: each padded micro-batch holds rows of similar length
                micro = [mine[i : i + self.micro] for i in range(0, len(mine), self.micro)]
            per_rank.append([m.tolist() for m in micro])
        return StepPlan(per_rank, int(self.trained[rows].sum()))


def source_plan(examples: Examples, weights: dict[str, float] | None) -> dict[str, dict]:
    """Source name -> {"train_rows", "weight", "rows_per_epoch": round(weight x train_rows), halves up}, in the
    order of the examples' source indices. Examples that name no source are one source, "all"."""
    names = examples.source_names or ["all"]
    if weights is not None and examples.source_names:
        missing = [name for name in names if name not in weights]
        if missing:
            raise ValueError(f"the training rows come from sources {names}, but no weight is given for {missing}; "
                             "tokenize and train from the same data.sources")
    elif weights is not None and any(w != 1 for w in weights.values()):
        raise ValueError(f"source weights {weights} given, but the training rows name no sources")
    counts = np.bincount(examples.source.numpy(), minlength=len(names))
    plan = {}
    for name, rows in zip(names, counts.tolist()):
        weight = (weights or {}).get(name, 1)
        plan[name] = {"train_rows": rows, "weight": weight, "rows_per_epoch": int(np.floor(weight * rows + 0.5))}
    return plan


def _trained_per_row(examples: Examples) -> np.ndarray:
    labelled = (examples.labels != IGNORE_INDEX).to(torch.int64)
    cums = torch.cat([torch.zeros(1, dtype=torch.int64), labelled.cumsum(0)])
    return (cums[examples.offsets[1:]] - cums[examples.offsets[:-1]]).numpy()


def collate(examples: Examples, rows: list[int], *, pack: bool) -> dict[str, torch.Tensor]:
    """Right-padded [B, L] tensors (pad label -100, no attention mask needed under causal attention),
    or with ``pack`` one [1, sum(L)] row whose position ids restart at 0 for each source row, plus the
    row lengths (``seq_lens``). attention.segment_attention runs each row on its own from those lengths;
    other attention implementations get a block-diagonal mask from the position ids. Either way rows
    never attend to each other."""
    pieces = [examples.get(i) for i in rows]
    if pack:
        ids = torch.cat([p[0] for p in pieces]).long().unsqueeze(0)
        labels = torch.cat([p[1] for p in pieces]).long().unsqueeze(0)
        position_ids = torch.cat([torch.arange(len(p[0])) for p in pieces]).unsqueeze(0)
        return {"input_ids": ids, "labels": labels, "position_ids": position_ids, "seq_lens": [len(p[0]) for p in pieces]}
    width = max(len(p[0]) for p in pieces)
    ids = torch.full((len(pieces), width), examples.pad_token_id, dtype=torch.long)
    labels = torch.full((len(pieces), width), IGNORE_INDEX, dtype=torch.long)
    for b, (row_ids, row_labels) in enumerate(pieces):
        ids[b, : len(row_ids)] = row_ids
        labels[b, : len(row_labels)] = row_labels
    return {"input_ids": ids, "labels": labels, "position_ids": None, "seq_lens": None}
