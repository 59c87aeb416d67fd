"""A persistent demonstration bank: each demonstration's frozen aggregation, computed once.

AIM turns every (image, text) demonstration into hidden states of a frozen multimodal LLM at the
demonstration's text positions; only a projection on top of them trains. Those hidden states
depend only on the demonstration's content, the frozen backbone and the chosen layer, so they are
stored once on disk and reused by every later step, epoch, run and rank.

Layout of ``root``::

    index.json                  {"version": 1, "entries": {key: {"shard", "shape", "dtype", "sha256", "nbytes", "used"}}}
    shards/<uuid>.safetensors   one file per ``put`` call, holding that call's entries
    .lock                       advisory lock serializing index updates across processes

Guarantees:
- Writes are atomic: a shard is written to a temporary file and renamed; the index is rewritten
  to a temporary file and renamed, under an exclusive ``fcntl`` lock, merging whatever other
  processes (DDP ranks) added meanwhile. A crash leaves either the old or the new index.
- Reads memory-map the shard (safetensors) and check the entry's sha256; an unreadable shard or
  a checksum mismatch is reported (a warning naming the file), the bad entries are dropped from
  the index and the lookup is a miss, so the caller recomputes and stores it again. Other
  entries are untouched.
- The bank is bounded: beyond ``max_bytes`` the least recently used shards are deleted.
- Keys cover the content (image bytes, text token ids), the backbone fingerprint and the layer,
  so a changed backbone or layer never returns stale states.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX_VERSION = 1


class DemoBankWarning(UserWarning):
    """A bank file was unreadable or corrupt; its entries are recomputed."""


def _tensor_sha256(t: torch.Tensor) -> str:
    data = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
    return hashlib.sha256(data.numpy().tobytes()).hexdigest()


def module_fingerprint(module: torch.nn.Module) -> str:
    """A digest of a frozen module's parameter and buffer names, shapes, dtypes and values.

    Hashes every byte (computed once per run; a backbone's weights are read once anyway).
    """
    h = hashlib.sha256()
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(_tensor_sha256(t.float() if t.dtype == torch.bfloat16 else t).encode())
    return h.hexdigest()[:32]


def demonstration_key(image, text_ids: Sequence[int] | torch.Tensor, fingerprint: str, layer: int) -> str:
    """Key of one demonstration's aggregation: its content, the backbone and the layer read.

    ``image``: a tensor (pixels or encoder features), raw bytes, or an ``icl.aim.visual.VisualInput``
    (an image or video in a backbone's pixel format; its digest covers the pixels and the sizes or
    patch grid that change what the backbone reads).
    """
    h = hashlib.sha256()
    h.update(f"fp={fingerprint};layer={layer};".encode())
    if hasattr(image, "digest") and hasattr(image, "pixel_values"):
        h.update(b"visual;" + image.digest())
    elif isinstance(image, torch.Tensor):
        h.update(f"img{tuple(image.shape)}{image.dtype};".encode())
        h.update(_tensor_sha256(image.float() if image.dtype == torch.bfloat16 else image).encode())
    else:
        h.update(b"imgbytes;" + hashlib.sha256(image).digest())
    ids = text_ids.tolist() if isinstance(text_ids, torch.Tensor) else list(text_ids)
    h.update(("txt" + ",".join(map(str, ids))).encode())
    return h.hexdigest()


class DemonstrationBank:
    """Disk-backed, size-bounded, multi-process-safe cache of demonstration aggregations.

    Args:
        root: the bank's folder (created if missing).
        max_bytes: bound on the stored tensor bytes (None: unbounded); least recently used
            shards are deleted beyond it.
        verify: check each entry's sha256 when read (detects corrupt files; costs one pass over
            the bytes read).
        memory_bytes: entries this process has read or written stay in RAM up to this many bytes
            (oldest dropped first), so a training loop does not re-read them from disk.
    """

    def __init__(self, root: str | os.PathLike, max_bytes: int | None = None, verify: bool = True, memory_bytes: int = 1 << 30):
        if max_bytes is not None and max_bytes <= 0:
            raise ValueError(f"max_bytes: expected a positive number of bytes or None, got {max_bytes}")
        self.root = Path(root)
        (self.root / "shards").mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.verify = verify
        self.hits = 0
        self.misses = 0
        self.recomputed_corrupt = 0
        # Entries this process already read or wrote, kept in RAM: a training loop meets the same
        # demonstrations again and again, and should not re-read (and re-hash) them from disk.
        self._memory: dict[str, torch.Tensor] = {}
        self._memory_limit = memory_bytes
        self._index_cache: tuple[tuple[int, int], dict] | None = None

    # ------------------------------------------------------------------ index handling
    @property
    def index_path(self) -> Path:
        return self.root / "index.json"

    @contextlib.contextmanager
    def _locked(self):
        with open(self.root / ".lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _read_index(self) -> dict:
        try:
            st = os.stat(self.index_path)
            stamp = (st.st_mtime_ns, st.st_size)
            if self._index_cache is not None and self._index_cache[0] == stamp:
                return json.loads(json.dumps(self._index_cache[1]))  # a private copy: callers mutate it
            with open(self.index_path) as fh:
                index = json.load(fh)
            if index.get("version") != INDEX_VERSION or not isinstance(index.get("entries"), dict):
                raise ValueError(f"unknown index version {index.get('version')!r}")
            self._index_cache = (stamp, index)
            return json.loads(json.dumps(index))
        except FileNotFoundError:
            return {"version": INDEX_VERSION, "entries": {}}
        except (ValueError, json.JSONDecodeError) as exc:
            warnings.warn(
                f"demonstration bank index {self.index_path} is unreadable ({exc}); rebuilding it from the shard files",
                DemoBankWarning,
                stacklevel=3,
            )
            return self._rebuild_index()

    def _rebuild_index(self) -> dict:
        """Index every readable shard (shards are written atomically, so a readable one is whole)."""
        entries = {}
        for path in sorted((self.root / "shards").glob("*.safetensors")):
            try:
                with safe_open(str(path), framework="pt") as fh:
                    for key in fh.keys():
                        t = fh.get_tensor(key)
                        entries[key] = {
                            "shard": path.name,
                            "shape": list(t.shape),
                            "dtype": str(t.dtype).replace("torch.", ""),
                            "sha256": _tensor_sha256(t),
                            "nbytes": t.numel() * t.element_size(),
                            "used": path.stat().st_mtime,
                        }
            except Exception as exc:
                warnings.warn(
                    f"demonstration bank: skipping unreadable shard {path} ({type(exc).__name__})", DemoBankWarning, stacklevel=4
                )
        return {"version": INDEX_VERSION, "entries": entries}

    def _write_index(self, index: dict) -> None:
        tmp = self.index_path.with_name(f".index.{uuid.uuid4().hex}.tmp")
        with open(tmp, "w") as fh:
            json.dump(index, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.index_path)

    # ------------------------------------------------------------------ public API
    def __len__(self) -> int:
        return len(self._read_index()["entries"])

    def __contains__(self, key: str) -> bool:
        return key in self._read_index()["entries"]

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def stored_bytes(self) -> int:
        return sum(e["nbytes"] for e in self._read_index()["entries"].values())

    def get_many(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """The stored tensors of ``keys`` that are present and intact (misses are left out)."""
        keys = list(keys)
        found: dict[str, torch.Tensor] = {k: self._memory[k] for k in keys if k in self._memory}
        if len(found) == len(keys):
            self.hits += len(found)
            return found
        index = self._read_index()["entries"]
        bad: dict[str, str] = {}  # key -> why
        by_shard: dict[str, list[str]] = {}
        for key in keys:
            if key in index and key not in found:
                by_shard.setdefault(index[key]["shard"], []).append(key)
        for shard, shard_keys in by_shard.items():
            path = self.root / "shards" / shard
            try:
                with safe_open(str(path), framework="pt") as fh:  # memory-mapped
                    for key in shard_keys:
                        t = fh.get_tensor(key)
                        if self.verify and _tensor_sha256(t) != index[key]["sha256"]:
                            bad[key] = f"checksum mismatch in {path}"
                        else:
                            found[key] = t
                            self._remember(key, t)
            except Exception as exc:  # unreadable, truncated or missing shard
                for key in shard_keys:
                    bad[key] = f"{path} is unreadable ({type(exc).__name__}: {exc})"
        if bad:
            first = next(iter(bad.values()))
            warnings.warn(
                f"demonstration bank: {len(bad)} corrupt entr{'y' if len(bad) == 1 else 'ies'} dropped and to be "
                f"recomputed ({first})",
                DemoBankWarning,
                stacklevel=2,
            )
            self.recomputed_corrupt += len(bad)
            with self._locked():
                index_now = self._read_index()
                for key in bad:
                    index_now["entries"].pop(key, None)
                self._write_index(index_now)
                self._delete_shards({index[k]["shard"] for k in bad}, index_now)
        self.hits += len(found)
        self.misses += len(keys) - len(found)
        if found and self.max_bytes is not None:  # recency only matters for eviction
            self._touch(found)
        return found

    def put_many(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Store ``tensors`` (key -> tensor) in one new shard, atomically; then enforce the bound."""
        if not tensors:
            return
        cpu = {k: t.detach().contiguous().cpu() for k, t in tensors.items()}
        for k, t in cpu.items():
            self._remember(k, t)
        shard = f"{uuid.uuid4().hex}.safetensors"
        final = self.root / "shards" / shard
        tmp = final.with_name("." + shard + ".tmp")
        save_file(cpu, str(tmp))
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        now = time.time()
        with self._locked():
            index = self._read_index()
            for key, t in cpu.items():
                index["entries"][key] = {
                    "shard": shard,
                    "shape": list(t.shape),
                    "dtype": str(t.dtype).replace("torch.", ""),
                    "sha256": _tensor_sha256(t),
                    "nbytes": t.numel() * t.element_size(),
                    "used": now,
                }
            evicted = self._evict(index)
            self._write_index(index)
            self._delete_shards(evicted, index)

    def get_or_compute(self, keys: Sequence[str], compute: Callable[[list[int]], Sequence[torch.Tensor]]) -> list[torch.Tensor]:
        """Tensors for ``keys`` in order; ``compute(missing_positions)`` gives the missing ones, which are stored."""
        found = self.get_many(keys)
        missing = [i for i, k in enumerate(keys) if k not in found]
        if missing:
            computed = list(compute(missing))
            if len(computed) != len(missing):
                raise ValueError(f"compute: returned {len(computed)} tensors for {len(missing)} missing demonstrations")
            new = {keys[i]: t for i, t in zip(missing, computed)}
            self.put_many(new)
            found.update({k: t.detach() for k, t in new.items()})
        return [found[k] for k in keys]

    # ------------------------------------------------------------------ maintenance
    def _remember(self, key: str, t: torch.Tensor) -> None:
        self._memory[key] = t
        used = sum(x.numel() * x.element_size() for x in self._memory.values())
        while used > self._memory_limit and self._memory:
            oldest = next(iter(self._memory))  # dicts keep insertion order
            used -= self._memory[oldest].numel() * self._memory[oldest].element_size()
            del self._memory[oldest]

    def _touch(self, keys: Iterable[str]) -> None:
        now = time.time()
        with self._locked():
            index = self._read_index()
            for key in keys:
                if key in index["entries"]:
                    index["entries"][key]["used"] = now
            self._write_index(index)

    def _evict(self, index: dict) -> set[str]:
        """Drop least recently used shards' entries until under the bound; returns those shards."""
        if self.max_bytes is None:
            return set()
        entries = index["entries"]
        total = sum(e["nbytes"] for e in entries.values())
        evicted: set[str] = set()
        if total <= self.max_bytes:
            return evicted
        shard_used: dict[str, float] = {}
        for e in entries.values():
            shard_used[e["shard"]] = max(shard_used.get(e["shard"], 0.0), e["used"])
        for shard in sorted(shard_used, key=shard_used.get):  # least recently used first
            if total <= self.max_bytes:
                break
            for key in [k for k, e in entries.items() if e["shard"] == shard]:
                total -= entries.pop(key)["nbytes"]
            evicted.add(shard)
        return evicted

    def _delete_shards(self, shards: Iterable[str], index: dict) -> None:
        # Only shards this process just emptied: a shard another rank has written but not yet
        # indexed is never touched (it is not in ``shards``).
        referenced = {e["shard"] for e in index["entries"].values()}
        for shard in shards:
            if shard not in referenced:
                with contextlib.suppress(FileNotFoundError):
                    (self.root / "shards" / shard).unlink()
