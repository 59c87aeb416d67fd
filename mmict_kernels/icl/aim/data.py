"""AIM's data: images and videos in the backbone's format, prompts and answers as token ids, and one step's batches.

Two sources: the embedded shapes data (``shapes``) or a JSONL file in the driver's format
(docs/DRIVER.md): ``image`` (a path), ``frames`` (a video as a list of frame paths) or ``video`` (a
video file, decoded with PyAV: ``video_frames`` frames sampled uniformly over it), ``prompt``,
``answer``, optional ``task``. The frames' sampling rate (which Qwen2.5-VL's time positions use)
is the config's ``video_fps`` for ``frames``, one for the file, and for a ``video`` file its own:
the sampled frames over the video's duration. Every image and video goes through the backbone's own
preprocessing (:meth:`~mmict_kernels.icl.aim.backbones.Backbone.preprocess`): LLaVA-NeXT tiles
each image (a video's frames read as images); Qwen2-VL reads a video as a video.

A batch is groups of same-task queries that share their demonstrations (one-to-many), or groups
of one query (random); demonstrations are drawn from the pool's same task and, in training, never
from the group's own queries.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import torch

from .. import shapes as shapes_mod
from ..data import read_jsonl
from ..datasets.jsonl import media_of
from ..datasets.media import load_image, video_clip
from ..tokenizer import build_word_tokenizer
from .backbones import Backbone
from .config import AIMConfig
from .model import AIMBatch
from .visual import VisualInput

# What the embedded data asks when the config names no tasks: only demonstrations resolve "what is this ?".
SHAPES_TASKS = ("what_color", "what_shape")


@dataclasses.dataclass
class AIMData:
    visuals: list[VisualInput]  # one image or video per example, in the backbone's format
    tasks: list[str]
    prompts: list[list[int]]
    answers: list[list[int]]
    answer_text: list[str]

    def __len__(self):
        return len(self.tasks)

    def by_task(self) -> dict[str, np.ndarray]:
        t = np.array(self.tasks)
        return {task: np.flatnonzero(t == task) for task in sorted(set(self.tasks))}

    def to(self, device) -> AIMData:
        return dataclasses.replace(self, visuals=[v.to(device) for v in self.visuals])


def make_tokenizer(cfg: AIMConfig):
    """The checkpoint's own tokenizer, or a word tokenizer over the run's texts (tiny backbone)."""
    if cfg.checkpoint:
        from ..tokenizer import load_tokenizer

        return load_tokenizer(cfg.checkpoint)
    texts = list(shapes_mod.shapes_vocabulary())
    for path in {cfg.train_data, cfg.eval_data} - {"shapes"}:
        texts += [r["prompt"] + " " + r["answer"] for _, r in read_jsonl(path)]
    return build_word_tokenizer(texts)


def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def shapes_data(num: int, tasks, seed: int, image_size: int, tok, backbone: Backbone) -> AIMData:
    records, images = shapes_mod.make_shapes(num, tuple(tasks or SHAPES_TASKS), seed=seed, image_size=image_size)
    return AIMData(
        [backbone.preprocess([image]) for image in images],
        [r["task"] for r in records],
        [encode(tok, r["prompt"]) for r in records],
        [encode(tok, r["answer"]) for r in records],
        [r["answer"] for r in records],
    )


def jsonl_data(
    path: str, image_root: str | None, tok, backbone: Backbone, tasks=None, video_fps: float = 2.0, video_frames: int = 8
) -> AIMData:
    """Own data: one JSON object per line with ``image``, ``frames`` or ``video``, ``prompt``, ``answer`` (optional ``task``).

    ``tasks``: keep only these tasks' records (each must occur); None keeps every record.
    ``video_fps``: the rate the ``frames`` of a video were sampled at. ``video_frames``: the frames
    sampled from each ``video`` file (at the file's own size; their rate comes from the file).
    """
    root = image_root or os.path.dirname(os.path.abspath(path))
    records = read_jsonl(path)
    if tasks:
        present = {r.get("task", "default") for _, r in records}
        missing = [t for t in tasks if t not in present]
        if missing:
            raise ValueError(f"tasks: {missing} do not occur in {path} (its tasks: {sorted(present)})")
        records = [(n, r) for n, r in records if r.get("task", "default") in tasks]
    visuals = []
    for lineno, r in records:
        where = f"{path}, line {lineno}"
        media, paths = media_of(r)
        fps = video_fps
        if media == "video":
            frames, rate = video_clip(os.path.join(root, paths[0]), video_frames, where)  # at its own size
            fps = rate or video_fps
        else:
            frames = [load_image(os.path.join(root, p), None, where) for p in paths]  # each at its own size
        kind = "image" if media == "image" else "video"
        try:
            visuals.append(backbone.preprocess(frames, kind, fps=fps))
        except ValueError as exc:
            raise ValueError(f"data file {where}: {exc}") from exc
    recs = [r for _, r in records]
    return AIMData(
        visuals,
        [r.get("task", "default") for r in recs],
        [encode(tok, r["prompt"]) for r in recs],
        [encode(tok, r["answer"]) for r in recs],
        [r["answer"] for r in recs],
    )


def sample_groups(queries: AIMData, pool: AIMData, query_idx: list[int], shots: int, group_size: int, rng, same_pool: bool):
    """Groups of same-task queries and their demonstrations (from ``pool``, same task, never a query of the group)."""
    by_task_pool = pool.by_task()
    groups, demos = [], []
    by_task = {}
    for i in query_idx:
        by_task.setdefault(queries.tasks[i], []).append(i)
    for task, members in by_task.items():
        for start in range(0, len(members), group_size):
            group = members[start : start + group_size]
            cands = by_task_pool.get(task, np.zeros(0, dtype=np.int64))
            if same_pool:
                cands = cands[~np.isin(cands, group)]
            if len(cands) < shots:
                raise ValueError(f"only {len(cands)} demonstration candidates for task {task!r}, need shots={shots}")
            groups.append(group)
            demos.append([int(d) for d in rng.choice(cands, shots, replace=False)] if shots else [])
    return groups, demos


def build_batch(queries: AIMData, pool: AIMData, groups: list[list[int]], group_demos: list[list[int]]) -> AIMBatch:
    distinct = sorted({d for g in group_demos for d in g})
    where = {d: i for i, d in enumerate(distinct)}
    q_idx = [q for g in groups for q in g]
    q_group = [gi for gi, g in enumerate(groups) for _ in g]
    return AIMBatch(
        demo_images=[pool.visuals[d] for d in distinct] if distinct else None,
        demo_text=[pool.prompts[d] + pool.answers[d] for d in distinct],
        group_demos=[[where[d] for d in g] for g in group_demos],
        query_images=[queries.visuals[q] for q in q_idx],
        query_group=torch.tensor(q_group, dtype=torch.long),
        query_prompt=[queries.prompts[q] for q in q_idx],
        query_answer=[queries.answers[q] for q in q_idx],
        query_ids=q_idx,
    )


def make_batch(queries, pool, query_idx, shots, group_size, rng, sampling: str, same_pool: bool) -> AIMBatch:
    gs = group_size if sampling == "one-to-many" else 1
    groups, demos = sample_groups(queries, pool, query_idx, shots, gs, rng, same_pool)
    return build_batch(queries, pool, groups, demos)
