"""The multi-process scenarios of tests/icl/runs, run once under torchrun (2 processes, gloo) by conftest.py.

``python -m torch.distributed.run --nproc_per_node=2 two_process_scenarios.py OUT`` trains and
evaluates the tiny model with DDP and FSDP2 and writes what the tests compare with one process
into ``OUT/results.pt`` (rank 0) and ``OUT/rank{r}.pt`` (each rank's own numbers). Starting the
processes costs far more than the tiny runs, so every scenario shares this one start.
"""

import os
import sys

import torch

from mmict_kernels import evaluate as evaluate_cli
from mmict_kernels.icl import checkpoint as ckpt
from mmict_kernels.icl.build import build_run
from mmict_kernels.icl.config import load_config
from mmict_kernels.icl.distributed import init_distributed, local_nbytes, shard_model
from mmict_kernels.icl.evaluation import evaluate, predict
from mmict_kernels.icl.training import Trainer

# Run as a script by torchrun (outside pytest): the tests' helpers are found from here.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from helpers.tiny_run import TINY_RUN_OVERRIDES as TINY  # noqa: E402
from helpers.torchrun import run_script  # noqa: E402

PREDICT_CASES = {"random-0": (0, "random"), "random-2": (2, "random"), "one-to-many-2": (2, "one-to-many")}


def trainable_state(path: str) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(ckpt.latest_checkpoint(path), ckpt.TRAINABLE_FILE))


def predictions(run) -> dict:
    return {
        name: predict(run, k, sampling=s, group_size=4, batch_size=3, max_new_tokens=3, seed=0, limit=None)
        for name, (k, s) in PREDICT_CASES.items()
    }


def main(out: str) -> None:
    rank, world, _ = init_distributed()
    torch.set_num_threads(1)
    res, mine = {}, {}

    def fit(name, extra, **kwargs):
        cfg = load_config(None, TINY + extra + [f"train.output_dir={out}/{name}"])
        trainer = Trainer(cfg)
        return trainer, trainer.fit(**kwargs)

    # DDP with 2 micro-batches (no_sync on the first): the single-process steps.
    _, res["ddp_losses"] = fit("ddp", ["train.grad_accum_steps=2"], resume=False)
    res["ddp_state"] = trainable_state(f"{out}/ddp")

    # DDP cut after 3 steps: tests/icl/runs/test_fsdp.py resumes it in one process (another world size).
    fit("ddp_cut", [], resume=False, stop_after=3)
    # FSDP cut after 3 steps: resuming it in one process must be refused (FSDP needs torchrun), and
    # a batch of 12 queries cut the same way resumes on 3 processes (three_process_resume.py).
    fit("fsdp_cut_one", ["train.fsdp=true"], resume=False, stop_after=3)
    fit("fsdp_reshard", ["train.fsdp=true", "train.batch_size=12"], resume=False, stop_after=3)

    # FSDP2, frozen LLM sharded, trainable parts replicated; evaluation during training.
    trainer, res["fsdp_losses"] = fit("fsdp", ["train.fsdp=true", "eval.every_steps=5"], resume=False)
    res["fsdp_state"] = trainable_state(f"{out}/fsdp")
    res["fsdp_best"] = ckpt.read_best(f"{out}/fsdp") if rank == 0 else None
    llm_params = list(trainer.model.llm.parameters())
    mine["llm_local_bytes"] = local_nbytes(llm_params)
    mine["llm_full_bytes"] = sum(p.numel() * p.element_size() for p in llm_params)
    mine["trainable_local_bytes"] = local_nbytes(trainer.params)
    res["sharded_files"] = sorted(os.listdir(os.path.join(ckpt.latest_checkpoint(f"{out}/fsdp"), ckpt.SHARDED_DIR)))

    # Resume from a sharded checkpoint: stop after 3 steps, then a new trainer continues.
    _, first = fit("fsdp_cut", ["train.fsdp=true"], resume=False, stop_after=3)
    _, rest = fit("fsdp_cut", ["train.fsdp=true"], resume=True)
    res["fsdp_resumed_losses"] = first + rest
    res["fsdp_resumed_state"] = trainable_state(f"{out}/fsdp_cut")

    # FSDP2 with the trainable parts (and their optimizer state) sharded too, 2 micro-batches (no gradient sync on the first).
    fsdp_all = ["train.fsdp=true", "train.fsdp_shard_trainable=true", "train.grad_accum_steps=2"]
    trainer, res["fsdp_all_losses"] = fit("fsdp_all", fsdp_all, resume=False)
    mine["sharded_trainable_local_bytes"] = local_nbytes(trainer.params)
    res["fsdp_all_state"] = trainable_state(f"{out}/fsdp_all")  # gathered whole from the shards
    _, first = fit("fsdp_all_cut", fsdp_all, resume=False, stop_after=3)
    _, rest = fit("fsdp_all_cut", fsdp_all, resume=True)
    res["fsdp_all_resumed_losses"] = first + rest

    # FSDP2 over a T5 (the paper's FlanT5 family), with gradient accumulation and gradient checkpointing.
    t5 = ["model.llm_family=encoder-decoder", "model.llm_type=t5", "train.max_steps=3", "train.grad_accum_steps=2"]
    _, res["fsdp_t5_losses"] = fit("fsdp_t5", t5 + ["train.fsdp=true", "train.gradient_checkpointing=true"], resume=False)

    # Distributed evaluation: each rank a share of the batches, rank 0 gathers.
    run = build_run(load_config(None, TINY))
    res["predict_replicated"] = predictions(run)
    results = evaluate(run, demo_counts=(0, 2), sampling="random", output=f"{out}/eval.json", print_table=False,
                       batch_size=3, max_new_tokens=3)  # fmt: skip
    mine["evaluate_returned"] = sorted(results)
    shard_model(run.model)
    res["predict_fsdp"] = predictions(run)
    run = build_run(load_config(None, TINY + ["model.llm_family=encoder-decoder", "model.llm_type=t5"]))
    shard_model(run.model)
    res["predict_fsdp_t5"] = predictions(run)

    # The evaluate CLI on the FSDP run's folder: its best checkpoint, the LLM sharded (its config.yaml says train.fsdp).
    mine["evaluate_cli_status"] = evaluate_cli.main(
        ["--run", f"{out}/fsdp", "--demos", "0", "2", "--limit", "6", "--output", f"{out}/fsdp_cli_eval.json"]
    )

    torch.save(mine, f"{out}/rank{rank}.pt")
    if rank == 0:
        res["world"] = world
        torch.save(res, f"{out}/results.pt")


if __name__ == "__main__":
    run_script(main)
