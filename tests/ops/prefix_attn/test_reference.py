"""ops.prefix_attention with the torch backend: groups, GQA, ragged prefixes, decode, padding, bad input."""

import pytest
import torch

from helpers.naive import naive_attention
from helpers.oracle import check_against_oracle
from mmict_kernels import ops


def _naive(q, k, v, pk, pv, ids, prefix_lengths, seqlens_k, causal):
    batch, len_q, heads, _ = q.shape
    len_k, kv_heads = k.shape[1], k.shape[2]
    rep = heads // kv_heads

    def keys_of(src_prefix, src_own):
        return lambda b: torch.cat([src_prefix[ids[b]], src_own[b]]).repeat_interleave(rep, dim=1)

    len_p = pk.shape[1]

    def visible(b, i):
        n_p = prefix_lengths[ids[b]]
        first_own = len_k - seqlens_k[b]
        pos = len_k - len_q + i
        own = [len_p + j for j in range(first_own, len_k) if not causal or j <= pos]
        return list(range(n_p)) + own

    return naive_attention(q, keys_of(pk, k), keys_of(pv, v), visible, q.shape[-1] ** -0.5)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("len_q,len_k", [(5, 5), (1, 6), (3, 7)])
def test_matches_naive_with_groups_gqa_and_padding(causal, len_q, len_k):
    batch, heads, kv_heads, head_dim, groups, len_p = 4, 4, 2, 8, 3, 6
    f64 = dict(dtype=torch.float64)
    q = torch.randn(batch, len_q, heads, head_dim, **f64)
    k, v = (torch.randn(batch, len_k, kv_heads, head_dim, **f64) for _ in range(2))
    pk, pv = (torch.randn(groups, len_p, kv_heads, head_dim, **f64) for _ in range(2))
    ids = [2, 0, 2, 1]
    prefix_lengths = [6, 0, 3]
    seqlens_k = [len_k, len_k - 1, 0, 1]
    out = ops.prefix_attention(
        q,
        k,
        v,
        pk,
        pv,
        torch.tensor(ids),
        causal,
        backend="torch",
        prefix_lengths=torch.tensor(prefix_lengths, dtype=torch.int32),
        seqlens_k=torch.tensor(seqlens_k, dtype=torch.int32),
    )
    naive = _naive(q, k, v, pk, pv, ids, prefix_lengths, seqlens_k, causal)
    torch.testing.assert_close(out, naive, rtol=1e-10, atol=1e-10)
    # row 2 sees its group's 3 prefix tokens only; no row yields NaN
    assert torch.isfinite(out).all()


def test_row_that_sees_nothing_gives_zeros_and_finite_grads():
    q = torch.randn(1, 2, 2, 8, requires_grad=True)
    k = torch.randn(1, 2, 2, 8, requires_grad=True)
    pk = torch.randn(1, 3, 2, 8, requires_grad=True)
    out = ops.prefix_attention(
        q,
        k,
        k,
        pk,
        pk,
        backend="torch",
        prefix_lengths=torch.tensor([0], dtype=torch.int32),
        seqlens_k=torch.tensor([0], dtype=torch.int32),
    )
    assert out.abs().max() == 0
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, pk))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_against_float64_oracle(dtype):
    q = torch.randn(3, 4, 4, 16, dtype=dtype)
    k, v = (torch.randn(3, 4, 1, 16, dtype=dtype) for _ in range(2))
    pk, pv = (torch.randn(2, 5, 1, 16, dtype=dtype) for _ in range(2))
    ids = torch.tensor([1, 1, 0])
    plen = torch.tensor([5, 2], dtype=torch.int32)

    def fn(q, k, v, pk, pv):
        return ops.prefix_attention(q, k, v, pk, pv, ids, backend="torch", prefix_lengths=plen)

    def ref(q, k, v, pk, pv):
        return ops.prefix_attention_reference(q, k, v, pk, pv, ids, prefix_lengths=plen)[0]

    check_against_oracle(fn, ref, [q, k, v, pk, pv], grad_idx=(0, 1, 2, 3, 4), name=f"prefix {dtype}")


def test_prefix_gradient_is_the_sum_over_the_group_rows():
    """The gradient of a shared prefix equals the sum of the gradients of per-row copies."""
    q = torch.randn(3, 2, 2, 8, dtype=torch.float64)
    k = torch.randn(3, 2, 2, 8, dtype=torch.float64)
    pk = torch.randn(1, 4, 2, 8, dtype=torch.float64, requires_grad=True)
    ops.prefix_attention(q, k, k, pk, pk, backend="torch").sum().backward()
    copies = pk.detach().expand(3, -1, -1, -1).clone().requires_grad_(True)
    ops.prefix_attention(q, k, k, copies, copies, torch.arange(3), backend="torch").sum().backward()
    torch.testing.assert_close(pk.grad[0], copies.grad.sum(0))


def test_bad_inputs_name_the_argument():
    q = torch.randn(2, 3, 4, 8)
    k = torch.randn(2, 3, 2, 8)
    pk = torch.randn(2, 5, 2, 8)
    with pytest.raises(ValueError, match="prefix_ids"):
        ops.prefix_attention(q, k, k, pk, pk)  # two groups need prefix_ids
    with pytest.raises(ValueError, match="prefix_ids"):
        ops.prefix_attention(q, k, k, pk, pk, torch.tensor([0, 2]))  # group 2 does not exist
    with pytest.raises(ValueError, match="K/V heads"):
        ops.prefix_attention(q, torch.randn(2, 3, 3, 8), torch.randn(2, 3, 3, 8), pk, pk, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="prefix_k"):
        ops.prefix_attention(q, k, k, torch.randn(2, 5, 1, 8), torch.randn(2, 5, 1, 8), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="prefix_lengths"):
        ops.prefix_attention(q, k, k, pk, pk, torch.tensor([0, 1]), prefix_lengths=torch.tensor([6, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match="seqlens_k"):
        ops.prefix_attention(q, k, k, pk, pk, torch.tensor([0, 1]), seqlens_k=torch.tensor([4, 1], dtype=torch.int32))
    with pytest.raises(TypeError, match="causal"):
        ops.prefix_attention(q, k, k, pk, pk, torch.tensor([0, 1]), causal=1)
