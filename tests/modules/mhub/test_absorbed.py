"""Cross-attention with the image K/V projections folded into the queries (modules/mhub/absorbed.py)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from helpers.mhub import HIDDEN, assert_matches_hf, make_hf, make_inputs, run_with_grads
from mmict_kernels import FusedMHub
from mmict_kernels.modules.mhub import absorbed
from mmict_kernels.ops._reference import masked_attention
from mmict_kernels.ops._sdpa import dropout_attention

B, LQ, H, D, LK, DIN = 3, 5, 4, 8, 11, 12
LENGTHS = [11, 4, 0]  # ragged, and a sample with no image token


def _leaves(dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_(True)  # noqa: E731
    return make(B, LQ, H, D), make(B, LK, DIN), make(2 * H * D, DIN), make(2 * H * D)


def _usual_order(q, x, valid, weight, bias, scale, dropout_p, seed):
    k, v = (t.view(B, LK, H, D) for t in F.linear(x, weight, bias).split(H * D, dim=-1))
    if dropout_p > 0:
        return dropout_attention(q, k, v, valid[:, None, None, :], scale, dropout_p, seed)[0]
    out = masked_attention(q, k, v, valid[:, None, None, :], scale)[0]
    return torch.where(valid.any(-1)[:, None, None, None], out, 0.0)  # a row that sees nothing: zeros, as ours


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("seed", [0, 1])
def test_equals_the_usual_order_in_float64(dropout_p, seed):
    """Outputs and the gradients of q, the image tokens, the K/V weight and bias (b_k's: zero), the same dropout mask."""
    q, x, weight, bias = _leaves(torch.float64, seed)
    valid = torch.arange(LK)[None, :] < torch.tensor(LENGTHS)[:, None]
    dout = torch.randn(B, LQ, H, D, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 9))
    out = absorbed._AbsorbedCrossAttention.apply(q, x, valid, weight, bias, 0.3, dropout_p, 1234)
    ref = _usual_order(q, x, valid, weight, bias, 0.3, dropout_p, 1234)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert not out[2].any()  # no image token: zeros, not NaN
    for name, a, r in zip(
        ("q", "x", "weight", "bias"),
        torch.autograd.grad(out, (q, x, weight, bias), dout),
        torch.autograd.grad(ref, (q, x, weight, bias), dout),
    ):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10, msg=name)


def test_float32_within_the_oracle_rule():
    q, x, weight, bias = _leaves(torch.float64, 3)
    valid = torch.arange(LK)[None, :] < torch.tensor(LENGTHS)[:, None]
    ref64 = _usual_order(q, x, valid, weight, bias, 0.3, 0.0, 0)
    args32 = [t.detach().float() for t in (q, x)] + [valid] + [t.detach().float() for t in (weight, bias)]
    ref32 = _usual_order(*args32, 0.3, 0.0, 0)
    out32 = absorbed._AbsorbedCrossAttention.apply(*args32, 0.3, 0.0, 0)
    assert (out32.double() - ref64).abs().max() <= 2 * (ref32.double() - ref64).abs().max() + 1e-6


@pytest.mark.parametrize("image_grad", [False, True])
def test_flop_model_counts_what_runs(image_grad):
    """``absorbed.flops`` is what torch's FLOP formulas count over the forward and backward (with dropout)."""
    q, x, weight, bias = _leaves(torch.float32, 0)
    x.requires_grad_(image_grad)
    valid = torch.ones(B, LK, dtype=torch.bool)
    with FlopCounterMode(display=False) as counter:
        absorbed._AbsorbedCrossAttention.apply(q, x, valid, weight, bias, 0.3, 0.1, 5).sum().backward()
    assert counter.get_total_flops() == B * absorbed.flops(LQ, LK, DIN, H, D, image_grad, absorbed=True)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        absorbed._AbsorbedCrossAttention.apply(q, x, valid, weight, bias, 0.3, 0.0, 5)
    assert counter.get_total_flops() == B * absorbed.flops(LQ, LK, DIN, H, D, image_grad, absorbed=True, backward=False)


def test_cheaper_at_the_driver_shapes():
    # 257 image tokens x 1408, 12 x 64 heads: 8 queries (the MMICT step) yes; 32 frozen, or 3 objectives x 32, no
    assert absorbed.cheaper(8, 257, 1408, 12, 64, image_grad=True)
    assert absorbed.cheaper(8, 257, 1408, 12, 64, image_grad=False)
    assert not absorbed.cheaper(32, 257, 1408, 12, 64, image_grad=False)
    assert not absorbed.cheaper(96, 257, 1408, 12, 64, image_grad=True)
    assert absorbed.cheaper(32, 257, 1408, 12, 64, image_grad=False, backward=False)  # inference: the forward alone
    # rows sharing images: the usual order projects each image once, the absorbed one works per row
    assert absorbed.cheaper(8, 257, 1408, 12, 64, image_grad=True, rows=15, images=14)  # the MMICT step's batches
    assert absorbed.cheaper(8, 257, 1408, 12, 64, image_grad=True, rows=16, images=8)
    assert not absorbed.cheaper(8, 257, 1408, 12, 64, image_grad=True, rows=16, images=4)  # 4 rows per image


def _spy(monkeypatch):
    calls = []
    real = absorbed.absorbed_cross_attention
    monkeypatch.setattr(absorbed, "absorbed_cross_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_fused_mhub_uses_it_and_matches_transformers(monkeypatch):
    calls = _spy(monkeypatch)
    hf = make_hf("instructblip", layers=3, freq=1)
    hub = FusedMHub.from_hf(hf, backend="torch")
    inputs = make_inputs("instructblip", batch=3, nq=5, image_tokens=33, image_lengths=[33, 20, 7], text_lengths=[3, 0, 6])
    assert_matches_hf(hub, hf, inputs)
    assert calls  # the absorbed order ran (3 cross-attention layers per pass)


def test_same_training_step_as_the_usual_order(monkeypatch):
    """With dropout: the same seeds, the same masks, so the same outputs and gradients as forming K and V."""
    calls = _spy(monkeypatch)
    hf = make_hf("instructblip", layers=2, freq=1, dropout=0.1)
    hub = FusedMHub.from_hf(hf, backend="torch").train()
    inputs = make_inputs("instructblip", batch=3, nq=5, image_tokens=33, image_lengths=[33, 20, 7], text_lengths=[3, 0, 6])
    dout = torch.randn(3, 11, HIDDEN, generator=torch.Generator().manual_seed(2))
    results = []
    for absorb in (True, False):
        if not absorb:
            monkeypatch.setattr(absorbed, "cheaper", lambda *a, **k: False)
        torch.manual_seed(0)
        results.append(run_with_grads(copy.deepcopy(hub), inputs, torch.float32, dout))
    assert calls
    (out_a, grads_a), (out_b, grads_b) = results
    torch.testing.assert_close(out_a, out_b, rtol=1e-5, atol=1e-5)
    for name in grads_b:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-5, msg=name)
