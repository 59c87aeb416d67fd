"""ops.prefix_attention's torch backend (sdpa.py: torch's fused CPU kernel, GQA K/V as they are) against the float64 oracle."""

from __future__ import annotations

import pytest
import torch

from helpers.oracle import check_against_oracle
from mmict_kernels import ops


def _inputs(dtype, batch=4, len_q=5, len_k=5, heads=4, kv_heads=2, head_dim=16, groups=3, len_p=6):
    gen = torch.Generator().manual_seed(11)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    return [rnd(batch, len_q, heads, head_dim), rnd(batch, len_k, kv_heads, head_dim), rnd(batch, len_k, kv_heads, head_dim),
            rnd(groups, len_p, kv_heads, head_dim), rnd(groups, len_p, kv_heads, head_dim)]  # fmt: skip


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_against_float64_oracle_groups_gqa_padding(causal, dtype):
    ids = torch.tensor([2, 0, 2, 1])
    prefix_lengths = torch.tensor([6, 0, 3], dtype=torch.int32)
    seqlens_k = torch.tensor([5, 4, 0, 1], dtype=torch.int32)  # row 2: nothing but its group's prefix
    kwargs = dict(prefix_lengths=prefix_lengths, seqlens_k=seqlens_k)

    def fn(q, k, v, pk, pv):
        return ops.prefix_attention(q, k, v, pk, pv, ids, causal, backend="torch", **kwargs)

    def ref(q, k, v, pk, pv):
        return ops.prefix_attention_reference(q, k, v, pk, pv, ids, causal, **kwargs)[0]

    check_against_oracle(fn, ref, _inputs(dtype), grad_idx=(0, 1, 2, 3, 4), name=f"prefix sdpa {causal} {dtype}")


def test_decode_step_and_row_that_sees_nothing():
    q, k, v, pk, pv = (t.requires_grad_(True) for t in _inputs(torch.float32, batch=2, len_q=1, len_k=4, groups=1))
    out, lse = ops.prefix_attention(
        q, k, v, pk, pv, backend="torch", return_lse=True,
        prefix_lengths=torch.tensor([0], dtype=torch.int32), seqlens_k=torch.tensor([0, 2], dtype=torch.int32),
    )  # fmt: skip
    assert out[0].abs().max() == 0 and (lse[0] == float("-inf")).all()
    out.square().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v, pk, pv))
    ref = ops.prefix_attention_reference(
        q, k, v, pk, pv, prefix_lengths=torch.tensor([0], dtype=torch.int32), seqlens_k=torch.tensor([0, 2], dtype=torch.int32)
    )[0]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
