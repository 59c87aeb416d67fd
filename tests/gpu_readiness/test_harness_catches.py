"""The GPU-readiness tools catch what they exist for (fast: tiny kernels, no production shapes).

- The compile-only harness (``mmict_kernels.testing.compile_only``): a kernel reading a plain
  module-level Python float runs in Triton's interpreter but fails to compile; register spills,
  too much shared memory and an over-tall grid are reported; each target gets its own kernel.
- ``gpu_scenarios.problems``: spills fail training scenarios only; syncs over the allowance fail.
- ``HostSyncCounter``: counts ``.item()``, ``nonzero``, boolean-mask indexing, ``.tolist()``, and
  not plain ops.
- ``checked_memory_access``: an interpreted kernel reading one element past its tensor is caught.
"""

from __future__ import annotations

import os

import pytest
import torch
from gpu_readiness.conftest import HERE, compile_only_env, result_of, run_python

from mmict_kernels.testing.compile_only import CompileLog, KernelRecord
from mmict_kernels.testing.gpu_scenarios import problems
from mmict_kernels.testing.host_syncs import HostSyncCounter

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# ---------------------------------------------------------------------------------------------
# Interpreter vs compiler, in fresh processes
# ---------------------------------------------------------------------------------------------
def test_interpreter_accepts_a_plain_module_float(tmp_path):
    env = {**compile_only_env(tmp_path), "TRITON_INTERPRET": "1"}
    result = result_of(run_python([str(HERE / "tiny_kernels.py"), "interpret"], env, timeout=120))
    assert result["scale_by_plain_global"]["y"] == [0.5 * i for i in range(8)]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict:
    """tiny_kernels.py under the harness: everything for sm_90, the small kernels for sm_80 too (same process)."""
    env = compile_only_env(tmp_path_factory.mktemp("tiny-cache"))
    return result_of(run_python([str(HERE / "tiny_kernels.py"), "compile", "--arch", "90", "--arch", "80"], env, timeout=300))


@pytest.mark.parametrize("arch", [90, 80])
def test_compiler_rejects_a_plain_module_float(compiled, arch):
    run = compiled[f"scale_by_plain_global@{arch}"]
    assert not run["records"]
    assert len(run["errors"]) == 1 and "CompilationError" in run["errors"][0]
    assert "constexpr" in run["errors"][0]  # Triton's message: globals must be tl.constexpr


@pytest.mark.parametrize(("arch", "target"), [(90, "sm_90a"), (80, "sm_80")])
def test_constexpr_global_compiles_with_resources(compiled, arch, target):
    run = compiled[f"scale_by_constexpr_global@{arch}"]
    assert not run["errors"]
    (record,) = run["records"]
    assert record["target"] == target  # its own kernel per target, also in one process
    assert record["grid"] == [4] and record["num_warps"] == 4
    assert 0 < record["registers"] <= 255
    assert record["spill_stores"] == 0 and record["spill_loads"] == 0 and record["stack_bytes"] == 0
    assert record["launch_problems"] == []


@pytest.mark.parametrize("arch", [90, 80])
def test_an_over_tall_grid_is_an_error(compiled, arch):
    (error,) = compiled[f"grid_too_tall@{arch}"]["errors"]
    assert "grid dimension y = 70000" in error


def test_register_spills_are_reported(compiled):
    (record,) = compiled["big_accumulator@90"]["records"]
    assert record["registers"] == 255
    assert record["spill_stores"] > 0 and record["spill_loads"] > 0


def test_shared_memory_over_the_limit_is_a_launch_problem(compiled):
    (record,) = compiled["pipelined_matmul@90"]["records"]
    assert record["shared_bytes"] > 227 * 1024
    assert any("shared memory" in p for p in record["launch_problems"])


def test_launches_are_counted(compiled):
    assert compiled["launches@90"] == 5 and compiled["launches@80"] == 3


# ---------------------------------------------------------------------------------------------
# What makes a scenario run fail
# ---------------------------------------------------------------------------------------------
def _record(scenario: str, spill: int = 0, shared: int = 1024, launched_in=()) -> KernelRecord:
    return KernelRecord(kernel="k", module="m", scenario=scenario, grid=(8,), num_warps=4, num_stages=2, shared_bytes=shared,
                        constexprs="BLOCK=64", registers=96, spill_stores=spill, spill_loads=spill, stack_bytes=0,
                        target="sm_90a", arch=90, launched_in=[scenario, *launched_in])  # fmt: skip


def _summary(name: str, training: bool, syncs: int = 0, max_syncs: int = 0) -> dict:
    return {name: {"training": training, "syncs": syncs, "max_syncs": max_syncs, "where": []}}


def test_problems_spills_fail_training_scenarios_only():
    log = CompileLog(records=[_record("train", spill=8), _record("decode", spill=8)])
    summary = {**_summary("train", True), **_summary("decode", False)}
    found = problems(log, summary, fail_on_spill=True)
    assert len(found) == 1 and found[0].startswith("train: k spills")
    assert problems(log, summary, fail_on_spill=False) == []
    # a specialisation first compiled by a non-training scenario and reused by a training one counts
    log = CompileLog(records=[_record("decode", spill=8, launched_in=["train"])])
    assert len(problems(log, summary, fail_on_spill=True)) == 1


def test_problems_syncs_over_the_allowance_and_launch_problems():
    summary = {**_summary("a", True, syncs=1), **_summary("b", True, syncs=1, max_syncs=1)}
    found = problems(CompileLog(), summary, fail_on_spill=True)
    assert found == ["a: 1 host syncs (at most 0): []"]
    log = CompileLog(records=[_record("b", shared=300 * 1024)], errors=[("a", "CompilationError: boom")])
    found = problems(log, _summary("b", True, max_syncs=1), fail_on_spill=True)
    assert found[0] == "a: CompilationError: boom" and "shared memory" in found[1]


def test_blocks_per_sm():
    record = _record("x")  # 96 registers x 4 warps, 1 KB shared
    assert record.blocks_per_sm() == 5  # registers: 65536 // (96 * 32 * 4)
    record.registers, record.num_warps = 255, 8  # 256 x 32 x 8 = 65536 registers: one block
    assert record.blocks_per_sm() == 1
    record.num_warps = 16
    assert record.blocks_per_sm() == 0 and record.launch_problems()


# ---------------------------------------------------------------------------------------------
# HostSyncCounter
# ---------------------------------------------------------------------------------------------
def _syncs(fn) -> HostSyncCounter:
    with HostSyncCounter() as counter:
        fn()
    return counter


def test_host_sync_counter_counts_what_stalls_a_gpu():
    x = torch.tensor([1.0, -2.0, 3.0])
    cases = {
        ".item()": lambda: x.sum().item(),
        "float()": lambda: float(x[0]),
        "if tensor:": lambda: bool((x > 0).any()),
        "nonzero": lambda: torch.nonzero(x > 0),
        "bool-mask index": lambda: x[x > 0],
        "bool-mask assignment": lambda: x.clone().__setitem__(x > 0, 0.0),
        "masked_select": lambda: x.masked_select(x > 0),
        "unique": lambda: torch.unique(x),
        "tolist": lambda: x.tolist(),
        "repeat_interleave without output_size": lambda: torch.arange(3).repeat_interleave(torch.tensor([1, 2, 0])),
    }
    for what, fn in cases.items():
        assert _syncs(fn).count >= 1, what
    assert _syncs(lambda: x.sum().item()).by_op == {"aten._local_scalar_dense": 1}
    assert _syncs(lambda: torch.nonzero(x > 0)).by_op == {"aten.nonzero": 1}


def test_host_sync_counter_ignores_plain_ops():
    x = torch.randn(4, 8, requires_grad=True)
    index = torch.tensor([0, 2])

    def plain():
        y = torch.nn.functional.gelu(x @ x.T).softmax(-1)
        y = y[index] + torch.where(y[index] > 0, y[index], 0.0)  # integer indexing, where: no sync
        torch.arange(3).repeat_interleave(torch.tensor([1, 2, 0]), output_size=3)
        y.sum().backward()

    counter = _syncs(plain)
    assert counter.count == 0, counter.report()


# ---------------------------------------------------------------------------------------------
# Out-of-bounds accesses of interpreted kernels
# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(not INTERPRET, reason="checks kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1)")
def test_checked_memory_access_catches_a_read_past_the_tensor():
    from gpu_readiness.tiny_kernels import read_one_past_the_end, scale_by_plain_global

    from mmict_kernels.testing.interpreter_bounds import checked_memory_access

    parent = torch.arange(16.0)
    x, y = parent[4:12], torch.empty(8)  # a view: the element past it is still inside the parent storage
    with checked_memory_access() as log:
        scale_by_plain_global[(1,)](x, y, 8, BLOCK=8)
    assert log.kernels == {"scale_by_plain_global": 1} and not log.violations
    with pytest.raises(Exception, match="outside its tensors"), checked_memory_access() as log:
        read_one_past_the_end[(1,)](x, y, 8, BLOCK=8)
    (violation,) = log.violations
    assert violation.access == "load" and violation.lanes == 1
    assert violation.address == x.data_ptr() + 8 * x.element_size()


def test_resource_summary_lists_kernels_and_spills():
    from mmict_kernels.testing.compile_only import record_row
    from mmict_kernels.testing.resource_summary import summarize

    rows = [{**record_row(_record("train", spill=8)), "triton": "3.6.0"}, {**record_row(_record("eval")), "triton": "3.6.0"}]
    text = summarize(rows)
    assert "### Triton 3.6.0, sm_90a (2 specialisations, 1 spilling; blocks/SM on H100/H200)" in text
    assert "| `k` | 2 | 96 | 1.0 | 5 | 1 |" in text
    assert "- `k` BLOCK=64, 4 warps: 96 registers, 8/8 B; in train" in text
