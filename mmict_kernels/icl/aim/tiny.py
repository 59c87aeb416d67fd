"""Tiny random-weight multimodal LLMs for each backbone family, built from configs (no download).

They keep the real models' layouts at a small width: LLaVA's CLIP tower + projector in front of a
Llama; LLaVA-NeXT's any-resolution tiling (tiles of the tower's input size, grid pinpoints up to
2 x 2 tiles, CLS dropped, a newline token per row); Qwen2-VL's patch embedding with temporal
patches of 2 frames, 2 x 2 patch merging and 3-D M-RoPE (sections in the real 1:1.5:1.5 ratio);
Qwen2.5-VL's windowed vision attention. Used by the CLI's default run, the tests and the
efficiency benchmark.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl")
# Token ids each family adds after the text vocabulary (image placeholder; Qwen's video and wrappers).
EXTRA_TOKENS = {"llava": 1, "llava_next": 1, "qwen2_vl": 4, "qwen2_5_vl": 4}


@dataclasses.dataclass
class TinyShape:
    """Widths of a tiny backbone. The LLM's head dim is hidden / heads."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    vision_hidden: int = 32
    vision_layers: int = 2
    image_size: int = 32  # LLaVA: the input size; LLaVA-NeXT: a tile's size; Qwen2-VL: largest image side
    patch_size: int = 8
    intermediate_size: int | None = None  # default 2 x hidden
    max_positions: int = 4096
    initializer_range: float = 0.02


def mrope_section(head_dim: int) -> list[int]:
    """M-RoPE's (time, height, width) split of the head dim's rotary pairs, as Qwen2-VL's [16, 24, 24] of 64."""
    pairs = head_dim // 2
    time = pairs // 4
    height = (pairs - time) // 2
    return [time, height, pairs - time - height]


def tiny_model(family: str, vocab_size: int, shape: TinyShape | None = None, seed: int = 0) -> nn.Module:
    """A random-weight ``family`` model over ``vocab_size`` text tokens (+ its extra special tokens).

    Special ids sit right after the text vocabulary: LLaVA's image placeholder at ``vocab_size``;
    Qwen's image, video, vision start and vision end at ``vocab_size`` .. ``vocab_size + 3``.
    """
    if family not in FAMILIES:
        raise ValueError(f"backbone: expected one of {FAMILIES}, got {family!r}")
    import transformers

    s = shape or TinyShape()
    total = vocab_size + EXTRA_TOKENS[family]
    text = dict(
        hidden_size=s.hidden_size,
        intermediate_size=s.intermediate_size or 2 * s.hidden_size,
        num_hidden_layers=s.num_layers,
        num_attention_heads=s.num_heads,
        num_key_value_heads=s.num_kv_heads,
        vocab_size=total,
        max_position_embeddings=s.max_positions,
        initializer_range=s.initializer_range,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )
    if family in ("llava", "llava_next"):
        vision = transformers.CLIPVisionConfig(
            hidden_size=s.vision_hidden,
            intermediate_size=2 * s.vision_hidden,
            num_hidden_layers=s.vision_layers,
            num_attention_heads=4,
            image_size=s.image_size,
            patch_size=s.patch_size,
            initializer_range=s.initializer_range,
        )
        llm = transformers.LlamaConfig(**text)
        if family == "llava":
            config = transformers.LlavaConfig(
                vision_config=vision,
                text_config=llm,
                image_token_id=vocab_size,
                vision_feature_layer=-1,
                vision_feature_select_strategy="full",
            )
            model_cls = transformers.LlavaForConditionalGeneration
        else:
            t = s.image_size
            config = transformers.LlavaNextConfig(
                vision_config=vision,
                text_config=llm,
                image_token_id=vocab_size,
                image_grid_pinpoints=[[t, 2 * t], [2 * t, t], [2 * t, 2 * t]],  # as LLaVA-NeXT's 336 -> 672
                vision_feature_layer=-1,
                vision_feature_select_strategy="default",
            )
            model_cls = transformers.LlavaNextForConditionalGeneration
    else:
        head_dim = s.hidden_size // s.num_heads
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_section(head_dim)}
        ids = dict(
            image_token_id=vocab_size,
            video_token_id=vocab_size + 1,
            vision_start_token_id=vocab_size + 2,
            vision_end_token_id=vocab_size + 3,
        )
        if family == "qwen2_vl":
            vision = dict(
                depth=s.vision_layers,
                embed_dim=s.vision_hidden,
                hidden_size=s.hidden_size,
                num_heads=4,
                mlp_ratio=2,
                patch_size=s.patch_size,
                spatial_merge_size=2,
                temporal_patch_size=2,
                initializer_range=s.initializer_range,
            )
            config = transformers.Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
            model_cls = transformers.Qwen2VLForConditionalGeneration
        else:
            vision = dict(
                depth=s.vision_layers,
                hidden_size=s.vision_hidden,
                intermediate_size=2 * s.vision_hidden,
                out_hidden_size=s.hidden_size,
                num_heads=4,
                patch_size=s.patch_size,
                spatial_merge_size=2,
                temporal_patch_size=2,
                window_size=4 * 2 * s.patch_size,  # 4 x 4 merged tokens per window, as 112 px of 14 px patches
                fullatt_block_indexes=[s.vision_layers - 1],
                tokens_per_second=2,
                initializer_range=s.initializer_range,
            )
            config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
            model_cls = transformers.Qwen2_5_VLForConditionalGeneration
    with torch.random.fork_rng(devices=[]):  # the same weights in every process and run
        torch.manual_seed(seed)
        return model_cls(config).eval()
