"""Two processes (torchrun, gloo) train as one: DDP and FSDP2 give the single-process steps, FSDP2 holds
about half the frozen LLM per process, and a run resumed from a sharded checkpoint continues exactly,
on the same number of processes or on another (DDP into one process, FSDP onto three).

The two-process side runs once for the session (conftest.two_processes, two_process_scenarios.py);
the single-process references run here.
"""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from mmict_kernels.icl import checkpoint as ckpt
from mmict_kernels.icl.config import load_config
from mmict_kernels.icl.training import Trainer

T5 = ("model.llm_family=encoder-decoder", "model.llm_type=t5", "train.max_steps=3", "train.grad_accum_steps=2")


def one_process(out, tiny, *extra) -> tuple[list[float], dict, Trainer]:
    trainer = Trainer(load_config(None, tiny(out, *extra)))
    losses = trainer.fit(resume=False)
    state = load_file(f"{ckpt.latest_checkpoint(str(out))}/{ckpt.TRAINABLE_FILE}")
    return losses, state, trainer


def assert_close_states(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys() and not any(k.startswith("llm.") for k in got)
    for k, v in got.items():
        # atol: some entries (e.g. key biases, to which softmax is blind) are pure rounding noise.
        torch.testing.assert_close(v, expected[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


def test_ddp_and_fsdp_give_the_single_process_steps(two_processes, tmp_path, tiny):
    res = two_processes["results"]
    losses, state, trainer = one_process(tmp_path / "one", tiny, "eval.every_steps=5")
    # DDP (2 micro-batches); FSDP2 (LLM sharded); FSDP2 (trainable parts sharded too, 2 micro-batches)
    for name in ("ddp", "fsdp", "fsdp_all"):
        torch.testing.assert_close(torch.tensor(res[f"{name}_losses"]), torch.tensor(losses), rtol=1e-5, atol=1e-6)
    assert_close_states(res["ddp_state"], state)
    assert_close_states(res["fsdp_state"], state)
    assert_close_states(res["fsdp_all_state"], state)  # trainable.safetensors gathered from sharded parameters
    # Evaluation during training (each rank a share of the queries) picks the same best checkpoint.
    assert res["fsdp_best"] == {**trainer.best, "checkpoint": "checkpoints/step-5"}


def test_fsdp_over_t5_with_accumulation_and_gradient_checkpointing(two_processes, tmp_path, tiny):
    losses, _, _ = one_process(tmp_path / "t5", tiny, *T5)
    torch.testing.assert_close(
        torch.tensor(two_processes["results"]["fsdp_t5_losses"]), torch.tensor(losses), rtol=1e-5, atol=1e-5
    )


def test_fsdp_holds_half_the_llm_per_process(two_processes):
    ranks = two_processes["ranks"]
    full = ranks[0]["llm_full_bytes"]
    for r in ranks:
        assert 0.45 * full <= r["llm_local_bytes"] <= 0.55 * full, (r["llm_local_bytes"], full)
    assert sum(r["llm_local_bytes"] for r in ranks) >= full  # every byte on some process (plus padding)
    # Trainable parts: replicated by default, halved with train.fsdp_shard_trainable.
    trainable = ranks[0]["trainable_local_bytes"]
    assert all(r["trainable_local_bytes"] == trainable for r in ranks)
    for r in ranks:
        assert 0.4 * trainable <= r["sharded_trainable_local_bytes"] <= 0.6 * trainable


def test_resume_from_a_sharded_checkpoint_continues_exactly(two_processes):
    res = two_processes["results"]
    assert res["sharded_files"] == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
    ]  # torch.distributed.checkpoint, one shard per rank
    assert res["fsdp_resumed_losses"] == res["fsdp_losses"]  # bitwise: 3 steps, then a new process group's trainer continues
    assert res["fsdp_all_resumed_losses"] == res["fsdp_all_losses"]  # optimizer state sharded too
    for k, v in res["fsdp_resumed_state"].items():
        assert torch.equal(v, res["fsdp_state"][k]), k


def test_a_ddp_checkpoint_resumes_in_one_process(two_processes, tmp_path, tiny):
    """Another world size: 3 steps under DDP on 2 processes, the last 2 in one process give the
    uninterrupted single-process steps (the batch is global; each rank's random state is not
    carried over to another world size, and this run draws nothing from it)."""
    losses, state, _ = one_process(tmp_path / "one", tiny)
    out = two_processes["out"] / "ddp_cut"
    assert ckpt.step_of(ckpt.latest_checkpoint(str(out))) == 3
    rest = Trainer(load_config(None, tiny(out))).fit(resume=True)
    torch.testing.assert_close(torch.tensor(rest), torch.tensor(losses[3:]), rtol=1e-5, atol=1e-6)
    assert_close_states(load_file(f"{ckpt.latest_checkpoint(str(out))}/{ckpt.TRAINABLE_FILE}"), state)


def test_an_fsdp_checkpoint_is_not_resumed_in_one_process(two_processes, tiny):
    """Sharded FSDP state needs a process group: one process is refused with what to do, nothing loaded."""
    out = two_processes["out"] / "fsdp_cut_one"
    with pytest.raises(
        ValueError, match="saved with train.fsdp True .2 processes.; resume it with the same train.fsdp and torchrun"
    ):
        Trainer(load_config(None, tiny(out, "train.fsdp=true"))).fit(resume=True)
    assert ckpt.step_of(ckpt.latest_checkpoint(str(out))) == 3


def test_an_fsdp_checkpoint_resumes_on_another_number_of_processes(two_processes, tmp_path, tiny):
    """3 of 5 steps with FSDP on 2 processes, the last 2 on 3 processes (the sharded state resharded by
    torch.distributed.checkpoint): the uninterrupted single-process losses."""
    losses, _, _ = one_process(tmp_path / "one", tiny, "train.batch_size=12")
    run = two_processes["out"] / "fsdp_reshard"
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "three_process_resume.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3", script, str(run)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-6000:])
    rest = torch.load(run / "resumed_on_3.pt")
    torch.testing.assert_close(torch.tensor(rest), torch.tensor(losses[3:]), rtol=1e-5, atol=1e-6)
    assert ckpt.step_of(ckpt.latest_checkpoint(str(run))) == 5
