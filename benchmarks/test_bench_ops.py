"""Regression benchmarks of the three ops (pytest-benchmark), plus checks of bench_hub's cost model and files.

    pytest benchmarks/ --benchmark-only                      # timings only
    pytest benchmarks/ --benchmark-only --benchmark-autosave # keep them in .benchmarks/ to compare runs
    pytest benchmarks/ --benchmark-compare                   # against the last saved run

CPU: the tiny shapes of bench_hub.py, our reference and (in Triton's interpreter) our Triton
kernels, with SDPA's math path as the fixed point of comparison. GPU: the image-QA and
GQA-prefix shapes in bf16 with every backend that runs there.
"""

from __future__ import annotations

import types

import pytest
import torch
from bench_cases import CPU_PRESETS, GPU_PRESETS, OPS, PREFIX, SELF, build_cases
from bench_peers import Unavailable, first_call, providers

from mmict_kernels import ops

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
CASES = (
    build_cases(list(OPS), GPU_PRESETS, ["image_qa", "llm4096_gqa"]) if CUDA else build_cases(list(OPS), CPU_PRESETS, ["tiny"])
)
PROVIDERS = [p for p in providers() if p.ours or p.name in (("sdpa-flash", "sdpa-cudnn") if CUDA else ("sdpa-math",))]
SLOW = {"triton"} if not CUDA else set()  # the interpreter takes ~1 s per launch: few rounds


def _case_id(case):
    return f"{case.op}-{case.preset}" + (f"-{case.mask}" if case.mask else "")


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", PROVIDERS, ids=lambda p: p.name)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_op(benchmark, case, provider, mode):
    inputs = case.make_inputs(DTYPE, DEVICE, seed=0)
    try:
        fn = provider.build(
            case, inputs, DEVICE, types.SimpleNamespace(quick=True, no_compile=False, in_phase=lambda compiled: True)
        )
        first_call(provider, fn, inputs, DEVICE)
    except Unavailable as why:
        pytest.skip(str(why))
    grad = torch.randn(inputs["q"].shape, dtype=DTYPE, device=DEVICE)
    leaves = case.leaves(inputs)

    def run():
        with provider.context():
            out = fn(inputs)
            if mode == "fwd+bwd":
                out.backward(grad)
        if CUDA:
            torch.cuda.synchronize()

    def setup():
        for t in leaves:
            t.grad = None

    benchmark.group = f"{case.op} {case.shape} {mode}"
    rounds = 2 if provider.name in SLOW else 20
    benchmark.pedantic(run, setup=setup, rounds=rounds, iterations=1, warmup_rounds=1)


# ---------------------------------------------------------------------------------------
# The analytic cost model of bench_hub.py (run without --benchmark-only)
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "case", build_cases(list(OPS), {**GPU_PRESETS, **CPU_PRESETS}, [*GPU_PRESETS, *CPU_PRESETS]), ids=_case_id
)
def test_visible_pairs_match_the_masks(case):
    """The closed-form pair counts behind the FLOP numbers equal the reference masks' counts."""
    p, cpu = case.params, torch.device("cpu")
    if case.op == SELF:
        length = p["num_query"] + p["text"]
        mask = ops.self_attention_mask(p["num_query"], length, case.text_lengths(cpu), case.mask, cpu)
        expected = int(mask.expand(p["batch"], 1, length, length).sum())
    elif case.op == PREFIX:
        ids = torch.zeros(p["batch"], dtype=torch.long)
        expected = int(ops.prefix_attention_mask(p["len_q"], p["len_prefix"], p["len_q"], ids, None, None, True).sum())
    elif case.packed:
        expected = p["len_q"] * int(case.cu_seqlens_k(cpu)[-1])
        assert max(case.key_lengths()) == p["max_frames"] * p["tokens_per_frame"]
    else:
        expected = p["batch"] * p["len_q"] * p["len_k"]
    assert case.visible_pairs() == expected
    assert case.flops("fwd+bwd") == pytest.approx(3.5 * case.flops("fwd"))
    assert case.bytes("fwd+bwd", torch.bfloat16) == case.bytes("fwd", torch.bfloat16) + case.bytes("bwd", torch.bfloat16)


def test_results_files_round_trip(tmp_path):
    """Rows appended by Results read back into the summary table; a CSV with other columns is refused."""
    from bench_results import Results, Skip, make_row, summary_from_csv
    from bench_timing import Floors, Timing

    env = {"gpu": "CPU (test)", "torch": "t", "triton": "tr", "cuda": "none", "commit": "abc", "date": "2026-01-01T00:00:00Z"}
    results = Results(str(tmp_path), env, "cpu")
    floors = Floors(bandwidth_bytes_per_s=1e9, matmul_flops_per_s=1e12, copy_bytes=0, matmul_n=0)
    for provider, ours, ms in (("triton", True, 2.0), ("sdpa-flash", False, 3.0)):
        results.add_row(
            make_row("hub_cross_attention", provider, "fwd", "s", "float32", Timing(ms, ms, ms, 1), None, 1e9, 1e6, floors, ours)
        )
    results.add_skip(Skip("hub_cross_attention", "xformers", "s", "float32", "not importable"))
    table = "\n".join(summary_from_csv(results.rows_path))
    assert "triton 2.0000 ms" in table and "sdpa-flash 3.0000 ms" in table and "1.50x" in table
    with open(results.skips_path) as f:
        assert "not importable" in f.read()
    with open(results.rows_path, "w") as f:
        f.write("other,columns\n")
    with pytest.raises(SystemExit):
        Results(str(tmp_path), env, "cpu")


def test_cpu_speed_rows_round_trip(tmp_path):
    """cpu_speed.py: the paired ratio is taken within each repetition; an older file gains the new columns, empty."""
    import csv

    import cpu_speed

    # speedup: the ratio of the medians (2.0 / 1.5); paired_speedup: the median of the rounds' ratios (0.4, 2, 2).
    times = {"ref": ([1.0, 2.0, 3.0], [2.0] * 3, [10] * 3), "ours": ([2.5, 1.0, 1.5], [1.0] * 3, [20, 30, 40])}
    rows = []
    cpu_speed.write_case("op", "mode", "shape", times, "ref", rows.append)
    ours = next(r for r in rows if r["provider"] == "ours")
    assert ours["speedup"] == pytest.approx(2.0 / 1.5) and ours["paired_speedup"] == 2.0 and ours["minor_faults"] == 30

    path = tmp_path / "cpu_speed.csv"
    old_columns = cpu_speed.CSV_COLUMNS[: cpu_speed.CSV_COLUMNS.index("paired_speedup")]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=old_columns)
        writer.writeheader()
        writer.writerow({c: "x" for c in old_columns})
    cpu_speed._upgrade_header(str(path))
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == cpu_speed.CSV_COLUMNS
        (row,) = list(reader)
    assert row["op"] == "x" and row["paired_speedup"] == "" and row["malloc"] == ""
    with open(path, "w") as f:
        f.write("other,columns\n")
    with pytest.raises(SystemExit):
        cpu_speed._upgrade_header(str(path))


def test_count_flops_matches_flop_counter_mode():
    """bench_timing.count_flops gives FlopCounterMode's total (forward + backward of a small MLP)."""
    from bench_timing import count_flops
    from torch.utils.flop_counter import FlopCounterMode

    model = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.GELU(), torch.nn.Linear(40, 8))
    x = torch.randn(5, 7, 24)

    def step():
        model(x).sum().backward()

    with FlopCounterMode(display=False) as reference:
        step()
    assert count_flops(step) == reference.get_total_flops() > 0
    with torch.inference_mode():
        assert count_flops(lambda: model(x)) == 2 * 5 * 7 * (24 * 40 + 40 * 8)
