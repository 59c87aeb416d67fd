"""Examples and data sets: what the driver trains and evaluates on.

A data set (:class:`ICLDataset`) is a list of :class:`Example` plus the frozen encoder's features
of every image or video frame they show (computed once: the encoder never trains; see
``features.py``). The readers of each source live in ``datasets/``: the embedded ``shapes``
data, JSONL files, and the published layouts (COCO Karpathy, VQAv2 / OK-VQA, MSR-VTT, MSVD,
MSRVTT-QA / MSVD-QA, Hugging Face ``datasets`` folders); ``datasets.load_split`` picks one from
the config's ``data.train`` / ``data.eval``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping

import torch

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Example:
    images: tuple  # feature keys, one per frame (a video has several)
    prompt: str
    answer: str  # the training target
    answers: tuple = ()  # every reference answer (caption metrics, VQA accuracy); defaults to (answer,)
    task: str = "default"
    label: str | None = None  # class, for same-class demonstration sampling
    # "caption": a demonstration shows its caption alone; "vqa": its question and answer;
    # None: from the task name (``task_kind``; only JSONL data leaves it unset).
    kind: str | None = None
    # The data set's own ids, written with the predictions so the published evaluation tools
    # can read them: the image's (or video's) id, and the question's (VQA).
    image_id: object = None
    question_id: object = None
    # The image or video shown (e.g. its file), the same for every example of it: a query never
    # gets a demonstration of its own image. None: its feature keys.
    media: str | None = None
    # The headline metric of its task: "exact_match" (the embedded data); None: from the kind
    # (CIDEr for captions, VQA accuracy for questions).
    metric: str | None = None

    @property
    def media_key(self) -> str:
        """Identifies the image or video this example shows."""
        return self.media if self.media is not None else "|".join(self.images)


KINDS = ("caption", "vqa")


def task_kind(task: str, kind: str | None = None, where: str = "kind") -> str:
    """``kind`` if given (checked), else "caption" for a task whose name contains "caption", else "vqa".

    The kind decides a demonstration's M-Hub text (the official code gives a caption
    demonstration its caption alone, a VQA one its question and answer), the metrics and the
    layout of the saved predictions, and may pick the generation lengths
    (``eval.generation_lengths``). Every reader but JSONL sets it; JSONL guesses from the task
    name when a line has no ``kind``, and says so.
    """
    if kind is None:
        return "caption" if "caption" in task.lower() else "vqa"
    if kind not in KINDS:
        raise ValueError(f"{where}: expected one of {list(KINDS)}, got {kind!r}")
    return kind


class ICLDataset:
    """Examples and the frozen features of their images.

    ``features``: a mapping key -> (tokens, width) tensor; a ``features.FeatureStore`` (read on
    demand from disk, float16 or bfloat16) or a dict (the embedded data, float32). Its ``mean(key)``,
    when it has one, gives the (width,) token mean used by nearest-neighbour sampling.
    """

    def __init__(self, examples: list[Example], features: Mapping, name: str = ""):
        if not examples:
            raise ValueError(f"data set {name!r} has no examples")
        missing = sorted({k for e in examples for k in e.images if k not in features})
        if missing:
            raise ValueError(f"data set {name!r}: no image features for {missing[:5]}")
        self.examples, self.features, self.name = examples, features, name
        self._embeddings = None

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]

    def image_tokens(self, i: int) -> torch.Tensor:
        """(frames * tokens, width) float32: every frame's tokens, concatenated (MMICT's video packing)."""
        return torch.cat([self.features[k] for k in self.examples[i].images]).float()

    def image_embeddings(self) -> torch.Tensor:
        """(N, width) unit-norm mean-pooled frozen features, for nearest-neighbour sampling."""
        if self._embeddings is None:
            mean = getattr(self.features, "mean", None)
            pooled, cache = [], {}
            for e in self.examples:
                if e.images not in cache:
                    if mean is not None:  # the stored float32 token means: no feature is read
                        cache[e.images] = torch.stack([mean(k) for k in e.images]).mean(0)
                    else:
                        cache[e.images] = torch.cat([self.features[k] for k in e.images]).float().mean(0)
                pooled.append(cache[e.images])
            self._embeddings = torch.nn.functional.normalize(torch.stack(pooled).float(), dim=-1)
        return self._embeddings

    def tasks(self) -> list[str]:
        return [e.task for e in self.examples]

    def texts(self) -> list[str]:
        return [t for e in self.examples for t in (e.prompt, e.answer, *e.answers)]


def __getattr__(name: str):
    # The readers moved to datasets/ (they import this module, so it cannot import them at the top);
    # these names stay importable from here.
    moved = {
        "read_jsonl": "jsonl",
        "shapes_dataset": "shapes",
        "load_image": "media",
    }
    if name in moved:
        import importlib

        return getattr(importlib.import_module(f".datasets.{moved[name]}", __package__), name)
    if name == "FeatureStore":
        from .features import FeatureStore

        return FeatureStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
