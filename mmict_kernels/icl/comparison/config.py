"""What a comparison runs: methods, sampling strategies, demonstration counts and the shared step budget."""

from __future__ import annotations

import dataclasses
import os

import yaml

from ..baselines import METHODS
from ..config import dataclass_from_dict

SAMPLINGS = ("random", "similar", "one-to-many")


@dataclasses.dataclass
class CompareConfig:
    run_config: str | None = None  # the driver's run config the methods share (None: its built-in tiny run)
    run_overrides: tuple = ()  # driver "section.key=value" overrides on top of it
    methods: tuple = METHODS
    samplings: tuple = SAMPLINGS
    train_demos: int = 2  # demonstrations per query in training (train_per_count: each count trains its own model)
    eval_demos: tuple = (0, 1, 2, 4, 8)
    train_per_count: bool = False
    steps: int = 150  # optimizer steps per trained model: the same budget for every method
    timing_steps: int = 4  # steps of the separate timing run (the first is a warm-up and not counted)
    eval_limit: int | None = None  # at most this many evaluation groups (None: the whole evaluation set)
    max_new_tokens: int = 4
    caption_bleu_n: int = 4  # BLEU-n of the caption task (the embedded captions are 2 words: BLEU-4 is 0 by definition there)
    device: str = "auto"
    threads: int | None = None  # torch CPU threads (None: torch's default); tiny models gain nothing from more
    output: str = "benchmarks/results/compare_shapes"  # <output>.json and <output>.csv; "" writes nothing

    @classmethod
    def from_dict(cls, values: dict) -> CompareConfig:
        cfg = dataclass_from_dict(cls, values, "compare config")
        bad = [m for m in cfg.methods if m not in METHODS]
        if bad or not cfg.methods:
            raise ValueError(f"methods: expected a non-empty subset of {METHODS}, got {list(cfg.methods)}")
        bad = [s for s in cfg.samplings if s not in SAMPLINGS]
        if bad or not cfg.samplings:
            raise ValueError(f"samplings: expected a non-empty subset of {SAMPLINGS}, got {list(cfg.samplings)}")
        if not cfg.eval_demos or any(not isinstance(k, int) or k < 0 for k in cfg.eval_demos):
            raise ValueError(f"eval_demos: expected non-negative integers, got {list(cfg.eval_demos)}")
        if cfg.train_demos < 0 or cfg.steps < 1 or cfg.timing_steps < 2:
            raise ValueError("train_demos >= 0, steps >= 1 and timing_steps >= 2 are required")
        if not 1 <= cfg.caption_bleu_n <= 4:
            raise ValueError(f"caption_bleu_n: expected 1 to 4, got {cfg.caption_bleu_n}")
        if cfg.threads is not None and cfg.threads < 1:
            raise ValueError(f"threads: expected >= 1 or null, got {cfg.threads}")
        return cfg


def load_compare_config(path: str | None, values: dict | None = None) -> CompareConfig:
    merged: dict = {}
    if path is not None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"compare config file not found: {path}")
        with open(path, encoding="utf-8") as f:
            merged = yaml.safe_load(f) or {}
        if not isinstance(merged, dict):
            raise ValueError(f"compare config {path}: expected a mapping at the top level")
    merged.update({k: v for k, v in (values or {}).items() if v is not None})
    return CompareConfig.from_dict(merged)
