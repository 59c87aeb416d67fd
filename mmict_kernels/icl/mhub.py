"""Building the M-Hub (an InstructBLIP Q-Former with its learned query tokens).

The default implementation is :class:`mmict_kernels.FusedMHub` (fused attention kernels, image
K/V cache). ``impl="transformers"`` keeps transformers' own ``InstructBlipQFormerModel`` behind
the same call signature, as a baseline to compare against. Both start from the same weights:
the hub is created as a transformers module (seeded, or loaded from a checkpoint) and copied.
"""

from __future__ import annotations

import glob
import json
import os

import torch
from torch import nn

# A tiny M-Hub for the embedded data (the official one: BERT-base, 12 layers, width 768).
TINY_MHUB = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "cross_attention_frequency": 1,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
    "max_position_embeddings": 64,
}


class TransformersMHub(nn.Module):
    """transformers' InstructBLIP Q-Former plus its query tokens, called like ``FusedMHub``."""

    def __init__(self, qformer: nn.Module, query_tokens: torch.Tensor):
        super().__init__()
        self.qformer = qformer
        self.query_tokens = nn.Parameter(query_tokens.detach().clone())
        self.config = qformer.config

    def forward(self, input_ids, attention_mask=None, query_embeds=None, encoder_hidden_states=None, encoder_attention_mask=None):
        if query_embeds is None:
            query_embeds = self.query_tokens.expand(input_ids.shape[0], -1, -1)
        return self.qformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            query_embeds=query_embeds,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
        )


def _load_instructblip_qformer(folder: str):
    """The Q-Former and query tokens of a local transformers InstructBLIP checkpoint folder."""
    from safetensors.torch import load_file
    from transformers import InstructBlipConfig, InstructBlipQFormerModel

    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"model.mhub_checkpoint: no config.json in {folder}")
    config = InstructBlipConfig.from_pretrained(folder)
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"model.mhub_checkpoint: no *.safetensors weights in {folder}")
    qformer_state, query_tokens = {}, None
    for path in files:
        for key, value in load_file(path).items():
            if key.startswith("qformer."):
                qformer_state[key[len("qformer.") :]] = value
            elif key == "query_tokens":
                query_tokens = value
    if query_tokens is None or not qformer_state:
        raise ValueError(f"model.mhub_checkpoint: {folder} holds no 'qformer.*' weights or no 'query_tokens'")
    qformer = InstructBlipQFormerModel(config.qformer_config)
    missing, unexpected = qformer.load_state_dict(qformer_state, strict=False)
    if missing or unexpected:
        raise ValueError(f"model.mhub_checkpoint {folder}: missing keys {missing[:8]}, unexpected keys {unexpected[:8]}")
    return qformer, query_tokens


def build_mhub(
    mhub_config: dict,
    checkpoint: str | None,
    num_query_tokens: int,
    vocab_size: int,
    encoder_width: int,
    seed: int = 0,
    impl: str = "fused",
    backend: str = "auto",
) -> nn.Module:
    from transformers import InstructBlipQFormerConfig, InstructBlipQFormerModel

    if checkpoint:
        if not os.path.isdir(checkpoint):
            raise FileNotFoundError(f"model.mhub_checkpoint: folder not found: {checkpoint}")
        qformer, query_tokens = _load_instructblip_qformer(checkpoint)
        if qformer.config.encoder_hidden_size != encoder_width:
            raise ValueError(
                f"model.mhub_checkpoint: the Q-Former expects image features of width {qformer.config.encoder_hidden_size}, "
                f"the image encoder gives {encoder_width}"
            )
    else:
        values = {**TINY_MHUB, **mhub_config, "vocab_size": vocab_size, "encoder_hidden_size": encoder_width, "pad_token_id": 0}
        config = InstructBlipQFormerConfig(**values)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            qformer = InstructBlipQFormerModel(config)
            query_tokens = torch.randn(1, num_query_tokens, config.hidden_size) * config.initializer_range
    qformer.train()
    if impl == "transformers":
        return TransformersMHub(qformer, query_tokens)
    if impl != "fused":
        raise ValueError(f"model.mhub_impl: expected 'fused' or 'transformers', got {impl!r}")
    from ..modules.mhub import FusedMHub

    return FusedMHub.from_hf(qformer, backend, query_tokens=query_tokens)


def describe(mhub: nn.Module) -> str:
    cfg = mhub.config
    return json.dumps(
        {k: getattr(cfg, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads") if hasattr(cfg, k)}
    )
