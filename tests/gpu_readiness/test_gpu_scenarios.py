"""Every GPU scenario of the public API compiles for sm_90 (and the sm_80 subset) without a GPU.

The harness (``python -m mmict_kernels.testing.gpu_scenarios``) runs the public ops and modules
at the production shapes with the unmodified host launchers, every Triton launch compiled for the
target by Triton's own compiler and ptxas (nothing executes), and counts host syncs per step. It
runs once per target in a subprocess (session fixture ``harness_reports``, see conftest.py);
these tests read its report:

- every scenario runs with no compile error and no launch the GPU would refuse;
- no register spill in the default training configurations;
- host syncs per step within each scenario's allowance, asserted against the numbers below;
- every Triton kernel of the package that a public op launches was compiled.
"""

from __future__ import annotations

import collections
import importlib
import pkgutil

import pytest
from gpu_readiness.conftest import SM80_SCENARIOS

from mmict_kernels.testing.gpu_scenarios import scenarios

SCENARIOS = {s.name: s for s in scenarios()}
TRAINING = [name for name, s in SCENARIOS.items() if s.training]

# Host syncs one step may make, by scenario (absent: 0). The harness's own allowances must not be looser.
MAX_SYNCS = {
    "prefix_cache_generate_bf16": 1,  # one per generate call: trimming the steps after every row finished
    "aim_step_bf16": 1,  # transformers' mask preprocessing inside the frozen backbone's aggregation
}
# @triton.jit kernels of the package that no public op launches (so no scenario compiles them).
NOT_LAUNCHED_BY_THE_API = {
    "_dropout_mask_kernel": "draws the attention-dropout keep-mask for tests (hub_attention_triton.dropout_keep_mask)",
}


@pytest.fixture(scope="module")
def sm90(harness_reports):
    return harness_reports[90]


@pytest.fixture(scope="module")
def sm80(harness_reports):
    return harness_reports[80]


def _records_of(report, scenario):
    return [r for r in report["records"] if scenario in r["launched_in"].split()]


def test_the_harness_ran_every_scenario(sm90, sm80):
    assert set(sm90["scenarios"]) == set(SCENARIOS), sm90["log"][-3000:]
    assert set(sm80["scenarios"]) == set(SM80_SCENARIOS), sm80["log"][-3000:]
    assert sm90["kernels"] >= 100 and sm90["launches"] > sm90["kernels"]


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenario_compiles_for_sm90(sm90, name):
    summary = sm90["scenarios"][name]
    assert summary["ok"], summary["errors"]
    records = _records_of(sm90, name)
    assert records, f"{name} launched no Triton kernel"
    assert {r["target"] for r in records} == {"sm_90a"}
    for r in records:
        assert r["launch_problems"] == [], (r["kernel"], r["constexprs"], r["launch_problems"])


@pytest.mark.parametrize("name", SM80_SCENARIOS)
def test_scenario_compiles_for_sm80(sm80, name):
    summary = sm80["scenarios"][name]
    assert summary["ok"], summary["errors"]
    records = _records_of(sm80, name)
    assert records and {r["target"] for r in records} == {"sm_80"}
    for r in records:
        assert r["launch_problems"] == [], (r["kernel"], r["constexprs"], r["launch_problems"])


def test_no_register_spill_on_sm80(sm80):
    """The sm_80 (A100) subset spills nowhere either: the prefix tiles shrink for it
    (``prefix_attn/triton.py::_sm80_tiles``; benchmarks/results/kernel_resources.md)."""
    spilled = [(r["launched_in"], r["kernel"], r["constexprs"], r["spill_stores"], r["spill_loads"]) for r in sm80["records"]
               if r["spill_stores"] or r["spill_loads"]]  # fmt: skip
    assert spilled == []


@pytest.mark.parametrize("name", TRAINING)
def test_no_register_spill_in_training(sm90, name):
    spilled = [(r["kernel"], r["constexprs"], r["spill_stores"], r["spill_loads"]) for r in _records_of(sm90, name)
               if r["spill_stores"] or r["spill_loads"]]  # fmt: skip
    assert spilled == []


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_host_syncs_within_the_allowance(sm90, name):
    summary = sm90["scenarios"][name]
    allowed = MAX_SYNCS.get(name, 0)
    assert SCENARIOS[name].max_syncs <= allowed, "the harness allows more syncs than this test"
    assert summary["syncs"] <= allowed, summary["where"]


def test_no_problem_reported(sm90, sm80):
    assert sm90["problems"] == [] and sm80["problems"] == []


def _package_kernels() -> dict[str, str]:
    """{kernel name: module} of every @triton.jit function named *_kernel in mmict_kernels.ops."""
    import mmict_kernels.ops as ops_pkg

    found = {}
    for info in pkgutil.walk_packages(ops_pkg.__path__, ops_pkg.__name__ + "."):
        if info.name.rsplit(".", 1)[-1] == "cuda":
            continue  # needs the extension
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if name.endswith("_kernel") and getattr(getattr(obj, "fn", None), "__module__", None) == module.__name__:
                found[name] = module.__name__
    return found


def test_every_kernel_of_the_package_is_compiled(sm90):
    compiled = collections.Counter(r["kernel"] for r in sm90["records"])
    missing = {
        name: mod for name, mod in _package_kernels().items() if name not in compiled and name not in NOT_LAUNCHED_BY_THE_API
    }
    assert missing == {}, "kernels no scenario compiles: add a scenario to mmict_kernels/testing/gpu_scenarios.py"
