"""Triton hub_cross_attention (ops.hub_cross_attention(..., backend="triton")) against the float64 oracle.

Runs in the CPU interpreter (TRITON_INTERPRET=1, tiny ragged shapes) or on a GPU; the default
M-Hub shape runs only on a GPU. ``triton_toolkit.force_tiles(16, 16)`` makes tiny shapes span several
query and key blocks, so partial tiles and the packed block table are exercised. The backward has
two paths (one program per (head, sample) up to ``SHORT_QUERY_MAX`` queries, three kernels beyond):
the ``backward_path`` fixture runs a test through both.
"""

from __future__ import annotations

import pytest
import torch

from helpers.devices import TRITON_DEVICE, gpu_only_shape, requires_triton
from helpers.oracle import assert_close_by_rule, check_against_oracle
from mmict_kernels import BackendUnavailableError, backends, ops
from mmict_kernels.ops import hub_attention_triton as HA
from mmict_kernels.ops import triton_toolkit as tk
from mmict_kernels.ops.hub_cross_attn import triton as CT
from mmict_kernels.ops.hub_cross_attn.reference import hub_cross_attention_reference

pytestmark = requires_triton
DEVICE = TRITON_DEVICE
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
gpu_only = gpu_only_shape


@pytest.fixture
def many_blocks():
    with tk.force_tiles(16, 16):
        yield


@pytest.fixture(params=["one-kernel", "three-kernels"])
def backward_path(request, monkeypatch):
    """The short-query backward (one program per (head, sample)), or the delta / dQ / dK-dV kernels of longer queries."""
    if request.param == "three-kernels":
        monkeypatch.setattr(HA, "SHORT_QUERY_MAX", 0)
    return request.param


def _rand(*shape, dtype):
    return torch.randn(*shape, dtype=dtype, device=DEVICE)


def _lengths(values):
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


def _cu(lengths):
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=DEVICE)
    cu[1:] = torch.cumsum(_lengths(lengths), 0)
    return cu


def _check_dense(q, k, v, seqlens_k, name, **kw):
    check_against_oracle(
        lambda q, k, v: ops.hub_cross_attention(q, k, v, backend="triton", seqlens_k=seqlens_k, **kw),
        lambda q, k, v: hub_cross_attention_reference(q, k, v, seqlens_k=seqlens_k, **kw)[0],
        [q, k, v], grad_idx=(0, 1, 2), name=name,
    )  # fmt: skip


def _check_packed(q, k, v, cu, name):
    check_against_oracle(
        lambda q, k, v: ops.hub_cross_attention(q, k, v, cu, backend="triton"),
        lambda q, k, v: hub_cross_attention_reference(q, k, v, cu)[0],
        [q, k, v], grad_idx=(0, 1, 2), name=name,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------
# Forward + backward vs the oracle
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("len_q,len_k,lengths", [(5, 19, [7, 0, 19]), (33, 7, None)], ids=["ragged-lens", "all-valid"])
def test_dense(backward_path, dtype, len_q, len_k, lengths):
    batch, heads, head_dim = 3, 2, 32
    q, k, v = (
        _rand(batch, len_q, heads, head_dim, dtype=dtype),
        _rand(batch, len_k, heads, head_dim, dtype=dtype),
        _rand(batch, len_k, heads, head_dim, dtype=dtype),
    )
    seqlens = None if lengths is None else _lengths(lengths)
    _check_dense(q, k, v, seqlens, f"dense {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_packed_varlen_with_empty_sample(backward_path, dtype):
    heads, head_dim, lengths = 2, 32, [7, 0, 40, 1]
    q = _rand(len(lengths), 5, heads, head_dim, dtype=dtype)
    k, v = (_rand(sum(lengths), heads, head_dim, dtype=dtype) for _ in range(2))
    _check_packed(q, k, v, _cu(lengths), f"packed {dtype}")


@pytest.mark.parametrize("head_dim,dtype", [(64, torch.bfloat16), (128, torch.float32)], ids=["d64-bf16", "d128-fp32"])
def test_head_dims(head_dim, dtype):
    q = _rand(2, 5, 1, head_dim, dtype=dtype)
    k, v = (_rand(2, 19, 1, head_dim, dtype=dtype) for _ in range(2))
    _check_dense(q, k, v, _lengths([19, 11]), f"D={head_dim}", softmax_scale=0.3)


def test_many_blocks_dense_and_packed(backward_path, many_blocks):
    """Several query blocks (Lq = 33 > 16) and key blocks, partial last tiles, an empty sample."""
    heads, head_dim = 1, 32
    q = _rand(3, 33, heads, head_dim, dtype=torch.float32)
    k, v = (_rand(3, 40, heads, head_dim, dtype=torch.float32) for _ in range(2))
    _check_dense(q, k, v, _lengths([40, 0, 17]), "dense, many blocks")
    lengths = [17, 0, 33]  # the block table maps programs to (sample, block) across samples
    kp, vp = (_rand(sum(lengths), heads, head_dim, dtype=torch.float32) for _ in range(2))
    _check_packed(q, kp, vp, _cu(lengths), "packed, many blocks")


def test_strided_inputs():
    """Only the head dim must be contiguous: q from a (B, H, Lq, D) tensor, k and v from one KV tensor."""
    batch, len_q, len_k, heads, head_dim = 2, 5, 19, 2, 32
    q = _rand(batch, heads, len_q, head_dim, dtype=torch.float16).transpose(1, 2)
    kv = _rand(batch, len_k, 2, heads, head_dim, dtype=torch.float16)
    assert not q.is_contiguous() and not kv[:, :, 0].is_contiguous()
    _check_dense(q, kv[:, :, 0], kv[:, :, 1], _lengths([19, 4]), "strided")


def test_lse_and_empty_rows(backward_path):
    q = _rand(2, 5, 2, 32, dtype=torch.float32)
    k, v = (_rand(2, 19, 2, 32, dtype=torch.float32) for _ in range(2))
    seqlens = _lengths([0, 19])
    out, lse = ops.hub_cross_attention(q, k, v, backend="triton", seqlens_k=seqlens, return_lse=True)
    ref_out, ref_lse = hub_cross_attention_reference(q.double(), k.double(), v.double(), seqlens_k=seqlens)
    assert lse.dtype == torch.float32 and lse.shape == (2, 2, 5)
    assert torch.isneginf(lse[0]).all() and (out[0] == 0).all()
    assert_close_by_rule("lse", lse[1], ref_lse[1], hub_cross_attention_reference(q, k, v, seqlens_k=seqlens)[1][1])
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    ops.hub_cross_attention(qg, kg, vg, backend="triton", seqlens_k=seqlens).sum().backward()
    for g in (qg.grad[0], kg.grad[0], vg.grad[0], kg.grad[1, 19:]):
        assert torch.isfinite(g).all() and (g == 0).all()


def test_empty_batch_and_queries():
    for batch, len_q in ((0, 5), (2, 0)):
        q = _rand(batch, len_q, 2, 32, dtype=torch.float32).requires_grad_()
        k = _rand(batch, 7, 2, 32, dtype=torch.float32).requires_grad_()
        out = ops.hub_cross_attention(q, k, k, backend="triton")
        assert out.shape == q.shape
        out.sum().backward()
        assert (k.grad == 0).all()


@pytest.mark.skipif(DEVICE != "cpu", reason="bounds are checked in Triton's CPU interpreter")
def test_packed_offsets_near_the_int32_limits_stay_in_bounds(backward_path):
    """Value checks off, cu_seqlens jumping between the int32 extremes: every load and store of both
    backwards stays inside its tensor (the dK/dV block table takes int64 differences, clamped as the kernels clamp)."""
    from mmict_kernels.testing.interpreter_bounds import checked_memory_access

    q, k, v = (
        t.requires_grad_()
        for t in (_rand(3, 4, 2, 32, dtype=torch.float32), *(_rand(10, 2, 32, dtype=torch.float32) for _ in range(2)))
    )
    cu = torch.tensor([0, 2**31 - 1, -(2**31), 10], dtype=torch.int32, device=DEVICE)
    with ops.skip_value_checks(), checked_memory_access() as log:
        ops.hub_cross_attention(q, k, v, cu, backend="triton", dropout_p=0.2).square().sum().backward()
    assert not log.violations, log.violations
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_unsupported_head_dim_is_refused():
    q = _rand(1, 3, 1, 48, dtype=torch.float32)
    with pytest.raises(BackendUnavailableError, match="head dims"):
        ops.hub_cross_attention(q, q, q, backend="triton")
    with pytest.raises(ValueError, match="head dims"):
        CT.hub_cross_attention_triton(q, q, q, None, None, 0.1, 0.0)


# ---------------------------------------------------------------------------------------
# Dropout: exact against the reference with the kernels' own keep-mask
# ---------------------------------------------------------------------------------------
def _seed_of_call(seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return tk.draw_seed(torch.device(DEVICE))


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_dropout_matches_reference_with_exported_mask(backward_path, packed):
    p, heads, head_dim, lengths = 0.3, 2, 32, [7, 0, 19]
    q = _rand(3, 5, heads, head_dim, dtype=torch.float32)
    if packed:
        cu, seqlens = _cu(lengths), None
        k, v = (_rand(sum(lengths), heads, head_dim, dtype=torch.float32) for _ in range(2))
    else:
        cu, seqlens = None, _lengths(lengths)
        k, v = (_rand(3, 19, heads, head_dim, dtype=torch.float32) for _ in range(2))
    keep = CT.hub_cross_attention_dropout_mask(_seed_of_call(7), q, k, cu, p)
    assert keep.shape == (3, heads, 5, 19) and keep.dtype == torch.bool
    assert 0.5 < keep.float().mean().item() < 0.9

    def kernel(q, k, v):
        torch.manual_seed(7)
        return ops.hub_cross_attention(q, k, v, cu, backend="triton", seqlens_k=seqlens, dropout_p=p)

    check_against_oracle(
        kernel,
        lambda q, k, v: hub_cross_attention_reference(q, k, v, cu, seqlens, dropout_p=p, dropout_mask=keep)[0],
        [q, k, v], grad_idx=(0, 1, 2), name="dropout",
    )  # fmt: skip


def test_dropout_reproducible_with_manual_seed():
    q = _rand(2, 5, 2, 32, dtype=torch.float16)
    k, v = (_rand(2, 19, 2, 32, dtype=torch.float16) for _ in range(2))

    def run(seed):
        torch.manual_seed(seed)
        return ops.hub_cross_attention(q, k, v, backend="triton", dropout_p=0.2)

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))
    assert not torch.equal(run(1), ops.hub_cross_attention(q, k, v, backend="triton"))


def test_dropout_keep_mask_lanes_are_independent():
    """One Philox call decides 4 neighbouring keys: each lane keeps 1 - p, and neighbours are not copies."""
    p = 0.3
    keep = HA.dropout_keep_mask(_seed_of_call(5), 2, 2, 32, 64, 64, p).float().reshape(-1, 4)  # (groups, 4 lanes)
    assert ((keep.mean(0) - (1 - p)).abs() < 0.04).all()  # 2048 draws per lane: 4 standard deviations
    assert (keep[:, 0] == keep[:, 1]).float().mean() < 0.65  # independent lanes agree 0.7^2 + 0.3^2 = 0.58 of the time
    assert not torch.equal(keep[:64], keep[64:128])  # rows differ


def test_short_backward_is_deterministic_and_chosen_by_length():
    """Up to SHORT_QUERY_MAX queries the backward is one program per (head, sample), with no atomics: bitwise
    reproducible (packed keys, dropout); longer queries take the three-kernel path."""
    assert HA.short_backward_tiles(HA.SHORT_QUERY_MAX, 64, torch.bfloat16).block_m == 128
    assert HA.short_backward_tiles(HA.SHORT_QUERY_MAX + 1, 64, torch.bfloat16) is None
    assert HA.short_backward_tiles(64, 64, torch.float32).block_m == 64
    assert HA.short_backward_tiles(65, 64, torch.float32) is None  # float32: at most 64 rows in the tile
    with backends.simulate_gpu(backends.SimulatedGPU(capability=(8, 0))):  # sm_80: at most 64 rows
        assert HA.short_backward_tiles(65, 64, torch.bfloat16, torch.device("cpu")) is None
    lengths = [7, 0, 40]
    q = _rand(3, 5, 2, 32, dtype=torch.float16)
    k, v = (_rand(sum(lengths), 2, 32, dtype=torch.float16) for _ in range(2))

    def grads():
        torch.manual_seed(3)
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        ops.hub_cross_attention(qg, kg, vg, _cu(lengths), backend="triton", dropout_p=0.2).square().sum().backward()
        return qg.grad, kg.grad, vg.grad

    assert all(torch.equal(a, b) for a, b in zip(grads(), grads()))


# ---------------------------------------------------------------------------------------
# torch.library and torch.compile
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["dense-lens-dropout", "packed"])
def test_opcheck(case):
    heads, head_dim = 2, 32
    q = _rand(2, 5, heads, head_dim, dtype=torch.float32).requires_grad_()
    if case == "packed":
        cu, seqlens, seed, p = _cu([7, 3]), None, None, 0.0
        k, v = (_rand(10, heads, head_dim, dtype=torch.float32).requires_grad_() for _ in range(2))
    else:
        cu, seqlens, seed, p = None, _lengths([7, 3]), torch.tensor([11], device=DEVICE), 0.25
        k, v = (_rand(2, 7, heads, head_dim, dtype=torch.float32).requires_grad_() for _ in range(2))
    torch.library.opcheck(torch.ops.mmict.hub_cross_attention_triton_fwd.default, (q, k, v, cu, seqlens, seed, 0.2, p))
    out, lse = torch.ops.mmict.hub_cross_attention_triton_fwd(q, k, v, cu, seqlens, seed, 0.2, p)
    args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse, cu, seqlens, seed, 0.2, p)
    torch.library.opcheck(torch.ops.mmict.hub_cross_attention_triton_bwd.default, args)


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
    seqlens = _lengths([7, 3])
    q, k, v = (_rand(2, 7, 2, 32, dtype=torch.float32).requires_grad_() for _ in range(3))
    _compile_and_compare(lambda q, k, v: CT.hub_cross_attention_triton(q, k, v, None, seqlens, 0.2, 0.0)[0], q, k, v)


def test_compile_fullgraph_front_end():
    seqlens = _lengths([7, 3])
    q, k, v = (_rand(2, 7, 2, 32, dtype=torch.float32).requires_grad_() for _ in range(3))
    fn = lambda q, k, v: ops.hub_cross_attention(q, k, v, backend="triton", seqlens_k=seqlens)  # noqa: E731
    _compile_and_compare(fn, q, k, v)


# ---------------------------------------------------------------------------------------
# GPU: the default M-Hub shape (64 samples x 32 queries x 257 image tokens x 12 heads x 64)
# ---------------------------------------------------------------------------------------
@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_default_mhub_shape(dtype):
    q = _rand(64, 32, 12, 64, dtype=dtype)
    k, v = (_rand(64, 257, 12, 64, dtype=dtype) for _ in range(2))
    _check_dense(q, k, v, None, f"M-Hub {dtype}")


@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_video_frames_packed(dtype):
    lengths = [257 * f for f in (1, 4, 2, 8, 1, 3, 0, 6)]  # frames x 257 tokens per sample
    q = _rand(len(lengths), 32, 12, 64, dtype=dtype)
    k, v = (_rand(sum(lengths), 12, 64, dtype=dtype) for _ in range(2))
    _check_packed(q, k, v, _cu(lengths), f"video {dtype}")
