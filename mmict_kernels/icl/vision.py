"""The frozen image encoder: a transformers vision model built from a config or a local checkpoint.

It runs once per image (features are cached, see ``features.FeatureStore``), so training never
pays for it. We keep the encoder's last hidden states BEFORE any final LayerNorm: the model's
trainable ``ln_vision`` (as in BLIP-2/MMICT) is applied on top, initialised from the encoder's
own final norm when it has one.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:  # (the config imports the data readers, which import this module)
    from .config import ModelConfig

_FAMILIES = {
    "blip2": ("Blip2VisionConfig", "Blip2VisionModel"),
    "clip": ("CLIPVisionConfig", "CLIPVisionModel"),
    "siglip": ("SiglipVisionConfig", "SiglipVisionModel"),
}
# Pixel normalisation of each family's pre-processing (BLIP-2 uses the OpenAI CLIP statistics).
_PIXEL_STATS = {
    "blip2": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
# A tiny encoder for the embedded data: 32 px images, 8 px patches -> 16 patch tokens (+ CLS).
# initializer_range: BLIP-2's config default (1e-10, meant for loading weights) would make random
# features ~1e-9, which the LayerNorm after the encoder turns into noise; 0.2 keeps the image in them.
TINY_VISION = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "patch_size": 8,
    "initializer_range": 0.2,
}


def build_vision_encoder(cfg: ModelConfig, seed: int = 0) -> torch.nn.Module:
    import transformers

    config_name, model_name = _FAMILIES[cfg.vision_family]
    model_cls = getattr(transformers, model_name)
    if cfg.vision_checkpoint:
        if not os.path.isdir(cfg.vision_checkpoint):
            raise FileNotFoundError(f"model.vision_checkpoint: folder not found: {cfg.vision_checkpoint}")
        encoder = _vision_tower_of_full_model(cfg.vision_checkpoint, config_name, model_cls)
        if encoder is None:
            encoder = model_cls.from_pretrained(cfg.vision_checkpoint)
    else:
        values = {**TINY_VISION, **cfg.vision_config, "image_size": cfg.image_size}
        with torch.random.fork_rng(devices=[]):  # random weights, the same in every process and run
            torch.manual_seed(seed)
            encoder = model_cls(getattr(transformers, config_name)(**values))
    encoder.eval().requires_grad_(False)
    return encoder


def _vision_tower_of_full_model(folder: str, config_name: str, model_cls):
    """The vision tower of a whole BLIP-2 / InstructBLIP checkpoint folder (its ``vision_model.*``), else None.

    Lets one InstructBLIP folder serve as both ``vision_checkpoint`` and ``mhub_checkpoint``.
    """
    import glob

    import transformers
    from safetensors.torch import load_file

    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("model_type") not in ("blip-2", "instructblip") or "vision_config" not in meta:
        return None
    vision_config = {k: v for k, v in meta["vision_config"].items() if k not in ("model_type", "architectures")}
    encoder = model_cls(getattr(transformers, config_name)(**vision_config))
    state = {}
    for file in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        state.update({k[len("vision_model.") :]: v for k, v in load_file(file).items() if k.startswith("vision_model.")})
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if missing or unexpected or not state:
        raise ValueError(
            f"model.vision_checkpoint {folder}: vision_model.* weights do not fit: missing {missing[:8]}, unexpected {unexpected[:8]}"
        )
    return encoder


def vision_width(encoder: torch.nn.Module) -> int:
    return int(encoder.config.hidden_size)


def final_norm(encoder: torch.nn.Module) -> torch.nn.LayerNorm | None:
    """The encoder's norm over all output tokens, if any (BLIP-2's ``post_layernorm`` is LAVIS's ``ln_vision``)."""
    norm = getattr(encoder, "post_layernorm", None)
    blip = encoder.__class__.__name__.startswith(("Blip2", "InstructBlip"))
    return norm if isinstance(norm, torch.nn.LayerNorm) and blip else None


def pixels_from_uint8(images: np.ndarray, family: str) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 normalised the way the family expects."""
    mean, std = _PIXEL_STATS[family]
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255).permute(0, 3, 1, 2)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@torch.no_grad()
def encode_pixels(encoder: torch.nn.Module, pixels: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """(N, 3, H, W) -> (N, tokens, width) float32: the last encoder layer, before any final norm."""
    device = next(encoder.parameters()).device
    out = []
    for start in range(0, pixels.shape[0], batch_size):
        chunk = pixels[start : start + batch_size].to(device)
        hidden = encoder(pixel_values=chunk, output_hidden_states=True).hidden_states[-1]
        out.append(hidden.float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def fingerprint(encoder: torch.nn.Module) -> str:
    """Identifies a frozen model's weights cheaply: config, parameter shapes, leading and trailing values."""
    h = hashlib.sha256(json.dumps(encoder.config.to_dict(), sort_keys=True, default=str).encode())
    for name, p in sorted(encoder.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        flat = p.detach().flatten()
        h.update(flat[:64].float().cpu().numpy().tobytes())
        h.update(flat[-64:].float().cpu().numpy().tobytes())  # rows appended later (new tokens) too
    return h.hexdigest()[:16]
