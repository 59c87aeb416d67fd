#!/usr/bin/env python3
"""memory.py: what a Q-Former training forward keeps for backward, per provider, and the MMICT step's peak memory.

    python benchmarks/memory.py                          # B = 4 and 64, every provider, the MMICT step (CPU: ~15 min)
    python benchmarks/memory.py --batches 4 --no-step    # the Q-Former rows at B = 4 only
    python benchmarks/memory.py --step-only

Saved-for-backward bytes (a device-independent count, run on whatever device is here): one
training forward (dropout on, as in training) of transformers' default InstructBLIP Q-Former
(768 x 12 layers, 12 x 64 heads, cross-attention every 2nd layer, 32 queries + 32 text tokens,
257 x 1408 image tokens, float32, random weights) with every tensor autograd keeps seen through
``torch.autograd.graph.saved_tensors_hooks``, counted once per storage, parameters excluded (a
copy of a weight counts). ``activations_mib`` leaves out the kept tensors shaped like a weight (or
like a concatenation of the Q/K/V weights): copies of weights.

Providers: ``hf-eager`` and ``hf-sdpa`` (transformers' ``InstructBlipQFormerModel``),
``fused-mhub-torch`` (``FusedMHub.from_hf(..., backend="torch")``, the CPU default) and
``fused-mhub-triton`` (the Triton path, compile-only: under ``mmict_kernels.testing.compile_only``
every kernel compiles for sm_90 and nothing runs, while the tensors autograd keeps are allocated
exactly as on a GPU; the matmuls around the kernels still run on the CPU), each with and without
gradient checkpointing (``mode``). ``vs_hf_eager`` is the ratio to hf-eager with the same mode.

The MMICT step (``op=mmict_step``): one ``Trainer.train_step`` of ``benchmarks/bench_modules.py``'s
providers (``mmict-fused``, ``mmict-baseline``, ``mmict-official``) at the CPU_STEP_MODEL shape
(M-Hub 768 x 12 on 257 x 1408 features, 8 queries x 4 demonstrations in 2 groups of 4, a 4-layer
1024-wide Llama), each in its own process: the saved-for-backward bytes of the step's forward
(parameters excluded) and its peak memory: on a CPU the resident set's high-water mark during
the step (``VmHWM`` after resetting it through ``/proc/self/clear_refs``), on a GPU
``torch.cuda.max_memory_allocated``; ``step_extra_mib`` is that peak minus what was resident
before the step (the model, optimizer state, cached features).

Rows are appended to ``benchmarks/results/memory_<device>.csv`` (columns in CSV_COLUMNS).
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import subprocess
import sys
import tempfile

# The Triton rows compile kernels for the GPU (compile-only); @triton.jit picks the interpreter at
# import time, so the interpreter must be off before anything imports triton.
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
DEFAULT_OUT = os.path.join(ROOT, "benchmarks", "results")
CSV_COLUMNS = [
    "op", "provider", "mode", "shape", "dtype", "saved_mib", "activations_mib", "weight_copies_mib", "vs_hf_eager",
    "peak_mib", "step_extra_mib", "device", "torch", "triton", "transformers", "commit", "date", "note",
]  # fmt: skip
QFORMER_PROVIDERS = ("hf-eager", "hf-sdpa", "fused-mhub-torch", "fused-mhub-triton")
STEP_PROVIDER_NAMES = ("mmict-fused", "mmict-baseline", "mmict-official")
MIB = 2**20


# ---------------------------------------------------------------------------------------------
# Counting what autograd keeps
# ---------------------------------------------------------------------------------------------
class SavedBytes:
    """``with SavedBytes(params) as s: ...`` counts the storages autograd keeps inside the block.

    Each storage counts once (views of one tensor, or a tensor kept by several ops, are one); the
    parameters' storages are excluded. A kept tensor shaped like one of ``weight_shapes`` (and not a
    parameter) counts as a weight copy.
    """

    def __init__(self, params, weight_shapes=()):
        self.params = {p.untyped_storage().data_ptr() for p in params}
        self.weight_shapes = set(weight_shapes)
        self.storages: dict[int, tuple[int, bool]] = {}

    def _pack(self, t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self.params and ptr not in self.storages:
            self.storages[ptr] = (storage.nbytes(), tuple(t.shape) in self.weight_shapes)
        # An alias without autograd history: handing back ``t`` itself would let a node that keeps its own
        # output hold that output's Python object, a reference cycle through C++ that gc never frees
        # (every counted graph would leak; a full run was OOM-killed that way).
        return t.detach()

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(n for n, _ in self.storages.values())

    @property
    def weight_copies(self) -> int:
        return sum(n for n, is_weight in self.storages.values() if is_weight)


def weight_shapes(config) -> set:
    """Shapes of the Q-Former's 2-D weights, and of the Q/K/V (K/V) weights concatenated."""
    h, e, i = config.hidden_size, config.encoder_hidden_size, config.intermediate_size
    return {(h, h), (h, e), (i, h), (h, i), (3 * h, h), (2 * h, e), (config.vocab_size, h), (config.max_position_embeddings, h)}


def qformer_inputs(config, batch: int, text: int = 32, num_query: int = 32, image_tokens: int = 257):
    gen = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(1, config.vocab_size, (batch, text), generator=gen),
        "attention_mask": torch.ones(batch, num_query + text, dtype=torch.long),
        "query_embeds": torch.randn(batch, num_query, config.hidden_size, generator=gen),
        "encoder_hidden_states": torch.randn(batch, image_tokens, config.encoder_hidden_size, generator=gen),
    }


def build_provider(name: str, hf, checkpointing: bool):
    import copy

    from mmict_kernels import FusedMHub

    model = copy.deepcopy(hf)
    if checkpointing:
        model.gradient_checkpointing_enable()
    if name.startswith("hf-"):
        model.set_attn_implementation(name[len("hf-") :])
        return model.train()
    return FusedMHub.from_hf(model, backend=name[len("fused-mhub-") :]).train()


def count_qformer(name: str, hf, inputs, checkpointing: bool) -> SavedBytes:
    """One training forward of a provider, counted."""
    import contextlib

    model = build_provider(name, hf, checkpointing)
    context = contextlib.nullcontext()
    if name == "fused-mhub-triton":
        from mmict_kernels.testing.compile_only import compile_only

        context = compile_only()
    counter = SavedBytes(model.parameters(), weight_shapes(hf.config))
    torch.manual_seed(0)
    with context, counter:
        model(**inputs)
    del model
    gc.collect()  # the graph (and its kept tensors, GBs at B = 64) can sit in reference cycles until collected
    return counter


# ---------------------------------------------------------------------------------------------
# The MMICT step's peak (one process per provider)
# ---------------------------------------------------------------------------------------------
def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def step_child(provider: str) -> dict:
    """Run in a fresh process: build the provider's trainer, one warm-up step, then one measured step."""
    from bench_modules import CPU_STEP_MODEL, make_step_trainer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as out_dir:
        trainer = make_step_trainer(device, provider, out_dir, CPU_STEP_MODEL if device.type == "cpu" else None)
        trainer.train_step(0)  # warm: optimizer state allocated, caches filled
        counter = SavedBytes(trainer.model.parameters())
        if device.type == "cuda":
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            before = _rss_kib("VmRSS") * 1024
            with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
                f.write("5")
        with counter:
            trainer.train_step(1)
        if device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _rss_kib("VmHWM") * 1024
        model = trainer.run.model
        shape = (
            f"8 queries x 4 demos (2 groups of 4); M-Hub {model.mhub.config.hidden_size}x{model.mhub.config.num_hidden_layers} "
            f"on {trainer.run.train_set.image_tokens(0).shape[0]}x{trainer.run.train_set.image_tokens(0).shape[1]} features, "
            f"LLM {model.llm.config.model_type} {model.llm.config.hidden_size}x{model.llm.config.num_hidden_layers}"
        )
    return {
        "saved": counter.total,
        "peak": peak,
        "extra": peak - before,
        "shape": shape,
        "device": device.type,
        "peak_kind": "max_memory_allocated" if device.type == "cuda" else "VmHWM",
    }


def run_step_rows(write_row) -> None:
    for provider in STEP_PROVIDER_NAMES:
        print(f"== mmict_step {provider}: one process, warm-up step, measured step", flush=True)
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--step-child", provider], capture_output=True, text=True, cwd=ROOT
        )
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("STEP_RESULT ")]
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            print(f"   {provider} failed: {tail}")
            write_row(op="mmict_step", provider=provider, mode="train_step", note=f"failed: {tail}")
            continue
        r = json.loads(lines[-1][len("STEP_RESULT ") :])
        print(
            f"   saved {r['saved'] / MIB:.1f} MiB, peak {r['peak'] / MIB:.0f} MiB ({r['peak_kind']}), step extra {r['extra'] / MIB:.0f} MiB"
        )
        write_row(
            op="mmict_step", provider=provider, mode="train_step", shape=r["shape"], dtype="float32" if r["device"] == "cpu" else "bf16-autocast",
            saved_mib=r["saved"] / MIB, peak_mib=r["peak"] / MIB, step_extra_mib=r["extra"] / MIB,
            note=f"peak = {r['peak_kind']} during one step (after a warm-up step); saved = the step's forward, parameters excluded",
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="4,64", help="comma-separated Q-Former batch sizes (default 4,64)")
    p.add_argument("--providers", default=",".join(QFORMER_PROVIDERS), help=f"subset of {','.join(QFORMER_PROVIDERS)}")
    p.add_argument("--no-checkpointing", action="store_true", help="skip the gradient-checkpointing rows")
    p.add_argument("--no-step", action="store_true", help="skip the MMICT step rows")
    p.add_argument("--step-only", action="store_true", help="only the MMICT step rows")
    p.add_argument("--out", default=DEFAULT_OUT, help="folder of memory_<device>.csv (rows are appended)")
    p.add_argument("--step-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.step_child:
        print("STEP_RESULT " + json.dumps(step_child(args.step_child)), flush=True)
        return 0

    import transformers
    from bench_timing import environment
    from transformers import InstructBlipQFormerConfig, InstructBlipQFormerModel

    torch.set_num_threads(min(2, torch.get_num_threads()))
    device = torch.device("cpu")
    env = environment(device, ROOT)
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # pragma: no cover - depends on the machine
        triton_version = "not installed"
    common = {
        "device": "device-independent count (CPU)",
        "torch": env["torch"],
        "triton": triton_version,
        "transformers": transformers.__version__,
        "commit": env["commit"],
        "date": env["date"],
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"memory_{'cpu' if not torch.cuda.is_available() else 'cuda'}.csv")
    new_file = not os.path.exists(path)
    handle = open(path, "a", newline="")
    writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
    if new_file:
        writer.writeheader()

    def write_row(**fields):
        row = {**common, **{k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in fields.items()}}
        if fields.get("op") == "mmict_step":
            row["device"] = env["gpu"]  # a peak is the machine's own
        writer.writerow({c: row.get(c, "") for c in CSV_COLUMNS})
        handle.flush()

    print(
        f"memory.py | torch {env['torch']} | triton {triton_version} | transformers {transformers.__version__} | commit {env['commit']}"
    )
    if not args.step_only:
        config = InstructBlipQFormerConfig()  # transformers' defaults: 768 x 12, 1408-wide image features
        torch.manual_seed(0)
        hf = InstructBlipQFormerModel(config).train()
        providers = [s.strip() for s in args.providers.split(",") if s.strip()]
        modes = [False] if args.no_checkpointing else [False, True]
        for batch in (int(b) for b in args.batches.split(",")):
            inputs = qformer_inputs(config, batch)
            shape = (
                f"B={batch} Nq=32+32 text image=257x1408 hidden=768 layers=12 heads=12 dropout="
                f"{config.attention_probs_dropout_prob}/{config.hidden_dropout_prob} train"
            )
            for checkpointing in modes:
                mode = "saved_for_backward" + (" gradient_checkpointing" if checkpointing else "")
                base = None
                for name in providers:
                    counter = count_qformer(name, hf, inputs, checkpointing)
                    base = counter.total if name == "hf-eager" else base
                    ratio = counter.total / base if base else float("nan")
                    note = (
                        "compile-only: sm_90 kernels compiled, not run; kept tensors allocated as on a GPU"
                        if name.endswith("triton")
                        else ""
                    )
                    print(f"   B={batch:<3} {mode:<42} {name:<18} saved {counter.total / MIB:8.1f} MiB "
                          f"(weight copies {counter.weight_copies / MIB:6.1f})  vs hf-eager {ratio:.3f}x", flush=True)  # fmt: skip
                    write_row(
                        op="qformer_instructblip", provider=name, mode=mode, shape=shape, dtype="float32",
                        saved_mib=counter.total / MIB, activations_mib=(counter.total - counter.weight_copies) / MIB,
                        weight_copies_mib=counter.weight_copies / MIB, vs_hf_eager=ratio, note=note,
                    )  # fmt: skip
    if not args.no_step:
        run_step_rows(write_row)
    handle.close()
    print(f"rows appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
