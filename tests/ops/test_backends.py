"""The backend registry: auto order, refusals with reasons, explicit requests."""

import pytest
import torch

from mmict_kernels import backends, ops
from mmict_kernels.backends import BackendUnavailableError


def test_auto_on_cpu_is_the_torch_backend_through_sdpa():
    """On a CPU ``auto`` picks the torch backend, which runs torch's SDPA kernels; the readable
    reference is not a backend, it stays the oracle the tests compare every backend against."""
    from mmict_kernels.ops.hub_cross_attn import sdpa as cross_sdpa
    from mmict_kernels.ops.hub_self_attn import sdpa as self_sdpa
    from mmict_kernels.ops.prefix_attn import sdpa as prefix_sdpa

    expected = {
        "hub_cross_attention": cross_sdpa.hub_cross_attention_sdpa,
        "hub_self_attention": self_sdpa.hub_self_attention_sdpa,
        "prefix_attention": prefix_sdpa.prefix_attention_sdpa,
    }
    for op, impl_expected in expected.items():
        name, impl = backends.resolve(op, "auto", device_type="cpu", dtype=torch.float32, head_dim=64)
        assert name == "torch" and impl is impl_expected, op
        assert impl is not getattr(ops, f"{op}_reference")


def test_every_refusal_has_a_reason():
    why = backends.explain("prefix_attention", device_type="cpu", dtype=torch.float32, head_dim=64)
    assert why["torch"] is None
    assert "CUDA" in why["cuda"]
    why = backends.explain("hub_cross_attention", device_type="cuda", dtype=torch.float64, head_dim=64)
    assert "dtypes" in why["triton"]
    why = backends.explain("hub_cross_attention", device_type="cuda", dtype=torch.float16, head_dim=48)
    assert "head dims" in why["triton"]
    why = backends.explain("prefix_attention", device_type="cuda", dtype=torch.float16, head_dim=64, dropout=True)
    assert "dropout" in why["triton"]


def test_triton_on_cpu_requires_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
        backends.resolve("hub_self_attention", "triton", device_type="cpu", dtype=torch.float32, head_dim=64)


def test_unknown_backend_and_op():
    with pytest.raises(ValueError, match="backend"):
        backends.resolve("hub_self_attention", "tpu", device_type="cpu", dtype=torch.float32, head_dim=64)
    assert (
        "no cuda implementation"
        in backends.explain("hub_self_attention", device_type="cuda", dtype=torch.float16, head_dim=64)["cuda"]
    )
    assert set(backends.registered_ops()) >= {"hub_cross_attention", "hub_self_attention", "prefix_attention"}


def test_skip_value_checks_context():
    from mmict_kernels.ops import checks

    t = torch.zeros(1)
    assert checks.value_checks_enabled(t)
    with ops.skip_value_checks():
        assert not checks.value_checks_enabled(t)
    assert checks.value_checks_enabled(t)


def test_front_end_compiles_fullgraph():
    q = torch.randn(2, 4, 2, 8)
    k = torch.randn(2, 6, 2, 8)
    lengths = torch.tensor([6, 2], dtype=torch.int32)
    fn = torch.compile(
        lambda q, k: ops.hub_cross_attention(q, k, k, seqlens_k=lengths, backend="torch"), fullgraph=True, backend="aot_eager"
    )
    torch.testing.assert_close(fn(q, k), ops.hub_cross_attention(q, k, k, seqlens_k=lengths, backend="torch"))


def test_two_ops_first_resolved_inside_one_compiled_graph():
    """Both backends are first imported during the same trace (a stale-cache bug once)."""
    import importlib
    import sys

    q = torch.randn(1, 3, 2, 8)
    for mod in ("mmict_kernels.ops.hub_self_attn.reference", "mmict_kernels.ops.prefix_attn.reference"):
        assert mod in sys.modules or importlib.import_module(mod)

    def f(q):
        a = ops.hub_self_attention(q, q, q, 1, backend="torch")
        return ops.prefix_attention(a, q, q, q, q, backend="torch")

    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="aot_eager")(q), f(q))
