"""The ``data.train`` / ``data.eval`` values: a string (``shapes`` or a JSONL path) or a mapping naming a format.

Checked when the config is read, so a typo fails before any file is opened::

    {format: coco_karpathy, annotations: FILE, media: DIR}
    {format: vqav2, questions: FILE, annotations: FILE, media: DIR}
    {format: msrvtt, annotations: FILE, media: DIR, split: train|validate|test}
    {format: msvd, annotations: FILE, media: DIR}
    {format: videoqa, annotations: FILE, media: DIR}
    {format: hf, path: DIR, split: NAME, image: COLUMN, caption: COLUMN}       (or question/answer(s) columns)

Every mapping also takes ``task`` (the task name: demonstrations come from the query's own task),
``prompt`` (the instruction; a VQA prompt holds ``{question}``) and ``limit`` (the first N examples).
"""

from __future__ import annotations

_COMMON = ("task", "prompt", "limit")
# format -> (required keys, optional keys)
FORMATS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "coco_karpathy": (("annotations", "media"), _COMMON),
    "vqav2": (("questions", "annotations", "media"), _COMMON),
    "msrvtt": (("annotations", "media", "split"), _COMMON),
    "msvd": (("annotations", "media"), _COMMON),
    "videoqa": (("annotations", "media"), _COMMON),
    "hf": (
        ("path",),
        ("split", "image", "video", "media", "caption", "question", "answer", "answers", "image_id", "question_id", "kind")
        + _COMMON,
    ),
}
MSRVTT_SPLITS = ("train", "validate", "test")
_TEXT_KEYS = ("annotations", "questions", "media", "path", "split", "task", "prompt", "kind") + (
    "image",
    "video",
    "caption",
    "question",
    "answer",
    "answers",
    "image_id",
    "question_id",
)


def check_data_spec(value, where: str) -> None:
    """Raise a ValueError naming ``where`` (e.g. "data.train") and what was expected, if ``value`` is not a data source."""
    if isinstance(value, str):
        if not value:
            raise ValueError(f"{where}: expected 'shapes', a JSONL path or a mapping with a 'format', got an empty string")
        return
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected 'shapes', a JSONL path or a mapping with a 'format', got {type(value).__name__}")
    fmt = value.get("format")
    if fmt not in FORMATS:
        raise ValueError(f"{where}.format: expected one of {sorted(FORMATS)}, got {fmt!r}")
    required, optional = FORMATS[fmt]
    known = {"format", *required, *optional}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown} for format {fmt!r}; expected some of {sorted(known)}")
    missing = [k for k in required if value.get(k) in (None, "")]
    if missing:
        raise ValueError(f"{where}: format {fmt!r} needs {missing} (got keys {sorted(value)})")
    for key in _TEXT_KEYS:
        if key in value and not isinstance(value[key], str):
            raise ValueError(f"{where}.{key}: expected a string, got {value[key]!r}")
    limit = value.get("limit")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ValueError(f"{where}.limit: expected an integer >= 1, got {limit!r}")
    if fmt == "msrvtt" and value["split"] not in MSRVTT_SPLITS:
        raise ValueError(f"{where}.split: expected one of {list(MSRVTT_SPLITS)}, got {value['split']!r}")
    if fmt == "hf":
        hf_kind(value, where)


def hf_kind(value: dict, where: str) -> str:
    """The task kind of a ``format: hf`` source: its ``kind``, else "caption" with a caption column, "vqa" with a question one."""
    if ("image" in value) == ("video" in value):
        raise ValueError(f"{where}: format 'hf' needs exactly one of 'image' or 'video' (the column holding the media)")
    kind = value.get("kind")
    if kind is None:
        kind = "caption" if "caption" in value else "vqa" if "question" in value else None
    if kind == "caption" and "caption" not in value:
        raise ValueError(f"{where}: a caption data set needs 'caption' (the column holding the caption or captions)")
    if kind == "vqa" and ("question" not in value or not ({"answer", "answers"} & set(value))):
        raise ValueError(f"{where}: a VQA data set needs 'question' and 'answer' or 'answers' (column names)")
    if kind not in ("caption", "vqa"):
        raise ValueError(f"{where}.kind: expected 'caption' or 'vqa' (or a 'caption' / 'question' column), got {kind!r}")
    return kind
