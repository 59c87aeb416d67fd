"""ops.hub_self_attention with the torch backend: the three BLIP-2 masks, ragged text, bad input."""

import pytest
import torch

from helpers.naive import naive_attention
from helpers.oracle import check_against_oracle
from mmict_kernels import ops


def visible_keys(mode, nq, text_len, i):
    """The BLIP-2 stage-1 masks written out from their definition (docs/DESIGN.md)."""
    queries = list(range(nq))
    text = list(range(nq, nq + text_len))
    if mode == "bidirectional":
        return queries + text
    if mode == "unimodal":
        return queries if i < nq else text
    if mode == "multimodal_causal":
        return queries if i < nq else queries + [j for j in text if j <= i]
    raise AssertionError(mode)


@pytest.mark.parametrize("mode", ["bidirectional", "unimodal", "multimodal_causal"])
@pytest.mark.parametrize("nq", [0, 3])
def test_masks_match_their_definition(mode, nq):
    text_lengths = [4, 0, 2]
    batch, seq_len, heads, head_dim = 3, nq + 4, 2, 8
    q, k, v = (torch.randn(batch, seq_len, heads, head_dim, dtype=torch.float64) for _ in range(3))
    lengths = torch.tensor(text_lengths, dtype=torch.int32)
    out = ops.hub_self_attention(q, k, v, nq, lengths, mode, backend="torch")
    naive = naive_attention(
        q, lambda b: k[b], lambda b: v[b], lambda b, i: visible_keys(mode, nq, text_lengths[b], i), head_dim**-0.5
    )
    torch.testing.assert_close(out, naive, rtol=1e-10, atol=1e-10)
    assert torch.isfinite(out).all()


def test_aliases():
    q = torch.randn(2, 5, 1, 8)
    lengths = torch.tensor([2, 1], dtype=torch.int32)
    for alias, mode in (("itm", "bidirectional"), ("itc", "unimodal"), ("itg", "multimodal_causal")):
        torch.testing.assert_close(
            ops.hub_self_attention(q, q, q, 3, lengths, alias, backend="torch"),
            ops.hub_self_attention(q, q, q, 3, lengths, mode, backend="torch"),
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["unimodal", "multimodal_causal"])
def test_low_precision_against_float64_oracle(dtype, mode):
    lengths = torch.tensor([5, 0, 3], dtype=torch.int32)
    q, k, v = (torch.randn(3, 9, 2, 16, dtype=dtype) for _ in range(3))

    def fn(q, k, v):
        return ops.hub_self_attention(q, k, v, 4, lengths, mode, backend="torch")

    def ref(q, k, v):
        return ops.hub_self_attention_reference(q, k, v, 4, lengths, mode)[0]

    check_against_oracle(fn, ref, [q, k, v], grad_idx=(0, 1, 2), name=f"self {mode} {dtype}")


def test_gradcheck_float64():
    q, k, v = (torch.randn(2, 5, 1, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    lengths = torch.tensor([2, 0], dtype=torch.int32)
    for mode in ("bidirectional", "unimodal", "multimodal_causal"):
        assert torch.autograd.gradcheck(
            lambda q, k, v: ops.hub_self_attention(q, k, v, 3, lengths, mode, backend="torch"), (q, k, v)
        )


def test_bad_inputs_name_the_argument():
    q = torch.randn(2, 5, 2, 8)
    with pytest.raises(ValueError, match="num_query_tokens"):
        ops.hub_self_attention(q, q, q, 6)
    with pytest.raises(TypeError, match="num_query_tokens"):
        ops.hub_self_attention(q, q, q, 2.0)
    with pytest.raises(ValueError, match="mask"):
        ops.hub_self_attention(q, q, q, 2, mask="causal")
    with pytest.raises(ValueError, match="text_lengths"):
        ops.hub_self_attention(q, q, q, 2, torch.tensor([1, 4], dtype=torch.int32))
    with pytest.raises((TypeError, ValueError), match="text_lengths"):
        ops.hub_self_attention(q, q, q, 2, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="k: expected shape"):
        ops.hub_self_attention(q, q[:, :4], q, 2)
