"""AIM's data: images as pixel tensors, prompts and answers as token ids, and the batches of one step.

Two sources: the embedded shapes data (``shapes``) or a JSONL file of ``image``, ``prompt``,
``answer`` (and optional ``task``) records. A batch is groups of same-task queries that share
their demonstrations (one-to-many), or groups of one query (random); demonstrations are drawn from
the pool's same task and, in training, never from the group's own queries.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import torch

from .. import shapes as shapes_mod
from ..data import load_image, read_jsonl
from ..tokenizer import build_word_tokenizer
from .config import AIMConfig
from .model import AIMBatch

PIXEL_MEAN, PIXEL_STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


@dataclasses.dataclass
class AIMData:
    pixels: torch.Tensor  # (N, 3, S, S)
    tasks: list[str]
    prompts: list[list[int]]
    answers: list[list[int]]
    answer_text: list[str]

    def __len__(self):
        return len(self.tasks)

    def by_task(self) -> dict[str, np.ndarray]:
        t = np.array(self.tasks)
        return {task: np.flatnonzero(t == task) for task in sorted(set(self.tasks))}


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


def _pixels(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div(255).permute(0, 3, 1, 2)
    return (x - torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1)) / torch.tensor(PIXEL_STD).view(1, 3, 1, 1)


def shapes_data(num: int, tasks, seed: int, image_size: int, tok) -> AIMData:
    records, images = shapes_mod.make_shapes(num, tuple(tasks), seed=seed, image_size=image_size)
    return AIMData(
        _pixels(images),
        [r["task"] for r in records],
        [encode(tok, r["prompt"]) for r in records],
        [encode(tok, r["answer"]) for r in records],
        [r["answer"] for r in records],
    )


def jsonl_data(path: str, image_root: str | None, image_size: int, tok) -> AIMData:
    """Own data: one JSON object per line with ``image``, ``prompt``, ``answer`` (optional ``task``)."""
    root = image_root or os.path.dirname(os.path.abspath(path))
    records = read_jsonl(path)
    images = []
    for lineno, r in records:
        if "frames" in r:
            raise ValueError(f"data file {path}, line {lineno}: AIM takes single images ('image'), not 'frames'")
        images.append(load_image(os.path.join(root, r["image"]), image_size, f"{path}, line {lineno}"))
    recs = [r for _, r in records]
    return AIMData(
        _pixels(np.stack(images)),
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
            cands = by_task_pool[task]
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
        demo_images=pool.pixels[distinct] if distinct else None,
        demo_text=[pool.prompts[d] + pool.answers[d] for d in distinct],
        group_demos=[[where[d] for d in g] for g in group_demos],
        query_images=queries.pixels[q_idx],
        query_group=torch.tensor(q_group, dtype=torch.long),
        query_prompt=[queries.prompts[q] for q in q_idx],
        query_answer=[queries.answers[q] for q in q_idx],
        query_ids=q_idx,
    )


def make_batch(queries, pool, query_idx, shots, group_size, rng, sampling: str, same_pool: bool) -> AIMBatch:
    gs = group_size if sampling == "one-to-many" else 1
    groups, demos = sample_groups(queries, pool, query_idx, shots, gs, rng, same_pool)
    return build_batch(queries, pool, groups, demos)
