"""Shared helpers of the FusedMHub tests: small random-weight transformers Q-Formers and ragged inputs."""

from __future__ import annotations

import copy

import torch
from transformers import Blip2QFormerConfig, Blip2QFormerModel, InstructBlipQFormerConfig, InstructBlipQFormerModel

from helpers.oracle import assert_close_by_rule

HIDDEN, HEADS, ENCODER, INTERMEDIATE, VOCAB, MAX_POS = 64, 4, 48, 96, 120, 40


def small_config(flavor: str, *, layers: int = 3, freq: int = 2, dropout: float = 0.0, text: bool = False, **overrides):
    """A small Q-Former config (hidden 64, 4 heads, encoder width 48, FFN 96)."""
    kwargs = dict(
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        num_hidden_layers=layers,
        intermediate_size=INTERMEDIATE,
        cross_attention_frequency=freq,
        encoder_hidden_size=ENCODER,
        vocab_size=VOCAB,
        max_position_embeddings=MAX_POS,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    kwargs.update(overrides)
    if flavor == "blip2":
        return Blip2QFormerConfig(use_qformer_text_input=text, **kwargs)
    return InstructBlipQFormerConfig(**kwargs)


def make_hf(flavor: str, seed: int = 0, **config_kwargs):
    """A random-weight transformers Q-Former in eval mode (eager attention: the plainest path)."""
    torch.manual_seed(seed)
    config = small_config(flavor, **config_kwargs)
    config._attn_implementation = "eager"
    cls = Blip2QFormerModel if flavor == "blip2" else InstructBlipQFormerModel
    model = cls(config).eval()
    # Random LayerNorm affine parameters and biases too, so nothing is trivially 1 or 0.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name or "layernorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def image_mask_for(lengths, num_tokens: int, pattern: str = "mixed", seed: int = 0) -> torch.Tensor:
    """(B, Li) long mask with lengths[b] valid tokens; pattern "right", "left" or "mixed" (random places)."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for b, n in enumerate(lengths):
        row = torch.zeros(num_tokens, dtype=torch.long)
        kind = pattern if pattern != "mixed" else ("right", "left", "scatter")[b % 3]
        if kind == "right":
            row[:n] = 1
        elif kind == "left":
            row[num_tokens - n :] = 1
        else:
            row[torch.randperm(num_tokens, generator=gen)[:n]] = 1
        rows.append(row)
    return torch.stack(rows)


def make_inputs(flavor: str, *, batch=3, nq=6, image_tokens=11, image_lengths=None, text_lengths=None, max_text=None, seed=1):
    """Random inputs of the flavor's forward as a dict of keyword arguments.

    Text (InstructBLIP, or BLIP-2 with text) is right-padded to ``max_text`` with ragged lengths.
    """
    gen = torch.Generator().manual_seed(seed)
    inputs = {"query_embeds": torch.randn(batch, nq, HIDDEN, generator=gen)}
    inputs["encoder_hidden_states"] = torch.randn(batch, image_tokens, ENCODER, generator=gen)
    if image_lengths is not None:
        inputs["encoder_attention_mask"] = image_mask_for(image_lengths, image_tokens, seed=seed)
    if text_lengths is not None:
        max_text = max(text_lengths) if max_text is None else max_text
        lengths = torch.tensor(text_lengths)
        text_mask = (torch.arange(max_text)[None, :] < lengths[:, None]).long()
        inputs["attention_mask"] = torch.cat([torch.ones(batch, nq, dtype=torch.long), text_mask], dim=1)
        if flavor == "instructblip":
            inputs["input_ids"] = torch.randint(1, VOCAB, (batch, max_text), generator=gen)
        else:  # BLIP-2 with text takes the text as embeddings after the queries, plus query_length
            text = torch.randn(batch, max_text, HIDDEN, generator=gen)
            inputs["query_embeds"] = torch.cat([inputs["query_embeds"], text], dim=1)
            inputs["query_length"] = nq
    return inputs


def _float_inputs(inputs: dict, dtype) -> dict:
    out = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            v = v.detach().to(dtype).requires_grad_(True)
        out[k] = v
    return out


def run_with_grads(model, inputs: dict, dtype, dout: torch.Tensor, **extra):
    """last_hidden_state and the gradients of every float input and every parameter (by name)."""
    model = model.to(dtype)
    leaves = _float_inputs(inputs, dtype)
    model.zero_grad(set_to_none=True)
    out = model(**leaves, **extra).last_hidden_state
    out.backward(dout.to(dtype))
    grads = {f"input:{k}": v.grad for k, v in leaves.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}
    params = {name: (p.grad if p.grad is not None else torch.zeros_like(p)) for name, p in model.named_parameters()}
    if hasattr(model, "split_fused_names"):  # FusedMHub's fused Q/K/V weights, by transformers' names
        params = model.split_fused_names(params)
    grads.update(params)
    return out.detach(), grads


def valid_positions(inputs: dict, shape) -> torch.Tensor:
    """(B, L, 1) bool, False at the padded text positions of ``inputs`` (whose outputs FusedMHub sets to zero)."""
    mask = inputs.get("attention_mask")
    if mask is None:
        return torch.ones(shape[0], shape[1], 1, dtype=torch.bool)
    valid = mask != 0
    if valid.shape[1] < shape[1]:  # a (B, text) mask: the queries in front are always valid
        valid = torch.cat([torch.ones(shape[0], shape[1] - valid.shape[1], dtype=torch.bool), valid], dim=1)
    return valid[..., None]


def as_fused(ref: torch.Tensor, inputs: dict) -> torch.Tensor:
    """transformers' hidden states (B, L, hidden) as FusedMHub gives them: zeros at the padded text positions."""
    return ref * valid_positions(inputs, ref.shape)


def assert_zero_at_padding(out: torch.Tensor, valid: torch.Tensor) -> None:
    padded = out.masked_select(~valid.expand_as(out))
    assert padded.numel() == 0 or not padded.any(), "FusedMHub: padded text positions must be exactly zero"


def assert_matches_hf(hub, hf, inputs: dict, check_grads: bool = True, skip_params=("query_tokens",), dtype=torch.float32):
    """FusedMHub in ``dtype`` against transformers in float64 by the oracle rule of CONTRIBUTING.md (base: transformers in ``dtype``),
    outputs and gradients."""
    hf64, hf32, ours = copy.deepcopy(hf), copy.deepcopy(hf), copy.deepcopy(hub)
    with torch.no_grad():
        shape = hf32(**inputs).last_hidden_state.shape
    valid = valid_positions(inputs, shape)
    # A loss over the token positions only (as every objective's is): padded text slots are zeros in
    # FusedMHub and take no gradient; transformers computes them, but nothing reads them.
    dout = torch.randn(shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * valid
    ref64, g64 = run_with_grads(hf64, inputs, torch.float64, dout)
    ref32, g32 = run_with_grads(hf32, inputs, dtype, dout)
    out, g = run_with_grads(ours, inputs, dtype, dout)
    assert out.dtype == dtype
    assert_zero_at_padding(out, valid)
    assert_close_by_rule("last_hidden_state", out, ref64 * valid, ref32 * valid)
    if not check_grads:
        return
    for name, ref in g64.items():
        assert name in g, f"missing gradient {name}"
        assert_close_by_rule(f"grad {name}", g[name], ref, g32[name])
    extra = set(g) - set(g64) - {n for n in g if n in skip_params}
    assert not extra, f"FusedMHub has parameters transformers lacks: {sorted(extra)}"
