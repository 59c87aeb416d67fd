"""Readers of every data source the driver takes, one module each.

``data.train`` / ``data.eval`` name the source (``spec.py`` checks them): ``shapes`` (the embedded
data), a JSONL path (the driver's own format), or a mapping with a ``format``:

- ``coco_karpathy``: COCO captions, LAVIS/BLIP Karpathy JSONs (``coco_karpathy.py``);
- ``vqav2``: VQAv2 / OK-VQA official questions + annotations (``vqav2.py``);
- ``msrvtt``: MSR-VTT ``*_videodatainfo.json`` and ``.mp4`` videos (``msrvtt.py``);
- ``msvd``: MSVD captions, LAVIS's JSON list, ``.avi`` videos (``msvd.py``);
- ``videoqa``: MSRVTT-QA / MSVD-QA JSON lists (``videoqa.py``);
- ``hf``: a Hugging Face ``datasets`` folder with a column mapping (``hf.py``).

Each reader sets the task kind (caption or VQA) and the data set's own ids (``image_id``,
``question_id``) on its examples; images and videos become features through the feature store
(``features.py``), extracted once.
"""

from __future__ import annotations

from . import coco_karpathy, hf, jsonl, msrvtt, msvd, videoqa, vqav2
from .common import LoadContext
from .spec import FORMATS, check_data_spec

READERS = {
    "coco_karpathy": coco_karpathy.load,
    "vqav2": vqav2.load,
    "msrvtt": msrvtt.load,
    "msvd": msvd.load,
    "videoqa": videoqa.load,
    "hf": hf.load,
}


def load_source(spec, ctx: LoadContext, where: str):
    """The data set of a mapping source (``{format: ..., ...}``) or a JSONL path; ``shapes`` is built by the caller."""
    check_data_spec(spec, where)
    if isinstance(spec, str):
        return jsonl.load(spec, ctx)
    return READERS[spec["format"]](spec, ctx)


__all__ = ["FORMATS", "READERS", "LoadContext", "check_data_spec", "load_source"]
