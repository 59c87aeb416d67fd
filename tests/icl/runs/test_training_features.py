"""The training features: gradient accumulation, precision (fp16 with a GradScaler), gradient checkpointing,
TensorBoard / W&B logging, the start-up summary, config type and range checks and the truncation report
(the step's host syncs: test_host_syncs.py)."""

import os
import sys
import warnings

import pytest
import torch

from mmict_kernels import train as train_cli
from mmict_kernels.icl import checkpoint as ckpt
from mmict_kernels.icl.config import ConfigTypeError, load_config
from mmict_kernels.icl.precision import MixedPrecision
from mmict_kernels.icl.run_dir import remove_run
from mmict_kernels.icl.training import Trainer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def trained_state(trainer) -> dict:
    return {k: v.detach().clone() for k, v in trainer.model.trainable_state_dict().items()}


# ------------------------------------------------------------------ gradient accumulation
def test_grad_accumulation_computes_the_one_batch_step(tmp_path, tiny):
    one = Trainer(load_config(None, tiny(tmp_path / "one")))
    losses_one = one.fit(resume=False)
    accum = Trainer(load_config(None, tiny(tmp_path / "two", "train.grad_accum_steps=2")))
    assert [len(b.queries) for b in accum.make_step_batches(0)] == [4, 4]  # the batch of 8, split in two
    losses_two = accum.fit(resume=False)
    torch.testing.assert_close(torch.tensor(losses_two), torch.tensor(losses_one), rtol=1e-5, atol=1e-6)
    a, b = trained_state(one), trained_state(accum)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    with pytest.raises(ValueError, match="grad_accum_steps"):
        load_config(None, ["train.batch_size=8", "train.grad_accum_steps=3"])


# ------------------------------------------------------------------ precision
def test_fp16_scales_the_loss_and_resumes_with_the_scaler(tmp_path, tiny):
    """fp16 autocast with a GradScaler (GPU-only in runs; forced onto the CPU here): the scaler
    skips the overflowing first steps, lowers its scale, and a resume restores it exactly."""
    extra = ("train.precision=fp16", "train.max_steps=6")

    def trainer(out):
        t = Trainer(load_config(None, tiny(out, *extra)))
        t.precision = MixedPrecision("fp16", t.device, on_cpu=True)
        return t

    full = trainer(tmp_path / "full")
    losses = full.fit(resume=False)
    assert all(torch.isfinite(torch.tensor(losses))) and full.precision.scaler.get_scale() < 2.0**16
    cut = trainer(tmp_path / "cut")
    first = cut.fit(resume=False, stop_after=3)
    assert (
        ckpt.read_state(ckpt.latest_checkpoint(str(tmp_path / "cut")))["grad_scaler"]["scale"] == cut.precision.scaler.get_scale()
    )
    resumed = trainer(tmp_path / "cut")
    assert first + resumed.fit(resume=True) == losses
    assert resumed.precision.scaler.get_scale() == full.precision.scaler.get_scale()


def test_precision_key_and_the_deprecated_bf16_alias():
    for name in ("tiny.yaml", "tiny_t5.yaml", "mmict_paper.yaml"):  # the shipped configs use the new key
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            assert load_config(os.path.join(REPO, "configs", name)).train.precision == "bf16"
    with pytest.warns(FutureWarning, match="train.bf16 is deprecated: read as train.precision: fp32"):
        cfg = load_config(None, ["train.bf16=false"])
    assert cfg.train.precision == "fp32" and not cfg.train.bf16
    with pytest.raises(ValueError, match="disagree"):
        load_config(None, ["train.bf16=true", "train.precision=fp16"])
    with pytest.raises(ValueError, match=r"train.precision: expected one of \['bf16', 'fp16', 'fp32'\], got 'fp8'"):
        load_config(None, ["train.precision=fp8"])


# ------------------------------------------------------------------ gradient checkpointing
def saved_bytes_and_grads(trainer) -> tuple[int, torch.Tensor]:
    """Bytes kept for the backward by one training forward (parameters excluded), and the gradients."""
    batch = trainer.make_batch(0)
    params = {p.data_ptr() for p in trainer.model.parameters()}
    kept = {}

    def pack(t):
        if t.data_ptr() not in params:
            kept[t.data_ptr()] = t.untyped_storage().nbytes()
        return t

    trainer.model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        nll, _ = trainer.model(batch)
    nll.backward()
    return sum(kept.values()), torch.cat([p.grad.flatten() for p in trainer.params])


@pytest.mark.parametrize(
    "case",
    [
        ("model.llm_type=llama",),
        ("model.llm_family=encoder-decoder", "model.llm_type=t5"),
        ("model.mhub_impl=transformers",),
        ("demos.sampling=one-to-many", "demos.group_size=4"),  # shared prefix: the M-Hub only
    ],
    ids=["llama", "t5", "transformers-mhub", "shared-prefix"],
)
def test_gradient_checkpointing_keeps_the_gradients_and_saves_memory(tmp_path, tiny, case):
    plain = Trainer(load_config(None, tiny(tmp_path / "a", *case)))
    recomputed = Trainer(load_config(None, tiny(tmp_path / "b", *case, "train.gradient_checkpointing=true")))
    kept_plain, grads_plain = saved_bytes_and_grads(plain)
    kept_recomputed, grads_recomputed = saved_bytes_and_grads(recomputed)
    torch.testing.assert_close(grads_recomputed, grads_plain, rtol=1e-5, atol=1e-6)
    assert kept_recomputed < 0.7 * kept_plain, (kept_recomputed, kept_plain)
    if case[0].startswith("demos.sampling"):
        assert recomputed.checkpointing.startswith("M-Hub layers (not the LLM")


# ------------------------------------------------------------------ logging and the summary
def test_tensorboard_metrics_and_the_start_up_summary(tmp_path, tiny, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    trainer = Trainer(load_config(None, tiny(out, "train.tensorboard=true", "eval.every_steps=5", "eval.limit=4")))
    trainer.fit(resume=False)
    printed = capsys.readouterr().out
    for expected in (
        "data: 48 training examples (shapes), 12 evaluation examples (shapes)",
        "steps: 6 per epoch, 5 in all; batch 8 queries per step = 1 process(es) x 1 micro-batch(es) x 8",
        f"parameters: {trainer.parameter_counts[0]:,} trainable, {trainer.parameter_counts[1]:,} frozen",
        "device: cpu; compute: float32 (train.precision bf16 applies on GPUs); strategy: one process",
        "kernels: hub_cross_attention: torch",
        "hub_self_attention: torch",
        "evaluation: every 5 steps on shapes with 2 demonstrations",
    ):
        assert expected in printed, (expected, printed)
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/samples_per_s", f"eval/{trainer.best['metric']}"} <= tags, tags
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5]


def test_wandb_logs_one_run_per_folder_across_a_resume(tmp_path, tiny, monkeypatch):
    """The real wandb, offline: the steps go to one W&B run whose id the run folder keeps, and a
    resumed run logs on into that W&B run (another offline segment with the same id)."""
    pytest.importorskip("wandb")  # in requirements.txt
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    overrides = tiny(out, "train.wandb=mmict-test")
    first = Trainer(load_config(None, overrides)).fit(resume=False, stop_after=3)
    run_id = (out / "wandb_run_id").read_text().strip()
    rest = Trainer(load_config(None, overrides)).fit(resume=True)
    assert len(first) == 3 and len(rest) == 2
    segments = sorted((out / "wandb").glob("offline-run-*"))
    assert len(segments) == 2 and all(s.name.endswith("-" + run_id) for s in segments), segments
    for segment in segments:
        records = (segment / f"run-{run_id}.wandb").read_bytes()
        assert b"train/loss" in records and b"train/grad_norm" in records
    assert "wandb_run_id" in remove_run(str(out)) and not (out / "wandb").exists()  # --overwrite starts a new W&B run


def test_wandb_without_the_package_warns_and_trains(tmp_path, tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError, installed or not
    with pytest.warns(UserWarning, match="train.wandb is set but the wandb package is not installed"):
        losses = Trainer(load_config(None, tiny(tmp_path, "train.wandb=my-project", "train.max_steps=1"))).fit(resume=False)
    assert len(losses) == 1


def test_text_cut_at_max_text_tokens_is_reported_once_with_count_and_longest(tmp_path, tiny):
    # Captions ("red circle") are 2 words: the training targets are cut at 1 token too.
    cut = ("data.max_text_tokens=1", "data.shapes_tasks=[color,caption]", "train.max_steps=7")
    with pytest.warns(
        UserWarning, match=r"distinct texts were cut at data.max_text_tokens=1 tokens \(\d+ LLM target, .*longest had \d+ tokens"
    ) as seen:
        Trainer(load_config(None, tiny(tmp_path, *cut))).fit(resume=False)
    assert len([w for w in seen if "were cut" in str(w.message)]) == 1  # once, although 7 steps pass the first epoch


# ------------------------------------------------------------------ config checks
@pytest.mark.parametrize(
    "override, message",
    [
        ("train.batch_size=sixteen", "config key train.batch_size: expected an integer, got 'sixteen' (str)"),
        ("train.lr=fast", "config key train.lr: expected a number, got 'fast'"),
        ("train.gradient_checkpointing=maybe", "config key train.gradient_checkpointing: expected a boolean"),
        ("train.epochs=-1", "train.epochs: expected > 0, got -1"),
        ("train.batch_size=0", "train.batch_size: expected >= 1, got 0"),
        ("train.keep_checkpoints=0", "train.keep_checkpoints: expected >= 1, got 0"),
        ("train.grad_accum_steps=0", "train.grad_accum_steps: expected >= 1, got 0"),
        ("eval.every_steps=-5", "eval.every_steps: expected >= 0, got -5"),
        ("train.fsdp_shard_trainable=true", "needs train.fsdp: true"),
    ],
)
def test_config_values_of_the_wrong_type_or_range_name_the_key(override, message, capsys):
    with pytest.raises(ValueError) as raised:
        load_config(None, [override])
    assert message in str(raised.value)
    assert train_cli.main(["--set", override, "--no-progress"]) == 2  # a user error, not a traceback
    assert message in capsys.readouterr().err


def test_type_errors_are_type_errors_too():
    with pytest.raises(TypeError):
        load_config(None, ["train.max_steps=2.5"])
    assert issubclass(ConfigTypeError, TypeError) and issubclass(ConfigTypeError, ValueError)
