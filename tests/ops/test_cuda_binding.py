"""CPU checks of the CUDA backend's Python layer (no GPU, no compiled extension needed).

1. Without ``mmict_kernels._C`` the cuda backend is refused with a reason that says so.
2. The op schemas declared in ``python/attention_ops.cpp`` are defined in a subprocess with CPU
   stand-in kernels (the PyTorch reference), then ``ops/*/cuda.py`` registers its fake and
   autograd implementations on them exactly as it does over the real extension. That checks,
   without CUDA: the schemas parse, the Python wrappers call them with the right argument order,
   gradients reach the right inputs, ``torch.library.opcheck`` passes and ``torch.compile``
   (fullgraph) traces through the fakes. The kernels themselves are tested on a GPU by
   tests/ops/*/test_cuda.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmict_kernels import backends, ops

ROOT = Path(__file__).resolve().parents[2]
BINDING = ROOT / "python" / "attention_ops.cpp"


def op_schemas() -> list[str]:
    """The schema strings of every ``m.def(...)`` in the binding (adjacent C++ literals joined)."""
    text = BINDING.read_text()
    schemas = []
    for call in re.finditer(r"m\.def\(\s*((?:\"[^\"]*\"\s*)+)\)", text):
        schemas.append("".join(re.findall(r"\"([^\"]*)\"", call.group(1))))
    return schemas


def test_binding_declares_the_four_ops():
    names = sorted(s.split("(")[0] for s in op_schemas())
    assert names == [
        "hub_cross_attention_cuda_bwd",
        "hub_cross_attention_cuda_fwd",
        "prefix_attention_cuda_bwd",
        "prefix_attention_cuda_fwd",
    ]


@pytest.mark.skipif(backends.cuda_extension_available(), reason="the extension is built here")
def test_cuda_backend_refused_without_extension():
    why = backends.explain("hub_cross_attention", device_type="cuda", dtype=torch.float16, head_dim=64)["cuda"]
    assert why is not None and "mmict_kernels._C is not built" in why
    why = backends.explain("prefix_attention", device_type="cuda", dtype=torch.bfloat16, head_dim=128)["cuda"]
    assert why is not None and "mmict_kernels._C is not built" in why
    q = torch.randn(1, 4, 2, 64)
    with pytest.raises(backends.BackendUnavailableError, match="cuda"):
        ops.hub_cross_attention(q, q, q, backend="cuda")
    with pytest.raises(backends.BackendUnavailableError, match="cuda"):
        ops.prefix_attention(q, q, q, q[:1], q[:1], backend="cuda")


def test_cuda_backend_refuses_what_the_kernels_do_not_support():
    reasons = backends.explain("hub_cross_attention", device_type="cuda", dtype=torch.float32, head_dim=64)
    assert reasons["cuda"] is not None
    if backends.cuda_extension_available():  # otherwise the missing extension is the first reason
        assert "dtypes" in reasons["cuda"]
        assert "head dims" in backends.explain("prefix_attention", device_type="cuda", dtype=torch.float16, head_dim=96)["cuda"]


# --------------------------------------------------------------------------------------------
# The Python layer over CPU stand-ins of the ops (run in a subprocess: the stand-in library and
# the fake `mmict_kernels._C` module must not leak into the other tests).
# --------------------------------------------------------------------------------------------
_STAND_IN = r"""
import sys, types
from concurrent.futures import ThreadPoolExecutor

import torch

sys.modules["mmict_kernels._C"] = types.ModuleType("mmict_kernels._C")  # what cuda.py imports
from ops.test_cuda_binding import op_schemas
from mmict_kernels.ops.hub_cross_attn.reference import hub_cross_attention_reference
from mmict_kernels.ops.prefix_attn.reference import prefix_attention_reference

LIB = torch.library.Library("mmict", "FRAGMENT")
for schema in op_schemas():
    LIB.define(schema)


def fresh_thread(fn):
    # A kernel runs below autograd (autograd keys excluded in this thread); the stand-in
    # backward differentiates the reference in a fresh thread, where autograd is on.
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn).result()


def grads_of(ref, inputs, dout):
    def run():
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        out = ref(*leaves)
        return tuple(g.contiguous() for g in torch.autograd.grad(out, leaves, dout))
    return fresh_thread(run)


def hub_fwd(q, k, v, cu, lens, scale, num_splits=0):
    out, lse = hub_cross_attention_reference(q, k, v, cu_seqlens_k=cu, seqlens_k=lens, softmax_scale=scale)
    return out.contiguous(), lse.float().contiguous()


def hub_bwd(dout, q, k, v, out, lse, cu, lens, scale):
    ref = lambda q, k, v: hub_cross_attention_reference(q, k, v, cu_seqlens_k=cu, seqlens_k=lens, softmax_scale=scale)[0]
    return grads_of(ref, [q, k, v], dout)


def prefix_fwd(q, k, v, pk, pv, ids, causal, scale, plens, slens, deterministic, num_splits=0):
    out, lse = prefix_attention_reference(q, k, v, pk, pv, ids, causal, scale, plens, slens)
    return out.contiguous(), lse.float().contiguous()


def prefix_bwd(dout, q, k, v, pk, pv, ids, out, lse, causal, scale, plens, slens, deterministic):
    ref = lambda *t: prefix_attention_reference(*t, ids, causal, scale, plens, slens)[0]
    return grads_of(ref, [q, k, v, pk, pv], dout)


for name, fn in [("hub_cross_attention_cuda_fwd", hub_fwd), ("hub_cross_attention_cuda_bwd", hub_bwd),
                 ("prefix_attention_cuda_fwd", prefix_fwd), ("prefix_attention_cuda_bwd", prefix_bwd)]:
    LIB.impl(name, fn, "CPU")

from mmict_kernels.ops.hub_cross_attn.cuda import hub_cross_attention_cuda
from mmict_kernels.ops.prefix_attn.cuda import prefix_attention_cuda

torch.manual_seed(0)
dt = torch.float64


def check_grads(name, fn, ref, inputs):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_leaves = [t.detach().clone().requires_grad_() for t in inputs]
    ref_out = ref(*ref_leaves)
    ref_grads = torch.autograd.grad(ref_out, ref_leaves, dout)
    torch.testing.assert_close(out, ref_out)
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        torch.testing.assert_close(g, r, msg=lambda m: f"{name} grad[{i}]: {m}")
    print(f"{name}: forward and gradients ok")


# hub cross-attention: packed varlen with an empty sample, and dense with lengths
lens = torch.tensor([5, 0, 3], dtype=torch.int32)
cu = torch.tensor([0, 5, 5, 8], dtype=torch.int32)
q, k, v = torch.randn(3, 4, 2, 8, dtype=dt), torch.randn(8, 2, 8, dtype=dt), torch.randn(8, 2, 8, dtype=dt)
check_grads("hub packed", lambda q, k, v: hub_cross_attention_cuda(q, k, v, cu, None, 0.3, 0.0)[0],
            lambda q, k, v: hub_cross_attention_reference(q, k, v, cu, None, 0.3)[0], [q, k, v])
kd, vd = torch.randn(3, 6, 2, 8, dtype=dt), torch.randn(3, 6, 2, 8, dtype=dt)
check_grads("hub dense", lambda q, k, v: hub_cross_attention_cuda(q, k, v, None, lens, 0.3, 0.0)[0],
            lambda q, k, v: hub_cross_attention_reference(q, k, v, None, lens, 0.3)[0], [q, kd, vd])
torch.library.opcheck(torch.ops.mmict.hub_cross_attention_cuda_fwd.default,
                      (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), cu, None, 0.3))
torch.library.opcheck(torch.ops.mmict.hub_cross_attention_cuda_fwd.default, (q, kd, vd, None, lens, 0.3, 2))
print("hub opcheck ok")
# An explicit (non-default) num_splits reaches setup_context too: gradients still line up.
check_grads("hub dense num_splits=3", lambda q, k, v: torch.ops.mmict.hub_cross_attention_cuda_fwd(q, k, v, None, lens, 0.3, 3)[0],
            lambda q, k, v: hub_cross_attention_reference(q, k, v, None, lens, 0.3)[0], [q.detach(), kd, vd])

# prefix attention: GQA, two groups, padding on both sides of the row
ids = torch.tensor([1, 0, 1])
plens = torch.tensor([4, 2], dtype=torch.int32)
slens = torch.tensor([5, 2, 0], dtype=torch.int32)
inputs = [torch.randn(3, 3, 4, 8, dtype=dt), torch.randn(3, 5, 2, 8, dtype=dt), torch.randn(3, 5, 2, 8, dtype=dt),
          torch.randn(2, 4, 2, 8, dtype=dt), torch.randn(2, 4, 2, 8, dtype=dt)]
for det in (False, True):
    check_grads(f"prefix deterministic={det}",
                lambda *t: prefix_attention_cuda(*t, ids, True, 0.25, plens, slens, det)[0],
                lambda *t: prefix_attention_reference(*t, ids, True, 0.25, plens, slens)[0], inputs)
torch.library.opcheck(torch.ops.mmict.prefix_attention_cuda_fwd.default,
                      (*[t.clone().requires_grad_() for t in inputs], ids, True, 0.25, plens, slens, True))
print("prefix opcheck ok")

# torch.compile (fullgraph) traces the wrappers through the fake implementations, fwd + bwd.
fn = lambda *t: prefix_attention_cuda(*t, ids, False, 0.25, plens, None, True)[0]
compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
leaves = [t.detach().clone().requires_grad_() for t in inputs]
out = compiled(*leaves)
out.sum().backward()
torch.testing.assert_close(out, fn(*inputs))
assert all(t.grad is not None for t in leaves)
print("torch.compile ok")
"""


def test_python_layer_over_cpu_stand_in_ops():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", _STAND_IN], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-6000:]}"
    for line in (
        "hub packed",
        "hub dense",
        "hub opcheck ok",
        "hub dense num_splits=3",
        "prefix deterministic=True",
        "prefix opcheck ok",
        "torch.compile ok",
    ):
        assert line in proc.stdout
