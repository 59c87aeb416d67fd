"""CUDA C++ kernels (``mmict_kernels._C``) against the float64 oracle (NOTES §4 rule).

GPU-only: every test skips without a CUDA device or without the built extension. Shapes are
small but ragged (query counts that are not tile multiples, zero-length rows, GQA, several
prefix groups) and cover both dtypes and both head dims, forward and backward.
"""

from __future__ import annotations

import pytest
import torch
from oracle import assert_close_by_rule, check_against_oracle

from mmict_kernels import backends, ops
from mmict_kernels.ops.hub_cross_attention.reference import hub_cross_attention_reference
from mmict_kernels.ops.prefix_attention.reference import prefix_attention_reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not backends.cuda_extension_available(), reason="mmict_kernels._C is not built"),
]

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


# ---------------------------------------------------------------------------------------------
# prefix attention
# ---------------------------------------------------------------------------------------------
PREFIX_CASES = {
    # name: (B, Lq, Lk, H, Hkv, G, Lp, prefix_ids, prefix_lengths, seqlens_k, causal)
    "train_gqa_groups": (3, 20, 20, 4, 2, 2, 70, [1, 0, 1], [70, 33], [20, 7, 0], True),
    "decode_cache": (2, 1, 37, 4, 1, 1, 130, [0, 0], None, [37, 5], True),
    "chunk_noncausal": (2, 9, 17, 2, 2, 3, 64, [2, 0], [0, 64, 10], None, False),
    "long_rows": (2, 70, 70, 2, 1, 1, 40, [0, 0], None, [70, 45], True),  # 64-row tiles + causal skips
    "empty_prefix_and_row": (2, 6, 6, 2, 2, 1, 16, [0, 0], [0], [6, 0], True),  # row 1 sees nothing
}


def _prefix_inputs(case, dtype, head_dim):
    batch, len_q, len_k, heads, kv_heads, groups, len_p, ids, plens, slens, causal = case
    q = _randn(batch, len_q, heads, head_dim, dtype=dtype)
    k = _randn(batch, len_k, kv_heads, head_dim, dtype=dtype)
    v = _randn(batch, len_k, kv_heads, head_dim, dtype=dtype)
    pk = _randn(groups, len_p, kv_heads, head_dim, dtype=dtype)
    pv = _randn(groups, len_p, kv_heads, head_dim, dtype=dtype)
    extra = {
        "prefix_ids": torch.tensor(ids, dtype=torch.int64, device=DEV),
        "prefix_lengths": None if plens is None else torch.tensor(plens, dtype=torch.int32, device=DEV),
        "seqlens_k": None if slens is None else torch.tensor(slens, dtype=torch.int32, device=DEV),
        "causal": causal,
    }
    return [q, k, v, pk, pv], extra


def _prefix_fn(extra, deterministic, backend="cuda"):
    def fn(q, k, v, pk, pv):
        return ops.prefix_attention(
            q, k, v, pk, pv, extra["prefix_ids"], extra["causal"], backend=backend,
            prefix_lengths=extra["prefix_lengths"], seqlens_k=extra["seqlens_k"], deterministic=deterministic,
        )

    return fn


def _prefix_ref(extra):
    def ref(q, k, v, pk, pv):
        return prefix_attention_reference(
            q, k, v, pk, pv, extra["prefix_ids"], extra["causal"],
            prefix_lengths=extra["prefix_lengths"], seqlens_k=extra["seqlens_k"],
        )[0]

    return ref


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(PREFIX_CASES), ids=str)
def test_prefix_attention_matches_oracle(case, dtype, head_dim, deterministic):
    inputs, extra = _prefix_inputs(PREFIX_CASES[case], dtype, head_dim)
    check_against_oracle(
        _prefix_fn(extra, deterministic), _prefix_ref(extra), inputs, grad_idx=(0, 1, 2, 3, 4), name=f"prefix_attention[{case}]"
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prefix_attention_deterministic_is_bitwise_reproducible(dtype):
    inputs, extra = _prefix_inputs(PREFIX_CASES["train_gqa_groups"], dtype, 64)
    dout = _randn(*inputs[0].shape, dtype=dtype)
    runs = []
    for _ in range(3):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        out = _prefix_fn(extra, True)(*leaves)
        grads = torch.autograd.grad(out, leaves, dout)
        runs.append((out.detach(), grads))
    for out, grads in runs[1:]:
        assert torch.equal(out, runs[0][0])
        for g, g0 in zip(grads, runs[0][1]):
            assert torch.equal(g, g0)


def test_prefix_attention_lse_matches_reference():
    inputs, extra = _prefix_inputs(PREFIX_CASES["empty_prefix_and_row"], torch.bfloat16, 128)
    out, lse = ops.prefix_attention(*inputs, extra["prefix_ids"], True, backend="cuda", prefix_lengths=extra["prefix_lengths"],
                                    seqlens_k=extra["seqlens_k"], return_lse=True)
    _, lse_ref = prefix_attention_reference(*[t.double() for t in inputs], extra["prefix_ids"], True,
                                            prefix_lengths=extra["prefix_lengths"], seqlens_k=extra["seqlens_k"])
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_ref))
    assert (out[1] == 0).all() and torch.isfinite(out).all()
    finite = torch.isfinite(lse_ref)
    assert (lse[finite].double() - lse_ref[finite]).abs().max().item() < 2e-2


# ---------------------------------------------------------------------------------------------
# split-KV forward (flash-decoding): forced split counts, including more splits than key blocks
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_splits", [1, 2, 3, 16])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prefix_attention_split_kv(dtype, num_splits):
    # Decoding: one query per row, long prefix, a short own cache; row 2 sees nothing.
    inputs, extra = _prefix_inputs((3, 1, 9, 4, 2, 2, 700, [1, 1, 0], [0, 700], [9, 3, 0], True), dtype, 128)

    def fn(q, k, v, pk, pv):
        return torch.ops.mmict.prefix_attention_cuda_fwd(q, k, v, pk, pv, extra["prefix_ids"], True, 128**-0.5,
                                                         extra["prefix_lengths"], extra["seqlens_k"], True, num_splits)[0]

    out, _ = check_against_oracle(fn, _prefix_ref(extra), inputs, grad_idx=(0, 1, 2, 3, 4), name=f"prefix split {num_splits}")
    assert (out[2] == 0).all()


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


def test_auto_split_is_used_for_decoding_and_matches():
    # B x H = 8 CTAs on a GPU with 100+ SMs and 40 key blocks: the heuristic splits.
    inputs, extra = _prefix_inputs((2, 1, 4, 4, 4, 1, 2500, [0, 0], None, None, True), torch.bfloat16, 64)
    out_auto = ops.prefix_attention(*inputs, extra["prefix_ids"], True, backend="cuda")
    out_one = torch.ops.mmict.prefix_attention_cuda_fwd(*inputs, extra["prefix_ids"], True, 64**-0.5, None, None, False, 1)[0]
    ref64 = prefix_attention_reference(*[t.double() for t in inputs], extra["prefix_ids"], True)[0]
    ref_lp = prefix_attention_reference(*inputs, extra["prefix_ids"], True)[0]
    assert_close_by_rule("auto split", out_auto, ref64, ref_lp)
    assert_close_by_rule("one split", out_one, ref64, ref_lp)


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


def test_opcheck_prefix_attention():
    inputs, extra = _prefix_inputs(PREFIX_CASES["train_gqa_groups"], torch.float16, 64)
    for t in inputs:
        t.requires_grad_()
    args = (*inputs, extra["prefix_ids"], True, 0.125, extra["prefix_lengths"], extra["seqlens_k"], True)
    torch.library.opcheck(torch.ops.mmict.prefix_attention_cuda_fwd.default, args)


def test_torch_compile_fullgraph_matches_eager():
    # The CUDA wrapper itself (the front-end's backend lookup is not traced by dynamo here).
    from mmict_kernels.ops.prefix_attention.cuda import prefix_attention_cuda

    inputs, extra = _prefix_inputs(PREFIX_CASES["train_gqa_groups"], torch.bfloat16, 64)

    def fn(q, k, v, pk, pv):
        return prefix_attention_cuda(q, k, v, pk, pv, extra["prefix_ids"], True, 0.125, extra["prefix_lengths"],
                                     extra["seqlens_k"], True)[0]

    compiled = torch.compile(fn, fullgraph=True)
    leaves_e = [t.detach().clone().requires_grad_() for t in inputs]
    leaves_c = [t.detach().clone().requires_grad_() for t in inputs]
    out_e, out_c = fn(*leaves_e), compiled(*leaves_c)
    assert torch.equal(out_e, out_c)
    out_e.float().square().sum().backward()
    out_c.float().square().sum().backward()
    for a, b in zip(leaves_e, leaves_c):
        assert torch.equal(a.grad, b.grad)


def test_auto_backend_picks_cuda():
    q, k, v, lengths = _hub_inputs(HUB_CASES["dense_full"], torch.float16, 64)
    assert backends.available_backends("hub_cross_attention", device_type="cuda", dtype=q.dtype, head_dim=64)[0] == "cuda"
    out = ops.hub_cross_attention(q, k, v, backend="auto", seqlens_k=lengths["seqlens_k"])
    ref64 = hub_cross_attention_reference(q.double(), k.double(), v.double(), seqlens_k=lengths["seqlens_k"])[0]
    ref_lp = hub_cross_attention_reference(q, k, v, seqlens_k=lengths["seqlens_k"])[0]
    assert_close_by_rule("auto", out, ref64, ref_lp)
