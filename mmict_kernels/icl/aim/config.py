"""AIM's run configuration: one flat dataclass, read from YAML or ``--set key=value`` (``python -m mmict_kernels.aim``)."""

from __future__ import annotations

import dataclasses

from ..config import dataclass_from_dict

# The driver's spelling of the strategies AIM's own run knows (icl.sampling.STRATEGIES has them all).
SAMPLINGS = ("one-to-many", "random")
# What AIM's config called one-to-many before it took the driver's spelling; still read, as one-to-many.
LEGACY_ONE_TO_MANY = "one_to_many"
# backbone: "auto" is the checkpoint's own architecture, or the tiny LLaVA without a checkpoint.
BACKBONES = ("auto", "llava", "llava_next", "qwen2_vl", "qwen2_5_vl")


@dataclasses.dataclass
class AIMConfig:
    out: str = "runs/aim"
    seed: int = 0
    device: str = "auto"
    # backbone
    backbone: str = "auto"  # llava | llava_next | qwen2_vl | qwen2_5_vl (tiny, from the fields below) | auto
    checkpoint: str | None = None  # a local LLaVA / LLaVA-NeXT / Qwen2-VL / Qwen2.5-VL folder; else a tiny model
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    vision_hidden: int = 32
    image_size: int = 32  # LLaVA: input size; LLaVA-NeXT: tile size; Qwen2-VL: largest image side; shapes: drawn size
    patch_size: int = 8
    warmup_backbone_steps: int = 300  # tiny backbone only: fine-tune on the run's data, then freeze
    warmup_backbone_lr: float = 3e-3
    # data: "shapes" (embedded) or a JSONL file (docs/DRIVER.md format: image, frames or video, prompt, answer, task)
    train_data: str = "shapes"
    eval_data: str = "shapes"
    image_root: str | None = None  # image paths in the JSONL are relative to it (default: the file's folder)
    train_examples: int = 800  # shapes only (a JSONL file gives all its records)
    eval_examples: int = 200
    video_fps: float = 2.0  # the rate a JSONL record's "frames" were sampled at (Qwen2.5-VL's time positions)
    video_frames: int = 8  # frames sampled uniformly from a JSONL record's "video" file (its rate follows)
    tasks: tuple | None = None  # shapes: default (what_color, what_shape); JSONL: keep these tasks (default all)
    backbone_tasks: tuple = ("color", "shape")  # shapes warm-up's zero-shot questions
    # AIM
    shots: int = 2
    sampling: str = "one-to-many"  # or "random" (one demonstration set per query)
    group_size: int = 4
    layer: int = -1
    projection: str = "linear"
    bank_dir: str | None = None  # default: <out>/bank
    bank_max_bytes: int | None = None
    visual_cache_bytes: int = 1 << 28  # frozen visual tokens kept in memory (0: off); see AIMModel
    # optimisation (only the projection trains)
    steps: int = 150
    batch_queries: int = 16
    lr: float = 2e-3
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    backend: str = "auto"
    eval_shots: tuple = (0, 2)
    max_new_tokens: int | None = None  # generated at evaluation; default: the longest eval answer + eos

    @classmethod
    def from_dict(cls, values: dict) -> AIMConfig:
        cfg = dataclass_from_dict(cls, values, "AIM config")
        if cfg.sampling == LEGACY_ONE_TO_MANY:
            cfg.sampling = "one-to-many"
        if cfg.sampling not in SAMPLINGS:
            raise ValueError(f"sampling: expected 'one-to-many' or 'random', got {cfg.sampling!r}")
        if cfg.backbone not in BACKBONES:
            raise ValueError(f"backbone: expected one of {BACKBONES}, got {cfg.backbone!r}")
        if not cfg.video_fps > 0:
            raise ValueError(f"video_fps: expected a positive number of frames per second, got {cfg.video_fps}")
        if not isinstance(cfg.video_frames, int) or cfg.video_frames < 1:
            raise ValueError(f"video_frames: expected a positive int (frames per video file), got {cfg.video_frames!r}")
        if cfg.shots < 0 or cfg.group_size < 1 or cfg.batch_queries < 1:
            raise ValueError("shots >= 0, group_size >= 1 and batch_queries >= 1 are required")
        return cfg
