"""MSR-VTT captions in the official layout: ``train_val_videodatainfo.json`` / ``test_videodatainfo.json``.

``{"videos": [{"video_id": "video0", "split": "train", ...}], "sentences": [{"video_id": "video0",
"caption": "..."}]}``; the videos of the configured ``split`` (train | validate | test) are read,
each from ``{video_id}.mp4`` in ``media``, with ``data.num_frames`` frames sampled uniformly. The
id written with the predictions is the ``video_id``.

Config: ``{format: msrvtt, annotations: FILE, media: DIR, split: train|validate|test}``.
"""

from __future__ import annotations

import os

from . import media as media_mod
from .common import VIDEO_CAPTION_PROMPT, LoadContext, build_dataset, caption_entries, expect, field, read_json


def load(spec: dict, ctx: LoadContext):
    path, root, split = spec["annotations"], spec["media"], spec["split"]
    data = read_json(path, "MSR-VTT annotations")
    expect(isinstance(data, dict) and isinstance(data.get("videos"), list) and isinstance(data.get("sentences"), list), path,
           "expected a JSON object with 'videos' and 'sentences' lists (train_val_videodatainfo.json / test_videodatainfo.json)")  # fmt: skip
    videos = {}
    for i, v in enumerate(data["videos"]):
        where = f"{path}, videos[{i}]"
        vid = field(v, "video_id", str, where)
        if field(v, "split", str, where) == split:
            videos[vid] = where
    expect(bool(videos), path, f"no video has split {split!r}")
    captions: dict[str, list[str]] = {vid: [] for vid in videos}
    for i, s in enumerate(data["sentences"]):
        where = f"{path}, sentences[{i}]"
        vid = field(s, "video_id", str, where)
        if vid in captions:
            captions[vid].append(field(s, "caption", str, where))
    items = []
    for vid, where in videos.items():
        expect(bool(captions[vid]), where, f"video {vid!r} has no sentence")
        clip = media_mod.video(os.path.join(root, f"{vid}.mp4"), ctx.num_frames, ctx.image_size, f"{where} ({vid})")
        items.append((clip, captions[vid], vid))
    entries = caption_entries(items, ctx.role, spec.get("prompt", VIDEO_CAPTION_PROMPT))
    name = f"{os.path.basename(path)}:{split}"
    return build_dataset(entries, ctx, spec.get("task", "msrvtt_caption"), "caption", name, spec.get("limit"))
