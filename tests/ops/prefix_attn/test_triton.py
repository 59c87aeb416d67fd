"""Triton prefix_attention vs the float64 oracle (the oracle rule of CONTRIBUTING.md), forward and backward.

Runs on CUDA, or on the CPU under TRITON_INTERPRET=1 (tiny ragged shapes: the interpreter is
slow). Ragged means: several groups with different prefix lengths (one of them 0), left-padded
own keys (one row with nothing visible at all), Lk > Lq, GQA, odd lengths that cross the
16-wide interpreter tiles.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from helpers.devices import INTERPRET, TRITON_DEVICE, requires_gpu, requires_triton
from helpers.oracle import check_against_oracle
from mmict_kernels import ops
from mmict_kernels.backends import BackendUnavailableError
from mmict_kernels.ops import triton_toolkit as tk
from mmict_kernels.ops.prefix_attn import prefix_attention_reference

pytestmark = requires_triton
DEVICE = TRITON_DEVICE
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _many_blocks():
    """16 x 16 tiles in the interpreter, so the tiny shapes below still cross several blocks."""
    with tk.force_tiles(16, 16) if INTERPRET else contextlib.nullcontext():
        yield


def make_case(
    batch=3, len_q=5, len_k=7, heads=4, kv_heads=2, head_dim=32, groups=2, len_p=19, dtype=torch.float32,
    prefix_ids=(1, 0, 1), prefix_lengths=(17, 0), seqlens_k=(7, 3, 0), device=DEVICE,
):  # fmt: skip
    """Random inputs; None for prefix_lengths / seqlens_k leaves them out (all valid).

    Default: row 0 = empty prefix + 7 own keys, row 1 = 17 prefix tokens + 3 own keys (4 left-padded),
    row 2 = empty prefix + no own key (sees nothing: zeros, zero gradients).
    """

    def rnd(*shape):
        return torch.randn(*shape, dtype=torch.float32, device=device).to(dtype)

    int_t = lambda xs, dt: None if xs is None else torch.tensor(xs, dtype=dt, device=device)  # noqa: E731
    return dict(
        q=rnd(batch, len_q, heads, head_dim),
        k=rnd(batch, len_k, kv_heads, head_dim),
        v=rnd(batch, len_k, kv_heads, head_dim),
        prefix_k=rnd(groups, len_p, kv_heads, head_dim),
        prefix_v=rnd(groups, len_p, kv_heads, head_dim),
        prefix_ids=int_t(prefix_ids, torch.int64),
        prefix_lengths=int_t(prefix_lengths, torch.int32),
        seqlens_k=int_t(seqlens_k, torch.int32),
    )


TENSORS = ("q", "k", "v", "prefix_k", "prefix_v")  # the differentiable inputs, in argument order


def prefix_attention(case, tensors=None, causal=True, backend="triton", **kw):
    """ops.prefix_attention on ``tensors`` (default: the case's own) with the case's groups and lengths."""
    tensors = [case[n] for n in TENSORS] if tensors is None else tensors
    return ops.prefix_attention(*tensors, case["prefix_ids"], causal, None, backend, prefix_lengths=case["prefix_lengths"],
                                seqlens_k=case["seqlens_k"], **kw)  # fmt: skip


def run_oracle(case, causal, name, deterministic=False):
    def reference(q, k, v, pk, pv):
        ids, extra = case["prefix_ids"], dict(prefix_lengths=case["prefix_lengths"], seqlens_k=case["seqlens_k"])
        return prefix_attention_reference(q, k, v, pk, pv, ids, causal, None, **extra)[0]

    return check_against_oracle(
        lambda *t: prefix_attention(case, t, causal, deterministic=deterministic), reference, [case[n] for n in TENSORS],
        grad_idx=range(5), name=name,
    )  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("kv_heads", [2, 1], ids=["gqa2", "mqa"])
def test_matches_oracle_ragged(dtype, causal, kv_heads):
    case = make_case(kv_heads=kv_heads, dtype=dtype)
    out, grads = run_oracle(case, causal, f"prefix {dtype} causal={causal} Hkv={kv_heads}")
    assert (out[2] == 0).all() and all((g[2] == 0).all() for g in grads[:3])  # row 2 sees nothing


@pytest.mark.parametrize("head_dim", [64, 128])
def test_head_dims(head_dim):
    case = make_case(batch=2, len_q=3, len_k=4, head_dim=head_dim, groups=1, len_p=6, prefix_ids=(0, 0), prefix_lengths=(5,),
                     seqlens_k=(4, 2), dtype=torch.bfloat16)  # fmt: skip
    run_oracle(case, True, f"prefix D={head_dim}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_step(dtype):
    """Lq = 1 against a longer own cache (Lk > Lq), H=4 query heads packed on Hkv=1."""
    # Lk = 17: the query's last visible key (16) starts a new 16-wide tile, the edge causal skipping must include.
    case = make_case(batch=4, len_q=1, len_k=17, kv_heads=1, groups=3, len_p=9, prefix_ids=(2, 0, 1, 2),
                     prefix_lengths=(9, 0, 4), seqlens_k=(17, 5, 16, 1), dtype=dtype)  # fmt: skip
    run_oracle(case, True, f"decode {dtype}")


def test_defaults_all_valid_and_long_rows():
    """No prefix_lengths / seqlens_k; 2 x 29 packed GQA rows and 37 own keys span several 16-wide tiles,
    so the causal block skipping (forward, dq and dk/dv) crosses tile edges inside a query. Lk - Lq = 9
    puts the last visible key of the 1st and 3rd query tiles (queries 7, 23) first in a key tile."""
    case = make_case(batch=2, len_q=29, len_k=38, heads=4, kv_heads=2, groups=2, len_p=21, prefix_ids=(1, 1),
                     prefix_lengths=None, seqlens_k=None)  # fmt: skip
    run_oracle(case, True, "defaults")


def test_edge_shapes():
    """Lk < Lq (early queries see only the prefix) and a group whose every row has nothing own."""
    case = make_case(
        batch=3, len_q=6, len_k=4, groups=3, len_p=5, prefix_ids=(0, 2, 2), prefix_lengths=(5, 0, 3), seqlens_k=(4, 0, 4)
    )
    run_oracle(case, True, "Lk<Lq")
    empty_prefix = make_case(
        batch=2, len_q=3, len_k=3, groups=1, len_p=0, prefix_ids=(0, 0), prefix_lengths=None, seqlens_k=(3, 1)
    )
    run_oracle(empty_prefix, True, "Lp=0")


def test_strided_inputs():
    """Only the last dim needs stride 1: q from a (B, H, L, D) layout, k/v sliced from one packed tensor."""
    case = make_case()
    q = case["q"].transpose(1, 2).contiguous().transpose(1, 2)  # (B, Lq, H, D) view with head-major strides
    kv = torch.stack([case["k"], case["v"]], dim=3)  # (B, Lk, Hkv, 2, D)
    pkv = torch.cat([case["prefix_k"], case["prefix_v"]], dim=-1)  # (G, Lp, Hkv, 2D)
    strided = dict(case, q=q, k=kv[:, :, :, 0], v=kv[:, :, :, 1], prefix_k=pkv[..., :32], prefix_v=pkv[..., 32:])
    assert not strided["k"].is_contiguous() and not strided["prefix_v"].is_contiguous()
    out = prefix_attention(case, [strided[n] for n in TENSORS])
    torch.testing.assert_close(out, prefix_attention(case), rtol=0, atol=0)
    run_oracle(strided, False, "strided")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_row_with_nothing_visible(dtype):
    """Empty prefix + no own keys: out 0, lse -inf, and every gradient finite (zero where it must be)."""
    case = make_case(dtype=dtype, prefix_ids=(0, 1, 0), prefix_lengths=(0, 11), seqlens_k=(7, 2, 0))  # row 2: nothing
    leaves = {n: case[n].clone().requires_grad_() for n in TENSORS}
    out, lse = prefix_attention(case, list(leaves.values()), return_lse=True)
    assert (out[2] == 0).all() and torch.isneginf(lse[2]).all()
    assert torch.isfinite(lse[:2]).all()
    out.backward(torch.randn_like(out))
    for name, t in leaves.items():
        assert torch.isfinite(t.grad).all(), name
    assert (leaves["q"].grad[2] == 0).all() and (leaves["k"].grad[2] == 0).all() and (leaves["v"].grad[2] == 0).all()
    assert (leaves["prefix_k"].grad[0] == 0).all()  # group 0's prefix has length 0


def _lse_oracle(case, causal):
    """float64 log-sum-exp over [group prefix ; own keys] with the same mask (differentiable)."""
    from mmict_kernels.ops.prefix_attn import prefix_attention_mask

    def fn(q, k, v, pk, pv):
        ids = case["prefix_ids"]
        heads, kv_heads = q.shape[2], k.shape[2]
        keys = torch.cat([pk[ids], k], dim=1).repeat_interleave(heads // kv_heads, dim=2)
        mask = prefix_attention_mask(q.shape[1], pk.shape[1], k.shape[1], ids, case["prefix_lengths"], case["seqlens_k"], causal)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, keys) * q.shape[-1] ** -0.5
        return torch.logsumexp(scores.masked_fill(~mask, float("-inf")), dim=-1)

    return fn


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_lse_is_a_statistic_not_differentiated(backend):
    """The package-wide rule (ops/__init__.py): lse has the float64 logsumexp's values and no gradient, on every backend."""
    case = make_case(seqlens_k=(7, 3, 1))
    leaves = [case[n].clone().requires_grad_() for n in TENSORS]
    out, lse = prefix_attention(case, leaves, backend=backend, return_lse=True)
    assert out.requires_grad and not lse.requires_grad
    lse64 = _lse_oracle(case, True)(*[case[n].double() for n in TENSORS])
    torch.testing.assert_close(lse.double(), lse64, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_deterministic_mode(dtype):
    """deterministic=True: within the oracle rule, bitwise identical on a second run, and equal to the
    default (atomic) path up to the float32 summation order of the prefix gradients."""
    case = make_case(batch=5, prefix_ids=(1, 0, 1, 1, 0), seqlens_k=(7, 3, 0, 5, 6), prefix_lengths=(13, 17), dtype=dtype)
    out_a, grads_a = run_oracle(case, True, "deterministic", deterministic=True)

    def grads(deterministic):
        leaves = [case[n].clone().requires_grad_() for n in TENSORS]
        out = prefix_attention(case, leaves, deterministic=deterministic)
        gen = torch.Generator(device="cpu").manual_seed(0)  # the upstream gradient run_oracle used
        dout = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out)
        return out.detach(), torch.autograd.grad(out, leaves, dout)

    out_b, grads_b = grads(True)
    assert torch.equal(out_a, out_b)
    for ga, gb in zip(grads_a, grads_b):
        assert torch.equal(ga, gb)
    out_c, grads_c = grads(False)
    assert torch.equal(out_a, out_c)  # the forward has no atomics
    for ga, gc in zip(grads_a[:3], grads_c[:3]):  # nor do dq, dk, dv
        assert torch.equal(ga, gc)
    ulp = 1e-5 if dtype == torch.float32 else 1e-2  # one rounding of the float32 sum to the output dtype
    for ga, gc in zip(grads_a[3:], grads_c[3:]):
        torch.testing.assert_close(ga, gc, rtol=ulp, atol=ulp)


@pytest.mark.parametrize("blocks_on_x", [True, False], ids=["blocks-on-x", "rows-on-x"])
def test_dkdv_grid_orders(monkeypatch, blocks_on_x):
    """The dK/dV grid puts the key blocks of one (row, kv head) side by side (axis 0); past CUDA's 65535
    programs on axis 1 the rows go to axis 0. Both orders give the oracle's gradients (atomic and deterministic)."""
    from mmict_kernels.ops.prefix_attn import triton as prefix_triton

    if not blocks_on_x:
        monkeypatch.setattr(prefix_triton, "MAX_GRID_YZ", 0)
    case = make_case(batch=4, prefix_ids=(1, 0, 1, 1), seqlens_k=(7, 3, 0, 5), prefix_lengths=(19, 6))
    run_oracle(case, True, f"blocks_on_x={blocks_on_x}")
    run_oracle(case, False, f"blocks_on_x={blocks_on_x} deterministic", deterministic=True)


def _op_args(case, causal=True, deterministic=False):
    return (*[case[n] for n in TENSORS], case["prefix_ids"], case["prefix_lengths"], case["seqlens_k"], causal, 32**-0.5,
            deterministic)  # fmt: skip


def test_opcheck():
    """Every opcheck test on both ops (the forward with gradients, so AOT autograd runs the backward)."""
    from mmict_kernels.ops.prefix_attn import triton as prefix_triton

    case = make_case(batch=2, len_q=3, len_k=4, prefix_ids=(1, 0), seqlens_k=(4, 2))
    grad_case = dict(case, **{n: case[n].clone().requires_grad_() for n in TENSORS})
    torch.library.opcheck(prefix_triton.prefix_attention_triton_fwd, _op_args(grad_case))
    no_optionals = dict(case, prefix_lengths=None, seqlens_k=None)  # the fake kernel with None optionals
    torch.library.opcheck(
        prefix_triton.prefix_attention_triton_fwd, _op_args(no_optionals, causal=False), test_utils="test_faketensor"
    )
    out, lse = prefix_triton.prefix_attention_triton_fwd(*_op_args(case))
    bwd_args = (torch.randn_like(out), *_op_args(case)[:8], out, lse, True, 32**-0.5, True)
    torch.library.opcheck(prefix_triton.prefix_attention_triton_bwd, bwd_args)


def _compile_check(entry):
    """torch.compile(fullgraph=True) of a loss over ``entry``: forward and gradients equal eager."""
    case = make_case(batch=2, len_q=3, len_k=4, prefix_ids=(1, 0), seqlens_k=(4, 2))

    def f(q, k, v, pk, pv):
        out, lse = entry(q, k, v, pk, pv, case)
        return out.float().square().sum() + torch.where(torch.isfinite(lse), lse, 0.0).sum()

    eager_leaves = [case[n].clone().requires_grad_() for n in TENSORS]
    compiled_leaves = [case[n].clone().requires_grad_() for n in TENSORS]
    torch._dynamo.reset()
    # Inductor on GPU; on CPU aot_eager (dynamo + AOTAutograd + fake tensors, no 60 s C++ build).
    compiled = torch.compile(f, fullgraph=True, backend="inductor" if DEVICE == "cuda" else "aot_eager")
    loss_c = compiled(*compiled_leaves)
    loss_e = f(*eager_leaves)
    torch.testing.assert_close(loss_c, loss_e)
    for gc, ge in zip(torch.autograd.grad(loss_c, compiled_leaves), torch.autograd.grad(loss_e, eager_leaves)):
        torch.testing.assert_close(gc, ge)


def test_torch_compile_fullgraph():
    """The backend entry point (what ops.prefix_attention dispatches to) traces as one opaque custom op."""
    from mmict_kernels.ops.prefix_attn.triton import prefix_attention_triton

    _compile_check(
        lambda q, k, v, pk, pv, c: prefix_attention_triton(
            q, k, v, pk, pv, c["prefix_ids"], True, 32**-0.5, c["prefix_lengths"], c["seqlens_k"], False
        )
    )


def test_torch_compile_fullgraph_front_end():
    """The same through ops.prefix_attention(backend="triton", return_lse=True)."""
    _compile_check(lambda q, k, v, pk, pv, c: prefix_attention(c, [q, k, v, pk, pv], return_lse=True))


def test_unsupported_head_dim_is_refused():
    case = make_case(head_dim=48, batch=1, prefix_ids=(0,), seqlens_k=None)
    with pytest.raises(BackendUnavailableError, match="head dims"):
        ops.prefix_attention(
            case["q"], case["k"], case["v"], case["prefix_k"], case["prefix_v"], case["prefix_ids"], backend="triton"
        )


# ---------------------------------------------------------------------------------------
# GPU only: the realistic MMICT shape (64 rows x 128 own tokens, 4 demos x 64 prefix tokens)
# ---------------------------------------------------------------------------------------
def realistic_case(dtype, len_q=128):
    gen = torch.Generator(device="cpu").manual_seed(1)
    lengths = lambda lo, hi, n, dt: torch.randint(lo, hi + 1, (n,), generator=gen).to(dt).cuda()  # noqa: E731
    case = make_case(batch=64, len_q=len_q, len_k=128, heads=32, kv_heads=8, head_dim=128, groups=4, len_p=256, dtype=dtype,
                     prefix_ids=(0,), prefix_lengths=None, seqlens_k=None, device="cuda")  # fmt: skip
    case["prefix_ids"] = torch.arange(64, device="cuda") % 4
    case["prefix_lengths"] = lengths(192, 256, 4, torch.int32)
    case["seqlens_k"] = lengths(64, 128, 64, torch.int32)
    return case


@requires_gpu
@pytest.mark.skipif(INTERPRET, reason="GPU shape; too big for the interpreter")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_realistic_shape(dtype):
    run_oracle(realistic_case(dtype), True, f"gpu realistic {dtype}")


@requires_gpu
@pytest.mark.skipif(INTERPRET, reason="GPU shape; too big for the interpreter")
def test_gpu_decode_and_deterministic():
    run_oracle(realistic_case(torch.bfloat16, len_q=1), True, "gpu decode")
    case = realistic_case(torch.bfloat16)
    _, grads_a = run_oracle(case, True, "gpu deterministic", deterministic=True)
    _, grads_b = run_oracle(case, True, "gpu deterministic", deterministic=True)
    for ga, gb in zip(grads_a, grads_b):
        assert torch.equal(ga, gb)
