"""CUDA C++ kernels of hub_cross_attention (``mmict_kernels._C``) against the float64 oracle (the oracle rule of CONTRIBUTING.md).

GPU-only: every test skips without a CUDA device or without the built extension. Shapes are
small but ragged and cover both dtypes and both head dims, forward and backward.
"""

from __future__ import annotations

import pytest
import torch

from helpers.devices import requires_cuda_extension
from helpers.oracle import assert_close_by_rule, check_against_oracle
from mmict_kernels import backends, ops
from mmict_kernels.ops.hub_cross_attn.reference import hub_cross_attention_reference

pytestmark = [pytest.mark.gpu, requires_cuda_extension]

DTYPES = [torch.float16, torch.bfloat16]
HEAD_DIMS = [64, 128]
DEV = "cuda"


def _randn(*shape, dtype):
    return torch.randn(*shape, device=DEV, dtype=torch.float32).to(dtype)


# ---------------------------------------------------------------------------------------------
# hub cross-attention
# ---------------------------------------------------------------------------------------------
HUB_CASES = {
    # name: (B, Lq, H, lengths of the samples' image tokens, layout)
    "dense_full": (2, 32, 3, [77, 77], "dense"),
    "dense_ragged_zero": (3, 32, 2, [257, 0, 65], "dense"),
    "dense_long_queries": (2, 70, 2, [40, 129], "dense"),  # 64-row query tiles, a partial one
    "packed_ragged_zero": (4, 32, 2, [100, 0, 257, 1], "packed"),
    "packed_short_queries": (2, 5, 3, [64, 63], "packed"),
}


def _hub_inputs(case, dtype, head_dim):
    batch, len_q, heads, lengths, layout = case
    q = _randn(batch, len_q, heads, head_dim, dtype=dtype)
    lens = torch.tensor(lengths, dtype=torch.int32, device=DEV)
    if layout == "packed":
        total = sum(lengths)
        k = _randn(total, heads, head_dim, dtype=dtype)
        v = _randn(total, heads, head_dim, dtype=dtype)
        cu = torch.zeros(batch + 1, dtype=torch.int32, device=DEV)
        cu[1:] = torch.cumsum(lens, 0)
        return q, k, v, {"cu_seqlens_k": cu}
    len_k = max(lengths)
    k = _randn(batch, len_k, heads, head_dim, dtype=dtype)
    v = _randn(batch, len_k, heads, head_dim, dtype=dtype)
    return q, k, v, {"seqlens_k": lens}


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(HUB_CASES), ids=str)
def test_hub_cross_attention_matches_oracle(case, dtype, head_dim):
    q, k, v, lengths = _hub_inputs(HUB_CASES[case], dtype, head_dim)
    cu, seqlens = lengths.get("cu_seqlens_k"), lengths.get("seqlens_k")

    def fn(q, k, v):
        return ops.hub_cross_attention(q, k, v, cu, backend="cuda", seqlens_k=seqlens)

    def ref(q, k, v):
        return hub_cross_attention_reference(q, k, v, cu_seqlens_k=cu, seqlens_k=seqlens)[0]

    check_against_oracle(fn, ref, [q, k, v], grad_idx=(0, 1, 2), name=f"hub_cross_attention[{case}]")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_hub_cross_attention_lse_and_empty_rows(dtype):
    q, k, v, lengths = _hub_inputs(HUB_CASES["packed_ragged_zero"], dtype, 64)
    out, lse = ops.hub_cross_attention(q, k, v, lengths["cu_seqlens_k"], backend="cuda", return_lse=True)
    _, lse_ref = hub_cross_attention_reference(q.double(), k.double(), v.double(), cu_seqlens_k=lengths["cu_seqlens_k"])
    assert lse.dtype == torch.float32 and lse.shape == (4, 2, 32)
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_ref))
    assert (lse[1] == float("-inf")).all() and (out[1] == 0).all()  # the sample without image tokens
    finite = torch.isfinite(lse_ref)
    assert (lse[finite].double() - lse_ref[finite]).abs().max().item() < 1e-2


def test_hub_cross_attention_strided_inputs():
    # q, k, v as views into fused projections (head-dim contiguous, other strides arbitrary).
    dtype, heads, head_dim = torch.float16, 2, 64
    qkv = _randn(2, 33, 3, heads, head_dim, dtype=dtype)
    kv = _randn(2, 90, 2, heads, head_dim, dtype=dtype)
    q, k, v = qkv[:, :, 0], kv[:, :, 0], kv[:, :, 1]
    check_against_oracle(
        lambda q, k, v: ops.hub_cross_attention(q, k, v, backend="cuda"),
        lambda q, k, v: hub_cross_attention_reference(q, k, v)[0],
        [q, k, v],
        grad_idx=(0, 1, 2),
        name="hub_cross_attention[strided]",
    )


def test_size_one_dims_with_odd_strides():
    # torch may give a size-1 dim any stride (here 3, not a multiple of 8 elements): the binding
    # passes stride 0 for it, so the op runs and matches the contiguous input bit for bit.
    dtype, heads, head_dim = torch.float16, 2, 64
    q = _randn(1, 1, heads, head_dim, dtype=dtype)
    q_odd = torch.empty_strided(q.shape, (3, 3, head_dim, 1), device=DEV, dtype=dtype)
    q_odd.copy_(q)
    k, v = _randn(1, 70, heads, head_dim, dtype=dtype), _randn(1, 70, heads, head_dim, dtype=dtype)
    ref = ops.hub_cross_attention(q, k, v, backend="cuda")
    assert torch.equal(ops.hub_cross_attention(q_odd, k, v, backend="cuda"), ref)
    pk, pv = _randn(1, 40, heads, head_dim, dtype=dtype), _randn(1, 40, heads, head_dim, dtype=dtype)
    ref = ops.prefix_attention(q, k, v, pk, pv, backend="cuda")
    assert torch.equal(ops.prefix_attention(q_odd, k, v, pk, pv, backend="cuda"), ref)


def test_hub_cross_attention_expanded_upstream_gradient():
    # out.sum().backward() hands the op an expanded dout (all strides 0): it must be re-laid out.
    q, k, v, lengths = _hub_inputs(HUB_CASES["dense_ragged_zero"], torch.bfloat16, 64)
    grads, grads64, grads_lp = [], [], []
    for dst, impl, dt in ((grads, "cuda", None), (grads64, "torch", torch.float64), (grads_lp, "torch", None)):
        leaves = [(t.to(dt) if dt else t).detach().requires_grad_() for t in (q, k, v)]
        ops.hub_cross_attention(*leaves, backend=impl, seqlens_k=lengths["seqlens_k"]).sum().backward()
        dst.extend(t.grad for t in leaves)
    for name, g, g64, glp in zip("qkv", grads, grads64, grads_lp):
        assert_close_by_rule(f"d{name}", g, g64, glp)


@pytest.mark.parametrize("num_splits", [2, 5])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_hub_cross_attention_split_kv(head_dim, num_splits):
    q, k, v, lengths = _hub_inputs(HUB_CASES["packed_ragged_zero"], torch.float16, head_dim)
    cu = lengths["cu_seqlens_k"]
    out, lse = torch.ops.mmict.hub_cross_attention_cuda_fwd(q, k, v, cu, None, head_dim**-0.5, num_splits)
    out1, lse1 = torch.ops.mmict.hub_cross_attention_cuda_fwd(q, k, v, cu, None, head_dim**-0.5, 1)
    ref64, lse64 = hub_cross_attention_reference(q.double(), k.double(), v.double(), cu_seqlens_k=cu)
    ref_lp, _ = hub_cross_attention_reference(q, k, v, cu_seqlens_k=cu)
    assert_close_by_rule("split out", out, ref64, ref_lp)
    assert torch.equal(torch.isinf(lse), torch.isinf(lse64))
    finite = torch.isfinite(lse64)
    assert (lse[finite] - lse1[finite]).abs().max().item() < 1e-4


# ---------------------------------------------------------------------------------------------
# torch.library registration: opcheck, torch.compile
# ---------------------------------------------------------------------------------------------
def test_opcheck_hub_cross_attention():
    q, k, v, lengths = _hub_inputs(HUB_CASES["packed_short_queries"], torch.float16, 64)
    for t in (q, k, v):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.mmict.hub_cross_attention_cuda_fwd.default, (q, k, v, lengths["cu_seqlens_k"], None, 0.125))
    q, k, v, lengths = _hub_inputs(HUB_CASES["dense_ragged_zero"], torch.bfloat16, 128)
    torch.library.opcheck(torch.ops.mmict.hub_cross_attention_cuda_fwd.default, (q, k, v, None, lengths["seqlens_k"], 0.1))


def test_auto_backend_picks_cuda():
    q, k, v, lengths = _hub_inputs(HUB_CASES["dense_full"], torch.float16, 64)
    assert backends.available_backends("hub_cross_attention", device_type="cuda", dtype=q.dtype, head_dim=64)[0] == "cuda"
    out = ops.hub_cross_attention(q, k, v, backend="auto", seqlens_k=lengths["seqlens_k"])
    ref64 = hub_cross_attention_reference(q.double(), k.double(), v.double(), seqlens_k=lengths["seqlens_k"])[0]
    ref_lp = hub_cross_attention_reference(q, k, v, seqlens_k=lengths["seqlens_k"])[0]
    assert_close_by_rule("auto", out, ref64, ref_lp)
