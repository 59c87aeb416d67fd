"""Per-rank parameter and optimizer bytes of the published MMICT model under DDP and FSDP2, at 1, 2, 4 and 8 ranks.

The model is ``configs/mmict_paper.yaml``'s shape: ln_vision (1408), the InstructBLIP Q-Former
(BERT-base, 32 queries, cross-attention every 2nd layer, image width 1408) as ``FusedMHub``, the
FC into the LLM, and a frozen FlanT5-XL or FlanT5-XXL (their published configs) stored in bf16
(``model.llm_dtype: bfloat16``); the trainable parts in float32. Random weights on the meta
device: only shapes and dtypes exist, so the XXL (11 B parameters) fits on a laptop.

Measured, not computed by formula: each row builds the model, applies the driver's own sharding
(``mmict_kernels.icl.distributed.shard_model``, FSDP2 ``fully_shard``) over a fake process group of
N ranks (this process is rank 0, whose shards are the largest: FSDP2 pads dim 0 to a multiple of
N), creates the driver's AdamW (``icl.training.make_optimizer``) and takes one step on zero
gradients, then sums the bytes of the tensors rank 0 holds: its parameter shards (or whole
parameters) and the optimizer state (exp_avg, exp_avg_sq, step). Strategies:

- ``ddp``: every rank holds the whole model and the whole optimizer state (``train.fsdp: false``);
- ``fsdp``: the frozen LLM sharded, the trainable parts replicated (``train.fsdp: true``);
- ``fsdp+trainable``: the trainable parts and their optimizer state sharded too
  (``train.fsdp_shard_trainable: true``).

Not included: gradients (trainable parts only: the size of their parameters, or their shard),
activations, DDP's gradient buckets, the CUDA context, FSDP2's gathered unit during its compute.

    python benchmarks/fsdp_memory.py          # writes benchmarks/results/fsdp_memory.csv
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import subprocess

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
COLUMNS = ["model", "strategy", "world_size", "param_bytes_per_rank", "optimizer_bytes_per_rank", "how_measured",
           "torch", "commit", "date"]  # fmt: skip

# The published FlanT5 configs (google/flan-t5-xl, google/flan-t5-xxl config.json).
FLAN_T5 = {
    "flan-t5-xl": dict(d_model=2048, d_ff=5120, d_kv=64, num_heads=32, num_layers=24, num_decoder_layers=24),
    "flan-t5-xxl": dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, num_decoder_layers=24),
}
T5_COMMON = dict(vocab_size=32128, feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.1)
MHUB_VOCAB = 30523  # InstructBLIP's Q-Former tokenizer: BERT's 30522 + [DEC]
NUM_QUERY_TOKENS, VISION_WIDTH = 32, 1408
STRATEGIES = ("ddp", "fsdp", "fsdp+trainable")


def build_model(llm_name: str):
    """The MMICT model of configs/mmict_paper.yaml with FlanT5 ``llm_name``, on the meta device."""
    from transformers import InstructBlipQFormerConfig, InstructBlipQFormerModel, T5Config, T5ForConditionalGeneration

    from mmict_kernels.icl.model import MMICTModel
    from mmict_kernels.modules.mhub import FusedMHub

    with torch.device("meta"):
        qformer = InstructBlipQFormerModel(InstructBlipQFormerConfig(vocab_size=MHUB_VOCAB, encoder_hidden_size=VISION_WIDTH))
        mhub = FusedMHub.from_hf(qformer, "torch", query_tokens=torch.zeros(1, NUM_QUERY_TOKENS, qformer.config.hidden_size))
        llm = T5ForConditionalGeneration(T5Config(**FLAN_T5[llm_name], **T5_COMMON))
        llm.to(torch.bfloat16).requires_grad_(False).eval()
        return MMICTModel(mhub, llm, VISION_WIDTH, "encoder-decoder", NUM_QUERY_TOKENS, torch.nn.LayerNorm(VISION_WIDTH))


def measure(llm_name: str, strategy: str, world: int) -> tuple[int, int]:
    """(parameter bytes, optimizer bytes) that rank 0 of ``world`` holds under ``strategy``."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from mmict_kernels.icl.config import TrainConfig
    from mmict_kernels.icl.distributed import local_nbytes, shard_model
    from mmict_kernels.icl.training import make_optimizer

    model = build_model(llm_name)
    if strategy != "ddp":
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
        try:
            shard_model(model, shard_trainable=strategy == "fsdp+trainable", param_dtype=torch.bfloat16)
        finally:
            dist.destroy_process_group()
    params = local_nbytes(model.parameters())
    optimizer = make_optimizer(model, TrainConfig())
    for p in model.trainable_parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    states = [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return params, local_nbytes(states)


def _git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, text=True).strip()
    except Exception:
        return "unknown"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(FLAN_T5), choices=list(FLAN_T5))
    p.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--out", default=os.path.join(HERE, "results", "fsdp_memory.csv"))
    args = p.parse_args(argv)
    tail = ("and one step of the driver's AdamW (params: what the rank holds; optimizer: exp_avg, exp_avg_sq, step); "
            "meta-device tensors, LLM bf16, trainable parts float32")  # fmt: skip
    how = {
        "ddp": f"cpu_tensor_bytes: the whole model on every rank (DDP), {tail}",
        "fsdp": f"cpu_tensor_bytes: rank 0's shards after the driver's shard_model (FSDP2 fully_shard) over a fake process "
        f"group of world_size ranks, trainable parts replicated, {tail}",
        "fsdp+trainable": f"cpu_tensor_bytes: rank 0's shards after the driver's shard_model (FSDP2 fully_shard, "
        f"shard_trainable) over a fake process group of world_size ranks, {tail}",
    }
    common = {"torch": torch.__version__, "commit": _git_commit(), "date": datetime.date.today().isoformat()}
    rows = []
    for name in args.models:
        for strategy in STRATEGIES:
            for world in args.world_sizes:
                params, optim = measure(name, strategy, world)
                rows.append({"model": name, "strategy": strategy, "world_size": world, "param_bytes_per_rank": params,
                             "optimizer_bytes_per_rank": optim, "how_measured": how[strategy], **common})  # fmt: skip
                print(
                    f"{name:<12} {strategy:<15} {world}  params {params / 2**30:7.2f} GiB  optimizer {optim / 2**30:6.2f} GiB",
                    flush=True,
                )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
