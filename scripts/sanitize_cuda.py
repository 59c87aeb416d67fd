"""One small, ragged case per CUDA kernel, forward and backward, for compute-sanitizer.

    compute-sanitizer --tool memcheck  --error-exitcode 1 python3 scripts/sanitize_cuda.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python3 scripts/sanitize_cuda.py
    compute-sanitizer --tool synccheck --error-exitcode 1 python3 scripts/sanitize_cuda.py
    compute-sanitizer --tool initcheck --error-exitcode 1 python3 scripts/sanitize_cuda.py

Covers every kernel the extension launches (forward with 32- and 64-row query tiles, split-KV
combine, dsum, dq, dkdv on dense / packed / prefix-atomic / prefix-deterministic segments) for float16 and
bfloat16, head dims 64 and 128, with partial tiles, zero-length rows and GQA. It also checks
that every result is finite, so a run without the sanitizer is a quick smoke test. Exits 0 and
prints one line per case on success.
"""

from __future__ import annotations

import sys

import torch


def main(dev: str = "cuda") -> int:
    if not torch.cuda.is_available():
        print("sanitize_cuda: no CUDA device; nothing to do")
        return 0
    from mmict_kernels import backends, ops

    if not backends.cuda_extension_available():
        print("sanitize_cuda: mmict_kernels._C is not built; nothing to do")
        return 1
    torch.manual_seed(0)
    cases = 0
    for dtype in (torch.float16, torch.bfloat16):
        for head_dim in (64, 128):

            def rnd(*shape, dtype=dtype):
                return torch.randn(*shape, device=dev, dtype=dtype, requires_grad=True)

            # hub cross-attention, dense with a zero-length sample and a partial key block
            for len_q in (32, 70):  # 32-row and 64-row query tiles
                q, k, v = rnd(3, len_q, 2, head_dim), rnd(3, 77, 2, head_dim), rnd(3, 77, 2, head_dim)
                lens = torch.tensor([77, 0, 13], dtype=torch.int32, device=dev)
                out = ops.hub_cross_attention(q, k, v, backend="cuda", seqlens_k=lens)
                out.backward(torch.randn_like(out))
                _check(f"hub dense {dtype} D={head_dim} Lq={len_q}", out, q.grad, k.grad, v.grad)
                cases += 1

            # hub cross-attention, packed varlen
            lens = torch.tensor([65, 0, 3], dtype=torch.int32, device=dev)
            cu = torch.zeros(4, dtype=torch.int32, device=dev)
            cu[1:] = torch.cumsum(lens, 0)
            q, k, v = rnd(3, 32, 2, head_dim), rnd(68, 2, head_dim), rnd(68, 2, head_dim)
            out = ops.hub_cross_attention(q, k, v, cu, backend="cuda")
            out.backward(torch.randn_like(out))
            _check(f"hub packed {dtype} D={head_dim}", out, q.grad, k.grad, v.grad)
            cases += 1

            # split-KV forward + its combine kernel (forced: the auto heuristic would not split
            # these small cases); with at most 2 key blocks per sample some splits see none
            with torch.no_grad():
                out, lse = torch.ops.mmict.hub_cross_attention_cuda_fwd(q, k, v, cu, None, head_dim**-0.5, 3)
            _check(f"hub packed split-KV {dtype} D={head_dim}", out, lse.clamp_min(-1e30))  # empty sample: lse = -inf
            cases += 1

            # prefix attention, GQA, two groups, left padding, both prefix-gradient modes
            for deterministic in (False, True):
                q, k, v = rnd(3, 9, 4, head_dim), rnd(3, 11, 2, head_dim), rnd(3, 11, 2, head_dim)
                pk, pv = rnd(2, 70, 2, head_dim), rnd(2, 70, 2, head_dim)
                ids = torch.tensor([1, 0, 1], device=dev)
                plens = torch.tensor([70, 5], dtype=torch.int32, device=dev)
                slens = torch.tensor([11, 4, 0], dtype=torch.int32, device=dev)
                out = ops.prefix_attention(q, k, v, pk, pv, ids, True, backend="cuda", prefix_lengths=plens, seqlens_k=slens,
                                           deterministic=deterministic)
                out.backward(torch.randn_like(out))
                _check(f"prefix {dtype} D={head_dim} deterministic={deterministic}", out, q.grad, k.grad, v.grad, pk.grad, pv.grad)
                cases += 1
    torch.cuda.synchronize()
    print(f"sanitize_cuda: {cases} cases ran")
    return 0


def _check(name: str, *tensors: torch.Tensor) -> None:
    torch.cuda.synchronize()
    for t in tensors:
        if t is None or not torch.isfinite(t).all():
            raise SystemExit(f"sanitize_cuda: {name}: missing or non-finite result")
    print(f"sanitize_cuda: {name}: ok")


if __name__ == "__main__":
    sys.exit(main())
