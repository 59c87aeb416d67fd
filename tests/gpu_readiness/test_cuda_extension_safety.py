"""The CUDA extension is never picked where it cannot run, and backend="cuda" means CUDA per op.

The extension embeds SASS for the archs it was built for and no PTX, so on any other GPU its
kernels cannot load. Checked on a CPU with a simulated GPU (``backends.simulate_gpu``) and a
stand-in list of built archs: the registry refuses ``cuda`` with the reason, ``auto`` takes Triton,
and ``FusedMHub(backend="cuda")`` sends to CUDA the ops that have a CUDA kernel for the inputs and
the rest to the best other backend (run under the compile-only harness in a subprocess, with a
stand-in extension whose ops count their calls).
"""

from __future__ import annotations

import pytest
import torch
from gpu_readiness.conftest import HERE, compile_only_env, result_of, run_python

from mmict_kernels import backends

FACTS = dict(device_type="cpu", dtype=torch.bfloat16, head_dim=64)  # CPU tensors stand for the simulated GPU's


@pytest.fixture
def extension_built_for(monkeypatch):
    """Pretend ``mmict_kernels._C`` is importable and was built for the given archs."""

    def pretend(*archs: str) -> None:
        monkeypatch.setattr(backends, "_cuda_extension_error", lambda: None)
        monkeypatch.setattr(backends, "built_cuda_archs", lambda: tuple(archs))

    return pretend


@pytest.mark.parametrize(
    ("arch", "capability", "runs"),
    [
        ("90a", (9, 0), True), ("90a", (8, 0), False), ("90a", (10, 0), False), ("90", (9, 0), True),
        ("80", (8, 0), True), ("80", (8, 6), True), ("86", (8, 0), False), ("80", (9, 0), False), ("80", (12, 0), False),
    ],
)  # fmt: skip
def test_arch_runs_on(arch, capability, runs):
    assert backends.arch_runs_on(arch, capability) is runs


@pytest.mark.parametrize("op", ["hub_cross_attention", "prefix_attention"])
@pytest.mark.parametrize("capability", [(8, 0), (8, 9), (10, 0), (12, 0)])
def test_registry_refuses_cuda_on_an_arch_it_was_not_built_for(extension_built_for, op, capability):
    extension_built_for("90a")
    gpu = backends.SimulatedGPU(name="other GPU", capability=capability, num_sms=100)
    with backends.simulate_gpu(gpu):
        why = backends.explain(op, **FACTS)
        assert why["cuda"] is not None
        assert "built for sm_90a" in why["cuda"] and f"{capability[0]}.{capability[1]}" in why["cuda"]
        assert f'MMICT_KERNELS_CUDA_ARCHS="{capability[0]}{capability[1]}"' in why["cuda"]  # how to fix it
        name, _ = backends.resolve(op, "auto", **FACTS)
        assert name == "triton"  # auto falls back
        with pytest.raises(backends.BackendUnavailableError, match="built for sm_90a"):
            backends.resolve(op, "cuda", **FACTS)
        with pytest.raises(backends.BackendUnavailableError, match="built for sm_90a"):
            backends.module_choice(op, "cuda", **FACTS)  # a module asked for CUDA gets none of it: an error


@pytest.mark.parametrize("op", ["hub_cross_attention", "prefix_attention"])
def test_registry_accepts_cuda_on_a_built_arch(extension_built_for, op):
    extension_built_for("90a", "80")
    for capability in ((9, 0), (8, 0), (8, 6)):
        with backends.simulate_gpu(backends.SimulatedGPU(capability=capability)):
            assert backends.explain(op, **FACTS)["cuda"] is None, capability
            assert backends.available_backends(op, **FACTS)[0] == "cuda"
            assert backends.module_choice(op, "cuda", **FACTS) == "cuda"


def test_module_choice_cuda_is_per_op(extension_built_for):
    extension_built_for("90a")
    with backends.simulate_gpu(backends.SimulatedGPU(capability=(9, 0))):
        assert backends.module_choice("hub_cross_attention", "cuda", **FACTS) == "cuda"
        assert backends.module_choice("hub_self_attention", "cuda", **FACTS) == "auto"  # no CUDA kernel
        assert backends.module_choice("hub_cross_attention", "cuda", **FACTS, dropout=True) == "auto"  # no dropout in CUDA
        assert backends.module_choice("hub_cross_attention", "cuda", **{**FACTS, "dtype": torch.float32}) == "auto"
        for other in ("auto", "triton", "torch"):
            assert backends.module_choice("hub_self_attention", other, **FACTS) == other


def test_without_the_extension_cuda_is_refused_with_the_reason(monkeypatch):
    monkeypatch.setattr(backends, "_cuda_extension_error", lambda: "mmict_kernels._C is not built: (test)")
    with backends.simulate_gpu():
        assert "mmict_kernels._C is not built" in backends.explain("prefix_attention", **FACTS)["cuda"]
        assert backends.resolve("prefix_attention", "auto", **FACTS)[0] == "triton"


@pytest.fixture(scope="module")
def fused_mhub_cuda(tmp_path_factory) -> dict:
    env = compile_only_env(tmp_path_factory.mktemp("cuda-per-op-cache"))
    return result_of(run_python([str(HERE / "cuda_per_op.py"), "--built", "90a", "--arch", "90"], env, timeout=300))


def _attention_forwards(kernels) -> list[str]:
    """The Triton M-Hub attention forward specialisations compiled (self- and cross-attention share a kernel)."""
    return [constexprs for name, module, constexprs in kernels if "hub" in module and "fwd" in name]


def _epilogues(kernels) -> set[str]:
    return {name for name, module, _ in kernels if "epilogue" in module}


def test_fused_mhub_cuda_sends_cross_attention_to_cuda(fused_mhub_cuda):
    assert fused_mhub_cuda["explain_cross"]["cuda"] is None  # the stand-in extension is accepted on sm_90
    run = fused_mhub_cuda["eval"]
    assert run["errors"] == []
    # one cross-attention layer (of 2): its forward and backward on CUDA
    assert run["cuda_calls"] == {"hub_cross_attention_cuda_fwd": 1, "hub_cross_attention_cuda_bwd": 1}
    # self-attention (no CUDA kernel) and the fused epilogues on Triton, compiled for sm_90
    assert len(_attention_forwards(run["triton_kernels"])) == 1
    assert len(_epilogues(run["triton_kernels"])) >= 4  # bias + dropout + residual + LayerNorm and bias + GELU, fwd and bwd


def test_fused_mhub_cuda_with_attention_dropout_takes_triton(fused_mhub_cuda):
    run = fused_mhub_cuda["train"]
    assert run["errors"] == []
    assert run["cuda_calls"] == {}  # the CUDA kernels have no attention dropout
    forwards = _attention_forwards(run["triton_kernels"])
    assert len(forwards) == 2 and all("HAS_DROPOUT=True" in c for c in forwards)  # self- and cross-attention, with dropout
