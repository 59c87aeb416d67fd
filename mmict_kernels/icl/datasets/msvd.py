"""MSVD captions in LAVIS's layout: a JSON list of ``{"video": "-4wsuPCjDBc_5_15.avi", "caption": ...}``.

``caption`` is one string (training files: one entry per caption) or a list (evaluation files);
``video`` is relative to ``media`` and decoded with PyAV (``data.num_frames`` frames sampled
uniformly). The id written with the predictions is the entry's ``image_id`` or ``video_id`` when it
has one, else the video's file name without its extension.

Config: ``{format: msvd, annotations: FILE, media: DIR}``.
"""

from __future__ import annotations

import os

from . import media as media_mod
from .common import VIDEO_CAPTION_PROMPT, LoadContext, build_dataset, caption_entries, captions_of, field, read_json


def load(spec: dict, ctx: LoadContext):
    path, root = spec["annotations"], spec["media"]
    data = read_json(path, "MSVD annotations")
    if not isinstance(data, list):
        raise ValueError(
            f"MSVD annotations file {path}: expected a JSON list of {{'video', 'caption'}} entries, got {type(data).__name__}"
        )
    items = []
    for i, entry in enumerate(data):
        where = f"{path}, entry {i}"
        name = field(entry, "video", str, where)
        captions = captions_of(field(entry, "caption", (str, list), where), where)
        vid = entry.get("image_id", entry.get("video_id", os.path.splitext(os.path.basename(name))[0]))
        items.append((media_mod.video(os.path.join(root, name), ctx.num_frames, ctx.image_size, where), captions, vid))
    entries = caption_entries(items, ctx.role, spec.get("prompt", VIDEO_CAPTION_PROMPT))
    return build_dataset(entries, ctx, spec.get("task", "msvd_caption"), "caption", os.path.basename(path), spec.get("limit"))
