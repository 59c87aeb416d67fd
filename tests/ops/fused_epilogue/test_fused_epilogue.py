"""Fused epilogues (bias + dropout + residual + LayerNorm, bias + GELU, fused QKV projection).

The Triton tests run on CUDA, or on the CPU under TRITON_INTERPRET=1 at tiny ragged shapes
(hidden 48, 100, 768: never a multiple of the 16-wide tiles only; 1, 7, 2x3 rows), and skip
otherwise. The interpreter truncates float32 -> bfloat16 on store (a GPU rounds to nearest),
up to one bf16 ulp instead of half: inputs keep BERT-like magnitudes (|out| < 4), where that
stays inside the oracle rule. Everything else (the torch backend, the keep-mask, the fused projection, input
checks) runs everywhere.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers.devices import INTERPRET, ON_GPU, TRITON_DEVICE, requires_triton
from helpers.oracle import check_against_oracle
from mmict_kernels.backends import BackendUnavailableError
from mmict_kernels.ops.fused_epilogue import (
    bias_dropout_add_layernorm,
    bias_dropout_add_layernorm_reference,
    bias_gelu,
    bias_gelu_reference,
    dropout_keep_mask,
    fused_kv_linear,
    fused_qkv_linear,
)

DEVICE = TRITON_DEVICE
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 48), (7, 100), (2, 3, 768)]  # (..., hidden): one row, ragged rows and hidden, 3-D


def ln_inputs(shape, dtype, device=DEVICE):
    """x, bias, residual, weight, ln_bias with BERT-like magnitudes (LayerNorm weight near 1)."""
    hidden = shape[-1]

    def rnd(*s, scale=1.0, shift=0.0):
        return (torch.randn(*s, device=device) * scale + shift).to(dtype)

    return [rnd(*shape), rnd(hidden, scale=0.1), rnd(*shape), rnd(hidden, scale=0.1, shift=1.0), rnd(hidden, scale=0.1)]


# ---------------------------------------------------------------------------------------
# Triton kernels vs the float64 oracle (the oracle rule of CONTRIBUTING.md), forward and every gradient
# ---------------------------------------------------------------------------------------
@requires_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_layernorm_triton_against_oracle(shape, dtype, dropout_p):
    seed = 1234

    def fused(x, b, r, w, lb):
        return bias_dropout_add_layernorm(x, b, r, w, lb, 1e-12, dropout_p, seed=seed, backend="triton")

    def reference(x, b, r, w, lb):
        return bias_dropout_add_layernorm_reference(x, b, r, w, lb, 1e-12, dropout_p, seed)

    check_against_oracle(fused, reference, ln_inputs(shape, dtype), grad_idx=range(5), name=f"bdaln {shape} p={dropout_p}")


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + [(300, 48)])  # 300 rows: several row tiles per program
def test_bias_gelu_triton_against_oracle(shape, dtype):
    x = torch.randn(*shape, device=DEVICE).to(dtype)
    bias = (torch.randn(shape[-1], device=DEVICE) * 0.5).to(dtype)
    fused = lambda x, b: bias_gelu(x, b, backend="triton")  # noqa: E731
    check_against_oracle(fused, bias_gelu_reference, [x, bias], grad_idx=(0, 1), name=f"bias_gelu {shape}")


@requires_triton
def test_dropout_mask_is_exactly_the_exported_one():
    """dx is 0 exactly where the kernel dropped, and dresidual / (1 - p) where it kept."""
    shape, p, seed = (5, 2, 100), 0.5, 2**40 + 17  # a seed with high bits set
    x, b, r, w, lb = [t.requires_grad_() for t in ln_inputs(shape, torch.float32)]
    out = bias_dropout_add_layernorm(x, b, r, w, lb, 1e-12, p, seed=seed, backend="triton")
    out.backward(torch.randn_like(out))
    keep = dropout_keep_mask(seed, shape, p, DEVICE)
    assert 0.3 < keep.float().mean().item() < 0.7
    assert torch.equal(x.grad != 0, keep), "the kernel's dropout mask differs from dropout_keep_mask"
    torch.testing.assert_close(x.grad[keep], r.grad[keep] / (1 - p))
    ref = bias_dropout_add_layernorm_reference(x, b, r, w, lb, 1e-12, p, seed)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@requires_triton
def test_dropout_reproducible_from_seed_and_same_on_both_backends():
    args = ln_inputs((7, 100), torch.float32)
    run = lambda backend, **kw: bias_dropout_add_layernorm(*args, dropout_p=0.1, backend=backend, **kw)  # noqa: E731
    first = run("triton", seed=7)
    assert torch.equal(first, run("triton", seed=7))
    assert torch.equal(first, run("triton", seed=torch.tensor(7)))
    assert not torch.equal(first, run("triton", seed=8))
    torch.testing.assert_close(first, run("torch", seed=7), rtol=1e-5, atol=1e-5)  # same mask, same math
    torch.manual_seed(3)
    drawn = run("triton")
    torch.manual_seed(3)
    assert torch.equal(drawn, run("triton")), "seed=None must be reproducible with torch.manual_seed"


@requires_triton
def test_parameter_gradients_are_deterministic():
    inputs = ln_inputs((13, 48), torch.float32)  # 13 rows: several rows per backward program
    grads = []
    for _ in range(2):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        out = bias_dropout_add_layernorm(*leaves, dropout_p=0.1, seed=5, backend="triton")
        gelu = bias_gelu(leaves[0], leaves[1], backend="triton")
        torch.manual_seed(0)
        ((out * torch.randn_like(out)).sum() + (gelu * torch.randn_like(gelu)).sum()).backward()
        grads.append([t.grad for t in leaves])
    for first, second in zip(*grads):
        assert torch.equal(first, second)


@requires_triton
@pytest.mark.parametrize("rows_shape", [(0,), (2, 0)])
def test_triton_empty_rows(rows_shape):
    hidden = 48
    x, b, r, w, lb = [t.requires_grad_() for t in ln_inputs((*rows_shape, hidden), torch.float32)]
    out = bias_dropout_add_layernorm(x, b, r, w, lb, dropout_p=0.1, seed=1, backend="triton")
    gelu = bias_gelu(x, b, backend="triton")
    assert out.shape == x.shape and gelu.shape == x.shape
    (out.sum() + gelu.sum()).backward()
    for t in (b, w, lb):
        assert torch.equal(t.grad, torch.zeros_like(t))


@requires_triton
def test_triton_non_contiguous_inputs():
    x_t, b, r, w, lb = ln_inputs((48, 7), torch.float32)[0], *ln_inputs((7, 48), torch.float32)[1:]
    x = x_t.t()  # (7, 48) with the hidden dim strided
    out = bias_dropout_add_layernorm(x, b, r, w, lb, backend="triton")
    torch.testing.assert_close(out, bias_dropout_add_layernorm_reference(x, b, r, w, lb))
    torch.testing.assert_close(bias_gelu(x, b, backend="triton"), bias_gelu_reference(x, b))


@requires_triton
def test_opcheck():
    from mmict_kernels.ops.fused_epilogue import triton_gelu, triton_layernorm

    x, b, r, w, lb = ln_inputs((2, 5, 20), torch.float32)
    seed = torch.tensor(11, device=DEVICE)
    for p, s in ((0.0, None), (0.2, seed)):
        # (B, R, hidden) rows, contiguous and a strided slice of the positions (read in place)
        for xs, rs in ((x, r), (x[:, 1:4], r[:, :3])):
            torch.library.opcheck(triton_layernorm._fwd_op, (xs.detach().requires_grad_(), b, rs, w, lb, s, 1e-12, p))
            out = triton_layernorm._fwd_op(xs.detach(), b, rs, w, lb, s, 1e-12, p)
            torch.library.opcheck(triton_layernorm._bwd_op, (torch.randn_like(out), xs.detach(), b, rs, w, s, 1e-12, p))
    x2 = x.reshape(-1, 20)
    torch.library.opcheck(triton_gelu._fwd_op, (x2, b.requires_grad_()))
    torch.library.opcheck(triton_gelu._bwd_op, (torch.randn_like(x2), x2.detach(), b.detach()))


@requires_triton
def test_torch_compile_fullgraph():
    """torch.compile(fullgraph=True) traces through the custom ops (tensor seed and seed=None)."""
    args = ln_inputs((7, 48), torch.float32)

    def block(x, b, r, w, lb, seed):
        h = bias_dropout_add_layernorm(x, b, r, w, lb, 1e-12, 0.1, seed=seed, backend="triton")
        return bias_gelu(h, b, backend="triton")

    def grads(fn, seed):
        leaves = [t.detach().clone().requires_grad_() for t in args]
        out = fn(*leaves, seed)
        out.sum().backward()
        return [out.detach()] + [t.grad for t in leaves]

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    seed = torch.tensor(99, device=DEVICE)
    for eager, comp in zip(grads(block, seed), grads(compiled, seed)):
        torch.testing.assert_close(comp, eager)
    drawn = torch.compile(lambda *a: block(*a, None), fullgraph=True, backend="aot_eager")
    torch.manual_seed(1)
    first = drawn(*args)
    torch.manual_seed(1)
    assert torch.equal(first, drawn(*args))


# ---------------------------------------------------------------------------------------
# Everywhere: the keep-mask, the torch backend, the fused projection, input checks
# ---------------------------------------------------------------------------------------
def test_keep_mask_properties():
    keep = dropout_keep_mask(3, (64, 100), 0.1)
    assert keep.dtype == torch.bool and keep.shape == (64, 100)
    assert abs(keep.float().mean().item() - 0.9) < 0.02
    assert torch.equal(keep, dropout_keep_mask(torch.tensor(3), (64, 100), 0.1))
    assert not torch.equal(keep, dropout_keep_mask(4, (64, 100), 0.1))
    # The stream depends on the flat index only: a (..., hidden) view of the same numel agrees.
    assert torch.equal(keep.reshape(-1), dropout_keep_mask(3, (6400,), 0.1))
    assert dropout_keep_mask(3, (5, 7), 0.0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_backend_matches_unfused_bert_block(dtype):
    """backend="torch" equals the BERT block written out (dense bias, dropout with the same mask, add, LayerNorm)."""
    x, b, r, w, lb = ln_inputs((2, 5, 48), dtype, "cpu")
    keep = dropout_keep_mask(21, x.shape, 0.1)
    expected = F.layer_norm((x + b) * keep / 0.9 + r, (48,), w, lb, 1e-12)
    out = bias_dropout_add_layernorm(x, b, r, w, lb, dropout_p=0.1, seed=21, backend="torch")
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(bias_gelu(x, b, backend="torch"), F.gelu(x + b))
    # auto on CPU is the reference; seed=None draws from torch's generator.
    torch.manual_seed(5)
    drawn = bias_dropout_add_layernorm(x, b, r, w, lb, dropout_p=0.1)
    torch.manual_seed(5)
    assert torch.equal(drawn, bias_dropout_add_layernorm(x, b, r, w, lb, dropout_p=0.1))


def test_torch_backend_compile_fullgraph():
    """The torch backend (the CPU path of FusedMHub) traces too, the Philox mask included."""
    args = ln_inputs((3, 5, 48), torch.float32, "cpu")

    def block(x, b, r, w, lb, seed):
        return bias_gelu(bias_dropout_add_layernorm(x, b, r, w, lb, 1e-12, 0.1, seed=seed), b)

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    seed = torch.tensor(99)
    torch.testing.assert_close(compiled(*args, seed), block(*args, seed))


@pytest.mark.skipif(INTERPRET or ON_GPU, reason="Triton is usable here")
def test_triton_refused_on_cpu_without_interpreter():
    x, b, r, w, lb = ln_inputs((3, 48), torch.float32, "cpu")
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        bias_dropout_add_layernorm(x, b, r, w, lb, backend="triton")


@pytest.mark.parametrize("has_bias", [True, False])
def test_fused_qkv_linear_matches_three_linears(has_bias):
    x = torch.randn(2, 5, 24, dtype=torch.float64, requires_grad=True)
    params = []
    for out_features in (24, 16, 16):  # ragged output widths (e.g. GQA-style K/V)
        params += [
            torch.randn(out_features, 24, dtype=torch.float64, requires_grad=True),
            torch.randn(out_features, dtype=torch.float64, requires_grad=True) if has_bias else None,
        ]
    fused = fused_qkv_linear(x, *params)
    plain = [F.linear(x, params[i], params[i + 1]) for i in (0, 2, 4)]
    leaves = [x] + [p for p in params if p is not None]
    douts = [torch.randn_like(t) for t in plain]
    g_fused = torch.autograd.grad(fused, leaves, douts)
    g_plain = torch.autograd.grad(plain, leaves, douts)
    for a, b in zip(list(fused) + list(g_fused), plain + list(g_plain)):
        torch.testing.assert_close(a, b)
    k, v = fused_kv_linear(x, *params[2:])
    torch.testing.assert_close(k, plain[1])
    torch.testing.assert_close(v, plain[2])


def test_fused_qkv_cache_follows_weight_updates():
    lin = [torch.nn.Linear(16, 16) for _ in range(3)]
    params = [t for m in lin for t in (m.weight, m.bias)]
    x = torch.randn(4, 16)
    with torch.no_grad():
        before = fused_qkv_linear(x, *params)
        lin[1].weight.mul_(2.0)  # an in-place update (as an optimizer step does) must invalidate the cache
        after = fused_qkv_linear(x, *params)
    torch.testing.assert_close(after[1], lin[1](x))
    torch.testing.assert_close(after[0], before[0])
    # Fresh tensors may reuse a dead tensor's id and memory: never a stale hit.
    for _ in range(20):
        wk, wv = torch.randn(16, 16), torch.randn(16, 16)
        _, k, v = fused_qkv_linear(x, lin[0].weight, None, wk, None, wv, None)
        torch.testing.assert_close(k, x @ wk.t())
        torch.testing.assert_close(v, x @ wv.t())
        del wk, wv, k, v


def test_fused_qkv_torch_compile_fullgraph():
    x = torch.randn(3, 16, requires_grad=True)
    params = [torch.randn(16, 16, requires_grad=True) if i % 2 == 0 else torch.randn(16, requires_grad=True) for i in range(6)]
    f = lambda x, *p: torch.stack(fused_qkv_linear(x, *p)).sum()  # noqa: E731
    eager = torch.autograd.grad(f(x, *params), [x, *params])
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for a, b in zip(torch.autograd.grad(compiled(x, *params), [x, *params]), eager):
        torch.testing.assert_close(a, b)


def test_bad_input_errors_name_the_argument():
    x, b, r, w, lb = ln_inputs((3, 48), torch.float32, "cpu")
    call = bias_dropout_add_layernorm
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        call(x.tolist(), b, r, w, lb)
    with pytest.raises(TypeError, match="x: expected dtype"):
        call(x.long(), b, r, w, lb)
    with pytest.raises(ValueError, match="bias: expected shape \\(48,\\)"):
        call(x, b[:5], r, w, lb)
    with pytest.raises(ValueError, match="residual: expected shape"):
        call(x, b, r[:2], w, lb)
    with pytest.raises(TypeError, match="weight: expected dtype float32"):
        call(x, b, r, w.half(), lb)
    with pytest.raises(ValueError, match="ln_bias: expected shape"):
        call(x, b, r, w, lb[None])
    with pytest.raises(ValueError, match="eps: expected a positive"):
        call(x, b, r, w, lb, eps=0.0)
    with pytest.raises(ValueError, match="dropout_p"):
        call(x, b, r, w, lb, dropout_p=1.0)
    with pytest.raises(TypeError, match="seed: expected an int"):
        call(x, b, r, w, lb, dropout_p=0.1, seed=1.5)
    with pytest.raises(ValueError, match="seed: expected an int in"):
        call(x, b, r, w, lb, dropout_p=0.1, seed=-1)
    with pytest.raises(TypeError, match="seed: expected"):
        call(x, b, r, w, lb, dropout_p=0.1, seed=torch.tensor([1.0]))
    with pytest.raises(ValueError, match="backend"):
        call(x, b, r, w, lb, backend="cudnn")
    with pytest.raises(ValueError, match="x: expected a \\(\\.\\.\\., hidden\\)"):
        bias_gelu(torch.zeros(3, 0), torch.zeros(0))
    with pytest.raises(ValueError, match="bias: expected shape"):
        bias_gelu(x, b[:3])
    if not (INTERPRET or ON_GPU):
        return
    with pytest.raises(BackendUnavailableError, match="dtypes"):
        bias_gelu(x.double(), b.double(), backend="triton")


def test_fused_qkv_bad_input():
    x = torch.randn(3, 16)
    w, bias = torch.randn(16, 16), torch.randn(16)
    with pytest.raises(ValueError, match="wk: expected shape \\(out_features, 16\\)"):
        fused_qkv_linear(x, w, bias, torch.randn(16, 8), bias, w, bias)
    with pytest.raises(ValueError, match="pass all biases or none"):
        fused_qkv_linear(x, w, bias, w, None, w, bias)
    with pytest.raises(ValueError, match="bv: expected shape \\(16,\\)"):
        fused_qkv_linear(x, w, bias, w, bias, w, bias[:3])
    with pytest.raises(TypeError, match="wv: expected dtype float32"):
        fused_kv_linear(x, w, bias, w.double(), bias)


def test_fused_qkv_linear_backward_under_autocast():
    """Autocast runs the forward GEMM in bf16; the backward returns grads in each input's dtype."""
    from mmict_kernels.ops import fused_qkv_linear

    x = torch.randn(5, 16, requires_grad=True)
    ws = [torch.randn(8, 16, requires_grad=True) for _ in range(3)]
    bs = [torch.randn(8, requires_grad=True) for _ in range(3)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = fused_qkv_linear(x, ws[0], bs[0], ws[1], bs[1], ws[2], bs[2])
    assert all(o.dtype == torch.bfloat16 for o in outs)
    sum(o.float().sum() for o in outs).backward()
    ours = [t.grad.clone() for t in [x, *ws, *bs]]
    for t in [x, *ws, *bs]:
        t.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = [torch.nn.functional.linear(x, w, b) for w, b in zip(ws, bs)]
    sum(o.float().sum() for o in outs).backward()
    for a, t in zip(ours, [x, *ws, *bs]):
        assert a.dtype == t.dtype == torch.float32
        torch.testing.assert_close(a, t.grad, rtol=2e-2, atol=0.5)
