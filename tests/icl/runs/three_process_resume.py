"""Resume on another number of processes: the 2-process FSDP checkpoint of two_process_scenarios.py
(``fsdp_reshard``, 3 of 5 steps) continued by 3 processes (torchrun, gloo); rank 0 writes the losses of
the steps it ran to ``RUN/resumed_on_3.pt``. ``torch.distributed.checkpoint`` reshards the state.
"""

import os
import sys

import torch

from mmict_kernels.icl.config import load_config
from mmict_kernels.icl.distributed import init_distributed
from mmict_kernels.icl.training import Trainer

# Run as a script by torchrun (outside pytest): the tests' helpers are found from here.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from helpers.tiny_run import TINY_RUN_OVERRIDES as TINY  # noqa: E402
from helpers.torchrun import run_script  # noqa: E402


def main(run: str) -> None:
    rank, _, _ = init_distributed()
    torch.set_num_threads(1)
    cfg = load_config(None, TINY + ["train.fsdp=true", "train.batch_size=12", f"train.output_dir={run}"])
    losses = Trainer(cfg).fit(resume=True)
    if rank == 0:
        torch.save(losses, os.path.join(run, "resumed_on_3.pt"))


if __name__ == "__main__":
    run_script(main)
