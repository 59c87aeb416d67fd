"""The training step with every feature on, compile-only (run by test_training_features.py in a process
without TRITON_INTERPRET): kernels compile for sm_90, nothing launches, and the host syncs are counted.

Prints one line ``RESULT {"syncs": N, "where": [...], "errors": [...], "loss_is_tensor": bool}``.
"""

import json
import sys
import tempfile

import torch

from mmict_kernels.icl.config import load_config
from mmict_kernels.icl.training import Trainer
from mmict_kernels.testing.compile_only import compile_only
from mmict_kernels.testing.host_syncs import HostSyncCounter

OVERRIDES = [
    "data.shapes_train_size=48",
    "data.shapes_eval_size=8",
    "train.batch_size=8",
    "train.progress=false",
    "train.tensorboard=false",
    "model.backend=auto",
    'model.mhub_config={"hidden_size": 64, "num_attention_heads": 2}',  # head dim 32: the Triton kernels
    'model.llm_config={"hidden_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1}',
    "demos.sampling=one-to-many",  # the shared prefix (decoder-only LLM)
    "demos.group_size=2",
    "train.grad_accum_steps=2",
    "train.precision=fp16",  # autocast + GradScaler (a simulated GPU runs the GPU's precision)
    "train.gradient_checkpointing=true",
    "train.grad_clip=1.0",
]


def main() -> None:
    torch.set_num_threads(1)
    with compile_only(arch=90) as log:
        trainer = Trainer(load_config(None, OVERRIDES + [f"train.output_dir={tempfile.mkdtemp()}"] + sys.argv[1:]))
        batches = trainer.make_step_batches(0)  # built on the host, as the prefetch thread does
        with HostSyncCounter() as syncs:
            loss = trainer.train_step(0, batches)
    result = {
        "syncs": syncs.count,
        "where": syncs.where,
        "errors": [m for _, m in log.errors],
        "loss_is_tensor": isinstance(loss, torch.Tensor),
        "scaler": trainer.precision.scaler is not None,
        "micro_batches": len(batches),
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
