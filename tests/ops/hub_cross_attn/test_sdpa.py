"""ops.hub_cross_attention's torch backend (sdpa.py: torch's fused CPU kernel; lean dropout path) against the float64 oracle."""

from __future__ import annotations

import pytest
import torch

from helpers.oracle import check_against_oracle
from mmict_kernels import ops
from mmict_kernels.ops import _sdpa
from mmict_kernels.ops._seeded_dropout import keep_mask_from_seed


def _pack(x, lengths):
    packed = torch.cat([x[b, :n] for b, n in enumerate(lengths)])
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    return packed, cu


@pytest.mark.parametrize("layout", ["dense", "packed"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_against_float64_oracle_ragged(layout, dtype):
    lengths = [9, 0, 4, 1]  # ragged, one sample without image tokens
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(4, 6, 2, 32, generator=gen).to(dtype)
    k = torch.randn(4, 9, 2, 32, generator=gen).to(dtype)
    v = torch.randn(4, 9, 2, 32, generator=gen).to(dtype)
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    if layout == "dense":
        inputs = [q, k, v]

        def fn(q, k, v):
            return ops.hub_cross_attention(q, k, v, seqlens_k=seqlens, backend="torch")

        def ref(q, k, v):
            return ops.hub_cross_attention_reference(q, k, v, seqlens_k=seqlens)[0]
    else:
        (kp, cu), (vp, _) = _pack(k, lengths), _pack(v, lengths)
        inputs = [q, kp, vp]

        def fn(q, k, v):
            return ops.hub_cross_attention(q, k, v, cu, backend="torch")

        def ref(q, k, v):
            return ops.hub_cross_attention_reference(q, k, v, cu)[0]

    _, grads = check_against_oracle(fn, ref, inputs, grad_idx=(0, 1, 2), name=f"cross sdpa {layout} {dtype}")
    assert grads[0][1].abs().max() == 0  # the sample without image tokens: zero gradient, not NaN


def test_packed_samples_of_equal_length_are_read_as_a_view():
    """Every sample with the same token count (one image each): the packed K/V are viewed as dense, not gathered."""
    gen = torch.Generator().manual_seed(8)
    q = torch.randn(3, 4, 2, 16, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(3, 5, 2, 16, generator=gen, dtype=torch.float64) for _ in range(2))
    cu = torch.tensor([0, 5, 10, 15], dtype=torch.int32)

    def fn(q, k, v):
        return ops.hub_cross_attention(q, k, v, cu, backend="torch")

    def ref(q, k, v):
        return ops.hub_cross_attention_reference(q, k, v, cu)[0]

    check_against_oracle(fn, ref, [q, k.flatten(0, 1), v.flatten(0, 1)], grad_idx=(0, 1, 2), name="cross sdpa equal lengths")
    from mmict_kernels.ops.hub_cross_attn.sdpa import _dense_from_packed

    packed = k.flatten(0, 1)
    (dense,), lengths = _dense_from_packed(cu, packed)
    assert dense.data_ptr() == packed.data_ptr() and lengths.tolist() == [5, 5, 5]


def test_empty_sample_gives_zeros_and_minus_inf_lse():
    q = torch.randn(3, 4, 2, 8)
    k, v = torch.randn(5, 2, 8), torch.randn(5, 2, 8)
    cu = torch.tensor([0, 3, 3, 5], dtype=torch.int32)
    out, lse = ops.hub_cross_attention(q, k, v, cu, backend="torch", return_lse=True)
    assert out[1].abs().max() == 0 and (lse[1] == float("-inf")).all()
    ref_out, ref_lse = ops.hub_cross_attention_reference(q, k, v, cu)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dropout_path_equals_the_reference_with_the_same_mask(dtype):
    p, seed = 0.25, 99
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(3, 5, 2, 16, generator=gen).to(dtype)
    k = torch.randn(3, 7, 2, 16, generator=gen).to(dtype)
    v = torch.randn(3, 7, 2, 16, generator=gen).to(dtype)
    seqlens = torch.tensor([7, 0, 3], dtype=torch.int32)
    mask = (torch.arange(7)[None, :] < seqlens[:, None].long())[:, None, None, :]
    keep = keep_mask_from_seed(seed, (3, 2, 5, 7), p, q.device)

    def fn(q, k, v):
        return _sdpa.dropout_attention(q, k, v, mask, 16**-0.5, p, seed=seed)[0]

    def ref(q, k, v):
        return ops.hub_cross_attention_reference(q, k, v, seqlens_k=seqlens, dropout_p=p, dropout_mask=keep)[0]

    check_against_oracle(fn, ref, [q, k, v], grad_idx=(0, 1, 2), name=f"cross dropout {dtype}")


def test_gradcheck_float64_dense_and_dropout():
    q = torch.randn(2, 3, 1, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 5, 1, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 5, 1, 4, dtype=torch.float64, requires_grad=True)
    seqlens = torch.tensor([5, 2], dtype=torch.int32)
    assert torch.autograd.gradcheck(
        lambda q, k, v: ops.hub_cross_attention(q, k, v, seqlens_k=seqlens, backend="torch"), (q, k, v)
    )
    mask = (torch.arange(5)[None, :] < seqlens[:, None].long())[:, None, None, :]
    assert torch.autograd.gradcheck(lambda q, k, v: _sdpa.dropout_attention(q, k, v, mask, 0.5, 0.3, seed=4)[0], (q, k, v))
