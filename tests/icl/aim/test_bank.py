"""The persistent demonstration bank (AIM): exact hits, corruption recovery, bound, multi-process writes."""

import multiprocessing as mp
import warnings

import pytest
import torch

from mmict_kernels.icl.aim.bank import DemoBankWarning, DemonstrationBank, demonstration_key, module_fingerprint


def _states(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3 + i, 8, generator=g) for i in range(n)]


def test_hit_is_exactly_what_was_computed(tmp_path):
    bank = DemonstrationBank(tmp_path, memory_bytes=100)  # RAM copy too small: most hits read the files
    keys = [f"k{i}" for i in range(4)]
    states = _states(4)
    calls = []

    def compute(missing):
        calls.append(missing)
        return [states[i] for i in missing]

    first = bank.get_or_compute(keys, compute)
    again = DemonstrationBank(tmp_path).get_or_compute(keys, compute)  # a new process would see the same
    assert calls == [[0, 1, 2, 3]]
    assert torch.equal(bank.get_many(keys)["k0"], states[0])
    for a, b, s in zip(first, again, states):
        assert torch.equal(a, s) and torch.equal(b, s)


def test_keys_depend_on_content_backbone_and_layer():
    img = torch.randn(3, 4, 4)
    net = torch.nn.Linear(3, 2)
    fp = module_fingerprint(net)
    base = demonstration_key(img, [1, 2, 3], fp, -1)
    assert base == demonstration_key(img.clone(), torch.tensor([1, 2, 3]), fp, -1)
    assert base != demonstration_key(img + 1e-3, [1, 2, 3], fp, -1)
    assert base != demonstration_key(img, [1, 2, 4], fp, -1)
    assert base != demonstration_key(img, [1, 2, 3], fp, -2)
    with torch.no_grad():
        net.weight[0, 0] += 1
    assert base != demonstration_key(img, [1, 2, 3], module_fingerprint(net), -1)


def test_corrupt_shard_is_reported_and_recomputed(tmp_path):
    bank = DemonstrationBank(tmp_path)
    bank.put_many({"a": torch.ones(5, 4)})
    bank.put_many({"b": torch.full((2, 4), 2.0)})
    shard_a = bank._read_index()["entries"]["a"]["shard"]
    path = tmp_path / "shards" / shard_a
    raw = bytearray(path.read_bytes())
    raw[-8:] = b"\x00" * 8  # flip the last payload bytes
    path.write_bytes(bytes(raw))
    bank = DemonstrationBank(tmp_path)  # another process: nothing in RAM, reads the files
    with pytest.warns(DemoBankWarning, match="checksum mismatch"):
        got = bank.get_many(["a", "b"])
    assert list(got) == ["b"] and torch.equal(got["b"], torch.full((2, 4), 2.0))  # the valid entry survives
    out = bank.get_or_compute(["a"], lambda missing: [torch.ones(5, 4)])
    assert torch.equal(out[0], torch.ones(5, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(bank.get_many(["a"])["a"], torch.ones(5, 4))


def test_truncated_or_missing_shard_and_bad_index(tmp_path):
    bank = DemonstrationBank(tmp_path)
    bank.put_many({"a": torch.ones(3)})
    shard = tmp_path / "shards" / bank._read_index()["entries"]["a"]["shard"]
    shard.write_bytes(shard.read_bytes()[:10])
    bank = DemonstrationBank(tmp_path)
    with pytest.warns(DemoBankWarning, match="unreadable"):
        assert bank.get_many(["a"]) == {}
    bank.put_many({"c": torch.zeros(2)})
    (tmp_path / "index.json").write_text("{not json")
    bank = DemonstrationBank(tmp_path)
    with pytest.warns(DemoBankWarning, match="index"):
        assert len(bank) == 1  # rebuilt from the intact shard: nothing valid is lost
    with pytest.warns(DemoBankWarning, match="index"):
        assert torch.equal(bank.get_many(["c"])["c"], torch.zeros(2))


def test_size_bound_evicts_least_recently_used(tmp_path):
    bank = DemonstrationBank(tmp_path, max_bytes=3 * 400, memory_bytes=0)
    for i in range(3):
        bank.put_many({f"k{i}": torch.full((100,), float(i))})  # 400 bytes each
    bank.get_many(["k0"])  # k0 is now more recent than k1
    bank.put_many({"k3": torch.zeros(100)})
    assert "k1" not in bank and {"k0", "k2", "k3"} <= set(bank._read_index()["entries"])
    assert bank.stored_bytes() <= 1200
    assert len(list((tmp_path / "shards").glob("*.safetensors"))) == 3


def _writer(root, rank, n):
    bank = DemonstrationBank(root)
    for i in range(n):
        bank.put_many({f"r{rank}-{i}": torch.full((4,), float(rank * 100 + i))})


def test_concurrent_writers_lose_nothing(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), r, 6)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    bank = DemonstrationBank(tmp_path)
    got = bank.get_many([f"r{r}-{i}" for r in range(2) for i in range(6)])
    assert len(got) == 12 and bank.hit_rate == 1.0
    assert torch.equal(got["r1-5"], torch.full((4,), 105.0))


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="max_bytes"):
        DemonstrationBank(tmp_path, max_bytes=0)
    bank = DemonstrationBank(tmp_path)
    with pytest.raises(ValueError, match="compute"):
        bank.get_or_compute(["x", "y"], lambda missing: [torch.zeros(1)])
