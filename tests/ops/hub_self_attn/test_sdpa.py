"""ops.hub_self_attention's torch backend (sdpa.py: torch's fused CPU kernel; lean dropout path) against the float64 oracle."""

from __future__ import annotations

import pytest
import torch

from helpers.oracle import check_against_oracle
from mmict_kernels import ops
from mmict_kernels.ops import _sdpa
from mmict_kernels.ops._seeded_dropout import keep_mask_from_seed
from mmict_kernels.ops.hub_self_attn.sdpa import hub_self_attention_sdpa

MODES = ("bidirectional", "unimodal", "multimodal_causal")


def _qkv(batch, seq_len, heads, head_dim, dtype):
    gen = torch.Generator().manual_seed(3)
    return [torch.randn(batch, seq_len, heads, head_dim, generator=gen).to(dtype) for _ in range(3)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_against_float64_oracle_ragged(mode, dtype):
    nq, text = 5, 6
    lengths = torch.tensor([6, 0, 3], dtype=torch.int32)  # ragged, one sample without text
    q, k, v = _qkv(3, nq + text, 2, 16, dtype)

    def fn(q, k, v):
        return ops.hub_self_attention(q, k, v, nq, lengths, mask=mode, backend="torch")

    def ref(q, k, v):
        return ops.hub_self_attention_reference(q, k, v, nq, lengths, mask=mode)[0]

    out, grads = check_against_oracle(fn, ref, [q, k, v], grad_idx=(0, 1, 2), name=f"self sdpa {mode} {dtype}")
    assert all(torch.isfinite(g).all() for g in grads)


def test_is_the_registered_torch_backend_and_returns_lse():
    q, k, v = _qkv(2, 7, 2, 8, torch.float32)
    lengths = torch.tensor([2, 1], dtype=torch.int32)
    out, lse = ops.hub_self_attention(q, k, v, 4, lengths, mask="multimodal_causal", backend="torch", return_lse=True)
    ref_out, ref_lse = ops.hub_self_attention_reference(q, k, v, 4, lengths, mask="multimodal_causal")
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
    direct, _ = hub_self_attention_sdpa(q, k, v, 4, lengths, "multimodal_causal", 8**-0.5, 0.0)
    torch.testing.assert_close(direct, out, rtol=0, atol=0)


def test_text_only_row_without_keys_gives_zeros_not_nan():
    """nq = 0 with an empty text (ITC's text stream of a sample without text): zeros, lse -inf, zero finite grads."""
    q, k, v = (t.requires_grad_(True) for t in _qkv(2, 4, 2, 8, torch.float32))
    lengths = torch.tensor([0, 3], dtype=torch.int32)
    out, lse = ops.hub_self_attention(q, k, v, 0, lengths, backend="torch", return_lse=True)
    assert out[0].abs().max() == 0 and torch.isinf(lse[0]).all() and (lse[0] < 0).all()
    out.square().sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert q.grad[0].abs().max() == 0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_path_equals_the_reference_with_the_same_mask(mode, dtype):
    """The recomputing dropout path, forward and every gradient, against the reference given the very keep-mask."""
    nq, p, seed = 3, 0.3, 1234
    lengths = torch.tensor([4, 0, 2], dtype=torch.int32)
    q, k, v = _qkv(3, nq + 4, 2, 8, dtype)
    mask = ops.self_attention_mask(nq, nq + 4, lengths, mode, q.device)
    keep = keep_mask_from_seed(seed, (3, 2, nq + 4, nq + 4), p, q.device)

    def fn(q, k, v):
        return _sdpa.dropout_attention(q, k, v, mask, 8**-0.5, p, seed=seed)[0]

    def ref(q, k, v):
        return ops.hub_self_attention_reference(q, k, v, nq, lengths, mask=mode, dropout_p=p, dropout_mask=keep)[0]

    check_against_oracle(fn, ref, [q, k, v], grad_idx=(0, 1, 2), name=f"self dropout {mode} {dtype}")


def test_dropout_path_keeps_no_score_sized_tensor_and_reproduces_from_the_seed():
    q, k, v = (t.requires_grad_(True) for t in _qkv(2, 40, 2, 8, torch.float32))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t.detach(), lambda t: t):
        torch.manual_seed(7)
        out = ops.hub_self_attention(q, k, v, 8, None, backend="torch", dropout_p=0.2)
    assert (2, 2, 40, 40) not in saved  # no probabilities, no bool keep-mask: q, k, v, out, lse, the packed mask
    assert (2 * 2 * 40 * 40 // 8,) in saved
    torch.manual_seed(7)
    again = ops.hub_self_attention(q, k, v, 8, None, backend="torch", dropout_p=0.2)
    assert torch.equal(out, again)
    plain = ops.hub_self_attention(q, k, v, 8, None, backend="torch")
    assert not torch.allclose(out, plain)
