"""A Hugging Face ``datasets`` folder: saved with ``save_to_disk`` (read by ``load_from_disk``), or a
local folder ``load_dataset`` reads (parquet, JSON, CSV, ``imagefolder``...), with a column mapping.

Config::

    {format: hf, path: DIR, split: NAME, image: COLUMN, caption: COLUMN}                  # captioning
    {format: hf, path: DIR, split: NAME, image: COLUMN, question: COLUMN, answers: COLUMN}  # VQA

- ``image`` (an ``Image`` column, or file paths relative to ``media``) or ``video`` (file paths
  relative to ``media``, decoded with PyAV);
- captioning: ``caption`` (a string or a list of strings per row); VQA: ``question`` and
  ``answer`` (the training target) and/or ``answers`` (every human answer: strings, or
  ``{"answer": ...}`` records as in VQAv2);
- ``image_id`` / ``question_id``: the columns of the ids written with the predictions (default:
  the row number). Rows with the same ``image_id`` are the same image: evaluation gives it one
  example with every caption, and no query gets a demonstration of its own image;
- ``kind``: "caption" or "vqa" (default: from the columns given); ``split``: needed when the
  folder holds several splits.
"""

from __future__ import annotations

import functools
import hashlib
import os

from ..features import FeatureJob
from . import media as media_mod
from .common import (
    CAPTION_PROMPT,
    VIDEO_CAPTION_PROMPT,
    VQA_PROMPT,
    Entry,
    LoadContext,
    build_dataset,
    caption_entries,
    captions_of,
    vqa_prompt,
)
from .spec import hf_kind


def open_dataset(path: str, split: str | None, where: str):
    """The ``datasets.Dataset`` of ``split`` in the folder ``path``."""
    try:
        import datasets
    except ImportError as exc:
        raise ImportError(
            f"{where}: reading a Hugging Face data set needs the `datasets` package (pip install datasets)"
        ) from exc
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{where}.path: folder not found: {path}")
    saved = any(os.path.isfile(os.path.join(path, f)) for f in ("dataset_dict.json", "state.json"))
    try:
        ds = datasets.load_from_disk(path) if saved else datasets.load_dataset(path, split=split)
    except Exception as exc:
        raise ValueError(f"{where}.path: {path} cannot be read as a Hugging Face data set: {exc}") from exc
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"{where}.split: expected one of {sorted(ds)} (the splits in {path}), got {split!r}")
        ds = ds[split]
    return ds


def _column(ds, name: str | None, key: str, where: str) -> list | None:
    """Every value of a text or path column (never an image column: that would decode every image)."""
    if name is None:
        return None
    if name not in ds.column_names:
        raise ValueError(f"{where}.{key}: no column {name!r} in the data set (columns: {ds.column_names})")
    return list(ds[name])


def _is_path_column(ds, column: str) -> bool:
    from datasets import Value

    feature = ds.features[column]
    return isinstance(feature, Value) and feature.dtype in ("string", "large_string")


def _answers(value, where: str) -> list[str]:
    """An answers cell: strings, or ``{"answer": ...}`` records (VQAv2 on the Hub)."""
    if isinstance(value, list) and value and all(isinstance(a, dict) and isinstance(a.get("answer"), str) for a in value):
        return [a["answer"] for a in value]
    return captions_of(value, where, "answers")


def _row_image(ds, column: str, row: int, size: int, where: str):
    """(1, size, size, 3) uint8 from an ``Image`` cell (decoded now, in the extraction's reader threads)."""
    try:
        image = ds[row][column]
    except Exception as exc:
        raise ValueError(f"{where}: the image cannot be read: {exc}") from exc
    if not hasattr(image, "convert"):
        raise ValueError(f"{where}: expected an image in column {column!r}, got {type(image).__name__}")
    return media_mod.pil_to_uint8(image, size)[None]


def load(spec: dict, ctx: LoadContext):
    where = "data.hf"
    kind = hf_kind(spec, where)
    path = spec["path"]
    ds = open_dataset(path, spec.get("split"), where)
    limit = spec.get("limit")
    if limit is not None and kind == "vqa":  # caption rows are grouped by image first; cut after grouping
        ds = ds.select(range(min(limit, len(ds))))
    name = f"{os.path.basename(os.path.normpath(path))}:{spec.get('split', '')}"
    root = spec.get("media", "")
    image_ids = _column(ds, spec.get("image_id"), "image_id", where)
    column = spec.get("video") or spec["image"]
    paths = (
        _column(ds, column, "video" if "video" in spec else "image", where)
        if "video" in spec or _is_path_column(ds, column)
        else None
    )
    fingerprint = getattr(ds, "_fingerprint", None) or os.path.abspath(path)

    def media_of(row: int):
        row_where = f"{path} ({spec.get('split', '')}), row {row}"
        if paths is not None:
            file = os.path.join(root, paths[row])
            if "video" in spec:
                return media_mod.video(file, ctx.num_frames, ctx.image_size, row_where)
            return media_mod.image(file, ctx.image_size, row_where)
        key = hashlib.sha1(f"hf|{fingerprint}|{column}|{row}".encode()).hexdigest()
        job = FeatureJob((key,), functools.partial(_row_image, ds, column, row, ctx.image_size, row_where), row_where)
        identity = f"hf:{os.path.abspath(path)}:{image_ids[row]}" if image_ids is not None else key
        return media_mod.Media((key,), (job,), identity)

    n = len(ds)
    if kind == "caption":
        captions = _column(ds, spec["caption"], "caption", where)
        items = [
            (media_of(r), captions_of(captions[r], f"{path}, row {r}"), image_ids[r] if image_ids is not None else r)
            for r in range(n)
        ]
        prompt = spec.get("prompt", _caption_prompt(spec))
        entries = caption_entries(items, ctx.role, prompt)
        return build_dataset(entries, ctx, spec.get("task", "caption"), "caption", name, limit)
    questions = _column(ds, spec["question"], "question", where)
    answer = _column(ds, spec.get("answer"), "answer", where)
    answers = _column(ds, spec.get("answers"), "answers", where)
    qids = _column(ds, spec.get("question_id"), "question_id", where)
    template = spec.get("prompt", VQA_PROMPT)
    entries = []
    for r in range(n):
        row_where = f"{path}, row {r}"
        refs = _answers(answers[r], row_where) if answers is not None else []
        target = answer[r] if answer is not None else max(refs, key=refs.count)
        if not isinstance(target, str):
            raise ValueError(f"{row_where}: the answer must be a string, got {target!r}")
        if not isinstance(questions[r], str):
            raise ValueError(f"{row_where}: the question must be a string, got {questions[r]!r}")
        entries.append(
            Entry(
                media_of(r),
                vqa_prompt(template, questions[r], f"{where}.prompt"),
                target.strip(),
                tuple(refs) or (target,),
                image_ids[r] if image_ids is not None else r,
                qids[r] if qids is not None else r,
            )
        )
    return build_dataset(entries, ctx, spec.get("task", "vqa"), "vqa", name)


def _caption_prompt(spec: dict) -> str:
    return VIDEO_CAPTION_PROMPT if "video" in spec else CAPTION_PROMPT
