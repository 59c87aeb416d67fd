"""What every reader shares: the load context, annotation files, caption grouping, and the data set build.

A reader turns its annotation files into :class:`Entry` objects (the media, prompt, answers and
ids of one example) without touching the encoder; :func:`build_dataset` then extracts the
missing features (``features.extract``) and returns the :class:`ICLDataset`.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import torch

from ..data import Example, ICLDataset
from ..features import FeatureStore, extract
from ..vision import encode_pixels, pixels_from_uint8
from .media import Media

CAPTION_PROMPT = "A short image caption:"
VIDEO_CAPTION_PROMPT = "A short video caption:"
VQA_PROMPT = "Question: {question} Short answer:"


@dataclasses.dataclass
class LoadContext:
    """What turns media into features, and which split is read.

    role: "train" or "eval". A caption data set gives one training example per caption, and one
    evaluation example per image or video holding all its captions (the COCO evaluation's unit).
    rank, world: the share of the feature extraction this process does (see ``features.extract``).
    """

    encoder: torch.nn.Module
    family: str
    image_size: int
    store: FeatureStore
    role: str = "train"
    num_frames: int = 8
    batch_size: int = 64
    rank: int = 0
    world: int = 1
    progress: bool = True
    image_root: str | None = None  # JSONL only

    def encode(self, frames: np.ndarray) -> torch.Tensor:
        """(n, H, W, 3) uint8 -> (n, tokens, width) float32 from the frozen encoder."""
        return encode_pixels(self.encoder, pixels_from_uint8(frames, self.family), self.batch_size)


@dataclasses.dataclass
class Entry:
    """One example before its features exist."""

    media: Media
    prompt: str
    answer: str
    answers: tuple
    image_id: object = None
    question_id: object = None
    label: str | None = None
    task: str | None = None  # this entry's task and kind, where they differ per entry (JSONL)
    kind: str | None = None


def read_json(path: str, what: str):
    """A JSON file's content; errors name the file (and say what it should be)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except UnicodeDecodeError as exc:
        raise ValueError(f"{what} file {path} is not UTF-8 text ({exc.reason})") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} file {path}: not valid JSON ({exc.msg}, line {exc.lineno})") from exc


def expect(cond: bool, where: str, message: str) -> None:
    if not cond:
        raise ValueError(f"{where}: {message}")


def field(entry, key: str, types, where: str):
    """``entry[key]``, checked to exist and be of ``types``."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(entry).__name__}")
    if key not in entry:
        raise ValueError(f"{where}: missing {key!r} (has {sorted(entry)})")
    value = entry[key]
    if not isinstance(value, types) or isinstance(value, bool):
        names = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise ValueError(f"{where}: {key!r} must be {names}, got {value!r}")
    return value


def captions_of(value, where: str, key: str = "caption") -> list[str]:
    """A caption field: one string or a non-empty list of strings."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(c, str) for c in value):
        return list(value)
    raise ValueError(f"{where}: {key!r} must be a string or a non-empty list of strings, got {value!r}")


def caption_entries(items: list[tuple[Media, list[str], object]], role: str, prompt: str) -> list[Entry]:
    """Caption examples from (media, captions, image id) items, in first-seen order.

    Training: one example per caption (its target), the image's other captions as references.
    Evaluation: one example per image id with every caption of it (items of one id merged), so
    the predictions and the COCO caption metrics have one caption per image.
    """
    by_id: dict = {}
    for media, captions, image_id in items:
        key = (image_id, media.identity)
        if key in by_id:
            by_id[key][1].extend(captions)
        else:
            by_id[key] = (media, list(captions), image_id)
    out = []
    for media, captions, image_id in by_id.values():
        refs = tuple(c.strip() for c in captions)
        targets = refs if role == "train" else refs[:1]
        out += [Entry(media, prompt, t, refs, image_id=image_id) for t in targets]
    return out


def build_dataset(
    entries: list[Entry], ctx: LoadContext, task: str, kind: str, name: str, limit: int | None = None
) -> ICLDataset:
    """Extract the features the store lacks, then the data set of ``entries`` (at most ``limit``)."""
    if limit is not None:
        entries = entries[:limit]
    if not entries:
        raise ValueError(f"data set {name!r} has no examples")
    jobs = [job for e in entries for job in e.media.jobs]
    extract(ctx.store, jobs, ctx.encode, batch_size=ctx.batch_size, rank=ctx.rank, world=ctx.world, progress=ctx.progress)
    examples = [
        Example(
            e.media.keys,
            e.prompt,
            e.answer,
            tuple(e.answers) or (e.answer,),
            e.task or task,
            e.label,
            e.kind or kind,
            image_id=e.image_id,
            question_id=e.question_id,
            media=e.media.identity,
        )
        for e in entries
    ]
    return ICLDataset(examples, ctx.store, name)


def vqa_prompt(template: str, question: str, where: str) -> str:
    if "{question}" not in template:
        raise ValueError(f"{where}: a VQA prompt must hold '{{question}}', got {template!r}")
    return template.replace("{question}", question.strip())
