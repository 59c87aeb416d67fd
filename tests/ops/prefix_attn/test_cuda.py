"""CUDA C++ kernels of prefix_attention (``mmict_kernels._C``) against the float64 oracle (the oracle rule of CONTRIBUTING.md).

GPU-only: every test skips without a CUDA device or without the built extension. Shapes are
small but ragged and cover both dtypes and both head dims, forward and backward.
"""

from __future__ import annotations

import pytest
import torch

from helpers.devices import requires_cuda_extension
from helpers.oracle import assert_close_by_rule, check_against_oracle
from mmict_kernels import ops
from mmict_kernels.ops.prefix_attn.reference import prefix_attention_reference

pytestmark = [pytest.mark.gpu, requires_cuda_extension]

DTYPES = [torch.float16, torch.bfloat16]
HEAD_DIMS = [64, 128]
DEV = "cuda"


def _randn(*shape, dtype):
    return torch.randn(*shape, device=DEV, dtype=torch.float32).to(dtype)


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
            q,
            k,
            v,
            pk,
            pv,
            extra["prefix_ids"],
            extra["causal"],
            backend=backend,
            prefix_lengths=extra["prefix_lengths"],
            seqlens_k=extra["seqlens_k"],
            deterministic=deterministic,
        )

    return fn


def _prefix_ref(extra):
    def ref(q, k, v, pk, pv):
        return prefix_attention_reference(
            q,
            k,
            v,
            pk,
            pv,
            extra["prefix_ids"],
            extra["causal"],
            prefix_lengths=extra["prefix_lengths"],
            seqlens_k=extra["seqlens_k"],
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
    out, lse = ops.prefix_attention(
        *inputs,
        extra["prefix_ids"],
        True,
        backend="cuda",
        prefix_lengths=extra["prefix_lengths"],
        seqlens_k=extra["seqlens_k"],
        return_lse=True,
    )
    _, lse_ref = prefix_attention_reference(
        *[t.double() for t in inputs],
        extra["prefix_ids"],
        True,
        prefix_lengths=extra["prefix_lengths"],
        seqlens_k=extra["seqlens_k"],
    )
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
        return torch.ops.mmict.prefix_attention_cuda_fwd(
            q, k, v, pk, pv, extra["prefix_ids"], True, 128**-0.5, extra["prefix_lengths"], extra["seqlens_k"], True, num_splits
        )[0]

    out, _ = check_against_oracle(fn, _prefix_ref(extra), inputs, grad_idx=(0, 1, 2, 3, 4), name=f"prefix split {num_splits}")
    assert (out[2] == 0).all()


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
def test_opcheck_prefix_attention():
    inputs, extra = _prefix_inputs(PREFIX_CASES["train_gqa_groups"], torch.float16, 64)
    for t in inputs:
        t.requires_grad_()
    args = (*inputs, extra["prefix_ids"], True, 0.125, extra["prefix_lengths"], extra["seqlens_k"], True)
    torch.library.opcheck(torch.ops.mmict.prefix_attention_cuda_fwd.default, args)


def test_torch_compile_fullgraph_matches_eager():
    # The CUDA wrapper itself (the front-end's backend lookup is not traced by dynamo here).
    from mmict_kernels.ops.prefix_attn.cuda import prefix_attention_cuda

    inputs, extra = _prefix_inputs(PREFIX_CASES["train_gqa_groups"], torch.bfloat16, 64)

    def fn(q, k, v, pk, pv):
        return prefix_attention_cuda(
            q, k, v, pk, pv, extra["prefix_ids"], True, 0.125, extra["prefix_lengths"], extra["seqlens_k"], True
        )[0]

    compiled = torch.compile(fn, fullgraph=True)
    leaves_e = [t.detach().clone().requires_grad_() for t in inputs]
    leaves_c = [t.detach().clone().requires_grad_() for t in inputs]
    out_e, out_c = fn(*leaves_e), compiled(*leaves_c)
    assert torch.equal(out_e, out_c)
    out_e.float().square().sum().backward()
    out_c.float().square().sum().backward()
    for a, b in zip(leaves_e, leaves_c):
        assert torch.equal(a.grad, b.grad)
