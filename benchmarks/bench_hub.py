#!/usr/bin/env python3
"""bench_hub.py: every backend of mmict_kernels against every peer, with floors, CSV and plots.

    python benchmarks/bench_hub.py                 # everything: the production shapes of docs/DESIGN.md on a GPU, tiny shapes on a CPU
    python benchmarks/bench_hub.py --quick         # a short pass (CI runs this on CPU)
    python benchmarks/bench_hub.py --ops prefix_attention --shapes llm4096_gqa --modes fwd,bwd

Measures the three ops (hub_cross_attention, hub_self_attention with each mask mode,
prefix_attention) with each of our backends (reference, triton, cuda) and the peers (SDPA
with each backend forced alone, compiled FlexAttention, xformers, flash-attn), then FusedMHub
against transformers' Q-Former, then the MMICT training/evaluation step when the driver is
present. Anything that cannot run is printed with the reason and written to the
``*_unavailable.csv`` file. See benchmarks/README.md for the columns and the floors.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, "benchmarks", "results")


def parse_args(argv=None):
    from bench_cases import CPU_PRESETS, GPU_PRESETS, OPS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one shape per op, fewer repetitions (CI on CPU: well under 2 minutes)")
    p.add_argument("--ops", default="all", help=f"comma-separated subset of {','.join(OPS)},qformer,mmict_step (default all)")
    p.add_argument(
        "--shapes",
        default=None,
        help=f"comma-separated presets: GPU {','.join(GPU_PRESETS)}; CPU {','.join(CPU_PRESETS)} (default: GPU all, --quick the first; CPU tiny)",
    )
    p.add_argument("--dtype", default=None, choices=("bf16", "fp16", "fp32"), help="default bf16 on GPU, fp32 on CPU")
    p.add_argument(
        "--modes", default=None, help="comma-separated subset of fwd,bwd,fwd+bwd (default all; --quick on CPU: fwd,fwd+bwd)"
    )
    p.add_argument("--out", default=DEFAULT_OUT, help="directory for the CSV files and plots (rows are appended)")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--no-plot", action="store_true", help="do not draw PNGs after the run")
    p.add_argument(
        "--no-compile",
        action="store_true",
        help="skip the torch.compile'd peers (FlexAttention, compiled Q-Former): their compilation takes minutes; recorded as skipped",
    )
    p.add_argument(
        "--value-checks",
        action="store_true",
        help="keep the ops' data-dependent input checks (each syncs with the GPU); off by default so we time the kernels",
    )
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------
# The ops
# ---------------------------------------------------------------------------------------
def check_tolerance(dtype: torch.dtype) -> float:
    return {torch.float32: 1e-4, torch.float64: 1e-8}.get(dtype, 2e-3)


def run_op_cases(cases, dtype, modes, device, options, floors, results):
    from bench_cases import Case
    from bench_measure import measure, timing_config
    from bench_peers import Unavailable, first_call, providers
    from bench_results import Skip, make_row, print_row
    from bench_timing import rotation_count

    cfg = timing_config(device, options.quick)
    dname = str(dtype).replace("torch.", "")
    for case in cases:
        n_sets = rotation_count(case.set_bytes(dtype), device)
        input_sets = [case.make_inputs(dtype, device, seed) for seed in range(n_sets)]
        # The oracle for the sanity check: our reference in float32 on the same values, and the
        # error the reference itself makes in the benchmark dtype (a peer may err up to ~4x that).
        with torch.no_grad():
            x0 = input_sets[0]
            x32 = {k: (t.detach().float() if t.is_floating_point() else t) for k, t in x0.items()}
            ref32 = case.call_ours("torch")(x32)
            ref_err = (case.call_ours("torch")(x0).float() - ref32).abs().max().item()
        tol = 4 * ref_err + check_tolerance(dtype)
        print(f"\n== {case.op} | {case.shape} | {dname} | {n_sets} input set(s) rotated")
        for prov in providers():
            if not options.in_phase(prov.compiled):
                continue
            try:
                fn = prov.build(case, x0, device, options)
                out = first_call(prov, fn, x0, device)
                err = (out.float() - ref32).abs().max().item()
                if not err <= tol:  # also catches NaN
                    raise Unavailable(
                        f"output differs from the reference: max abs error {err:.3g} > tolerance {tol:.3g}; not timed"
                    )
            except Exception as exc:  # Unavailable, or a peer's own error while setting up (e.g. its mask)
                why = (
                    str(exc)
                    if isinstance(exc, Unavailable)
                    else f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
                )
                results.add_skip(Skip(case.op, prov.name, case.shape, dname, why))
                print(f"   {prov.name:<15} unavailable: {why}")
                continue
            for mode in modes:
                try:
                    timing, peak = measure(fn, input_sets, Case.leaves, mode, device, cfg, prov.context)
                except Exception as exc:  # e.g. a backward that this provider lacks
                    reason = f"{mode} failed: {type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
                    results.add_skip(Skip(case.op, prov.name, case.shape, dname, reason))
                    print(f"   {prov.name:<15} {mode:<8} {reason}")
                    continue
                row = make_row(
                    case.op,
                    prov.name,
                    mode,
                    case.shape,
                    dname,
                    timing,
                    peak,
                    case.flops(mode),
                    case.bytes(mode, dtype),
                    floors,
                    prov.ours,
                )
                results.add_row(row)
                print_row(row)
        del input_sets
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------
def main(argv=None) -> int:
    # Pick the device first: on CPU our Triton kernels run only in Triton's interpreter, which
    # must be chosen before anything imports triton.language (importing mmict_kernels may).
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    wanted_device = pre.parse_known_args(argv)[0].device
    device = torch.device("cuda" if wanted_device == "cuda" or (wanted_device == "auto" and torch.cuda.is_available()) else "cpu")
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
        # Tiny shapes gain nothing from intra-op threads, and on a shared machine a parallel
        # region waits for its slowest thread: one thread makes the wall-clock numbers steadier.
        torch.set_num_threads(1)
    args = parse_args(argv)
    if not args.value_checks:
        os.environ["MMICT_KERNELS_SKIP_VALUE_CHECKS"] = "1"

    from bench_cases import CPU_PRESETS, GPU_PRESETS, MODES, OPS, build_cases
    from bench_results import Results, summarize
    from bench_timing import environment, measure_floors

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, None: None}[args.dtype]
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    presets = GPU_PRESETS if device.type == "cuda" else CPU_PRESETS
    wanted = OPS + ("qformer", "mmict_step") if args.ops == "all" else tuple(s.strip() for s in args.ops.split(",") if s.strip())
    unknown = [o for o in wanted if o not in OPS + ("qformer", "mmict_step")]
    if unknown:
        raise SystemExit(f"--ops: unknown {unknown}; expected some of {OPS + ('qformer', 'mmict_step')}")
    # Default: every GPU preset (--quick: the first); on CPU only "tiny" ("small" on request:
    # the Triton interpreter takes seconds per call there).
    default_names = list(presets)[:1] if args.quick or device.type == "cpu" else list(presets)
    names = [s.strip() for s in args.shapes.split(",")] if args.shapes else default_names
    bad = [n for n in names if n not in presets]
    if bad:
        raise SystemExit(f"--shapes: {bad} are not {device.type} presets; expected some of {list(presets)}")
    default_modes = "fwd,fwd+bwd" if args.quick and device.type == "cpu" else ",".join(MODES)
    modes = [m.strip() for m in (args.modes or default_modes).split(",") if m.strip()]
    if any(m not in MODES for m in modes):
        raise SystemExit(f"--modes: expected some of {MODES}, got {modes}")

    torch.manual_seed(0)
    env = environment(device, ROOT)
    print(
        f"bench_hub on {env['gpu']} | torch {env['torch']} | triton {env['triton']} | CUDA {env['cuda']} | commit {env['commit']} | {env['date']}"
    )
    if device.type == "cpu":
        print(
            "CPU NUMBERS: wall-clock timings of the PyTorch reference and of the Triton kernels in Triton's CPU interpreter"
            f" (TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}) at tiny shapes, one intra-op thread. They show that the command works; they say"
            " nothing about GPU speed."
        )
    print(f"dtype {str(dtype).replace('torch.', '')} | modes {','.join(modes)} | shapes {','.join(names)} | quick={args.quick}"
          f" | value checks {'on' if args.value_checks else 'off (MMICT_KERNELS_SKIP_VALUE_CHECKS=1)'}")  # fmt: skip

    floors = measure_floors(device, dtype, args.quick)
    print(
        f"floors measured now: copy {floors.bandwidth_bytes_per_s / 1e9:.1f} GB/s (read+write of {floors.copy_bytes / 2**20:.0f} MiB),"
        f" matmul {floors.matmul_flops_per_s / 1e12:.2f} TFLOP/s ({floors.matmul_n}^3 {str(dtype).replace('torch.', '')})"
    )

    results = Results(args.out, env, device.type)
    cases = build_cases([o for o in wanted if o in OPS], presets, names)
    print_backend_report(cases, device, dtype)
    import bench_modules

    # The torch.compile'd peers take minutes to compile, so they run in a last pass: a run cut
    # short by a time limit (a GPU session) still has every other row. On CPU --quick and with
    # --no-compile there is one pass, in which the compiled peers record why they were skipped.
    single = args.no_compile or (args.quick and device.type == "cpu")
    for phase in ("all",) if single else ("eager", "compiled"):
        args.in_phase = lambda compiled, phase=phase: phase == "all" or (phase == "compiled") == compiled
        if phase == "compiled":
            print("\n######## last pass: the torch.compile'd peers (FlexAttention, compiled Q-Former)")
        run_op_cases(cases, dtype, modes, device, args, floors, results)
        if "qformer" in wanted:
            bench_modules.run_qformer(device, dtype, modes, args, floors, results)
        if "mmict_step" in wanted and phase != "compiled":
            bench_modules.run_mmict_step(device, dtype, modes, args, floors, results)

    print(
        "\n== summary: our best vs the best peer (peer/ours > 1: we are faster) and vs the floor (floor/ours: share of the floor reached)"
    )
    if device.type == "cpu":
        print("   (CPU numbers: see above)")
    for line in summarize(results.rows):
        print("   " + line)
    if results.skips:
        print(f"\n{len(results.skips)} provider/case pair(s) could not run (reasons above and in {results.skips_path})")
    print(f"\nappended {len(results.rows)} row(s) to {results.rows_path} and {len(results.skips)} to {results.skips_path}")
    if not args.no_plot:
        import plot

        plot.plot_csv(results.rows_path, args.out)
    # Exit non-zero when none of our own providers produced a row for an op or the Q-Former:
    # then the command measured only peers, which means our code is broken (CI catches that).
    missing = [op for op in {c.op for c in cases} | ({"qformer_blip2", "qformer_instructblip"} if "qformer" in wanted else set())
               if not any(r.ours and r.op == op for r in results.rows)]  # fmt: skip
    if missing:
        print(f"\nERROR: no row of ours for {sorted(missing)}: every one of our backends failed (reasons above)")
        return 1
    return 0


def print_backend_report(cases, device, dtype) -> None:
    """Which of our backends can run each op here (at its first case's head dim), and why the others cannot."""
    from mmict_kernels import backends

    for op in dict.fromkeys(c.op for c in cases):
        head_dim = next(c.head_dim for c in cases if c.op == op)
        reasons = backends.explain(op, device_type=device.type, dtype=dtype, head_dim=head_dim)
        text = "; ".join(f"{b}: {'available' if why is None else 'unavailable (' + why + ')'}" for b, why in reasons.items())
        print(f"backends for {op} (head dim {head_dim}): {text}")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main())
