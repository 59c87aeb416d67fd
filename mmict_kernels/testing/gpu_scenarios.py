"""The GPU paths of the public API at production shapes, compiled without a GPU.

Each scenario runs a public op or module exactly as a user would on a GPU (the production shapes of docs/DESIGN.md:
M-Hub 768 x 12 heads on 257 x 1408 image tokens, 32 queries + 32 text; the LLM presets
``llm2048`` and ``llm4096_gqa``), under :func:`~mmict_kernels.testing.compile_only.compile_only`:
every Triton kernel it launches compiles for the GPU target, nothing executes, and
:class:`~mmict_kernels.testing.host_syncs.HostSyncCounter` counts the device-to-host syncs.

Each scenario builds its modules and inputs, then runs one step; the step's host syncs are counted
(construction is not a step). Scenarios marked ``training`` are the default training configurations: any register spill there
fails the run (``--fail-on-spill``). Depth does not change the kernels, so modules use 2 layers
(one with cross-attention, one without) to keep the CPU work small.

    python -m mmict_kernels.testing.gpu_scenarios --csv kernel_resources.csv --json summary.json --fail-on-spill
    python -m mmict_kernels.testing.gpu_scenarios --arch 80 --names mhub_train_bf16,prefix_llm2048_bf16
    python -m mmict_kernels.testing.gpu_scenarios --training --only prefix_   # name prefixes; --list shows all

The run fails (exit 1) on a compile error, a launch the GPU would refuse, a host-sync count over
the scenario's allowance, and with ``--fail-on-spill`` a spill in a training scenario. The CSV
has one row per compiled kernel specialisation (``compile_only.CSV_COLUMNS``) plus the device
label (``compile-only (no GPU)``), the Triton and torch versions and the git commit; ``--append``
adds to an existing table. Run without ``TRITON_INTERPRET`` and with a fresh ``TRITON_CACHE_DIR``
(the command sets a fresh one unless ``--keep-cache``).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BATCH = 2  # samples per M-Hub call; the kernels' specialisations do not depend on it beyond divisibility


@dataclasses.dataclass
class Scenario:
    """``setup()`` builds the modules and inputs and returns the step; only the step's host syncs count."""

    name: str
    setup: Callable[[], Callable[[], None]]
    training: bool  # a default training configuration: spills fail the run

    @property
    def max_syncs(self) -> int:
        """Host syncs allowed in one step: one where ALLOWED_SYNCS names the scenario, else none."""
        return int(self.name in ALLOWED_SYNCS)

    @property
    def why_syncs(self) -> str:
        return ALLOWED_SYNCS.get(self.name, "")


# Every scenario whose step may sync with the host (once), and why; every other step syncs never.
ALLOWED_SYNCS = {
    # generate: trimming the steps after every row finished (and one per eos_check_every = 8 steps)
    "prefix_cache_generate_bf16": "one per call: trimming the steps after every row finished (and one per 8 steps)",
    "aim_step_bf16": "transformers' own mask preprocessing in the frozen backbone's aggregation "
    "(find_packed_sequence_indices); a demonstration bank computes each aggregation once",
}


# ---------------------------------------------------------------------------------------
# M-Hub (FusedMHub, backend="auto")
# ---------------------------------------------------------------------------------------
def _qformer(dtype: torch.dtype, train: bool, num_layers: int = 2, num_queries: int = 32):
    from transformers import InstructBlipQFormerConfig

    from ..modules import FusedMHub

    config = InstructBlipQFormerConfig(
        num_hidden_layers=num_layers
    )  # 768 x 12 heads, cross-attention every 2nd layer, 1408-wide images
    hub = FusedMHub(config, flavor="instructblip", num_query_tokens=num_queries, backend="auto").to(dtype)
    return hub.train(train), config


def _text(batch: int, config, text_len: int = 32, num_queries: int = 32):
    ids = torch.randint(1, config.vocab_size, (batch, text_len))
    lengths = torch.tensor([text_len - 3 * (b % 4) for b in range(batch)])  # ragged right padding
    mask = (torch.arange(text_len)[None, :] < lengths[:, None]).long()
    return ids, torch.cat([torch.ones(batch, num_queries, dtype=torch.long), mask], dim=1)


def mhub_step(dtype: torch.dtype, train: bool, num_queries: int = 32) -> None:
    """One training step of the Q-Former: forward over images + text, backward to the parameters and images."""
    hub, config = _qformer(dtype, train, num_queries=num_queries)
    ids, mask = _text(BATCH, config, num_queries=num_queries)
    images = torch.randn(BATCH, 257, config.encoder_hidden_size, dtype=dtype, requires_grad=True)

    def step():
        out = hub(input_ids=ids, attention_mask=mask, encoder_hidden_states=images).last_hidden_state
        out.float().square().mean().backward()

    return step


def mhub_objectives(dtype: torch.dtype) -> None:
    """BLIP-2 stage 1: ITC + ITM + ITG masks over one image K/V cache (unimodal, bidirectional, causal, text-only stream)."""
    hub, config = _qformer(dtype, True)
    ids, mask = _text(BATCH, config)
    images = torch.randn(BATCH, 257, config.encoder_hidden_size, dtype=dtype, requires_grad=True)

    def step():
        cache = hub.encode_image(images)
        outs = hub.forward_objectives(input_ids=ids, attention_mask=mask, image_kv=cache)
        sum(o.last_hidden_state.float().square().mean() for o in outs).backward()

    return step


def mhub_video(dtype: torch.dtype) -> None:
    """Video: ragged clips of 1..8 frames x 257 tokens, packed (varlen cross-attention), forward + backward."""
    hub, config = _qformer(dtype, True)
    frames = [8, 3, 5, 1]
    ids, mask = _text(len(frames), config)
    tokens = torch.randn(sum(frames), 257, config.encoder_hidden_size, dtype=dtype, requires_grad=True)

    def step():
        cache = hub.encode_image(tokens, num_frames=torch.tensor(frames))
        hub(input_ids=ids, attention_mask=mask, image_kv=cache).last_hidden_state.float().square().mean().backward()

    return step


# ---------------------------------------------------------------------------------------
# Demo-prefix attention (ops.prefix_attention) at the LLM presets
# ---------------------------------------------------------------------------------------
PREFIX_PRESETS = {
    # (batch, len_q, len_prefix, heads, kv_heads, head_dim): 4 demonstrations x 33 tokens shared by 64 rows
    "llm2048": (64, 64, 132, 16, 16, 128),
    "llm4096_gqa": (64, 64, 132, 32, 8, 128),
    "qwen2_d64_gqa7": (64, 64, 132, 14, 2, 64),  # Qwen2-0.5B-class heads: 64-dim, 7 query heads per K/V head
}


def prefix_op(
    preset: str,
    dtype: torch.dtype,
    *,
    deterministic: bool = False,
    decode: bool = False,
    backward: bool = True,
    rows: tuple[int, int] | None = None,
) -> None:
    """``rows`` = (batch, own tokens) overrides the preset's rows (4 rows share each prefix)."""
    from .. import ops

    batch, len_q, len_p, heads, kv_heads, dim = PREFIX_PRESETS[preset]
    if rows is not None:
        batch, len_q = rows
    groups = batch // 4
    len_k = len_q + 1 if decode else len_q
    if decode:
        len_q = 1
    q = torch.randn(batch, len_q, heads, dim, dtype=dtype, requires_grad=backward)
    k = torch.randn(batch, len_k, kv_heads, dim, dtype=dtype, requires_grad=backward)
    v = torch.randn(batch, len_k, kv_heads, dim, dtype=dtype, requires_grad=backward)
    pk = torch.randn(groups, len_p, kv_heads, dim, dtype=dtype, requires_grad=backward)
    pv = torch.randn(groups, len_p, kv_heads, dim, dtype=dtype, requires_grad=backward)
    ids = torch.arange(batch) // 4
    lengths = torch.full((groups,), len_p, dtype=torch.int32) - (torch.arange(groups, dtype=torch.int32) % 3)
    seqlens = torch.full((batch,), len_k, dtype=torch.int32) - (torch.arange(batch, dtype=torch.int32) % 5)

    def step():
        out = ops.prefix_attention(q, k, v, pk, pv, ids, causal=True, prefix_lengths=lengths, seqlens_k=seqlens,
                                   deterministic=deterministic)  # fmt: skip
        if backward:
            out.float().square().mean().backward()

    return step


# ---------------------------------------------------------------------------------------
# The demo-prefix KV cache on a transformers decoder, and AIM
# ---------------------------------------------------------------------------------------
def _llama(dtype: torch.dtype, preset: str = "llm2048"):
    from transformers import LlamaConfig, LlamaForCausalLM

    _, _, _, heads, kv_heads, dim = PREFIX_PRESETS[preset]
    # The attention sees the preset's heads x head dim; a narrow residual stream (head_dim set
    # explicitly) keeps the CPU matmuls around it cheap (bfloat16 matmul backward is slow on CPUs).
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=heads, head_dim=dim,
                         num_key_value_heads=kv_heads, vocab_size=512, max_position_embeddings=1024)  # fmt: skip
    return LlamaForCausalLM(config).to(dtype).eval()


def prefix_cache_forward(dtype: torch.dtype) -> None:
    """DemoPrefixCache.build + forward_with_prefix + backward into the demonstration embeddings (MMICT training)."""
    from ..modules import DemoPrefixCache, forward_with_prefix

    model = _llama(dtype).requires_grad_(False)
    hidden = model.config.hidden_size
    demos = torch.randn(2, 40, hidden, dtype=dtype, requires_grad=True)
    rows = torch.randn(8, 24, hidden, dtype=dtype, requires_grad=True)
    mask = torch.ones(8, 24, dtype=torch.long)
    mask[1::2, 20:] = 0  # right padding

    def step():
        cache = DemoPrefixCache.build(model, demos, torch.tensor([40, 33], dtype=torch.int32))
        out = forward_with_prefix(model, cache, inputs_embeds=rows, attention_mask=mask, prefix_ids=torch.arange(8) % 2)
        out.logits.float().logsumexp(-1).mean().backward()

    return step


def prefix_cache_generate(dtype: torch.dtype) -> None:
    """generate_with_prefix: prefill + 4 decode steps (Lq = 1) on a shared prefix, left-padded prompts."""
    from ..modules import DemoPrefixCache, generate_with_prefix

    model = _llama(dtype, "llm4096_gqa")
    hidden = model.config.hidden_size
    with torch.no_grad():
        cache = DemoPrefixCache.build(model, torch.randn(2, 40, hidden, dtype=dtype), torch.tensor([40, 33]))
    prompts = torch.randint(1, 512, (8, 12))
    mask = torch.ones(8, 12, dtype=torch.long)
    mask[::3, :4] = 0  # left padding
    return lambda: generate_with_prefix(model, cache, prompts, attention_mask=mask, prefix_ids=torch.arange(8) % 2, max_new_tokens=5,
                                        eos_token_id=2)  # fmt: skip


def aim_step(dtype: torch.dtype) -> None:
    """AIM: a frozen LLaVA-style backbone (2048-wide Llama) aggregates demonstrations, the projection trains through the shared prefix."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    from ..icl.aim import AIMBatch, AIMModel, LlavaBackbone

    text = _llama(dtype).config
    vision = CLIPVisionConfig(
        hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4, image_size=64, patch_size=16
    )
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=511, vision_feature_layer=-1,
                         vision_feature_select_strategy="full")  # fmt: skip
    backbone = LlavaBackbone(LlavaForConditionalGeneration(config).to(dtype).eval())
    model = AIMModel(backbone, projection="mlp", eos_id=2, pad_id=0)  # the trainable projection stays float32
    g = torch.Generator().manual_seed(0)
    batch = AIMBatch(
        demo_images=torch.randn(4, 3, 64, 64, generator=g).to(dtype),
        demo_text=[[5, 6, 7, 8], [9, 10], [11, 12, 13], [14, 15, 16, 17, 18]],
        group_demos=[[0, 1], [2, 3]],
        query_images=torch.randn(4, 3, 64, 64, generator=g).to(dtype),
        query_group=torch.tensor([0, 0, 1, 1]),
        query_prompt=[[20, 21], [22], [23, 24, 25], [26]],
        query_answer=[[30], [31, 32], [33], [34]],
    )

    def step():
        nll, count = model(batch)
        (nll / max(count, 1)).backward()

    return step


def mmict_train_step() -> None:
    """The driver's MMICT training step (Trainer.train_step: batch to device, bf16 autocast, the M-Hub
    over every turn, the shared-prefix LLM, backward, clipping, AdamW) at the benchmark's GPU model
    shape: M-Hub 768 x 12 heads on 257 x 1408 features, 8 queries x 4 demonstrations in 2
    one-to-many groups, a Llama LLM with 16 x 128 heads (narrow residual stream, 2 layers)."""
    from ..icl.config import config_from_dict
    from ..icl.training import Trainer

    out_dir = tempfile.mkdtemp(prefix="mmict-scenario-")
    cfg = config_from_dict({
        "model": {
            "image_size": 224,
            "vision_config": dict(hidden_size=1408, intermediate_size=1408, num_hidden_layers=1, num_attention_heads=16, patch_size=14),
            "mhub_config": dict(hidden_size=768, num_hidden_layers=2, num_attention_heads=12, intermediate_size=3072,
                                cross_attention_frequency=2, max_position_embeddings=512),
            "llm_type": "llama",
            "llm_config": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=16, head_dim=128,
                               num_key_value_heads=16, max_position_embeddings=2048),
            "mhub_impl": "fused", "use_prefix_cache": True,
        },
        "data": {"shapes_train_size": 64, "shapes_eval_size": 8},
        "demos": {"num_demos": 4, "sampling": "one-to-many", "group_size": 4},
        "train": {"batch_size": 8, "max_steps": 10, "device": "cpu", "progress": False, "output_dir": out_dir, "log_every": 1000,
                  "precision": "bf16"},
    })  # fmt: skip
    trainer = Trainer(cfg)
    batch = trainer.make_batch(0)  # built on the host, as the training loop's prefetch thread does
    return lambda: trainer.train_step(0, batch)


# ---------------------------------------------------------------------------------------
# The list
# ---------------------------------------------------------------------------------------
def scenarios() -> list[Scenario]:
    out = []
    for name, dtype in DTYPES.items():
        out.append(Scenario(f"mhub_train_{name}", lambda d=dtype: mhub_step(d, True), training=True))
        out.append(Scenario(f"mhub_no_dropout_{name}", lambda d=dtype: mhub_step(d, False), training=True))
    # 128 learned queries (+ 32 text): long query blocks in self- and cross-attention, another backward
    # path than the default 32 queries (not a default configuration: spills are reported, not failed)
    out.append(Scenario("mhub_128_queries_bf16", lambda: mhub_step(torch.bfloat16, True, num_queries=128), training=False))
    out.append(Scenario("mhub_objectives_bf16", lambda: mhub_objectives(torch.bfloat16), training=True))
    out.append(Scenario("mhub_video_packed_bf16", lambda: mhub_video(torch.bfloat16), training=True))
    for preset in PREFIX_PRESETS:
        for name in ("bf16", "fp16"):
            out.append(Scenario(f"prefix_{preset}_{name}", lambda p=preset, d=DTYPES[name]: prefix_op(p, d), training=True))
        out.append(Scenario(f"prefix_{preset}_bf16_deterministic", lambda p=preset: prefix_op(p, torch.bfloat16, deterministic=True),
                            training=True))  # fmt: skip
        out.append(Scenario(f"prefix_{preset}_bf16_decode", lambda p=preset: prefix_op(p, torch.bfloat16, decode=True, backward=False),
                            training=False))  # fmt: skip
    # The MMICT step's LLM call: 8 short rows (query features + prompt, 12 own tokens) in 2 groups of
    # 4 sharing a demonstration prefix: 16-row tiles, another specialisation than the presets' 64-token rows.
    out.append(
        Scenario("prefix_llm2048_bf16_short_rows", lambda: prefix_op("llm2048", torch.bfloat16, rows=(8, 12)), training=True)
    )
    out.append(Scenario("prefix_llm2048_fp32", lambda: prefix_op("llm2048", torch.float32), training=False))
    out.append(Scenario("prefix_cache_forward_bf16", lambda: prefix_cache_forward(torch.bfloat16), training=True))
    out.append(Scenario("prefix_cache_generate_bf16", lambda: prefix_cache_generate(torch.bfloat16), training=False))
    out.append(Scenario("aim_step_bf16", lambda: aim_step(torch.bfloat16), training=True))
    out.append(Scenario("mmict_train_step_bf16", mmict_train_step, training=True))
    return out


class OutOfTime(BaseException):
    """SIGTERM (e.g. from ``timeout``) during a run: stop, and still write what was compiled so far."""


def _stop_on_sigterm() -> None:
    import signal

    def stop(signum, frame):
        raise OutOfTime()

    signal.signal(signal.SIGTERM, stop)


# One scenario per kernel family and dtype class (--smoke): the M-Hub (attention with dropout, the
# epilogues, float32), packed video cross-attention, prefix attention at head dims 128 and 64 with
# GQA, deterministic, decode and the MMICT step's short rows. A quick pass for other Triton versions.
SMOKE_SCENARIOS = (
    "mhub_train_bf16", "mhub_no_dropout_fp32", "mhub_video_packed_bf16", "prefix_llm2048_bf16",
    "prefix_llm2048_bf16_deterministic", "prefix_llm2048_bf16_short_rows", "prefix_llm4096_gqa_bf16_decode",
    "prefix_qwen2_d64_gqa7_fp16",
)  # fmt: skip


def run_scenarios(selected: list[Scenario], arch: int, num_sms: int | None = None):
    """Run the scenarios compile-only; returns (log, {scenario: {"syncs", "where", "seconds", ...}})."""
    from .compile_only import compile_only
    from .host_syncs import HostSyncCounter

    summary = {}
    with compile_only(arch=arch, num_sms=num_sms) as log:
        for scenario in selected:
            torch.manual_seed(0)
            start = time.perf_counter()
            errors_before = len(log.errors)
            syncs = HostSyncCounter()
            try:
                with log.run(scenario.name):
                    step = scenario.setup()
                    with syncs:
                        step()
            except OutOfTime:
                log.errors.append((scenario.name, "stopped: SIGTERM (out of time); later scenarios not run"))
                summary[scenario.name] = {"syncs": syncs.count, "where": syncs.where, "seconds": round(time.perf_counter() - start, 1),
                                          "training": scenario.training, "max_syncs": scenario.max_syncs, "why_syncs": "",
                                          "ok": False, "errors": [log.errors[-1][1]]}  # fmt: skip
                break
            summary[scenario.name] = {
                "syncs": syncs.count, "where": syncs.where, "seconds": round(time.perf_counter() - start, 1),
                "training": scenario.training, "max_syncs": scenario.max_syncs, "why_syncs": scenario.why_syncs,
                "ok": len(log.errors) == errors_before, "errors": [m for _, m in log.errors[errors_before:]],
            }  # fmt: skip
            print(f"{scenario.name:<40} {summary[scenario.name]['seconds']:6.1f}s  syncs={syncs.count}", flush=True)
    return log, summary


def problems(log, summary: dict, fail_on_spill: bool) -> list[str]:
    """Everything that makes the run fail: compile errors, launches the GPU would refuse (shared memory,
    registers x warps, grid), missing resource reports, spills in training scenarios, too many host syncs."""
    found = [f"{scenario}: {message}" for scenario, message in log.errors]
    found += [f"{r.scenario}: {r.kernel} ({r.constexprs}): {why}" for r in log.records for why in r.launch_problems()]
    if fail_on_spill:
        training = {name for name, s in summary.items() if s["training"]}
        found += [
            f"{r.scenario}: {r.kernel} spills ({r.spill_stores} B stores, {r.spill_loads} B loads) with {r.constexprs}"
            for r in log.records
            if r.spills and training.intersection(r.launched_in)
        ]
    found += [f"{name}: {s['syncs']} host syncs (at most {s['max_syncs']}): {s['where']}" for name, s in summary.items()
              if s["syncs"] > s["max_syncs"]]  # fmt: skip
    return found


DEVICE_LABEL = "compile-only (no GPU)"
TABLE_COLUMNS = ("device", "triton", "torch", "commit")  # after compile_only.CSV_COLUMNS


def source_commit() -> str:
    """The git commit of the package's source tree (``+dirty`` with uncommitted changes), or "unknown"."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "mmict_kernels"], cwd=root,
                               capture_output=True, text=True, check=True)  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def write_table(path: str, log, append: bool = False, device: str = DEVICE_LABEL, commit: str | None = None) -> None:
    """One row per compiled kernel specialisation (compile_only.CSV_COLUMNS + TABLE_COLUMNS)."""
    import triton

    from .compile_only import CSV_COLUMNS, record_row

    commit = commit or source_commit()
    new_file = not (append and os.path.exists(path) and os.path.getsize(path) > 0)
    with open(path, "w" if new_file else "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=(*CSV_COLUMNS, *TABLE_COLUMNS))
        if new_file:
            writer.writeheader()
        for r in log.records:
            writer.writerow({**record_row(r), "device": device, "triton": triton.__version__, "torch": torch.__version__,
                             "commit": commit})  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmict_kernels.testing.gpu_scenarios", description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="GPU target compute capability x 10 (90: H100/H200, 80: A100)")
    p.add_argument("--num-sms", type=int, help="SMs the host launchers see (default: 132 for sm_90, 108 for sm_80)")
    p.add_argument("--only", default="", help="comma-separated name prefixes of the scenarios to run")
    p.add_argument("--names", default="", help="comma-separated exact names of the scenarios to run")
    p.add_argument("--training", action="store_true", help="only the default training configurations")
    p.add_argument("--smoke", action="store_true", help="only SMOKE_SCENARIOS (one per kernel family and dtype class)")
    p.add_argument("--csv", help="write one row per compiled kernel (the kernel_resources.csv columns)")
    p.add_argument("--append", action="store_true", help="append to --csv instead of replacing it")
    p.add_argument("--device-label", default=DEVICE_LABEL, help="the CSV's device column")
    p.add_argument("--commit", help="the CSV's commit column (default: the source tree's git commit, +dirty if changed)")
    p.add_argument("--json", help="write the per-scenario summary (host syncs, time, errors) and every kernel record")
    p.add_argument("--fail-on-spill", action="store_true", help="a register spill in a training scenario fails the run")
    p.add_argument("--keep-cache", action="store_true", help="use TRITON_CACHE_DIR as set (default: a fresh folder)")
    p.add_argument("--list", action="store_true", help="list the scenarios and exit")
    args = p.parse_args(argv)
    selected = scenarios()
    if args.training:
        selected = [s for s in selected if s.training]
    if args.smoke:
        selected = [s for s in selected if s.name in SMOKE_SCENARIOS]
    if args.only:
        prefixes = tuple(x.strip() for x in args.only.split(",") if x.strip())
        selected = [s for s in selected if s.name.startswith(prefixes)]
    if args.names:
        names = [x.strip() for x in args.names.split(",") if x.strip()]
        unknown = sorted(set(names) - {s.name for s in selected})
        if unknown:
            p.error(f"unknown scenario(s) {unknown}; --list shows them")
        selected = [s for s in selected if s.name in names]
    if args.list:
        print("\n".join(f"{s.name}{'  (training)' if s.training else ''}" for s in selected))
        return 0
    if not args.keep_cache:
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="mmict-triton-cache-")
    start = time.perf_counter()
    _stop_on_sigterm()  # a time limit still gets the CSV / JSON of what was compiled until then
    log, summary = run_scenarios(selected, args.arch, args.num_sms)
    if args.csv:
        write_table(args.csv, log, append=args.append, device=args.device_label, commit=args.commit)
    found = problems(log, summary, args.fail_on_spill)
    if args.json:
        import triton

        from .compile_only import record_row

        with open(args.json, "w") as f:
            json.dump({
                "arch": args.arch, "triton": triton.__version__, "torch": torch.__version__, "scenarios": summary,
                "kernels": len(log.records), "launches": log.launches, "problems": found,
                "records": [{**record_row(r), "module": r.module, "launch_problems": r.launch_problems()} for r in log.records],
                "seconds": round(time.perf_counter() - start, 1),
            }, f, indent=1)  # fmt: skip
    targets = sorted({r.target for r in log.records}) or [f"sm_{args.arch}"]
    print(f"{len(log.records)} kernel specialisations compiled for {', '.join(targets)} from {log.launches} launches "
          f"(Triton {__import__('triton').__version__}); {len(found)} problems")  # fmt: skip
    for line in found:
        print("  PROBLEM", line)
    return 1 if found else 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
