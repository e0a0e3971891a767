"""The fast path's sparse lookup gradient for an input embedding tied to the output layer
(kernels._embedding_gradient): the same gradients as the dense lookup over micro-batches that accumulate,
the weight's gradient still dense, no vocabulary-sized dense lookup gradient made; untied or frozen
embeddings, and any under a process group (DDP), left alone."""

from __future__ import annotations

import copy

import torch

from conftest import build_model
from instructflow import kernels
from instructflow.examples import IGNORE_INDEX
from instructflow.kernels import linear_cross_entropy

VOCAB = 512


def _llama(tie: bool):
    return build_model("llama", VOCAB, eos_id=2, pad_id=0, tie_word_embeddings=tie)


def _accumulated_grads(model):
    """Gradients of two micro-batches' fused losses, accumulated as training does; the backward's op names."""
    generator = torch.Generator().manual_seed(1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for length in (24, 17):
            ids = torch.randint(0, VOCAB, (3, length), generator=generator)
            labels = ids.clone()
            labels[:, :5] = IGNORE_INDEX
            loss, _ = linear_cross_entropy.response_loss_sum(model, ids, labels)
            loss.backward()
    ops = {event.key for event in prof.key_averages()}
    return {name: p.grad for name, p in model.named_parameters()}, ops


def test_a_tied_embedding_gets_a_sparse_lookup_gradient_and_the_same_weight_gradient():
    dense = _llama(tie=True)
    sparse = copy.deepcopy(dense)
    assert kernels._embedding_gradient(sparse) == "sparse (tied to the output layer)"
    dense_grads, dense_ops = _accumulated_grads(dense)
    sparse_grads, sparse_ops = _accumulated_grads(sparse)
    # The flag reaches the model's own lookup: no dense lookup gradient (a vocabulary-sized tensor) is made.
    assert "aten::embedding_dense_backward" in dense_ops
    assert "aten::embedding_dense_backward" not in sparse_ops and "aten::embedding_backward" in sparse_ops
    assert dense_grads.keys() == sparse_grads.keys()
    for name, grad in dense_grads.items():
        assert not sparse_grads[name].is_sparse, name  # what clipping and the optimisers read
        torch.testing.assert_close(sparse_grads[name], grad, rtol=1e-5, atol=1e-6 * float(grad.abs().max()))
    weight = sparse.get_input_embeddings().weight
    assert weight.grad.abs().sum(dim=1).gt(0).all()  # the output layer's part reaches every row


def test_untied_or_frozen_embeddings_keep_the_dense_lookup_gradient():
    untied = _llama(tie=False)
    assert kernels._embedding_gradient(untied) == "dense"
    assert not untied.get_input_embeddings().sparse
    frozen = _llama(tie=True)
    frozen.get_input_embeddings().weight.requires_grad_(False)
    assert kernels._embedding_gradient(frozen) == "dense"
    assert not frozen.get_input_embeddings().sparse


def test_no_sparse_lookup_gradient_where_a_process_group_is_up():
    # DDP's reducer expects a sparse gradient from a sparse embedding (tests/test_multiprocess.py trains under it).
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        tied = _llama(tie=True)
        assert kernels._embedding_gradient(tied) == "dense" and not tied.get_input_embeddings().sparse
    finally:
        dist.destroy_process_group()
    assert kernels._embedding_gradient(tied) == "sparse (tied to the output layer)"
