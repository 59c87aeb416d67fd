#!/usr/bin/env python3
"""cpu_speed.py: FusedMHub and the MMICT step against transformers on a CPU, side by side in one run.

    python benchmarks/cpu_speed.py                     # every case, 7 repetitions, 2 intra-op threads
    python benchmarks/cpu_speed.py --cases qformer --reps 5

Wall-clock seconds of whole training passes (forward + backward), on the CPU this runs on; they
say nothing about GPU speed. Every case builds all its providers first, then repeats: each
repetition runs every provider once, in an order rotated from one repetition to the next, so
a slow spell of a shared machine hits every provider alike; rows report the median and the
20th / 80th percentiles over the repetitions (``cpu_median_s``: the process's CPU time, a
second view that other processes disturb less). ``speedup`` = the reference provider's median
over this provider's (> 1: faster than the reference); ``paired_speedup`` = the median over the
repetitions of the two providers' ratio within one repetition (a slow spell that spans a
repetition cancels out of it); ``minor_faults`` = the median minor page faults of one call (pages
the allocator got fresh from the OS: glibc gives freed memory back and faults it in again);
``malloc`` = the glibc malloc settings of the run (``MALLOC_TRIM_THRESHOLD_`` etc. from the
environment; "glibc defaults" when none is set).

Cases:
- ``qformer``: transformers' default InstructBLIP Q-Former (768 x 12 layers, 12 x 64 heads,
  cross-attention every 2nd layer), B = 4, 32 queries + 32 text slots, 257 x 1408 image tokens,
  float32: ``hf-eager``, ``hf-sdpa``, ``fused-mhub-torch`` (the CPU default) from the same weights;
  ``eval`` (dropout off: every provider computes the same function) and ``train`` (dropout on)
  with ragged text (valid lengths 1..32, right-padded: FusedMHub's position-wise matmuls skip the
  padded slots on a CPU), and ``train`` with full text (no padded slot: the same matmuls on both
  sides). Reference: hf-sdpa.

Every backward is that of the sum of the outputs over the token positions (padded text slots
excluded, as every objective excludes them: FusedMHub gives zeros there, transformers computes
them anyway), so every provider computes the same gradients.
- ``reuse``: 4 images x 4 texts each (16 rows), eval: ``hf-sdpa`` on the 16 rows with each image
  repeated (one call), ``hf-sdpa-4-calls`` (4 calls of 4 rows, one text per image each), and
  ``fused-mhub-torch`` with ``encode_image`` once per image and ``ImageKVCache.select`` for the
  16 rows; ``frozen`` image features (no gradient) and ``trained`` ones (a gradient to the
  features, as when ``ln_vision`` trains). Reference: the faster transformers provider.
- ``step``: the MMICT train step (``Trainer.train_step``: batch, forward, backward, clipping,
  AdamW) of benchmarks/bench_modules.py at CPU_STEP_MODEL (M-Hub 768 x 12 on 257 x 1408
  features, 8 queries x 4 demonstrations in 2 groups of 4, a 4-layer 1024-wide Llama):
  ``mmict-fused`` (ours), ``mmict-baseline`` (batched transformers Q-Former, demonstrations
  copied per row) and ``mmict-official`` (the authors' loop: Q-Former per turn at batch 1,
  demonstrations recomputed per row); FLOPs by torch's formulas (``bench_timing.count_flops``) over one step. Reference:
  mmict-baseline. Each provider's batches rotate with the step index, the same for all.

Rows are appended to ``benchmarks/results/cpu_speed.csv``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import os
import resource
import statistics
import sys
import tempfile
import time
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
CSV_COLUMNS = [
    "op", "provider", "mode", "shape", "dtype", "median_s", "p20_s", "p80_s", "cpu_median_s", "reps", "reference",
    "speedup", "gflop", "threads", "device", "torch", "transformers", "commit", "date",
    "paired_speedup", "minor_faults", "malloc",
]  # fmt: skip
# glibc's malloc settings that change how often freed memory goes back to the OS (and so how many
# pages the next allocations fault in); recorded with every row, unset means glibc's defaults.
MALLOC_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "LD_PRELOAD")
CASES = ("qformer", "reuse", "step")


def _percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def interleaved(fns: dict, reps: int, label: str) -> dict:
    """{name: (wall times, cpu times, minor page faults)}, one entry per round: one untimed call each,
    then ``reps`` rounds over every provider, order rotated."""
    names = list(fns)
    for name in names:
        fns[name]()
    walls, cpus, faults = ({n: [] for n in names} for _ in range(3))
    for r in range(reps):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            f0, c0, w0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.process_time(), time.perf_counter()
            fns[name]()
            walls[name].append(time.perf_counter() - w0)
            cpus[name].append(time.process_time() - c0)
            faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        print(f"   {label} round {r + 1}/{reps}: " + ", ".join(f"{n} {walls[n][-1]:.2f}s" for n in names), flush=True)
    return {n: (walls[n], cpus[n], faults[n]) for n in names}


# ---------------------------------------------------------------------------------------------
# Q-Former cases
# ---------------------------------------------------------------------------------------------
def _qformer():
    from transformers import InstructBlipQFormerConfig, InstructBlipQFormerModel

    torch.manual_seed(0)
    config = InstructBlipQFormerConfig()  # 768 x 12, 1408-wide image features
    return InstructBlipQFormerModel(config), config


def _text(config, rows: int, seed: int = 1234, ragged: bool = True):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 33, (rows,), generator=gen)  # ragged, right-padded
    if not ragged:
        lengths.fill_(32)
    mask = torch.ones(rows, 64, dtype=torch.long)
    mask[:, 32:] = (torch.arange(32)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1, config.vocab_size, (rows, 32), generator=gen)
    queries = torch.randn(rows, 32, config.hidden_size, generator=gen)
    return ids, mask, queries


def _backward_over_tokens(out: torch.Tensor, attention_mask: torch.Tensor) -> None:
    """Backward of ``out.sum()`` over the token positions: what every objective reads (never a padded
    text slot, whose output FusedMHub sets to zero and transformers computes all the same)."""
    out.backward(attention_mask[..., None].to(out.dtype).expand_as(out))


def _fwd_bwd(model, **inputs):
    def run():
        _backward_over_tokens(model(**inputs).last_hidden_state, inputs["attention_mask"])
        model.zero_grad(set_to_none=True)

    return run


def qformer_case(reps: int, write) -> None:
    from mmict_kernels import FusedMHub

    hf, config = _qformer()
    batch = 4
    images = torch.randn(batch, 257, config.encoder_hidden_size, generator=torch.Generator().manual_seed(5))
    # ragged text (lengths 1..32 of 32 slots, as a padded batch has them), and full text (no padded slot)
    for mode, text in (("eval", "ragged"), ("train", "ragged"), ("train", "full")):
        ids, mask, queries = _text(config, batch, ragged=text == "ragged")
        inputs = dict(input_ids=ids, attention_mask=mask, query_embeds=queries, encoder_hidden_states=images)
        shape = f"B={batch} Nq=32+32 {text} text image=257x1408 hidden=768 layers=12 heads=12"
        models = {}
        for impl in ("eager", "sdpa"):
            m = copy.deepcopy(hf)
            m.set_attn_implementation(impl)
            models[f"hf-{impl}"] = m
        models["fused-mhub-torch"] = FusedMHub.from_hf(copy.deepcopy(hf), backend="torch")
        fns = {}
        for name, m in models.items():
            m.train(mode == "train")
            fns[name] = _fwd_bwd(m, **inputs)
        print(f"== qformer | {shape} | fwd+bwd {mode}", flush=True)
        times = interleaved(fns, reps, f"qformer {mode} {text}")
        write_case("qformer_instructblip", f"fwd+bwd {mode}", shape, times, "hf-sdpa", write)


def reuse_case(reps: int, write) -> None:
    from mmict_kernels import FusedMHub

    hf, config = _qformer()
    images_n, per_image = 4, 4
    rows = images_n * per_image
    ids, mask, queries = _text(config, rows)
    images = torch.randn(images_n, 257, config.encoder_hidden_size, generator=torch.Generator().manual_seed(5))
    index = torch.arange(images_n).repeat_interleave(per_image)  # row r shows image r // 4
    sdpa = copy.deepcopy(hf).eval()
    sdpa.set_attn_implementation("sdpa")
    hub = FusedMHub.from_hf(copy.deepcopy(hf), backend="torch").eval()
    shape = f"{images_n} images x {per_image} texts (16 rows) Nq=32+32 ragged text image=257x1408 hidden=768 layers=12"
    for features in ("frozen", "trained"):
        grad = features == "trained"

        def feats():
            return images.clone().requires_grad_(grad)

        def batched():
            out = sdpa(input_ids=ids, attention_mask=mask, query_embeds=queries, encoder_hidden_states=feats()[index])
            _backward_over_tokens(out.last_hidden_state, mask)
            sdpa.zero_grad(set_to_none=True)

        def four_calls():
            x = feats()
            for r in range(per_image):
                rows_r = torch.arange(images_n) * per_image + r  # one text per image
                out = sdpa(
                    input_ids=ids[rows_r], attention_mask=mask[rows_r], query_embeds=queries[rows_r], encoder_hidden_states=x
                )
                _backward_over_tokens(out.last_hidden_state, mask[rows_r])
            sdpa.zero_grad(set_to_none=True)

        def ours():
            cache = hub.encode_image(feats()).select(index)
            out = hub(input_ids=ids, attention_mask=mask, query_embeds=queries, image_kv=cache).last_hidden_state
            _backward_over_tokens(out, mask)
            hub.zero_grad(set_to_none=True)

        print(f"== reuse | {shape} | image features {features}", flush=True)
        times = interleaved(
            {"hf-sdpa": batched, "hf-sdpa-4-calls": four_calls, "fused-mhub-torch": ours}, reps, f"reuse {features}"
        )
        reference = min(("hf-sdpa", "hf-sdpa-4-calls"), key=lambda n: statistics.median(times[n][0]))
        write_case("qformer_image_kv_reuse", f"fwd+bwd eval, image features {features}", shape, times, reference, write)


def step_case(reps: int, write) -> None:
    from bench_modules import CPU_STEP_MODEL, STEP_PROVIDERS, make_step_trainer
    from bench_timing import count_flops

    fns, flops, shape = {}, {}, ""
    tmp = tempfile.TemporaryDirectory()
    for name, *_ in STEP_PROVIDERS:
        trainer = make_step_trainer(torch.device("cpu"), name, os.path.join(tmp.name, name), CPU_STEP_MODEL)
        steps = iter(range(10**9))
        fns[name] = lambda t=trainer, s=steps: t.train_step(next(s))
        flops[name] = count_flops(fns[name]) / 1e9
        model = trainer.run.model
        feats = trainer.run.train_set.image_tokens(0).shape
        shape = (
            f"8 queries x 4 demos (2 groups of 4); M-Hub {model.mhub.config.hidden_size}x{model.mhub.config.num_hidden_layers} "
            f"on {feats[0]}x{feats[1]} features, {model.num_query_tokens} query tokens; LLM llama "
            f"{model.llm.config.hidden_size}x{model.llm.config.num_hidden_layers}"
        )
        print(f"   {name}: built, {flops[name]:.0f} GFLOP per step", flush=True)
    print(f"== mmict_step | {shape} | train_step", flush=True)
    times = interleaved(fns, reps, "step")
    write_case("mmict_step", "train_step", shape, times, "mmict-baseline", write, flops)
    tmp.cleanup()


def write_case(op, mode, shape, times, reference, write, flops=None) -> None:
    """One row per provider. ``speedup``: the reference's median over this one's; ``paired_speedup``:
    the median over rounds of (reference / this provider) within the round, which a slow spell of
    the machine that spans a round cancels from."""
    ref_walls = times[reference][0]
    ref = statistics.median(ref_walls)
    for name, (walls, cpus, faults) in times.items():
        median = statistics.median(walls)
        row = dict(
            op=op, provider=name, mode=mode, shape=shape, dtype="float32", median_s=median, p20_s=_percentile(walls, 0.2),
            p80_s=_percentile(walls, 0.8), cpu_median_s=statistics.median(cpus), reps=len(walls), reference=reference,
            speedup=ref / median, gflop=(flops or {}).get(name, ""),
            paired_speedup=statistics.median(r / w for r, w in zip(ref_walls, walls)),
            minor_faults=int(statistics.median(faults)),
        )  # fmt: skip
        print(f"   {name:<18} median {median:7.3f}s  [p20 {row['p20_s']:.3f}, p80 {row['p80_s']:.3f}]  "
              f"cpu {row['cpu_median_s']:.3f}s  {ref / median:.3f}x vs {reference} (paired {row['paired_speedup']:.3f}x)  "
              f"{row['minor_faults']} minor page faults", flush=True)  # fmt: skip
        write(row)


def _upgrade_header(path: str) -> None:
    """Rewrite an existing results file under today's columns (a column it lacks stays empty in its rows)."""
    if not os.path.exists(path):
        return
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames == CSV_COLUMNS:
            return
        unknown = set(reader.fieldnames or ()) - set(CSV_COLUMNS)
        if unknown:
            raise SystemExit(f"--out: {path} has columns this script does not write ({sorted(unknown)}); use another folder")
        rows = list(reader)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    p.add_argument("--reps", type=int, default=7, help="repetitions per provider (default 7)")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"), help="folder of cpu_speed.csv (rows appended)")
    args = p.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if any(c not in CASES for c in cases):
        raise SystemExit(f"--cases: expected some of {CASES}, got {cases}")
    if torch.cuda.is_available():
        print("note: this script times the CPU; the GPU is not used")
    os.environ.setdefault("MMICT_KERNELS_SKIP_VALUE_CHECKS", "1")  # as bench_hub.py: time the work, not the input checks
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(args.threads)

    import transformers
    from bench_timing import environment

    env = environment(torch.device("cpu"), ROOT)
    malloc = " ".join(f"{k}={os.environ[k]}" for k in MALLOC_ENV if os.environ.get(k)) or "glibc defaults"
    common = dict(threads=args.threads, device=env["gpu"], torch=env["torch"], transformers=transformers.__version__,
                  commit=env["commit"], date=env["date"], malloc=malloc)  # fmt: skip
    print(f"cpu_speed on {env['gpu']} | {args.threads} threads | torch {env['torch']} | transformers {transformers.__version__} "
          f"| commit {env['commit']} | {env['date']} | malloc: {malloc}\nCPU NUMBERS: wall clock on this machine; nothing here is a GPU claim.")  # fmt: skip
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "cpu_speed.csv")
    _upgrade_header(path)
    new_file = not os.path.exists(path)
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        if new_file:
            writer.writeheader()

        def write(row):
            row = {**common, **row}
            writer.writerow({c: (f"{row[c]:.4g}" if isinstance(row.get(c), float) else row.get(c, "")) for c in CSV_COLUMNS})
            handle.flush()

        for case in cases:
            {"qformer": qformer_case, "reuse": reuse_case, "step": step_case}[case](args.reps, write)
    print(f"rows appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
