"""The driver's own format: a JSONL file, one example per line (docs/DRIVER.md)::

    {"image": "imgs/0001.jpg", "prompt": "Question: what is on the table? Short answer:", "answer": "a cup"}
    {"frames": ["v/1/000.jpg", "v/1/008.jpg"], "prompt": "A short video caption:", "answer": "a man is cooking"}
    {"video": "v/2.mp4", "prompt": "A short video caption:", "answer": "a dog runs"}

A ``video`` file is decoded with PyAV: ``data.num_frames`` frames sampled uniformly over it.

Optional keys: ``answers`` (every reference), ``task`` (demonstrations come from the query's own
task), ``label`` (a class, for same-class sampling), ``kind`` ("caption" or "vqa"; without it the
task name decides, with a warning), ``image_id`` / ``question_id`` (written with the predictions;
default: the image path and the line number). Any other key is refused with its line: a typo
(``answer`` for ``answers``) must not silently change what is scored.
"""

from __future__ import annotations

import json
import logging
import os

from ..data import task_kind
from . import media as media_mod
from .common import Entry, LoadContext, build_dataset

log = logging.getLogger(__name__)

MEDIA_KEYS = ("image", "frames", "video")  # exactly one per record
KEYS = ("image", "frames", "video", "prompt", "answer", "answers", "task", "label", "kind", "image_id", "question_id")


def media_of(rec: dict) -> tuple[str, list]:
    """(which of MEDIA_KEYS a checked record has, its paths: the frames, or the one image or video file)."""
    key = next(k for k in MEDIA_KEYS if k in rec)
    return key, rec[key] if key == "frames" else [rec[key]]


def read_jsonl(path: str) -> list[tuple[int, dict]]:
    """(line number, record) of every non-empty line; errors name the file and the line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path}")
    out = []
    with open(path, encoding="utf-8") as f:
        try:
            lines = f.readlines()
        except UnicodeDecodeError as exc:
            raise ValueError(f"data file {path} is not UTF-8 text ({exc.reason})") from exc
    for lineno, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        where = f"data file {path}, line {lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not valid JSON ({exc.msg})") from exc
        if not isinstance(rec, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        unknown = sorted(set(rec) - set(KEYS))
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown}; expected some of {list(KEYS)}")
        if sum(k in rec for k in MEDIA_KEYS) != 1:
            raise ValueError(f"{where}: expected exactly one of 'image', 'frames' or 'video'")
        for key in ("prompt", "answer"):
            if not isinstance(rec.get(key), str):
                raise ValueError(f"{where}: expected a string {key!r}")
        media, frames = media_of(rec)
        if not isinstance(frames, list) or not frames or not all(isinstance(p, str) for p in frames):
            raise ValueError(f"{where}: {media} must be a path or a non-empty list of paths")
        answers = rec.get("answers", [rec["answer"]])
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            raise ValueError(f"{where}: 'answers' must be a non-empty list of strings")
        out.append((lineno, rec))
    if not out:
        raise ValueError(f"data file {path} has no examples")
    return out


def load(path: str, ctx: LoadContext):
    records = read_jsonl(path)
    root = ctx.image_root or os.path.dirname(os.path.abspath(path))
    entries, guessed = [], {}
    for lineno, rec in records:
        where = f"{path}, line {lineno}"
        media, paths = media_of(rec)
        full = [p if os.path.isabs(p) else os.path.join(root, p) for p in paths]
        if media == "frames":
            shown = media_mod.frames(full, ctx.image_size, where)
        elif media == "video":
            shown = media_mod.video(full[0], ctx.num_frames, ctx.image_size, where)
        else:
            shown = media_mod.image(full[0], ctx.image_size, where)
        task = str(rec.get("task", "default"))
        kind = task_kind(task, rec.get("kind"), where=f"data file {path}, line {lineno}: 'kind'")
        if rec.get("kind") is None:
            guessed.setdefault(task, kind)
        image_id = rec.get("image_id", paths[0] if len(paths) == 1 else "|".join(paths))
        answers = tuple(rec.get("answers", [rec["answer"]]))
        entries.append(
            Entry(
                shown,
                rec["prompt"],
                rec["answer"],
                answers,
                image_id,
                rec.get("question_id", lineno),
                rec.get("label"),
                task,
                kind,
            )
        )
    for task, kind in guessed.items():
        log.warning(
            "data file %s: task %r has no 'kind'; treated as %r from its name (set \"kind\": \"caption\" or \"vqa\" to choose)",
            path, task, kind,
        )  # fmt: skip
    return build_dataset(entries, ctx, "default", None, os.path.basename(path))
