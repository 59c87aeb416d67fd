"""Video question answering: MSRVTT-QA and MSVD-QA JSON lists of ``{"video" or "video_id", "question", "answer"}``.

The video is ``video`` (a file name relative to ``media``, LAVIS's layout) or found from
``video_id`` (the original releases): the first of ``{video_id}``, ``{video_id}.mp4``,
``video{video_id}.mp4`` (MSRVTT-QA), ``vid{video_id}.avi`` (MSVD-QA), ``{video_id}.avi`` that exists
in ``media``. The question id written with the predictions is the entry's ``question_id``, else its
``id``, else its position in the list. One answer per question: the VQA accuracy of one answer is
the match of the normalised answers.

Config: ``{format: videoqa, annotations: FILE, media: DIR}``.
"""

from __future__ import annotations

import os

from . import media as media_mod
from .common import VQA_PROMPT, Entry, LoadContext, build_dataset, field, read_json, vqa_prompt

VIDEO_NAMES = ("{}", "{}.mp4", "video{}.mp4", "vid{}.avi", "{}.avi")


def video_path(root: str, entry: dict, where: str) -> str:
    if "video" in entry:
        return os.path.join(root, field(entry, "video", str, where))
    vid = field(entry, "video_id", (str, int), where)
    candidates = [os.path.join(root, pattern.format(vid)) for pattern in VIDEO_NAMES]
    for c in candidates:
        if os.path.isfile(c):
            return c
    raise FileNotFoundError(f"video file not found for video_id {vid!r} (referenced by {where}); tried {candidates}")


def load(spec: dict, ctx: LoadContext):
    path, root = spec["annotations"], spec["media"]
    data = read_json(path, "video QA annotations")
    if not isinstance(data, list):
        raise ValueError(f"video QA annotations file {path}: expected a JSON list of questions, got {type(data).__name__}")
    entries, template = [], spec.get("prompt", VQA_PROMPT)
    for i, entry in enumerate(data):
        where = f"{path}, entry {i}"
        question = field(entry, "question", str, where)
        answer = field(entry, "answer", str, where)
        file = video_path(root, entry if isinstance(entry, dict) else {}, where)
        clip = media_mod.video(file, ctx.num_frames, ctx.image_size, where)
        vid = entry.get("video_id", os.path.splitext(os.path.basename(file))[0])
        qid = entry.get("question_id", entry.get("id", i))
        entries.append(Entry(clip, vqa_prompt(template, question, where), answer.strip(), (answer,), vid, qid))
    return build_dataset(entries, ctx, spec.get("task", "videoqa"), "vqa", os.path.basename(path), spec.get("limit"))
