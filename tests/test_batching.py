"""Batch planning (deterministic, epoch coverage, rank split) and collation (padding, packing)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from instructflow.batching import BatchPlanner, collate
from instructflow.examples import IGNORE_INDEX, Examples

PAD, EOS = 0, 1


def _examples(n=40, seed=0):
    rng = np.random.default_rng(seed)
    rows, plens = [], []
    for _ in range(n):
        p, r = int(rng.integers(1, 9)), int(rng.integers(1, 7))
        ids = rng.integers(2, 100, p + r).tolist() + [EOS]
        rows.append((ids, [IGNORE_INDEX] * p + ids[p:]))
        plens.append(p)
    return Examples.from_rows(rows, list(range(100, 100 + n)), plens, {"eos_token_id": EOS, "pad_token_id": PAD})


def _planner(examples, **kw):
    args = {"batch_size": 8, "micro_batch_size": 2, "world_size": 1, "seed": 3, **kw}
    return BatchPlanner(examples, **args)


def _rows_of(plan, rank=None):
    ranks = plan.micro_batches if rank is None else [plan.micro_batches[rank]]
    return [r for micro in ranks for batch in micro for r in batch]


def test_plan_is_a_function_of_seed_and_step():
    ex = _examples()
    a, b = _planner(ex), _planner(ex)
    steps = [7, 0, 3, 12, 3]  # out of order: no hidden state carried from one call to the next
    assert [b.step(s) for s in steps] == [a.step(s) for s in steps]
    other = _planner(ex, seed=4)
    assert [_rows_of(other.step(s)) for s in range(5)] != [_rows_of(a.step(s)) for s in range(5)]


def test_each_epoch_covers_rows_without_repetition_and_epochs_differ():
    ex = _examples(n=43)
    planner = _planner(ex)
    assert planner.steps_per_epoch == 5
    epochs = []
    for epoch in range(2):
        rows = [r for s in range(5) for r in _rows_of(planner.step(epoch * 5 + s))]
        assert len(rows) == len(set(rows)) == 40
        assert set(rows) <= set(range(43))
        epochs.append(rows)
    assert epochs[0] != epochs[1]


@pytest.mark.parametrize("pack", [False, True])
def test_ranks_get_disjoint_rows_and_the_same_global_batch(pack):
    ex = _examples()
    single = _planner(ex, world_size=1, pack=pack)
    double = _planner(ex, world_size=2, pack=pack)
    for s in range(6):
        plan = double.step(s)
        r0, r1 = _rows_of(plan, 0), _rows_of(plan, 1)
        assert not set(r0) & set(r1) and len(r0) == len(r1) == 4
        assert sorted(r0 + r1) == sorted(_rows_of(single.step(s)))
        assert all(len(micro) == 2 for rank in plan.micro_batches for micro in rank)
        assert plan.trained_tokens == single.step(s).trained_tokens


def test_steps_are_random_samples_not_length_sorted_runs():
    # Rows of one length band per step would make a step one task type on data whose tasks differ in
    # length; each step must mix lengths as the data does.
    ex = _examples(n=400)
    lengths = ex.lengths.numpy()
    planner = _planner(ex, batch_size=16, micro_batch_size=4)
    spreads = [np.ptp(lengths[_rows_of(planner.step(s))]) for s in range(20)]
    assert np.median(spreads) > 0.5 * np.ptp(lengths)


def test_micro_batches_balance_tokens_when_packed_and_length_when_padded():
    ex = _examples(n=400)
    lengths = ex.lengths.numpy()
    packed = _planner(ex, batch_size=16, micro_batch_size=4, pack=True)
    padded = _planner(ex, batch_size=16, micro_batch_size=4)
    for s in range(10):
        tokens = [int(lengths[m].sum()) for m in packed.step(s).micro_batches[0]]
        assert max(tokens) - min(tokens) <= int(np.ptp(lengths[_rows_of(packed.step(s))]))
        micro = padded.step(s).micro_batches[0]
        assert [int(lengths[m].max()) for m in micro] == sorted((int(lengths[m].max()) for m in micro), reverse=True)
        assert all(int(lengths[a].min()) >= int(lengths[b].max()) for a, b in zip(micro, micro[1:]))


def test_trained_tokens_counts_labelled_tokens_of_the_global_batch():
    ex = _examples()
    planner = _planner(ex, world_size=2)
    for s in range(4):
        plan = planner.step(s)
        expected = sum(int((ex.get(r)[1] != IGNORE_INDEX).sum()) for r in _rows_of(plan))
        assert plan.trained_tokens == expected


def test_invalid_batch_shapes_are_rejected():
    ex = _examples(n=10)
    with pytest.raises(ValueError, match="multiple"):
        _planner(ex, batch_size=8, micro_batch_size=3)
    with pytest.raises(ValueError, match="fewer than train.batch_size"):
        _planner(ex, batch_size=16, micro_batch_size=4)


def test_collate_pads_right_with_masked_labels():
    ex = _examples()
    rows = [0, 5, 9]
    batch = collate(ex, rows, pack=False)
    width = max(len(ex.get(r)[0]) for r in rows)
    assert batch["input_ids"].shape == batch["labels"].shape == (3, width)
    assert batch["position_ids"] is None
    for b, r in enumerate(rows):
        ids, labels = ex.get(r)
        n = len(ids)
        assert batch["input_ids"][b, :n].tolist() == ids.tolist()
        assert batch["labels"][b, :n].tolist() == labels.tolist()
        assert (batch["input_ids"][b, n:] == PAD).all() and (batch["labels"][b, n:] == IGNORE_INDEX).all()


def test_collate_packing_restarts_position_ids_per_row():
    ex = _examples()
    rows = [2, 7, 11]
    batch = collate(ex, rows, pack=True)
    lengths = [len(ex.get(r)[0]) for r in rows]
    assert batch["input_ids"].shape == (1, sum(lengths))
    assert batch["input_ids"][0].tolist() == torch.cat([ex.get(r)[0] for r in rows]).tolist()
    assert batch["labels"][0].tolist() == torch.cat([ex.get(r)[1] for r in rows]).tolist()
    expected = [p for n in lengths for p in range(n)]
    assert batch["position_ids"][0].tolist() == expected
    assert (batch["position_ids"][0] == 0).sum() == len(rows)
