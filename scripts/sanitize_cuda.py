"""Small, ragged cases of every attention kernel, forward and backward, for compute-sanitizer.

    compute-sanitizer --tool memcheck  --error-exitcode 3 python3 scripts/sanitize_cuda.py
    compute-sanitizer --tool racecheck --error-exitcode 3 python3 scripts/sanitize_cuda.py --quick
    compute-sanitizer --tool memcheck  --error-exitcode 3 python3 scripts/sanitize_cuda.py --backend triton
    compute-sanitizer --tool synccheck --error-exitcode 3 python3 scripts/sanitize_cuda.py
    compute-sanitizer --tool initcheck --error-exitcode 3 python3 scripts/sanitize_cuda.py

``--backend cuda`` (default) covers every kernel the extension launches (forward with 32- and
64-row query tiles, split-KV combine, dsum, dq, dkdv on dense / packed / prefix-atomic /
prefix-deterministic segments); ``--backend triton`` the Triton kernels of the same ops plus
hub self-attention (each mask). Both for float16 and bfloat16 (``--quick``: bfloat16 only), head
dims 64 and 128, with partial tiles, zero-length rows and GQA, and then the same ops with
out-of-range index tensors and the value checks off (``ops.skip_value_checks``): group ids
outside [0, G), lengths past the tensors or negative, decreasing and overlong ``cu_seqlens``.
The kernels clamp those into their tensors, so memcheck must stay silent there too.
``--extremes`` adds int32-limit values (differences that overflow int32). Every result is checked
finite, so a run without the sanitizer is a quick smoke test. Exits 0 and prints one line per case.
"""

from __future__ import annotations

import argparse
import sys

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="cuda", choices=("cuda", "triton"))
    p.add_argument("--quick", action="store_true", help="bfloat16 only (racecheck is slow)")
    p.add_argument("--extremes", action="store_true", help="also int32-limit index values")
    p.add_argument(
        "--device", default="cuda", help="cpu: a smoke run of the case list (--backend triton with TRITON_INTERPRET=1)"
    )
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("sanitize_cuda: no CUDA device; nothing to do")
        return 0
    from mmict_kernels import backends, ops

    if args.backend == "cuda" and not backends.cuda_extension_available():
        print("sanitize_cuda: mmict_kernels._C is not built; nothing to do")
        return 1
    torch.manual_seed(0)
    dev, backend = args.device, args.backend
    cases = 0
    for dtype in (torch.bfloat16,) if args.quick else (torch.float16, torch.bfloat16):
        for head_dim in (64, 128):

            def rnd(*shape, dtype=dtype):
                return torch.randn(*shape, device=dev, dtype=dtype, requires_grad=True)

            def i32(*values):
                return torch.tensor(values, dtype=torch.int32, device=dev)

            # hub cross-attention, dense with a zero-length sample and a partial key block
            for len_q in (32, 70):  # 32-row and 64-row query tiles
                q, k, v = rnd(3, len_q, 2, head_dim), rnd(3, 77, 2, head_dim), rnd(3, 77, 2, head_dim)
                out = ops.hub_cross_attention(q, k, v, backend=backend, seqlens_k=i32(77, 0, 13))
                out.backward(torch.randn_like(out))
                _check(f"{backend} hub dense {dtype} D={head_dim} Lq={len_q}", out, q.grad, k.grad, v.grad)
                cases += 1

            # hub cross-attention, packed varlen
            cu = i32(0, 65, 65, 68)
            q, k, v = rnd(3, 32, 2, head_dim), rnd(68, 2, head_dim), rnd(68, 2, head_dim)
            out = ops.hub_cross_attention(q, k, v, cu, backend=backend)
            out.backward(torch.randn_like(out))
            _check(f"{backend} hub packed {dtype} D={head_dim}", out, q.grad, k.grad, v.grad)
            cases += 1

            if backend == "cuda":
                # split-KV forward + its combine kernel (forced: the auto heuristic would not split
                # these small cases); with at most 2 key blocks per sample some splits see none
                with torch.no_grad():
                    out, lse = torch.ops.mmict.hub_cross_attention_cuda_fwd(q, k, v, cu, None, head_dim**-0.5, 3)
                _check(f"cuda hub packed split-KV {dtype} D={head_dim}", out, lse.clamp_min(-1e30))  # empty sample: lse = -inf
                cases += 1
            else:
                for mask in ops.MASK_MODES:  # hub self-attention has Triton and reference backends only
                    q, k, v = rnd(3, 45, 2, head_dim), rnd(3, 45, 2, head_dim), rnd(3, 45, 2, head_dim)
                    out = ops.hub_self_attention(q, k, v, 32, i32(13, 0, 5), mask=mask, backend=backend, dropout_p=0.1)
                    out.backward(torch.randn_like(out))
                    _check(f"triton hub self {mask} {dtype} D={head_dim}", out, q.grad, k.grad, v.grad)
                    cases += 1

            # prefix attention, GQA, two groups, left padding, both prefix-gradient modes
            for deterministic in (False, True):
                q, k, v = rnd(3, 9, 4, head_dim), rnd(3, 11, 2, head_dim), rnd(3, 11, 2, head_dim)
                pk, pv = rnd(2, 70, 2, head_dim), rnd(2, 70, 2, head_dim)
                ids = torch.tensor([1, 0, 1], device=dev)
                out = ops.prefix_attention(q, k, v, pk, pv, ids, True, backend=backend, prefix_lengths=i32(70, 5),
                                           seqlens_k=i32(11, 4, 0), deterministic=deterministic)  # fmt: skip
                out.backward(torch.randn_like(out))
                _check(f"{backend} prefix {dtype} D={head_dim} deterministic={deterministic}", out, q.grad, k.grad, v.grad,
                       pk.grad, pv.grad)  # fmt: skip
                cases += 1

            cases += _out_of_range_cases(ops, backend, rnd, i32, dtype, head_dim, args.extremes)
    _synchronize()
    print(f"sanitize_cuda: {cases} cases ran ({backend})")
    return 0


def _out_of_range_cases(ops, backend, rnd, i32, dtype, head_dim, extremes: bool) -> int:
    """The ops with index tensors outside their documented ranges and the value checks off."""
    big, small = (2**31 - 1, -(2**31)) if extremes else (1000, -7)
    cases = 0
    with ops.skip_value_checks():
        for cu in ((0, 40, 3, 500), (-5, 7, 3, 68), (0, big, small, 68)):
            q, k, v = rnd(3, 32, 2, head_dim), rnd(68, 2, head_dim), rnd(68, 2, head_dim)
            out = ops.hub_cross_attention(q, k, v, i32(*cu), backend=backend)
            out.backward(torch.randn_like(out))
            _check(f"{backend} hub packed cu_seqlens={cu} {dtype} D={head_dim}", out, q.grad, k.grad, v.grad)
            cases += 1
        q, k, v = rnd(3, 32, 2, head_dim), rnd(3, 77, 2, head_dim), rnd(3, 77, 2, head_dim)
        out = ops.hub_cross_attention(q, k, v, backend=backend, seqlens_k=i32(big, small, 13))
        out.backward(torch.randn_like(out))
        _check(f"{backend} hub dense seqlens_k out of range {dtype} D={head_dim}", out, q.grad, k.grad, v.grad)
        cases += 1
        for deterministic in (False, True):
            q, k, v = rnd(3, 9, 4, head_dim), rnd(3, 11, 2, head_dim), rnd(3, 11, 2, head_dim)
            pk, pv = rnd(2, 70, 2, head_dim), rnd(2, 70, 2, head_dim)
            ids = torch.tensor([5, -1, 1], device=q.device)
            out = ops.prefix_attention(q, k, v, pk, pv, ids, True, backend=backend, prefix_lengths=i32(big, small),
                                       seqlens_k=i32(big, small, 4), deterministic=deterministic)  # fmt: skip
            out.backward(torch.randn_like(out))
            _check(f"{backend} prefix ids/lengths out of range {dtype} D={head_dim} deterministic={deterministic}", out,
                   q.grad, k.grad, v.grad, pk.grad, pv.grad)  # fmt: skip
            cases += 1
    return cases


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _check(name: str, *tensors: torch.Tensor) -> None:
    _synchronize()
    for t in tensors:
        if t is None or not torch.isfinite(t).all():
            raise SystemExit(f"sanitize_cuda: {name}: missing or non-finite result")
    print(f"sanitize_cuda: {name}: ok")


if __name__ == "__main__":
    sys.exit(main())
