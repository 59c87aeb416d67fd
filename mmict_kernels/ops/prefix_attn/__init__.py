"""Demo-prefix attention: rows attend to [their group's shared demonstration prefix ; their own tokens].

Files: ``reference.py`` (PyTorch oracle), ``sdpa.py`` (the ``torch`` backend: torch's SDPA
kernels), ``triton.py`` (Triton kernels and their torch.library custom ops), ``cuda.py`` (the
CUDA C++ kernels in ``csrc/``).
"""

from __future__ import annotations

import torch

from ... import backends
from .. import checks as C
from .reference import prefix_attention_mask, prefix_attention_reference

OP = "prefix_attention"

# No attention dropout on any backend: the LLM is frozen (its dropout is off).
# torch: SDPA's fused CPU kernel (sdpa.py); reference.py stays the readable definition and the oracle.
backends.register(OP, "torch", __name__ + ".sdpa", "prefix_attention_sdpa", backends.without_dropout(backends.REFERENCE))
backends.register(
    OP, "triton", __name__ + ".triton", "prefix_attention_triton", backends.without_dropout(backends.TRITON_ATTENTION)
)
backends.register(OP, "cuda", __name__ + ".cuda", "prefix_attention_cuda", backends.CUDA_ATTENTION)


def prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    prefix_ids: torch.Tensor | None = None,
    causal: bool = True,
    softmax_scale: float | None = None,
    backend: str = "auto",
    *,
    prefix_lengths: torch.Tensor | None = None,
    seqlens_k: torch.Tensor | None = None,
    deterministic: bool = False,
    return_lse: bool = False,
):
    """Attention of each row to its group's cached demonstration prefix plus its own tokens.

    The prefix is stored once per group; no row ever gets a concatenated or expanded copy.
    The backward sums the prefix gradients over all rows of a group.

    Args:
        q: (B, Lq, H, D) the rows' queries.
        k, v: (B, Lk, Hkv, D) the rows' own keys/values (Lk = Lq in training; Lk > Lq when
            decoding with a cache). H must be a multiple of Hkv (grouped-query attention).
        prefix_k, prefix_v: (G, Lp, Hkv, D) the shared prefixes, one per group.
        prefix_ids: int64 (B,) group of each row, in [0, G). Default: all 0 (requires G == 1).
        causal: causal within the own tokens, bottom-right aligned (query i sits at own position
            Lk - Lq + i); the prefix is always fully visible.
        softmax_scale: defaults to ``D ** -0.5``.
        backend: "auto", "cuda", "triton" or "torch".
        prefix_lengths: int32 (G,) valid prefix tokens per group (right padding). Default: all Lp.
        seqlens_k: int32 (B,) valid own keys per row: the LAST seqlens_k[b] of the Lk positions
            (left padding, as transformers pads for generation). Default: all Lk.
        deterministic: make the prefix-gradient accumulation bitwise reproducible (kernels
            otherwise sum the rows of a group with atomics, whose order varies).
        return_lse: also return the log-sum-exp, (B, H, Lq) float32 (not differentiated).

    Returns:
        out (B, Lq, H, D) in q's dtype (and lse). A row with nothing visible gives zeros.
    """
    q, k, v, prefix_k, prefix_v = C.autocast_inputs(q, k, v, prefix_k, prefix_v)
    C.check_tensor("q", q, ndim=4, dtypes=C.FLOAT_DTYPES)
    batch, len_q, heads, head_dim = q.shape
    C.check_head_dim("q", head_dim)
    C.check_tensor("k", k, ndim=4)
    C.check_tensor("v", v, ndim=4)
    C.check_tensor("prefix_k", prefix_k, ndim=4)
    C.check_tensor("prefix_v", prefix_v, ndim=4)
    len_k, kv_heads = k.shape[1], k.shape[2]
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"k: expected shape (B={batch}, Lk, Hkv, D={head_dim}), got {tuple(k.shape)}")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v: expected shape {tuple(k.shape)} (same as k), got {tuple(v.shape)}")
    if kv_heads == 0 or heads % kv_heads != 0:
        raise ValueError(f"k: number of K/V heads ({kv_heads}) must divide the number of query heads ({heads})")
    groups, len_prefix = prefix_k.shape[0], prefix_k.shape[1]
    if prefix_k.shape[2] != kv_heads or prefix_k.shape[3] != head_dim:
        raise ValueError(
            f"prefix_k: expected shape (G, Lp, Hkv={kv_heads}, D={head_dim}) (heads and head dim of k), got {tuple(prefix_k.shape)}"
        )
    if tuple(prefix_v.shape) != tuple(prefix_k.shape):
        raise ValueError(f"prefix_v: expected shape {tuple(prefix_k.shape)} (same as prefix_k), got {tuple(prefix_v.shape)}")
    if groups == 0:
        raise ValueError("prefix_k: expected at least one group (G >= 1)")
    C.check_same_dtype_device("q", q, k=k, v=v, prefix_k=prefix_k, prefix_v=prefix_v)
    C.check_last_dim_contiguous(q=q, k=k, v=v, prefix_k=prefix_k, prefix_v=prefix_v)
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    scale = C.check_softmax_scale(softmax_scale, head_dim)
    C.check_backend_name(backend)
    check_values = C.value_checks_enabled(q)
    if prefix_ids is None:
        if groups != 1:
            raise ValueError(f"prefix_ids: required when there are several prefix groups (G = {groups})")
        prefix_ids = torch.zeros(batch, dtype=torch.int64, device=q.device)
    else:
        C.check_index_tensor("prefix_ids", prefix_ids, shape=(batch,), dtypes=(torch.int64, torch.int32), device=q.device)
        prefix_ids = prefix_ids.to(torch.int64).contiguous()
        if check_values:
            C.check_range("prefix_ids", prefix_ids, 0, groups - 1, f"group indices (G = {groups} prefix groups)")
    if prefix_lengths is not None:
        C.check_index_tensor(
            "prefix_lengths", prefix_lengths, shape=(groups,), dtypes=(torch.int32, torch.int64), device=q.device
        )
        prefix_lengths = prefix_lengths.to(torch.int32).contiguous()
        if check_values:
            C.check_range("prefix_lengths", prefix_lengths, 0, len_prefix, "prefix lengths")
    if seqlens_k is not None:
        C.check_index_tensor("seqlens_k", seqlens_k, shape=(batch,), dtypes=(torch.int32, torch.int64), device=q.device)
        seqlens_k = seqlens_k.to(torch.int32).contiguous()
        if check_values:
            C.check_range("seqlens_k", seqlens_k, 0, len_k, "own key lengths")

    _, impl = backends.resolve(OP, backend, device_type=q.device.type, dtype=q.dtype, head_dim=head_dim)
    out, lse = impl(q, k, v, prefix_k, prefix_v, prefix_ids, causal, scale, prefix_lengths, seqlens_k, bool(deterministic))
    return (out, lse) if return_lse else out


__all__ = ["prefix_attention", "prefix_attention_reference", "prefix_attention_mask"]
