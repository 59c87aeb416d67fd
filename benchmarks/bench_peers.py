"""Providers of each op: ours (every registered backend) and the peers we measure against.

A provider turns a Case into ``fn(inputs) -> out`` with out shaped (B, Lq, H, D), or raises
:class:`Unavailable` with the reason it cannot run here, which bench_hub.py prints and
records (a peer is never left out silently).

Peers get the same job as our op, expressed the way a user of that library would:
- SDPA (each backend forced alone, inside ``sdpa_kernel``), on (B, H, L, D) views of the
  same (B, L, H, D) tensors (no copy); the M-Hub masks as a boolean attn_mask built once;
  the prefix as ``torch.cat([prefix (expanded to every row) ; own keys])`` with a lower-right
  causal bias and ``enable_gqa``: the per-row copy is part of the peer's cost, because
  avoiding it is what our prefix kernel is for.
- FlexAttention, ``torch.compile``'d once, with the equivalent BlockMask built once per case.
- xformers ``memory_efficient_attention`` and flash-attn ``flash_attn_func`` when importable.
A ragged (packed, varlen) video batch goes to the peers without varlen support padded to the
longest clip by a gather, with the padding masked; xformers gets a BlockDiagonalMask and
flash-attn its varlen function, on the packed tensors as they are.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from bench_cases import CROSS, SELF, Case

from mmict_kernels import backends, ops

FLASH_ATTN_NOT_INSTALLABLE = (
    "it cannot be installed on the benchmark device: FlashAttention-2 is a source-only package with an "
    "hours-long build, and FlashAttention-4's CuTe-DSL runtime wheel (92 MB) is over the 64 MiB a device call "
    "can carry; SDPA's flash backend (FlashAttention-2's kernel) and its cuDNN backend stand in for it"
)


class Unavailable(Exception):
    """This provider cannot run this case here; the message says why."""


@dataclasses.dataclass
class Provider:
    name: str
    ours: bool
    build: Callable[[Case, dict, torch.device, object], Callable[[dict], torch.Tensor]]  # options: the CLI args
    # Entered once around all calls of a measurement (e.g. forcing one SDPA backend),
    # so its own overhead stays out of the timings.
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    compiled: bool = False  # torch.compile'd: measured in a last pass (see the phases in bench_hub.main)


def _bhld(x: torch.Tensor) -> torch.Tensor:
    """(B, L, H, D) -> (B, H, L, D) view: the layout SDPA and FlexAttention take."""
    return x.transpose(1, 2)


def _prefixed_kv(x: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """[prefix ; own] keys and values per row: the copy the naive way needs (B, Lp + Lk, Hkv, D)."""
    batch = x["q"].shape[0]
    k = torch.cat([x["prefix_k"].expand(batch, -1, -1, -1), x["k"]], dim=1)
    v = torch.cat([x["prefix_v"].expand(batch, -1, -1, -1), x["v"]], dim=1)
    return k, v


class _Padder:
    """Packed (total_k, H, D) K/V -> padded (B, max_len, H, D) with a key mask: how a peer
    without varlen support takes a ragged video batch. The gather index is built once (the
    lengths are the same in every input set); the gather itself is part of the peer's time."""

    def __init__(self, case: Case, device: torch.device):
        lengths = torch.tensor(case.key_lengths(), device=device)
        starts = torch.cumsum(lengths, 0) - lengths
        positions = torch.arange(int(lengths.max()), device=device)
        self.valid = positions[None, :] < lengths[:, None]  # (B, max_len)
        self.index = torch.where(self.valid, starts[:, None] + positions[None, :], torch.zeros_like(positions)[None, :])
        self.lengths = lengths

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return t[self.index]  # (B, max_len, H, D); padded slots hold row 0 and are masked


# ---------------------------------------------------------------------------------------
# Ours
# ---------------------------------------------------------------------------------------
def _ours(backend: str):
    def build(case: Case, example: dict, device: torch.device, options):
        why = backends.explain(case.op, device_type=device.type, dtype=example["q"].dtype, head_dim=case.head_dim)[backend]
        if why is not None:
            raise Unavailable(why)
        return case.call_ours(backend)

    return build


# ---------------------------------------------------------------------------------------
# SDPA, one backend at a time
# ---------------------------------------------------------------------------------------
def _sdpa(sdpa_backend):
    def build(case: Case, example: dict, device: torch.device, options):
        if case.op == CROSS and case.packed:
            pad = _Padder(case, device)
            mask = pad.valid[:, None, None, :]  # (B, 1, 1, max_len)

            def run(x):
                k, v = pad(x["k"]), pad(x["v"])
                return F.scaled_dot_product_attention(_bhld(x["q"]), _bhld(k), _bhld(v), attn_mask=mask).transpose(1, 2)

            return run
        if case.op == CROSS:
            return lambda x: F.scaled_dot_product_attention(_bhld(x["q"]), _bhld(x["k"]), _bhld(x["v"])).transpose(1, 2)
        if case.op == SELF:
            p = case.params
            mask = ops.self_attention_mask(p["num_query"], p["num_query"] + p["text"], example["text_lengths"], case.mask, device)
            return lambda x: F.scaled_dot_product_attention(
                _bhld(x["q"]), _bhld(x["k"]), _bhld(x["v"]), attn_mask=mask
            ).transpose(1, 2)
        import inspect

        from torch.nn.attention.bias import CausalBias, causal_lower_right

        p = case.params
        bias = causal_lower_right(p["len_q"], p["len_prefix"] + p["len_q"])
        group = p["heads"] // p["kv_heads"]
        # GQA: enable_gqa where torch's lower-right causal bias forwards it; on an older torch,
        # repeat the K/V heads (a copy, as a user of that torch would have to).
        native_gqa = "enable_gqa" in inspect.signature(CausalBias._dispatch).parameters
        kwargs = {"enable_gqa": True} if group > 1 and native_gqa else {}

        def run(x):
            k, v = _prefixed_kv(x)
            if group > 1 and not native_gqa:
                k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
            return F.scaled_dot_product_attention(_bhld(x["q"]), _bhld(k), _bhld(v), attn_mask=bias, **kwargs).transpose(1, 2)

        return run

    return build


def _sdpa_context(sdpa_backend):
    from torch.nn.attention import sdpa_kernel

    return lambda: sdpa_kernel([sdpa_backend])


# ---------------------------------------------------------------------------------------
# FlexAttention (compiled once; BlockMask built once per case)
# ---------------------------------------------------------------------------------------
@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # One compiled function serves every case; each new shape/mask recompiles, so lift the
    # recompile limit (default 8) above the number of cases.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return torch.compile(flex_attention, dynamic=False)


def _self_mask_mod(num_query: int, text_lengths: torch.Tensor, mode: str):
    """The three M-Hub masks as a FlexAttention mask_mod (same rules as ops.self_attention_mask)."""

    def mask_mod(b, h, q_idx, kv_idx):
        key_valid = kv_idx < num_query + text_lengths[b]
        row_is_query, key_is_query = q_idx < num_query, kv_idx < num_query
        if mode == "bidirectional":
            return key_valid
        if mode == "unimodal":
            return key_valid & (row_is_query == key_is_query)
        return key_valid & torch.where(row_is_query, key_is_query, key_is_query | (kv_idx <= q_idx))

    return mask_mod


def _flex(case: Case, example: dict, device: torch.device, options):
    if getattr(options, "no_compile", False):
        raise Unavailable("skipped: --no-compile (compiling FlexAttention takes minutes)")
    if device.type == "cpu" and getattr(options, "quick", False):
        raise Unavailable("skipped in --quick on CPU: compiling FlexAttention with inductor's C++ backend takes minutes here")
    from torch.nn.attention.flex_attention import create_block_mask

    flex = _compiled_flex()
    p = case.params
    if case.op == CROSS and case.packed:
        pad = _Padder(case, device)
        lengths = pad.lengths

        def valid_key(b, h, q_idx, kv_idx):
            return kv_idx < lengths[b]

        block_mask = create_block_mask(valid_key, p["batch"], None, p["len_q"], pad.valid.shape[1], device=device)
        return lambda x: flex(_bhld(x["q"]), _bhld(pad(x["k"])), _bhld(pad(x["v"])), block_mask=block_mask).transpose(1, 2)
    if case.op == CROSS:
        return lambda x: flex(_bhld(x["q"]), _bhld(x["k"]), _bhld(x["v"])).transpose(1, 2)
    if case.op == SELF:
        length = p["num_query"] + p["text"]
        mask_mod = _self_mask_mod(p["num_query"], example["text_lengths"], case.mask)
        block_mask = create_block_mask(mask_mod, p["batch"], None, length, length, device=device)
        return lambda x: flex(_bhld(x["q"]), _bhld(x["k"]), _bhld(x["v"]), block_mask=block_mask).transpose(1, 2)
    len_q, len_prefix = p["len_q"], p["len_prefix"]

    def prefix_causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + len_prefix  # the whole prefix, then causal over the own tokens

    block_mask = create_block_mask(prefix_causal, None, None, len_q, len_prefix + len_q, device=device)
    gqa = p["heads"] != p["kv_heads"]

    def run(x):
        k, v = _prefixed_kv(x)
        return flex(_bhld(x["q"]), _bhld(k), _bhld(v), block_mask=block_mask, enable_gqa=gqa).transpose(1, 2)

    return run


# ---------------------------------------------------------------------------------------
# xformers and flash-attn (when importable)
# ---------------------------------------------------------------------------------------
def _xformers(case: Case, example: dict, device: torch.device, options):
    try:
        import xformers.ops as xops
    except Exception as exc:
        raise Unavailable(f"xformers is not importable ({type(exc).__name__}: {exc})") from None
    if device.type != "cuda":
        raise Unavailable("xformers' memory_efficient_attention needs CUDA tensors")
    p = case.params
    if case.op == CROSS and case.packed:
        from xformers.ops.fmha.attn_bias import BlockDiagonalMask

        # Varlen the xformers way: one packed "batch" of 1 with a block-diagonal mask.
        bias = BlockDiagonalMask.from_seqlens(q_seqlen=[p["len_q"]] * p["batch"], kv_seqlen=case.key_lengths())

        def run(x):
            q = x["q"]
            out = xops.memory_efficient_attention(q.reshape(1, -1, *q.shape[2:]), x["k"][None], x["v"][None], attn_bias=bias)
            return out.reshape(q.shape)

        return run
    if case.op == CROSS:
        return lambda x: xops.memory_efficient_attention(x["q"], x["k"], x["v"])
    if case.op == SELF:
        length = p["num_query"] + p["text"]
        mask = ops.self_attention_mask(p["num_query"], length, example["text_lengths"], case.mask, device)
        # xformers wants an additive bias whose last dim is padded to a multiple of 8 in memory.
        padded = -(-length // 8) * 8
        bias = torch.zeros(p["batch"], p["heads"], length, padded, dtype=example["q"].dtype, device=device)[..., :length]
        bias.masked_fill_(~mask, float("-inf"))
        return lambda x: xops.memory_efficient_attention(x["q"], x["k"], x["v"], attn_bias=bias)
    from xformers.ops.fmha.attn_bias import LowerTriangularFromBottomRightMask

    heads, kv_heads = p["heads"], p["kv_heads"]

    def run(x):
        k, v = _prefixed_kv(x)
        q = x["q"]
        batch, len_q, len_k = q.shape[0], q.shape[1], k.shape[1]
        # Grouped-query attention in xformers' 5-D (B, M, G, H/G, D) layout; K/V expanded, not copied.
        q5 = q.reshape(batch, len_q, kv_heads, heads // kv_heads, -1)
        k5 = k[:, :, :, None, :].expand(batch, len_k, kv_heads, heads // kv_heads, k.shape[-1])
        v5 = v[:, :, :, None, :].expand(batch, len_k, kv_heads, heads // kv_heads, v.shape[-1])
        out = xops.memory_efficient_attention(q5, k5, v5, attn_bias=LowerTriangularFromBottomRightMask())
        return out.reshape(batch, len_q, heads, -1)

    return run


def _flash_attn(case: Case, example: dict, device: torch.device, options):
    try:
        from flash_attn import flash_attn_func
    except Exception as exc:
        raise Unavailable(f"flash-attn is not importable ({type(exc).__name__}: {exc}); {FLASH_ATTN_NOT_INSTALLABLE}") from None
    if device.type != "cuda":
        raise Unavailable("flash-attn needs CUDA tensors")
    if case.op == CROSS and case.packed:
        from flash_attn import flash_attn_varlen_func

        batch, len_q = case.params["batch"], case.params["len_q"]
        cu_q = torch.arange(0, (batch + 1) * len_q, len_q, dtype=torch.int32, device=device)
        max_k = max(case.key_lengths())

        def run(x):
            q = x["q"]
            out = flash_attn_varlen_func(q.reshape(-1, *q.shape[2:]), x["k"], x["v"], cu_q, x["cu_seqlens_k"], len_q, max_k)
            return out.reshape(q.shape)

        return run
    if case.op == CROSS:
        return lambda x: flash_attn_func(x["q"], x["k"], x["v"])
    if case.op == SELF:
        raise Unavailable(
            "flash-attn takes no arbitrary mask (only causal, sliding window, varlen): the M-Hub [queries ; text] masks "
            "with ragged text padding cannot be expressed"
        )

    def run(x):
        k, v = _prefixed_kv(x)
        return flash_attn_func(x["q"], k, v, causal=True)  # causal is bottom-right aligned; GQA native

    return run


def providers() -> list[Provider]:
    from torch.nn.attention import SDPBackend

    result = [
        Provider("reference", True, _ours("torch")),
        Provider("triton", True, _ours("triton")),
        Provider("cuda", True, _ours("cuda")),
    ]
    for name, sdpa_backend in (
        ("sdpa-math", SDPBackend.MATH),
        ("sdpa-efficient", SDPBackend.EFFICIENT_ATTENTION),
        ("sdpa-flash", SDPBackend.FLASH_ATTENTION),
        ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION),
    ):
        result.append(Provider(name, False, _sdpa(sdpa_backend), _sdpa_context(sdpa_backend)))
    result += [
        Provider("flex", False, _flex, compiled=True),
        Provider("xformers", False, _xformers),
        Provider("flash-attn", False, _flash_attn),
    ]
    return result


def first_call(provider: Provider, fn: Callable[[dict], torch.Tensor], inputs: dict, device: torch.device) -> torch.Tensor:
    """Run a provider once (autograd recording, as it will be timed, so a compiled provider
    compiles once, not once without and once with grad) and return the detached output; turn
    any failure (with the warnings SDPA emits about why it refused each kernel) into :class:`Unavailable`."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with provider.context():
                out = fn(inputs).detach()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return out
        except Unavailable:
            raise
        except Exception as exc:
            first_line = (str(exc).strip().splitlines() or [""])[0]
            # SDPA explains each refused kernel in a warning ("Flash attention does not support ...").
            why = list(dict.fromkeys((str(w.message).strip().splitlines() or [""])[0][:200] for w in caught))[:4]
            detail = f" [{'; '.join(why)}]" if why else ""
            hint = (
                " (no CPU kernel for this SDPA backend)"
                if device.type == "cpu" and provider.name in ("sdpa-efficient", "sdpa-cudnn")
                else ""
            )
            raise Unavailable(f"{type(exc).__name__}: {first_line}{hint}{detail}") from None
