"""Examples, data sets and the cache of frozen image features.

A data set is a list of :class:`Example` plus the frozen encoder's features of every image
(computed once: the encoder never trains). Two sources:

- ``"shapes"``: the embedded procedurally drawn data (``shapes.py``), no download.
- a JSONL file, one example per line (format in docs/DRIVER.md)::

    {"image": "imgs/0001.jpg", "prompt": "Question: what is on the table? Short answer:", "answer": "a cup"}
    {"frames": ["v/1/000.jpg", "v/1/008.jpg"], "prompt": "A short video caption:", "answer": "a man is cooking"}

  optional keys: ``answers`` (all reference answers, for VQA accuracy), ``task`` (demonstrations
  are drawn from the query's own task), ``label`` (a class name for same-class sampling),
  ``kind`` ("caption" or "vqa"; default from the task name, see :func:`task_kind`).

A missing or unreadable file (data, image, cache) raises an error naming that file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile

import numpy as np
import torch

from . import shapes as shapes_mod
from .vision import encode_pixels, pixels_from_uint8

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Example:
    images: tuple  # feature keys, one per frame (a video has several)
    prompt: str
    answer: str  # the training target
    answers: tuple = ()  # every reference answer (VQA accuracy); defaults to (answer,)
    task: str = "default"
    label: str | None = None  # class, for same-class demonstration sampling
    # "caption": a demonstration shows its caption alone; "vqa": its question and answer;
    # None: from the task name (``task_kind``).
    kind: str | None = None


KINDS = ("caption", "vqa")


def task_kind(task: str, kind: str | None = None, where: str = "kind") -> str:
    """``kind`` if given (checked), else "caption" for a task whose name contains "caption", else "vqa".

    The kind decides a demonstration's M-Hub text (the official code gives a caption
    demonstration its caption alone, a VQA one its question and answer) and may pick the
    generation lengths (``eval.generation_lengths``).
    """
    if kind is None:
        return "caption" if "caption" in task.lower() else "vqa"
    if kind not in KINDS:
        raise ValueError(f"{where}: expected one of {list(KINDS)}, got {kind!r}")
    return kind


class ICLDataset:
    """Examples and the frozen features of their images (``features[key]``: (tokens, width))."""

    def __init__(self, examples: list[Example], features: dict[str, torch.Tensor], name: str = ""):
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
        """(frames * tokens, width): every frame's tokens, concatenated (MMICT's video packing)."""
        return torch.cat([self.features[k] for k in self.examples[i].images])

    def image_embeddings(self) -> torch.Tensor:
        """(N, width) unit-norm mean-pooled frozen features, for nearest-neighbour sampling."""
        if self._embeddings is None:
            pooled = torch.stack([self.image_tokens(i).mean(0) for i in range(len(self))])
            self._embeddings = torch.nn.functional.normalize(pooled.float(), dim=-1)
        return self._embeddings

    def tasks(self) -> list[str]:
        return [e.task for e in self.examples]

    def texts(self) -> list[str]:
        return [t for e in self.examples for t in (e.prompt, e.answer, *e.answers)]


# ---------------------------------------------------------------------------------------
# Embedded data
# ---------------------------------------------------------------------------------------
def shapes_dataset(num: int, tasks, seed: int, encoder, family: str, image_size: int, name: str) -> ICLDataset:
    records, images = shapes_mod.make_shapes(num, tasks=tuple(tasks), seed=seed, image_size=image_size)
    feats = encode_pixels(encoder, pixels_from_uint8(images, family))
    features = {f"{name}/{i}": feats[i] for i in range(num)}
    examples = [
        Example((f"{name}/{r['image']}",), r["prompt"], r["answer"], (r["answer"],), r["task"], r["label"], task_kind(r["task"]))
        for r in records
    ]
    return ICLDataset(examples, features, name)


# ---------------------------------------------------------------------------------------
# JSONL data
# ---------------------------------------------------------------------------------------
def read_jsonl(path: str) -> list[tuple[int, dict]]:
    """(line number, record) of every non-empty line; errors name the file and the line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path}")
    out = []
    with open(path, encoding="utf-8") as f:
        try:
            lines = f.readlines()
        except UnicodeDecodeError as exc:
            raise ValueError(f"data file {path} is not UTF-8 text ({exc.reason})") from exc
    for lineno, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"data file {path}, line {lineno}: not valid JSON ({exc.msg})") from exc
        if not isinstance(rec, dict):
            raise ValueError(f"data file {path}, line {lineno}: expected a JSON object, got {type(rec).__name__}")
        has_image, has_frames = "image" in rec, "frames" in rec
        if has_image == has_frames:
            raise ValueError(f"data file {path}, line {lineno}: expected exactly one of 'image' or 'frames'")
        for key in ("prompt", "answer"):
            if not isinstance(rec.get(key), str):
                raise ValueError(f"data file {path}, line {lineno}: expected a string {key!r}")
        frames = rec["frames"] if has_frames else [rec["image"]]
        if not frames or not all(isinstance(p, str) for p in frames):
            raise ValueError(f"data file {path}, line {lineno}: 'frames' must be a non-empty list of paths")
        out.append((lineno, rec))
    if not out:
        raise ValueError(f"data file {path} has no examples")
    return out


def load_image(path: str, size: int, where: str) -> np.ndarray:
    """(size, size, 3) uint8 from an image file (Pillow) or a ``.npy`` array of shape (H, W, 3) uint8."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path} (referenced by {where})")
    if path.endswith(".npy"):
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as exc:
            raise ValueError(f"image file {path} (referenced by {where}) cannot be read: {exc}") from exc
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(
                f"image file {path} (referenced by {where}): expected a (H, W, 3) uint8 array, got {arr.dtype} {arr.shape}"
            )
        if arr.shape[:2] != (size, size):
            arr = (
                torch.nn.functional.interpolate(
                    torch.from_numpy(arr).permute(2, 0, 1)[None].float(), size=(size, size), mode="bilinear", antialias=True
                )[0]
                .permute(1, 2, 0)
                .round()
                .clamp(0, 255)
                .to(torch.uint8)
                .numpy()
            )
        return arr
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as exc:
        raise ImportError(f"reading {path} needs Pillow (`pip install pillow`), or store images as .npy arrays") from exc
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"image file {path} (referenced by {where}) cannot be read: {exc}") from exc


def _image_key(path: str) -> str:
    """Changes when the file does (path, size and modification time), so a stale cache misses."""
    st = os.stat(path)
    return hashlib.sha1(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()


class FeatureStore:
    """Frozen image features on disk: one safetensors file per encoder fingerprint, written atomically.

    A corrupt cache file is reported and rebuilt (its features are recomputed); the images are
    the source of truth, so nothing is lost.
    """

    def __init__(self, cache_dir: str | None, encoder_fingerprint: str):
        self.path = os.path.join(cache_dir, f"image-features-{encoder_fingerprint}.safetensors") if cache_dir else None
        self.features: dict[str, torch.Tensor] = {}
        self.dirty = False
        if self.path and os.path.exists(self.path):
            from safetensors.torch import load_file

            try:
                self.features = load_file(self.path)
            except Exception as exc:  # a truncated or foreign file: recompute rather than crash
                log.warning("feature cache %s is unreadable (%s); recomputing its features", self.path, exc)
                self.features = {}

    def save(self) -> None:
        if not (self.path and self.dirty):
            return
        from safetensors.torch import save_file

        folder = os.path.dirname(self.path) or "."
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        os.close(fd)
        try:
            save_file({k: v.contiguous() for k, v in self.features.items()}, tmp)
            os.replace(tmp, self.path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        self.dirty = False


def jsonl_dataset(path: str, image_root: str | None, encoder, family: str, image_size: int, store: FeatureStore) -> ICLDataset:
    records = read_jsonl(path)
    root = image_root or os.path.dirname(os.path.abspath(path))
    examples, todo = [], {}
    for lineno, rec in records:
        where = f"{path}, line {lineno}"
        frames = rec["frames"] if "frames" in rec else [rec["image"]]
        keys = []
        for p in frames:
            full = p if os.path.isabs(p) else os.path.join(root, p)
            if not os.path.isfile(full):
                raise FileNotFoundError(f"image file not found: {full} (referenced by {where})")
            key = _image_key(full)
            if key not in store.features:
                todo[key] = (full, where)
            keys.append(key)
        answers = rec.get("answers") or [rec["answer"]]
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise ValueError(f"data file {path}, line {lineno}: 'answers' must be a list of strings")
        task = str(rec.get("task", "default"))
        kind = task_kind(task, rec.get("kind"), where=f"data file {path}, line {lineno}: 'kind'")
        examples.append(Example(tuple(keys), rec["prompt"], rec["answer"], tuple(answers), task, rec.get("label"), kind))
    if todo:  # encode the images the cache does not hold yet, in chunks to bound memory
        items = list(todo.items())
        for start in range(0, len(items), 256):
            chunk = items[start : start + 256]
            pixels = np.stack([load_image(full, image_size, where) for _, (full, where) in chunk])
            feats = encode_pixels(encoder, pixels_from_uint8(pixels, family))
            for (key, _), f in zip(chunk, feats):
                store.features[key] = f.clone()
        store.dirty = True
        store.save()
    features = {k: store.features[k] for e in examples for k in e.images}
    return ICLDataset(examples, features, os.path.basename(path))
