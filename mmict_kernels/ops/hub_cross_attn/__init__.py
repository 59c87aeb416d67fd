"""M-Hub cross-attention: the learned queries of each sample attend to that sample's image tokens.

Files: ``reference.py`` (PyTorch oracle), ``sdpa.py`` (the ``torch`` backend: torch's SDPA
kernels), ``triton.py`` (Triton kernels and their torch.library custom ops), ``cuda.py`` (the
CUDA C++ kernels in ``csrc/`` and their custom ops). This module validates inputs and dispatches
through :mod:`mmict_kernels.backends`.
"""

from __future__ import annotations

import torch

from ... import backends
from .. import checks as C
from .reference import hub_cross_attention_reference

OP = "hub_cross_attention"

# torch: SDPA's fused CPU kernel (sdpa.py); reference.py stays the readable definition and the oracle.
backends.register(OP, "torch", __name__ + ".sdpa", "hub_cross_attention_sdpa", backends.REFERENCE)
backends.register(OP, "triton", __name__ + ".triton", "hub_cross_attention_triton", backends.TRITON_ATTENTION)
backends.register(OP, "cuda", __name__ + ".cuda", "hub_cross_attention_cuda", backends.CUDA_ATTENTION)


def _as_int32(name: str, t: torch.Tensor | None, shape: tuple[int, ...], device: torch.device) -> torch.Tensor | None:
    if t is None:
        return None
    C.check_index_tensor(name, t, shape=shape, dtypes=(torch.int32, torch.int64), device=device)
    return t.to(torch.int32).contiguous()


def hub_cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_k: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    backend: str = "auto",
    *,
    seqlens_k: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
):
    """Cross-attention from M-Hub's learned queries to image (or video-frame) tokens.

    Each sample's queries attend to all of that sample's valid image tokens; samples may have
    different numbers of tokens (frames x 257 for video).

    Args:
        q: (B, Lq, H, D) queries (float16, bfloat16, float32 or float64).
        k, v: either dense (B, Lk, H, D), or packed (total_k, H, D) with ``cu_seqlens_k``.
        cu_seqlens_k: int32 (B + 1,) offsets of each sample's tokens in packed ``k``/``v``
            (``cu_seqlens_k[0] == 0``, non-decreasing, ``cu_seqlens_k[-1] == total_k``).
        softmax_scale: defaults to ``D ** -0.5``.
        backend: "auto" (cuda, then triton, then torch), "cuda", "triton" or "torch".
        seqlens_k: int32 (B,) for dense ``k``/``v`` only: sample b attends to its first
            ``seqlens_k[b]`` tokens (right padding). Default: all ``Lk``.
        dropout_p: attention-probability dropout (pass 0.0 in eval, like SDPA).
        return_lse: also return the log-sum-exp of the scaled scores, (B, H, Lq) float32 (a
            statistic: not differentiated, on every backend).

    Returns:
        out (B, Lq, H, D) in q's dtype (and lse if ``return_lse``). A sample with no image
        token gives out = 0 (lse = -inf), never NaN.
    """
    q, k, v = C.autocast_inputs(q, k, v)
    C.check_tensor("q", q, ndim=4, dtypes=C.FLOAT_DTYPES)
    batch, len_q, heads, head_dim = q.shape
    C.check_head_dim("q", head_dim)
    packed = cu_seqlens_k is not None
    if packed:
        C.check_tensor("k", k, ndim=3)
        C.check_tensor("v", v, ndim=3)
        expected = (k.shape[0], heads, head_dim)
        what = "packed (total_k, H, D) with H, D from q"
    else:
        C.check_tensor("k", k, ndim=(4, 3))
        if k.dim() == 3:
            raise ValueError("k: a 3-D (packed) k needs cu_seqlens_k; pass dense k of shape (B, Lk, H, D) otherwise")
        C.check_tensor("v", v, ndim=4)
        expected = (batch, k.shape[1], heads, head_dim)
        what = "(B, Lk, H, D) with B, H, D from q"
    for name, t in (("k", k), ("v", v)):
        if tuple(t.shape) != expected:
            raise ValueError(f"{name}: expected shape {expected} ({what}), got {tuple(t.shape)}")
    C.check_same_dtype_device("q", q, k=k, v=v)
    C.check_last_dim_contiguous(q=q, k=k, v=v)
    scale = C.check_softmax_scale(softmax_scale, head_dim)
    dropout_p = C.check_dropout(dropout_p)
    C.check_backend_name(backend)
    if packed and seqlens_k is not None:
        raise ValueError("seqlens_k: only for dense k/v; with packed k/v the lengths come from cu_seqlens_k")
    cu_seqlens_k = _as_int32("cu_seqlens_k", cu_seqlens_k, (batch + 1,), q.device)
    seqlens_k = _as_int32("seqlens_k", seqlens_k, (batch,), q.device)
    if C.value_checks_enabled(q):
        if cu_seqlens_k is not None:
            ends_ok = (cu_seqlens_k[0] == 0) & (cu_seqlens_k[-1] == k.shape[0])
            C.expect(ends_ok, f"cu_seqlens_k: expected cu_seqlens_k[0] == 0 and cu_seqlens_k[-1] == total_k == {k.shape[0]}")
            if batch > 0:
                C.expect(
                    cu_seqlens_k[1:] >= cu_seqlens_k[:-1],
                    "cu_seqlens_k: expected non-decreasing offsets (every sample length >= 0)",
                )
        if seqlens_k is not None:
            C.check_range("seqlens_k", seqlens_k, 0, k.shape[1], "lengths")

    _, impl = backends.resolve(OP, backend, device_type=q.device.type, dtype=q.dtype, head_dim=head_dim, dropout=dropout_p > 0)
    out, lse = impl(q, k, v, cu_seqlens_k, seqlens_k, scale, dropout_p)
    return (out, lse) if return_lse else out


__all__ = ["hub_cross_attention", "hub_cross_attention_reference"]
