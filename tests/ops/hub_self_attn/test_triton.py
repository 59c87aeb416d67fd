"""Triton hub_self_attention (ops.hub_self_attention(..., backend="triton")) against the float64 oracle.

Every BLIP-2 mask mode with ragged text lengths (including samples without text), in the CPU
interpreter (TRITON_INTERPRET=1) or on a GPU; the default M-Hub shape only on a GPU.
``triton_toolkit.force_tiles(16, 16)`` splits tiny sequences into several query and key blocks whose
edges do not line up with ``num_query_tokens``, so the block-skipping ranges are exercised. The
``backward_path`` fixture runs a test through both backwards (one program per (head, sample) up to
``SHORT_QUERY_MAX`` queries, the delta / dQ / dK-dV kernels beyond).
"""

from __future__ import annotations

import pytest
import torch

from helpers.devices import TRITON_DEVICE, gpu_only_shape, requires_triton
from helpers.oracle import assert_close_by_rule, check_against_oracle
from mmict_kernels import ops
from mmict_kernels.ops import hub_attention_triton as HA
from mmict_kernels.ops import triton_toolkit as tk
from mmict_kernels.ops.hub_self_attn import triton as ST
from mmict_kernels.ops.hub_self_attn.reference import hub_self_attention_reference

pytestmark = requires_triton
DEVICE = TRITON_DEVICE
MASKS = ("bidirectional", "unimodal", "multimodal_causal")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
gpu_only = gpu_only_shape


@pytest.fixture
def many_blocks():
    with tk.force_tiles(16, 16):
        yield


@pytest.fixture(params=["one-kernel", "three-kernels"])
def backward_path(request, monkeypatch):
    if request.param == "three-kernels":
        monkeypatch.setattr(HA, "SHORT_QUERY_MAX", 0)
    return request.param


def _qkv(batch, seq_len, heads, head_dim, dtype):
    return [torch.randn(batch, seq_len, heads, head_dim, dtype=dtype, device=DEVICE) for _ in range(3)]


def _lengths(values):
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


def _check(q, k, v, nq, text_lengths, mask, name, **kw):
    check_against_oracle(
        lambda q, k, v: ops.hub_self_attention(q, k, v, nq, text_lengths, mask, backend="triton", **kw),
        lambda q, k, v: hub_self_attention_reference(q, k, v, nq, text_lengths, mask, **kw)[0],
        [q, k, v], grad_idx=(0, 1, 2), name=name,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------
# Forward + backward vs the oracle
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask", MASKS)
def test_masks_ragged_text(backward_path, mask, dtype):
    nq, text = 5, 12  # sample 1 has no text: its text rows see nothing (unimodal) or only queries
    q, k, v = _qkv(3, nq + text, 2, 32, dtype)
    _check(q, k, v, nq, _lengths([12, 0, 7]), mask, f"{mask} {dtype}")


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("nq,text", [(19, 20), (32, 7), (3, 30)], ids=["19+20", "32+7", "3+30"])
def test_masks_many_blocks(backward_path, many_blocks, mask, nq, text):
    q, k, v = _qkv(2, nq + text, 1, 32, torch.float32)
    _check(q, k, v, nq, _lengths([text, text // 3]), mask, f"{mask} nq={nq} T={text}")


@pytest.mark.parametrize("mask", ["unimodal", "multimodal_causal"])
def test_tiles_aligned_to_queries(mask):
    """With num_query_tokens a multiple of 16 the launcher's own tiles stop at the query/text edge."""
    nq, text = 16, 20
    tiles = HA.tiles_for(nq + text, 2, 32, torch.float16, torch.device("cpu"), align=nq)
    assert nq % tiles.block_m == 0 and nq % tiles.block_n == 0
    q, k, v = _qkv(2, nq + text, 1, 32, torch.float16)
    _check(q, k, v, nq, _lengths([20, 5]), mask, f"{mask} aligned tiles")


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize(
    "nq,text,lengths", [(0, 9, [9, 4]), (7, 0, [0, 0]), (4, 6, None)], ids=["no-queries", "no-text", "full-text"]
)
def test_edge_layouts(mask, nq, text, lengths):
    q, k, v = _qkv(2, nq + text, 2, 32, torch.float32)
    _check(q, k, v, nq, None if lengths is None else _lengths(lengths), mask, f"{mask} nq={nq} T={text}")


@pytest.mark.parametrize("head_dim,dtype,mask", [(64, torch.float16, "multimodal_causal"), (128, torch.bfloat16, "unimodal")])
def test_head_dims(head_dim, dtype, mask):
    q, k, v = _qkv(2, 9, 1, head_dim, dtype)
    _check(q, k, v, 4, _lengths([5, 2]), mask, f"D={head_dim}", softmax_scale=0.2)


def test_strided_inputs():
    """q, k, v as views of one packed (B, L, 3, H, D) projection output."""
    qkv = torch.randn(2, 13, 3, 2, 32, dtype=torch.float16, device=DEVICE)
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous()
    _check(q, k, v, 5, _lengths([8, 3]), "multimodal_causal", "strided")


def test_lse_and_rows_without_keys(backward_path):
    """Unimodal: text rows of a sample without text see no key -> out 0, lse -inf, zero grads."""
    nq, text = 3, 4
    q, k, v = _qkv(2, nq + text, 2, 32, torch.float32)
    lengths = _lengths([0, 4])
    out, lse = ops.hub_self_attention(q, k, v, nq, lengths, "unimodal", backend="triton", return_lse=True)
    ref_lse = hub_self_attention_reference(q.double(), k.double(), v.double(), nq, lengths, "unimodal")[1]
    low_lse = hub_self_attention_reference(q, k, v, nq, lengths, "unimodal")[1]
    assert torch.isneginf(lse[0, :, nq:]).all() and (out[0, nq:] == 0).all()
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert_close_by_rule("lse", lse[finite], ref_lse[finite], low_lse[finite])
    qg = q.clone().requires_grad_()
    ops.hub_self_attention(qg, k, v, nq, lengths, "unimodal", backend="triton").sum().backward()
    assert torch.isfinite(qg.grad).all() and (qg.grad[0, nq:] == 0).all()


# ---------------------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------------------
def _check_dropout(q, k, v, nq, lengths, mask, p, seed, name):
    """The kernels against the reference given the kernels' own keep-mask for the seed of the call."""
    torch.manual_seed(seed)
    keep = ST.hub_self_attention_dropout_mask(tk.draw_seed(torch.device(DEVICE)), q, p)
    assert keep.shape == (q.shape[0], q.shape[2], q.shape[1], q.shape[1]) and keep.dtype == torch.bool

    def kernel(q, k, v):
        torch.manual_seed(seed)
        return ops.hub_self_attention(q, k, v, nq, lengths, mask, backend="triton", dropout_p=p)

    check_against_oracle(
        kernel,
        lambda q, k, v: hub_self_attention_reference(q, k, v, nq, lengths, mask, dropout_p=p, dropout_mask=keep)[0],
        [q, k, v], grad_idx=(0, 1, 2), name=name,
    )  # fmt: skip


@pytest.mark.parametrize("mask", MASKS)
def test_dropout_matches_reference_with_exported_mask(backward_path, mask):
    _check_dropout(*_qkv(2, 10, 2, 32, torch.float32), 4, _lengths([6, 1]), mask, 0.25, 3, f"dropout {mask}")


@pytest.mark.parametrize("mask", ["unimodal", "multimodal_causal"])
def test_dropout_many_blocks_unaligned_text(backward_path, many_blocks, mask):
    """Key tiles of text rows start at num_query_tokens = 5 (not a multiple of the 4 keys one Philox call
    decides): the kernels align them down, and still draw exactly the exported mask."""
    q, k, v = _qkv(2, 5 + 30, 1, 32, torch.float32)
    _check_dropout(q, k, v, 5, _lengths([30, 11]), mask, 0.3, 4, f"dropout {mask} many blocks")


def test_dropout_reproducible_with_manual_seed():
    q, k, v = _qkv(2, 9, 2, 32, torch.bfloat16)

    def run(seed):
        torch.manual_seed(seed)
        return ops.hub_self_attention(q, k, v, 4, None, "bidirectional", backend="triton", dropout_p=0.3)

    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5), run(6))


# ---------------------------------------------------------------------------------------
# torch.library and torch.compile
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("mask,p", [("multimodal_causal", 0.1), ("unimodal", 0.0)])
def test_opcheck(mask, p):
    q, k, v = (t.requires_grad_() for t in _qkv(2, 7, 2, 32, torch.float32))
    lengths, seed = _lengths([2, 0]), (torch.tensor([9], device=DEVICE) if p > 0 else None)
    torch.library.opcheck(torch.ops.mmict.hub_self_attention_triton_fwd.default, (q, k, v, lengths, seed, 3, mask, 0.2, p))
    out, lse = torch.ops.mmict.hub_self_attention_triton_fwd(q, k, v, lengths, seed, 3, mask, 0.2, p)
    args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse, lengths, seed, 3, mask, 0.2, p)
    torch.library.opcheck(torch.ops.mmict.hub_self_attention_triton_bwd.default, args)


def _compile_and_compare(fn, q, k, v):
    qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
    fn(qs, ks, vs).sum().backward()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v)
    out.sum().backward()
    torch.testing.assert_close(out, fn(qs, ks, vs))
    for a, b in ((q, qs), (k, ks), (v, vs)):
        torch.testing.assert_close(a.grad, b.grad)


def test_compile_fullgraph_custom_op():
    lengths = _lengths([3, 1])
    q, k, v = (t.requires_grad_() for t in _qkv(2, 7, 2, 32, torch.float32))
    fn = lambda q, k, v: ST.hub_self_attention_triton(q, k, v, 4, lengths, "unimodal", 0.2, 0.0)[0]  # noqa: E731
    _compile_and_compare(fn, q, k, v)


def test_compile_fullgraph_front_end():
    lengths = _lengths([3, 1])
    q, k, v = (t.requires_grad_() for t in _qkv(2, 7, 2, 32, torch.float32))
    fn = lambda q, k, v: ops.hub_self_attention(q, k, v, 4, lengths, "itg", backend="triton")  # noqa: E731
    _compile_and_compare(fn, q, k, v)


# ---------------------------------------------------------------------------------------
# GPU: the default M-Hub shape (64 samples x [32 queries ; 32 text] x 12 heads x 64)
# ---------------------------------------------------------------------------------------
@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("mask", MASKS)
def test_gpu_default_mhub_shape(mask, dtype):
    q, k, v = _qkv(64, 64, 12, 64, dtype)
    lengths = torch.randint(0, 33, (64,), dtype=torch.int32, device=DEVICE)
    _check(q, k, v, 32, lengths, mask, f"M-Hub {mask} {dtype}")
