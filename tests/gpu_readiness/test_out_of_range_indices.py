"""With value checks off, out-of-range index tensors never make a Triton kernel leave its tensors.

``ops.skip_value_checks()`` (or ``MMICT_KERNELS_SKIP_VALUE_CHECKS=1``, or a captured CUDA graph)
removes the front-ends' index checks; the kernels clamp group ids, offsets and lengths into their
tensors instead (``prefix_ids`` outside [0, G) read no prefix, ``cu_seqlens`` / lengths are
clamped). Checked in Triton's interpreter with every load, store and atomic bounds-checked
(``mmict_kernels.testing.interpreter_bounds``), forward and backward: no access outside the
tensors of each launch, and finite results. Wrong values give wrong numbers, by design.
"""

from __future__ import annotations

import os

import pytest
import torch

from mmict_kernels import ops
from mmict_kernels.testing.interpreter_bounds import checked_memory_access

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET", "0") != "1", reason="bounds are checked in Triton's CPU interpreter (TRITON_INTERPRET=1)"
)


def rnd(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype, requires_grad=True)


def run_checked(fn, *leaves):
    """fn() forward + backward with every kernel access bounds-checked; returns (out, kernels launched)."""
    with ops.skip_value_checks(), checked_memory_access() as log:
        out = fn()
        out.float().square().sum().backward()
    assert not log.violations, log.violations
    assert len(log.kernels) >= 2, log.kernels  # forward and backward kernels ran (checked)
    assert torch.isfinite(out).all()
    for t in leaves:
        assert t.grad is not None and torch.isfinite(t.grad).all()
    return out, log.kernels


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize(
    ("ids", "prefix_lengths", "seqlens_k"),
    [
        ([5, -1, 1], [3, 2], [6, 6, 6]),  # group ids outside [0, G)
        ([0, 1, 1], [100, -4], [6, 6, 6]),  # prefix lengths beyond the cache and negative
        ([1, 0, 1], [7, 7], [50, -3, 4]),  # own-key lengths beyond L and negative
        ([2**31 - 1, -(2**31), 0], [2**31 - 1, -(2**31)], [2**31 - 1, -(2**31), 0]),  # int32 extremes
    ],
)
def test_prefix_attention(ids, prefix_lengths, seqlens_k, deterministic):
    q, k, v = rnd(3, 5, 4, 32), rnd(3, 6, 2, 32), rnd(3, 6, 2, 32)  # GQA: 4 query heads on 2 K/V heads
    pk, pv = rnd(2, 7, 2, 32), rnd(2, 7, 2, 32)
    ids = torch.tensor(ids, dtype=torch.int64)
    plens = torch.tensor(prefix_lengths, dtype=torch.int32)
    slens = torch.tensor(seqlens_k, dtype=torch.int32)

    def fn():
        return ops.prefix_attention(q, k, v, pk, pv, ids, True, backend="triton", prefix_lengths=plens, seqlens_k=slens,
                                    deterministic=deterministic)  # fmt: skip

    run_checked(fn, q, k, v, pk, pv)


@pytest.mark.parametrize(
    "cu_seqlens",
    [
        [0, 7, 3, 40],  # decreasing, and past total_k = 10
        [-5, 7, 3, 10],  # negative start
        [0, 2**31 - 1024, 5, 10],  # a huge (not overflowing) jump
        [0, 2**31 - 1, -(2**31), 10],  # int32 extremes (the block table's differences are taken in int64)
    ],
)
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_hub_cross_attention_packed(cu_seqlens, dropout_p):
    q, k, v = rnd(3, 4, 2, 32), rnd(10, 2, 32), rnd(10, 2, 32)
    cu = torch.tensor(cu_seqlens, dtype=torch.int32)
    fn = lambda: ops.hub_cross_attention(q, k, v, cu, backend="triton", dropout_p=dropout_p)  # noqa: E731
    run_checked(fn, q, k, v)


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_hub_cross_attention_dense_lengths(dropout_p):
    q, k, v = rnd(3, 4, 2, 32), rnd(3, 9, 2, 32), rnd(3, 9, 2, 32)
    lengths = torch.tensor([100, -2, 2**31 - 1], dtype=torch.int32)
    run_checked(lambda: ops.hub_cross_attention(q, k, v, seqlens_k=lengths, backend="triton", dropout_p=dropout_p), q, k, v)


@pytest.mark.parametrize("mask", ["bidirectional", "unimodal", "multimodal_causal"])
def test_hub_self_attention_text_lengths(mask):
    q, k, v = rnd(3, 7, 2, 32), rnd(3, 7, 2, 32), rnd(3, 7, 2, 32)
    lengths = torch.tensor([100, -2, 2**31 - 1], dtype=torch.int32)
    fn = lambda: ops.hub_self_attention(q, k, v, 3, lengths, mask=mask, backend="triton", dropout_p=0.1)  # noqa: E731
    run_checked(fn, q, k, v)
