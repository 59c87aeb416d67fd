"""COCO captions in the Karpathy split, as LAVIS/BLIP ship it (``coco_karpathy_{train,val,test}.json``).

A JSON list; train: one entry per caption ``{"image": "val2014/COCO_val2014_000000522418.jpg",
"caption": "...", "image_id": "coco_522418"}``; val/test: one entry per image with ``caption`` a
list. ``image`` is relative to ``media``. The image id written with the predictions is the number
in the file name (522418), as LAVIS's evaluation and the COCO caption ground truth use it; a
file name without one keeps the entry's ``image_id`` (or, lacking that, the image path).

Config: ``{format: coco_karpathy, annotations: FILE, media: DIR}``.
"""

from __future__ import annotations

import os
import re

from . import media as media_mod
from .common import CAPTION_PROMPT, LoadContext, build_dataset, caption_entries, captions_of, field, read_json

_NUMBER = re.compile(r"(\d+)\.[A-Za-z0-9]+$")


def image_id_of(path: str, entry: dict):
    m = _NUMBER.search(os.path.basename(path))
    if m:
        return int(m.group(1))
    return entry.get("image_id", path)


def load(spec: dict, ctx: LoadContext):
    path, root = spec["annotations"], spec["media"]
    data = read_json(path, "COCO Karpathy annotations")
    if not isinstance(data, list):
        raise ValueError(f"COCO Karpathy annotations file {path}: expected a JSON list of entries, got {type(data).__name__}")
    items = []
    for i, entry in enumerate(data):
        where = f"{path}, entry {i}"
        image = field(entry, "image", str, where)
        captions = captions_of(field(entry, "caption", (str, list), where), where)
        items.append((media_mod.image(os.path.join(root, image), ctx.image_size, where), captions, image_id_of(image, entry)))
    entries = caption_entries(items, ctx.role, spec.get("prompt", CAPTION_PROMPT))
    return build_dataset(entries, ctx, spec.get("task", "coco_caption"), "caption", os.path.basename(path), spec.get("limit"))
