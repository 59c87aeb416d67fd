"""The float64 oracle and the tolerance rule every kernel test uses (the oracle rule of CONTRIBUTING.md).

    max|out - ref64| <= 2 * max|ref_lowprec - ref64| + atol

ref64 is the PyTorch reference run on float64 copies of the inputs; ref_lowprec is the same
reference run in the tested dtype. The rule is applied to the output and to every gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

ATOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.detach().double().cpu() - b.detach().double().cpu()).abs().max().item()


def assert_close_by_rule(name: str, out: torch.Tensor, ref64: torch.Tensor, ref_lowprec: torch.Tensor, atol: float | None = None):
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref64.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    atol = ATOL[ref_lowprec.dtype] if atol is None else atol
    err = max_abs_diff(out, ref64)
    base = max_abs_diff(ref_lowprec, ref64)
    assert err <= 2 * base + atol, f"{name}: max|out - ref64| = {err:.3e} > 2 * {base:.3e} + {atol:.1e}"


def _run(fn: Callable, inputs: Sequence, grad_idx: Sequence[int], dout: torch.Tensor | None):
    leaves = [
        t.detach().clone().requires_grad_(i in grad_idx) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
        for i, t in enumerate(inputs)
    ]
    out = fn(*leaves)
    grads = []
    if grad_idx:
        grads = torch.autograd.grad(out, [leaves[i] for i in grad_idx], dout.to(out.dtype), allow_unused=True)
        grads = [torch.zeros_like(leaves[i]) if g is None else g for i, g in zip(grad_idx, grads)]
    return out.detach(), [g.detach() for g in grads]


def check_against_oracle(
    fn: Callable,
    reference: Callable,
    inputs: Sequence,
    grad_idx: Sequence[int] = (),
    name: str = "op",
    atol: float | None = None,
    seed: int = 0,
):
    """Run ``fn`` and ``reference`` on ``inputs`` (float tensors in the tested dtype), forward and backward.

    ``fn(*inputs)`` and ``reference(*inputs)`` return one tensor. Gradients are taken w.r.t.
    ``inputs[i]`` for i in ``grad_idx`` with a fixed random upstream gradient.
    """
    float_inputs = [t for t in inputs if isinstance(t, torch.Tensor) and t.is_floating_point()]
    dtype = float_inputs[0].dtype
    dout = None
    if grad_idx:
        with torch.no_grad():
            out_shape = reference(*inputs).shape
        gen = torch.Generator(device="cpu").manual_seed(seed)
        dout = torch.randn(out_shape, generator=gen, dtype=torch.float64).to(float_inputs[0].device)
    out, grads = _run(fn, inputs, grad_idx, dout)
    inputs64 = [t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs]
    ref64, grads64 = _run(reference, inputs64, grad_idx, dout)
    ref_lp, grads_lp = _run(reference, inputs, grad_idx, dout)
    assert out.dtype == dtype, f"{name}: output dtype {out.dtype} != input dtype {dtype}"
    assert_close_by_rule(f"{name} out", out, ref64, ref_lp, atol)
    for i, g, g64, glp in zip(grad_idx, grads, grads64, grads_lp):
        assert_close_by_rule(f"{name} grad[{i}]", g, g64, glp, atol)
    return out, grads
