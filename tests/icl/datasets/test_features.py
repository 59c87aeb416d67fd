"""The feature store: fp16/bf16 shards read on demand, batched extraction resumable after a kill, ranks sharing the work.

The frozen encoder is replaced by a cheap deterministic function of the pixels: these tests are
about storage and scheduling, not about the encoder (the data set tests run the real one).
"""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from mmict_kernels.icl.features import FeatureJob, FeatureStore, extract

TOKENS, WIDTH = 5, 12


def fake_encode(frames: np.ndarray) -> torch.Tensor:
    """(n, H, W, 3) uint8 -> (n, TOKENS, WIDTH): a fixed random projection of the pixels (deterministic)."""
    x = torch.from_numpy(frames.reshape(len(frames), -1)).double() / 255
    proj = torch.from_numpy(np.random.default_rng(0).standard_normal((x.shape[1], TOKENS * WIDTH)))
    return (x @ proj).reshape(-1, TOKENS, WIDTH).float()


def pixels(i: int) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 255, (1, 6, 6, 3), dtype=np.uint8)


def jobs(n: int, calls: list | None = None) -> list[FeatureJob]:
    def load(i):
        if calls is not None:
            calls.append(i)
        return pixels(i)

    return [FeatureJob((f"img{i:04d}",), lambda i=i: load(i), f"entry {i}") for i in range(n)]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_items_round_trip_in_the_storage_dtype(tmp_path, dtype):
    store = FeatureStore(str(tmp_path), "fp", dtype=dtype, shard_mb=0.0004)  # ~420 bytes: a shard per batch of 3
    assert extract(store, jobs(7), fake_encode, batch_size=3, progress=False, workers=2) == 7
    assert len(os.listdir(store.folder)) == 3
    again = FeatureStore(str(tmp_path), "fp", dtype=dtype)
    assert sorted(again) == [f"img{i:04d}" for i in range(7)]
    for i in range(7):
        ref = fake_encode(pixels(i))[0]
        got = again[f"img{i:04d}"]
        assert got.dtype == getattr(torch, dtype) and got.shape == (TOKENS, WIDTH)
        torch.testing.assert_close(got, ref.to(got.dtype), rtol=0, atol=0)
        torch.testing.assert_close(again.mean(f"img{i:04d}"), ref.mean(0), rtol=0, atol=0)  # float32, from float32
    # A memory-only store keeps the same dtype: runs with and without a cache see the same numbers.
    memory = FeatureStore(None, "fp", dtype=dtype)
    extract(memory, jobs(7), fake_encode, batch_size=3, progress=False)
    assert all(torch.equal(memory[k], again[k]) for k in again)
    assert extract(again, jobs(7), fake_encode, progress=False) == 0  # nothing missing: nothing encoded


def test_opening_a_store_reads_no_item(tmp_path):
    """Opening a 64 MiB store costs far less memory than one item per key: items are read on demand."""
    store = FeatureStore(str(tmp_path), "fp", shard_mb=8)
    item = torch.randn(256, 512)  # 256 KiB in float16
    for i in range(256):
        store.add(f"k{i}", item + i, item.mean(0))
        if store.pending_bytes >= store.shard_bytes:
            store.flush()
    store.flush()
    total = sum(os.path.getsize(os.path.join(store.folder, f)) for f in os.listdir(store.folder))
    assert total > 64 << 20
    probe = textwrap.dedent(
        f"""
        import torch
        from mmict_kernels.icl.features import FeatureStore

        def rss():
            return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) * 1024

        before = rss()
        store = FeatureStore({str(tmp_path)!r}, "fp")
        opened = rss()
        x = store["k17"]
        one = rss()
        print(len(store), opened - before, one - opened, float(x[0, 0]))
        """
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    n, opened, one, value = out.stdout.split()
    assert int(n) == 256
    assert int(opened) < 8 << 20, f"opening the store grew RSS by {int(opened) / 2**20:.1f} MiB of {total / 2**20:.0f} MiB"
    assert int(one) < 8 << 20
    assert float(value) == pytest.approx(float((item[0, 0] + 17).half()))


_KILLED_RUN = """
import sys, time
import numpy as np
sys.path.insert(0, {here!r})
from test_features import fake_encode, jobs
from mmict_kernels.icl.features import FeatureStore, extract

def slow_encode(frames):
    time.sleep(0.15)  # so the parent can kill it midway
    return fake_encode(frames)

extract(FeatureStore({folder!r}, "fp", shard_mb=0.0005), jobs(40), slow_encode, batch_size=2, progress=False, workers=1)
print("finished")
"""


def test_extraction_resumes_after_a_kill(tmp_path):
    folder = str(tmp_path / "cache")
    script = tmp_path / "run.py"
    script.write_text(_KILLED_RUN.format(here=os.path.dirname(__file__), folder=folder))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    shard_dir = os.path.join(folder, "features-fp-float16")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(shard_dir) and len([f for f in os.listdir(shard_dir) if f.endswith(".safetensors")]) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the extraction ended before it was killed: {proc.communicate()}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    store = FeatureStore(folder, "fp")
    kept = len(store)
    assert 6 <= kept < 40  # whole shards survived the kill (2 items each)
    calls = []
    assert extract(store, jobs(40, calls), fake_encode, batch_size=4, progress=False, workers=1) == 40 - kept
    assert len(calls) == 40 - kept  # only the missing images were read again
    fresh = FeatureStore(None, "fp")
    extract(fresh, jobs(40), fake_encode, progress=False)
    resumed = FeatureStore(folder, "fp")
    assert sorted(resumed) == sorted(fresh) and all(torch.equal(resumed[k], fresh[k]) for k in fresh)


def test_an_error_keeps_what_was_encoded_and_names_the_entry(tmp_path):
    bad = jobs(9)
    bad[6] = FeatureJob(
        ("img0006",),
        lambda: (_ for _ in ()).throw(ValueError("video x.mp4 (referenced by entry 6) cannot be decoded")),
        "entry 6",
    )
    store = FeatureStore(str(tmp_path), "fp")
    with pytest.raises(ValueError, match="entry 6"):
        extract(store, bad, fake_encode, batch_size=2, progress=False, workers=1)
    assert sorted(FeatureStore(str(tmp_path), "fp")) == [f"img{i:04d}" for i in range(6)]


def test_progress_bar(tmp_path, capsys):
    extract(FeatureStore(None, "fp"), jobs(5), fake_encode, batch_size=2, progress=True)
    assert "image features" in capsys.readouterr().err


def _rank_worker(rank, world, port, folder, result):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    calls = []
    if rank == 1:  # starts late: rank 0 has written shards by then, the split of the work must not change
        time.sleep(1.5)
    store = FeatureStore(folder, "fp", shard_mb=0.002)
    done = extract(store, jobs(21, calls), fake_encode, batch_size=2, rank=rank, world=world, progress=False, workers=1)
    torch.save({"done": done, "calls": calls, "keys": sorted(store), "item": store["img0020"]}, f"{result}.{rank}")
    dist.destroy_process_group()


def test_two_ranks_each_extract_their_share(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    folder, result = str(tmp_path / "cache"), str(tmp_path / "out")
    mp.spawn(_rank_worker, args=(2, port, folder, result), nprocs=2, join=True)
    r0, r1 = (torch.load(f"{result}.{r}", weights_only=False) for r in (0, 1))
    assert (r0["done"], r1["done"]) == (11, 10)
    assert sorted(r0["calls"] + r1["calls"]) == list(range(21)) and not set(r0["calls"]) & set(r1["calls"])
    assert r0["keys"] == r1["keys"] == [f"img{i:04d}" for i in range(21)]  # each sees the other's share
    assert torch.equal(r0["item"], r1["item"])
    names = os.listdir(os.path.join(folder, "features-fp-float16"))
    assert any(n.startswith("shard-r000-") for n in names) and any(n.startswith("shard-r001-") for n in names)
