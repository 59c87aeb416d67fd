"""The store of frozen image features: sharded, memory-mapped safetensors files read on demand.

The frozen encoder runs once per image (or video frame); its output is kept here and training
reads it back one item at a time. At COCO's scale (113k images x 257 tokens x 1408) the features
are ~82 GB in float16, so nothing here loads the store whole:

- storage: ``<folder>/features-<encoder fingerprint>-<dtype>/shard-r<rank>-<id>.safetensors``, each
  shard holding many items (``<key>``: (tokens, width) in float16 or bfloat16, ``<key>@mean``:
  (width,) float32, the token mean used by nearest-neighbour sampling). Opening a store reads
  each shard's header only (the key list); an item is read from its memory-mapped shard when
  asked for.
- extraction (:func:`extract`): the missing items in batches through the encoder, with a
  progress bar; every ``shard_mb`` of features is written as one shard, atomically (written to a
  temporary name, then renamed), so a run killed midway keeps every finished shard and a rerun
  extracts only what is missing. Under ``torch.distributed`` each rank extracts its share
  (``rank::world`` of the sorted missing items) into its own shards; the ranks then wait for each
  other and every rank sees every item.
- without a folder the store lives in memory (same dtype, so a run with and without a cache
  sees the same numbers).

A shard that cannot be read is reported, renamed ``*.corrupt`` and its items are extracted again:
the images are the source of truth, so nothing is lost.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

log = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_MEAN = "@mean"  # suffix of an item's token mean in a shard (item keys never contain "@")
_FORMAT = "mmict-features-1"


class FeatureStore(Mapping):
    """Frozen features by key: ``store[key]`` -> (tokens, width) tensor in the store's dtype.

    Args:
        folder: the cache folder (``data.feature_cache``); None keeps the features in memory.
        fingerprint: identifies the encoder (``vision.fingerprint``): another encoder, another store.
        dtype: "float16" (default), "bfloat16" or "float32" storage.
        shard_mb: features per shard file, in MiB (the work a kill can lose).
    """

    def __init__(self, folder: str | None, fingerprint: str, dtype: str = "float16", shard_mb: float = 256):
        if dtype not in DTYPES:
            raise ValueError(f"data.feature_dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
        if not shard_mb > 0:
            raise ValueError(f"data.feature_shard_mb: expected > 0, got {shard_mb!r}")
        self.dtype_name, self.dtype = dtype, DTYPES[dtype]
        self.folder = os.path.join(folder, f"features-{fingerprint}-{dtype}") if folder else None
        self.shard_bytes = int(shard_mb * (1 << 20))
        self._where: dict[str, str] = {}  # key -> shard file
        self._handles: dict[str, object] = {}  # shard file -> open safetensors handle (memory-mapped)
        self._memory: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # memory-only store
        self._pending: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # extracted, not yet in a shard
        self._pending_bytes = 0
        self.refresh()

    # ------------------------------------------------------------------ reading
    def refresh(self) -> None:
        """Index the shards written since the last look (by any process): their headers only."""
        if self.folder is None or not os.path.isdir(self.folder):
            return
        from safetensors import safe_open

        for path in sorted(glob.glob(os.path.join(self.folder, "shard-*.safetensors"))):
            if path in self._handles:
                continue
            try:
                handle = safe_open(path, framework="pt")
                names = list(handle.keys())
                meta = handle.metadata() or {}
                if meta.get("format") != _FORMAT:
                    raise ValueError(f"not a feature shard (metadata {meta})")
            except Exception as exc:  # truncated or foreign: its items are extracted again
                bad = path + ".corrupt"
                log.warning("feature shard %s is unreadable (%s); moved to %s, its features will be recomputed", path, exc, bad)
                os.replace(path, bad)
                continue
            self._handles[path] = handle
            for name in names:
                if not name.endswith(_MEAN):
                    self._where.setdefault(name, path)  # a key written twice (two writers): the first wins

    def __contains__(self, key) -> bool:
        return key in self._where or key in self._memory or key in self._pending

    def __len__(self) -> int:
        return len(self._where) + len(self._memory)

    def __iter__(self) -> Iterator[str]:
        yield from self._where
        yield from self._memory

    def __getitem__(self, key: str) -> torch.Tensor:
        """(tokens, width) in the store's dtype, read from its shard now."""
        return self._read(key, "")

    def mean(self, key: str) -> torch.Tensor:
        """(width,) float32: the mean of the item's tokens (computed in float32 at extraction)."""
        return self._read(key, _MEAN)

    def _read(self, key: str, suffix: str) -> torch.Tensor:
        if key in self._memory:
            return self._memory[key][1 if suffix else 0]
        if key in self._pending:
            return self._pending[key][1 if suffix else 0]
        path = self._where.get(key)
        if path is None:
            raise KeyError(f"no features for {key!r} in the feature store {self.folder or '(memory)'}")
        return self._handles[path].get_tensor(key + suffix)

    # ------------------------------------------------------------------ writing
    def add(self, key: str, tokens: torch.Tensor, mean: torch.Tensor) -> None:
        """Keep one item: ``tokens`` (tokens, width) stored in the store's dtype, ``mean`` (width,) float32."""
        item = (tokens.detach().to("cpu", self.dtype).contiguous(), mean.detach().to("cpu", torch.float32).contiguous())
        if self.folder is None:
            self._memory[key] = item
            return
        self._pending[key] = item
        self._pending_bytes += item[0].nbytes + item[1].nbytes

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    def flush(self, rank: int = 0) -> str | None:
        """Write the pending items as one shard (atomically); returns its path (None: nothing pending)."""
        if not self._pending:
            return None
        from safetensors.torch import save_file

        os.makedirs(self.folder, exist_ok=True)
        name = f"shard-r{rank:03d}-{uuid.uuid4().hex[:16]}.safetensors"
        path = os.path.join(self.folder, name)
        tmp = os.path.join(self.folder, f".{name}.tmp")
        tensors = {}
        for key, (tokens, mean) in self._pending.items():
            tensors[key], tensors[key + _MEAN] = tokens, mean
        try:
            save_file(tensors, tmp, metadata={"format": _FORMAT, "dtype": self.dtype_name})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        self._pending, self._pending_bytes = {}, 0
        self.refresh()
        return path


# ---------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FeatureJob:
    """One image or video to encode.

    keys: the feature key of each frame (one for an image).
    load: returns the frames, (len(keys), H, W, 3) uint8; raises an error naming the file and ``where``.
    where: the annotation entry that refers to it (for messages).
    """

    keys: tuple
    load: Callable[[], np.ndarray]
    where: str


def missing_jobs(store: FeatureStore, jobs: Sequence[FeatureJob]) -> list[FeatureJob]:
    """The jobs with a frame the store lacks, once each, in key order (the same list on every rank)."""
    seen, out = set(), []
    for job in jobs:
        if job.keys in seen or all(k in store for k in job.keys):
            continue
        seen.add(job.keys)
        out.append(job)
    return sorted(out, key=lambda j: j.keys)


def extract(
    store: FeatureStore,
    jobs: Sequence[FeatureJob],
    encode: Callable[[np.ndarray], torch.Tensor],
    batch_size: int = 64,
    rank: int = 0,
    world: int = 1,
    progress: bool = True,
    workers: int = 4,
) -> int:
    """Encode the frames ``store`` lacks and keep them; returns how many frames this process encoded.

    Args:
        encode: (n, H, W, 3) uint8 -> (n, tokens, width) float features (the frozen encoder).
        batch_size: frames per ``encode`` call.
        rank, world: this process's share of the work when several processes fill one store
            folder (each calls ``extract`` with the same jobs at the same time, in a
            ``torch.distributed`` group); they wait for each other at the end. Ignored (every
            process extracts everything) for a memory-only store.
        workers: threads reading and decoding files ahead of the encoder.
    """
    todo = missing_jobs(store, jobs)
    shared = store.folder is not None and world > 1
    if shared:
        todo = _agreed(todo, jobs)
    mine = todo[rank::world] if shared else todo
    total = sum(len(j.keys) for j in mine)
    done = 0
    bar = None
    if progress and total and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=f"image features (rank 0 of {world})" if shared else "image features", unit="frame")
    keys, frames = [], []

    def run_batch():
        nonlocal done
        feats = encode(np.stack(frames))
        for key, f in zip(keys, feats):
            f = f.float()
            store.add(key, f, f.mean(0))
        done += len(keys)
        if bar is not None:
            bar.update(len(keys))
        keys.clear()
        frames.clear()
        if store.folder is not None and store.pending_bytes >= store.shard_bytes:
            store.flush(rank)

    try:
        for job, pixels in _loaded(mine, workers):
            if pixels.shape[0] != len(job.keys):
                raise ValueError(f"{job.where}: expected {len(job.keys)} frames, got {pixels.shape[0]}")
            for key, frame in zip(job.keys, pixels):
                keys.append(key)
                frames.append(frame)
                if len(keys) >= batch_size:
                    run_batch()
        if keys:
            run_batch()
    finally:
        # Whatever was encoded is kept, even when a file fails or the run is interrupted.
        if store.folder is not None:
            store.flush(rank)
        if bar is not None:
            bar.close()
    if shared:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        store.refresh()
        lacking = [k for j in todo for k in j.keys if k not in store]
        if lacking:
            raise RuntimeError(f"feature store {store.folder}: {len(lacking)} items missing after every rank's extraction")
    return done


def _agreed(todo: list[FeatureJob], jobs: Sequence[FeatureJob]) -> list[FeatureJob]:
    """Rank 0's list of missing jobs, on every rank (a collective: no rank writes before every rank has it).

    Each rank takes every world-th job of this list, so the lists must be the same: a rank that looked
    at the store after another had already written shards would otherwise split a shorter list
    differently, and some items would be nobody's share.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return todo
    holder = [[job.keys for job in todo]]
    dist.broadcast_object_list(holder, src=0)
    by_keys = {job.keys: job for job in jobs}
    return [by_keys[keys] for keys in holder[0]]


def _loaded(jobs: Sequence[FeatureJob], workers: int):
    """(job, frames) in order, files read and decoded by ``workers`` threads a bounded distance ahead."""
    if workers <= 1:
        for job in jobs:
            yield job, job.load()
        return
    window = 4 * workers
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(job.load) for job in jobs[:window]]
        for i, job in enumerate(jobs):
            pixels = futures[i].result()
            futures[i] = None  # release the frames once consumed
            if i + window < len(jobs):
                futures.append(pool.submit(jobs[i + window].load))
            yield job, pixels
