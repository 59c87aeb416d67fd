"""ops.hub_cross_attention with the torch backend: semantics, precision, gradients, bad input."""

import pytest
import torch

from helpers.naive import naive_attention
from helpers.oracle import check_against_oracle
from mmict_kernels import ops
from mmict_kernels.backends import BackendUnavailableError


def _pack(k, lengths):
    return torch.cat([k[b, :n] for b, n in enumerate(lengths)]), torch.tensor(
        [0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32
    )


@pytest.mark.parametrize("lengths", [[7, 3, 0, 11], [1], [13, 13]])
def test_dense_packed_and_naive_agree(lengths):
    batch, len_q, heads, head_dim = len(lengths), 5, 3, 16
    len_k = max(lengths)
    q = torch.randn(batch, len_q, heads, head_dim, dtype=torch.float64)
    k = torch.randn(batch, len_k, heads, head_dim, dtype=torch.float64)
    v = torch.randn(batch, len_k, heads, head_dim, dtype=torch.float64)
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    dense = ops.hub_cross_attention(q, k, v, seqlens_k=seqlens, backend="torch")
    k_packed, cu = _pack(k, lengths)
    v_packed, _ = _pack(v, lengths)
    packed = ops.hub_cross_attention(q, k_packed, v_packed, cu, backend="torch")
    naive = naive_attention(q, lambda b: k[b], lambda b: v[b], lambda b, i: list(range(lengths[b])), head_dim**-0.5)
    torch.testing.assert_close(dense, naive, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(packed, naive, rtol=1e-10, atol=1e-10)
    for b, n in enumerate(lengths):
        if n == 0:
            assert dense[b].abs().max() == 0, "a sample without image tokens must give zeros"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_against_float64_oracle(dtype):
    lengths = [9, 0, 4]
    q = torch.randn(3, 6, 2, 32, dtype=dtype)
    k_dense = torch.randn(3, 9, 2, 32, dtype=dtype)
    v_dense = torch.randn(3, 9, 2, 32, dtype=dtype)
    seqlens = torch.tensor(lengths, dtype=torch.int32)

    def fn(q, k, v):
        return ops.hub_cross_attention(q, k, v, seqlens_k=seqlens, backend="torch")

    def ref(q, k, v):
        return ops.hub_cross_attention_reference(q, k, v, seqlens_k=seqlens)[0]

    _, grads = check_against_oracle(fn, ref, [q, k_dense, v_dense], grad_idx=(0, 1, 2), name=f"cross {dtype}")
    assert all(torch.isfinite(g).all() for g in grads)
    assert grads[0][1].abs().max() == 0  # the empty sample's queries get no gradient


def test_gradcheck_float64_packed():
    q = torch.randn(3, 2, 1, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(5, 1, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(5, 1, 4, dtype=torch.float64, requires_grad=True)
    cu = torch.tensor([0, 3, 3, 5], dtype=torch.int32)  # lengths 3, 0, 2
    assert torch.autograd.gradcheck(lambda q, k, v: ops.hub_cross_attention(q, k, v, cu, backend="torch"), (q, k, v))


def test_return_lse_and_dropout_statistics():
    q = torch.randn(2, 4, 2, 8)
    k = torch.randn(2, 6, 2, 8)
    out, lse = ops.hub_cross_attention(q, k, k, return_lse=True, backend="torch")
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * 8**-0.5
    torch.testing.assert_close(lse, torch.logsumexp(scores, dim=-1))
    torch.manual_seed(1)
    dropped = ops.hub_cross_attention(q, k, k, dropout_p=0.5, backend="torch")
    assert not torch.allclose(dropped, out) and torch.isfinite(dropped).all()


def test_bad_inputs_name_the_argument():
    q = torch.randn(2, 4, 2, 8)
    k = torch.randn(2, 6, 2, 8)
    with pytest.raises(ValueError, match="k: expected shape"):
        ops.hub_cross_attention(q, torch.randn(2, 6, 3, 8), k)
    with pytest.raises(ValueError, match="cu_seqlens_k"):
        ops.hub_cross_attention(q, k[0], k[0], torch.tensor([0, 2, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens_k"):
        ops.hub_cross_attention(q, k[0], k[0], torch.tensor([0, 4, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match="seqlens_k"):
        ops.hub_cross_attention(q, k, k, seqlens_k=torch.tensor([3, 7], dtype=torch.int32))
    with pytest.raises((TypeError, ValueError), match="k"):
        ops.hub_cross_attention(q, k.half(), k)
    with pytest.raises((TypeError, ValueError), match="q"):
        ops.hub_cross_attention(q[..., 0], k, k)
    with pytest.raises((TypeError, ValueError), match="q"):
        ops.hub_cross_attention(q.long(), k, k)
    with pytest.raises(ValueError, match="dropout"):
        ops.hub_cross_attention(q, k, k, dropout_p=1.5)
    with pytest.raises(ValueError, match="backend"):
        ops.hub_cross_attention(q, k, k, backend="cudnn")
    with pytest.raises(BackendUnavailableError, match="cuda"):
        ops.hub_cross_attention(q, k, k, backend="cuda")
