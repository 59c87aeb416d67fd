"""Images and videos on disk: their pixels, their feature keys, and the jobs that encode them.

An example shows one :class:`Media`: an image (one frame), a video (``data.num_frames`` frames
sampled uniformly, decoded with PyAV) or a list of frame images. Its feature keys change when
the file does (path, size, modification time; and the frame count for a video), so a stale
feature cache misses rather than serving old features. Its ``identity`` is the same for every
example of the same image or video (the file's path), so demonstration sampling can leave out
the query's own image.

Errors name the file and the annotation entry that refers to it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os

import numpy as np
import torch

from ..features import FeatureJob


@dataclasses.dataclass(frozen=True)
class Media:
    """What one example shows. keys: one feature key per frame; jobs: what encodes them; identity: the image or video."""

    keys: tuple
    jobs: tuple
    identity: str


def file_key(path: str, extra: str = "") -> str:
    """Changes when the file does (absolute path, size and modification time), so a stale cache misses."""
    st = os.stat(path)
    return hashlib.sha1(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{extra}".encode()).hexdigest()


def check_file(path: str, what: str, where: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file not found: {path} (referenced by {where})")
    return path


# ---------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------
def resize_uint8(arr: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) uint8, bilinear with antialiasing."""
    if arr.shape[:2] == (size, size):
        return arr
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)[None].float()
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    return x[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def load_image(path: str, size: int | None, where: str) -> np.ndarray:
    """(size, size, 3) uint8 from an image file (Pillow) or a ``.npy`` array of shape (H, W, 3) uint8.

    ``size=None``: (H, W, 3) at the file's own size (a processor that resizes or tiles it comes next).
    """
    check_file(path, "image", where)
    if path.endswith(".npy"):
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as exc:
            raise ValueError(f"image file {path} (referenced by {where}) cannot be read: {exc}") from exc
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(
                f"image file {path} (referenced by {where}): expected a (H, W, 3) uint8 array, got {arr.dtype} {arr.shape}"
            )
        return arr if size is None else resize_uint8(arr, size)
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as exc:
        raise ImportError(f"reading {path} needs Pillow (`pip install pillow`), or store images as .npy arrays") from exc
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8) if size is None else pil_to_uint8(im, size)
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"image file {path} (referenced by {where}) cannot be read: {exc}") from exc


def pil_to_uint8(image, size: int) -> np.ndarray:
    """A PIL image -> (size, size, 3) uint8 RGB, bicubic (BLIP-2's evaluation resize)."""
    from PIL import Image

    return np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.uint8)


def image(path: str, size: int, where: str) -> Media:
    """An image file (checked to exist now; read when its features are extracted)."""
    check_file(path, "image", where)
    key = file_key(path)
    job = FeatureJob((key,), functools.partial(_one_frame, path, size, where), where)
    return Media((key,), (job,), os.path.abspath(path))


def _one_frame(path: str, size: int, where: str) -> np.ndarray:
    return load_image(path, size, where)[None]


def frames(paths: list[str], size: int, where: str) -> Media:
    """A video given as frame images: each frame is an image (shared with any other example showing it)."""
    parts = [image(p, size, where) for p in paths]
    return Media(tuple(p.keys[0] for p in parts), tuple(p.jobs[0] for p in parts), "|".join(p.identity for p in parts))


# ---------------------------------------------------------------------------------------
# Videos
# ---------------------------------------------------------------------------------------
def video(path: str, num_frames: int, size: int, where: str) -> Media:
    """A video file: ``num_frames`` frames sampled uniformly (decoded when its features are extracted)."""
    check_file(path, "video", where)
    base = file_key(path, f"frames={num_frames}")
    keys = tuple(f"{base}#{j}" for j in range(num_frames))
    job = FeatureJob(keys, functools.partial(video_frames, path, num_frames, size, where), where)
    return Media(keys, (job,), os.path.abspath(path))


def uniform_indices(total: int, num: int) -> list[int]:
    """The middle frame of each of ``num`` equal segments of ``total`` frames (repeats when total < num)."""
    return [min(total - 1, int((j + 0.5) * total / num)) for j in range(num)]


def video_frames(path: str, num_frames: int, size: int, where: str) -> np.ndarray:
    """(num_frames, size, size, 3) uint8: frames sampled uniformly over the whole video, decoded with PyAV."""
    return np.stack(video_clip(path, num_frames, where, size)[0])


def video_clip(path: str, num_frames: int, where: str, size: int | None = None) -> tuple[list[np.ndarray], float | None]:
    """``num_frames`` frames sampled uniformly over the whole video (PyAV), and their rate in frames per second.

    Frames are (size, size, 3) uint8, or (H, W, 3) at the video's own size for ``size=None``. The
    rate is ``num_frames`` over the video's duration (None where the stream states no frame rate).
    """
    try:
        import av
    except ImportError as exc:
        raise ImportError(f"decoding the video {path} needs PyAV (`pip install av`)") from exc
    check_file(path, "video", where)
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise ValueError("it has no video stream")
            stream = container.streams.video[0]
            rate = float(stream.average_rate) if stream.average_rate else None
            total = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
        picked, decoded = _decode_at(path, uniform_indices(total, num_frames) if total else [], size)
        if decoded and len(picked) < num_frames:  # the header over-counted the frames: sample what is there
            picked, decoded = _decode_at(path, uniform_indices(decoded, num_frames), size)
        if not decoded:
            raise ValueError("no frame could be decoded")
    except (av.error.FFmpegError, ValueError, OSError) as exc:
        raise ValueError(f"video file {path} (referenced by {where}) cannot be decoded: {exc}") from exc
    return picked, (num_frames * rate / decoded if rate else None)


def _decode_at(path: str, indices: list[int], size: int | None) -> tuple[list[np.ndarray], int]:
    """(the frames at ``indices``, resized unless ``size`` is None, in order; the number of frames decoded)."""
    import av
    from PIL import Image

    wanted = {}
    for j, i in enumerate(indices):
        wanted.setdefault(i, []).append(j)
    out: list = [None] * len(indices)
    count = 0
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for count, frame in enumerate(container.decode(stream), start=1):
            for j in wanted.get(count - 1, ()):
                image = frame.to_image().convert("RGB")
                out[j] = np.asarray(image if size is None else image.resize((size, size), Image.BICUBIC), dtype=np.uint8)
    return [f for f in out if f is not None], count
