"""The embedded data (``icl/shapes.py``: drawn coloured shapes) as a data set, features in memory.

Scored by exact match (its answers are single words or a two-word caption), whatever the kind.
"""

from __future__ import annotations

from .. import shapes as shapes_mod
from ..data import Example, ICLDataset, task_kind
from ..vision import encode_pixels, pixels_from_uint8


def shapes_dataset(num: int, tasks, seed: int, encoder, family: str, image_size: int, name: str) -> ICLDataset:
    records, images = shapes_mod.make_shapes(num, tasks=tuple(tasks), seed=seed, image_size=image_size)
    feats = encode_pixels(encoder, pixels_from_uint8(images, family))
    features = {f"{name}/{i}": feats[i] for i in range(num)}
    examples = [
        Example(
            (f"{name}/{r['image']}",),
            r["prompt"],
            r["answer"],
            (r["answer"],),
            r["task"],
            r["label"],
            task_kind(r["task"]),
            image_id=r["image"],
            question_id=r["image"],
            metric="exact_match",
        )
        for r in records
    ]
    return ICLDataset(examples, features, name)
