"""The Q/K/V projections of one Q-Former attention block, stored fused, saved and loaded under transformers' names.

transformers keeps three ``nn.Linear`` (``query``, ``key``, ``value``) per attention block. Here:

- self-attention: one ``qkv`` linear, weight (3 * A, hidden) = [Wq; Wk; Wv], bias (3 * A,);
- cross-attention: ``query`` (hidden -> A, it reads the queries) and one ``kv`` linear, weight
  (2 * A, encoder width) = [Wk; Wv], bias (2 * A,) (they read the image tokens).

One GEMM computes q, k and v (views into its output), and there is no per-step concatenation or
extra copy of the weights: autograd saves the parameter itself, and ``dW`` is one GEMM written into
one gradient.

The fused storage is an implementation detail that no checkpoint sees: ``state_dict()`` splits it
back into transformers' keys (``...attention.query.weight``, ``...attention.key.bias``, ...) as fresh
tensors (so safetensors, which refuses tensors sharing storage, saves them), and ``load_state_dict``
accepts those keys (transformers' and LAVIS-renamed checkpoints, our own state dicts) as well as the
fused ones. :func:`split_fused` does the same split for any ``{name: tensor}`` mapping, e.g. the
parameters' gradients by transformers' names.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

# Fused attribute -> the transformers linears it holds, in row order.
FUSED_PARTS = {"qkv": ("query", "key", "value"), "kv": ("key", "value")}


class QFormerProjections(nn.Module):
    """``query``/``key``/``value`` of one attention block; keys and values may read the image width.

    Args:
        hidden_size: width of the queries (and of the text / keys in self-attention).
        kv_input_size: width the keys and values read (``encoder_hidden_size`` in cross-attention).
        all_head_size: heads x head dim (A).
        is_cross_attention: True: ``query`` + fused ``kv``; False: fused ``qkv`` (kv_input_size must be hidden_size).
    """

    def __init__(self, hidden_size: int, kv_input_size: int, all_head_size: int, is_cross_attention: bool):
        super().__init__()
        self.all_head_size = all_head_size
        self.is_cross_attention = is_cross_attention
        if is_cross_attention:
            self.query = nn.Linear(hidden_size, all_head_size)
            self.kv = nn.Linear(kv_input_size, 2 * all_head_size)
        else:
            if kv_input_size != hidden_size:
                raise ValueError(f"kv_input_size: self-attention reads the hidden states ({hidden_size}), got {kv_input_size}")
            self.qkv = nn.Linear(hidden_size, 3 * all_head_size)
        self._register_state_dict_hook(_split_on_save)
        self._register_load_state_dict_pre_hook(_fuse_on_load, with_module=True)

    @property
    def fused_name(self) -> str:
        return "kv" if self.is_cross_attention else "qkv"

    def extra_repr(self) -> str:
        parts = ", ".join(FUSED_PARTS[self.fused_name])
        return f"{self.fused_name} = [{parts}] in one weight (state dicts use transformers' per-projection keys)"


def _split_on_save(module: QFormerProjections, state_dict, prefix: str, local_metadata) -> None:
    """``{prefix}qkv.weight`` -> ``{prefix}query.weight``, ``key.weight``, ``value.weight`` (and the biases)."""
    fused = module.fused_name
    for kind in ("weight", "bias"):
        key = f"{prefix}{fused}.{kind}"
        if key not in state_dict:
            continue
        tensor = state_dict.pop(key)
        parts = tensor.split(module.all_head_size, dim=0)
        for name, part in zip(FUSED_PARTS[fused], parts):
            # keep_vars=True hands out the parameter itself: then views; else fresh tensors that
            # share no storage (safetensors refuses shared storage; a state dict is a snapshot).
            state_dict[f"{prefix}{name}.{kind}"] = part if isinstance(tensor, nn.Parameter) else part.clone()


def _fuse_on_load(module: QFormerProjections, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
    """transformers' per-projection keys -> the fused key, when all parts of a weight (or bias) are given.

    A state dict that already holds the fused key loads as is; one that holds only some of the parts
    is left alone, so the load reports the fused key missing and the stray parts unexpected.
    """
    fused = module.fused_name
    for kind in ("weight", "bias"):
        names = [f"{prefix}{name}.{kind}" for name in FUSED_PARTS[fused]]
        if f"{prefix}{fused}.{kind}" in state_dict or not all(n in state_dict for n in names):
            continue
        parts = [state_dict[n] for n in names]
        expected = module.all_head_size
        bad = [(n, tuple(p.shape)) for n, p in zip(names, parts) if p.dim() < 1 or p.shape[0] != expected]
        if bad:
            errors.append(f"{bad[0][0]}: expected {expected} rows (one projection of {fused}), got shape {bad[0][1]}")
            continue
        if kind == "weight" and len({tuple(p.shape[1:]) for p in parts}) != 1:
            shapes = {n: tuple(p.shape) for n, p in zip(names, parts)}
            errors.append(f"{prefix}{fused}: its projections disagree in input width: {shapes}")
            continue
        for n in names:
            del state_dict[n]
        state_dict[f"{prefix}{fused}.{kind}"] = torch.cat([p.detach() for p in parts], dim=0)


def split_fused(named: Mapping[str, torch.Tensor | None], all_head_size: int) -> dict[str, torch.Tensor | None]:
    """A ``{name: tensor}`` mapping with every fused ``*.qkv.*`` / ``*.kv.*`` entry split into transformers' names.

    E.g. ``{n: p.grad for n, p in hub.named_parameters()}`` -> gradients keyed as transformers keys its
    parameters. The parts are views of the fused tensor (None stays None). Other entries pass through.
    """
    out: dict[str, torch.Tensor | None] = {}
    for name, tensor in named.items():
        head, _, kind = name.rpartition(".")
        prefix, _, attr = head.rpartition(".")
        if attr in FUSED_PARTS and kind in ("weight", "bias") and prefix.endswith("attention"):
            parts = [None] * len(FUSED_PARTS[attr]) if tensor is None else tensor.split(all_head_size, dim=0)
            for part_name, part in zip(FUSED_PARTS[attr], parts):
                out[f"{prefix}.{part_name}.{kind}"] = part
        else:
            out[name] = tensor
    return out


__all__ = ["QFormerProjections", "split_fused", "FUSED_PARTS"]
