"""Epilogues that recompute instead of keeping (recompute.py), and the Triton LayerNorm reading strided rows.

- bias_gelu_linear: linear(gelu(x + bias)) against the float64 oracle, forward and every gradient,
  on the torch backend and the Triton kernels (interpreter on CPU); it keeps x only.
- dropout_add_layernorm: LayerNorm(dropout(h) + residual) with torch's random numbers; with the
  mask its seed gives, equal to the ops written out; it keeps h (and the residual) only.
- bias_dropout_add_layernorm (Triton) on a slice of a (B, L, hidden) tensor: read in place, same
  values and gradients as on a contiguous copy.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers.devices import TRITON_DEVICE, requires_triton
from helpers.oracle import check_against_oracle
from mmict_kernels.ops.fused_epilogue import (
    bias_dropout_add_layernorm,
    bias_dropout_add_layernorm_reference,
    bias_gelu_linear,
    dropout_add_layernorm,
    keep_mask_from_seed,
)


def _saved_storages(fn, *args, excluded=()):
    """Shapes of the tensors autograd keeps for ``fn(*args)``, one per storage, ``args[1:]`` and ``excluded`` excepted."""
    excluded = {t.untyped_storage().data_ptr() for t in (*args[1:], *excluded) if isinstance(t, torch.Tensor)}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in excluded:
            seen.setdefault(ptr, tuple(t.shape))
        return t.detach()  # not t itself: a node keeping its own output would form an uncollectable cycle

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return out, list(seen.values())


def _gelu_inputs(dtype, device="cpu", rows=(2, 5), k=40, n=24):
    gen = torch.Generator().manual_seed(0)

    def rnd(*s, scale=1.0):
        return (torch.randn(*s, generator=gen) * scale).to(device=device, dtype=dtype)

    return [rnd(*rows, k), rnd(k, scale=0.1), rnd(n, k, scale=0.2), rnd(n, scale=0.1)]


def _gelu_linear_ref(x, b, w, b2):
    return F.linear(F.gelu(x + b), w, b2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_bias_gelu_linear_torch_against_oracle(dtype):
    def fn(x, b, w, b2):
        return bias_gelu_linear(x, b, w, b2, backend="torch")

    check_against_oracle(fn, _gelu_linear_ref, _gelu_inputs(dtype), grad_idx=(0, 1, 2, 3), name=f"gelu_linear {dtype}")


def test_bias_gelu_linear_without_biases_and_keeps_only_x():
    x, _, w, _ = _gelu_inputs(torch.float32)
    x.requires_grad_(True)
    w.requires_grad_(True)
    out, saved = _saved_storages(lambda x, w: bias_gelu_linear(x, None, w), x, w)
    assert saved == [tuple(x.shape)]  # x only: gelu(x) is recomputed in backward, never kept
    ref = F.linear(F.gelu(x), w)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, (x, w), g), torch.autograd.grad(ref, (x, w), g))


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bias_gelu_linear_triton_against_oracle(dtype):
    def fn(x, b, w, b2):
        return bias_gelu_linear(x, b, w, b2, backend="triton")

    inputs = _gelu_inputs(dtype, TRITON_DEVICE, rows=(3, 7), k=100)
    check_against_oracle(fn, _gelu_linear_ref, inputs, grad_idx=(0, 1, 2, 3), name=f"gelu_linear triton {dtype}")


def test_bias_gelu_linear_bad_input():
    x, b, w, b2 = _gelu_inputs(torch.float32)
    with pytest.raises(ValueError, match="weight: expected shape"):
        bias_gelu_linear(x, b, w.t(), b2)
    with pytest.raises(ValueError, match="bias2: expected shape"):
        bias_gelu_linear(x, b, w, b2[:3])
    with pytest.raises(ValueError, match="bias: expected shape"):
        bias_gelu_linear(x, b[:3], w, b2)


# ---------------------------------------------------------------------------------------------
def _ln_inputs(dtype, shape=(3, 4, 48)):
    gen = torch.Generator().manual_seed(1)
    hidden = shape[-1]

    def rnd(*s, scale=1.0, shift=0.0):
        return (torch.randn(*s, generator=gen) * scale + shift).to(dtype)

    return [rnd(*shape), rnd(*shape), rnd(hidden, scale=0.1, shift=1.0), rnd(hidden, scale=0.1)]


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dropout_add_layernorm_against_oracle(dtype, dropout_p):
    """With the keep-mask its seed gives, it equals the ops written out (forward and every gradient)."""
    seed = 77
    keep = keep_mask_from_seed(seed, (3, 4, 48), dropout_p, "cpu") if dropout_p else None

    def fn(h, r, w, b):
        return dropout_add_layernorm(h, r, w, b, 1e-12, dropout_p, seed=seed)

    def ref(h, r, w, b):
        dropped = h if keep is None else torch.where(keep, h / (1 - dropout_p), torch.zeros_like(h))
        return F.layer_norm(dropped + r, (48,), w, b, 1e-12)

    check_against_oracle(fn, ref, _ln_inputs(dtype), grad_idx=(0, 1, 2, 3), name=f"dropout_add_layernorm {dtype}")


def test_dropout_add_layernorm_keeps_one_tensor_and_reproduces_from_torch_seed():
    h, r, w, b = _ln_inputs(torch.float32)
    h.requires_grad_(True)
    r.requires_grad_(True)
    torch.manual_seed(3)
    out, saved = _saved_storages(lambda h, r: dropout_add_layernorm(h, r, w, b, 1e-12, 0.3), h, r, excluded=(h, w, b))
    # LayerNorm's input and its per-row statistics, the keep-mask packed 8 to a byte, neither h nor the residual
    assert sorted(saved) == sorted([tuple(h.shape), (3, 4, 1), (3, 4, 1), ((h.numel() + 7) // 8,)]), saved
    torch.manual_seed(3)
    assert torch.equal(out, dropout_add_layernorm(h, r, w, b, 1e-12, 0.3))
    dropped = (out.detach() != F.layer_norm(h + r, (48,), w, b, 1e-12)).any(-1)
    assert dropped.any()
    kept_share = 1 - keep_mask_from_seed(123, (200, 500), 0.3, "cpu").float().mean().item()
    assert abs(kept_share - 0.3) < 0.01


def test_dropout_add_layernorm_compiles_fullgraph():
    h, r, w, b = _ln_inputs(torch.float32)
    compiled = torch.compile(lambda *a: dropout_add_layernorm(*a, 1e-12, 0.0), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(h, r, w, b), F.layer_norm(h + r, (48,), w, b, 1e-12))
    training = torch.compile(lambda *a: dropout_add_layernorm(*a, 1e-12, 0.2), fullgraph=True, backend="aot_eager")
    assert torch.isfinite(training(h, r, w, b)).all()


# ---------------------------------------------------------------------------------------------
@requires_triton
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
@pytest.mark.parametrize("part", [slice(0, 3), slice(3, 7)])
def test_triton_layernorm_reads_a_slice_of_positions_in_place(part, dropout_p):
    """Query rows (or text rows) of (B, L, hidden) tensors: same values and gradients as on contiguous copies, no copy kept."""
    gen = torch.Generator().manual_seed(4)
    full = [torch.randn(2, 7, 100, generator=gen).to(TRITON_DEVICE) for _ in range(2)]
    w = (1 + 0.1 * torch.randn(100, generator=gen)).to(TRITON_DEVICE)
    b, lb = (0.1 * torch.randn(100, generator=gen)).to(TRITON_DEVICE), (0.1 * torch.randn(100, generator=gen)).to(TRITON_DEVICE)
    x_full, r_full = (t.requires_grad_(True) for t in full)
    x, r = x_full[:, part], r_full[:, part]
    seed = torch.tensor(31, device=TRITON_DEVICE)
    dout = torch.randn(x.shape, generator=gen).to(TRITON_DEVICE)

    def run(x, r):
        return bias_dropout_add_layernorm(x, b, r, w, lb, 1e-12, dropout_p, seed=seed, backend="triton")

    # x and r are kept as views of their (B, L) tensors, not as copies: nothing else of their size is kept.
    out, saved = _saved_storages(run, x, r, excluded=(x_full, w, b, lb))
    assert all(torch.Size(s).numel() < x.numel() for s in saved), saved
    gx, gr = torch.autograd.grad(out, (x_full, r_full), dout)
    x_copy, r_copy = (t.detach()[:, part].contiguous().requires_grad_(True) for t in (x_full, r_full))
    ref = bias_dropout_add_layernorm_reference(x_copy, b, r_copy, w, lb, 1e-12, dropout_p, seed)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    rx, rr = torch.autograd.grad(ref, (x_copy, r_copy), dout)
    torch.testing.assert_close(gx[:, part], rx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gr[:, part], rr, rtol=1e-5, atol=1e-5)
    rest = torch.ones(7, dtype=torch.bool)
    rest[part] = False
    assert gx[:, rest].abs().max() == 0 and gr[:, rest].abs().max() == 0
