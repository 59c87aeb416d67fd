"""Each method as something that trains: the driver's Trainer with the method's batch layout, or AIM's projection step.

Every method starts from the same initial weights (a copy; the frozen LLM is shared, never
copied) and gets the same optimiser, schedule and step budget, so the rows of the table differ
only in what the method feeds its LLM.
"""

from __future__ import annotations

import copy
import dataclasses

import torch

from ..aim import AIMModel, DemonstrationBank, MMICTBackbone
from ..baselines import aim_batch, builder_class
from ..config import validate
from ..training import Trainer, make_optimizer


def fresh_model(init_model):
    """A copy of the initial model; the frozen LLM is the same object (never changed, so safe to share)."""
    return copy.deepcopy(init_model, memo={id(init_model.llm): init_model.llm})


def run_config_for(base_cfg, sampling: str, num_demos: int, steps: int):
    """The shared run config with this model's strategy, demonstration count and step budget, checked."""
    cfg = copy.deepcopy(base_cfg)
    cfg.demos.sampling, cfg.demos.num_demos, cfg.train.max_steps = sampling, num_demos, steps
    cfg.train.progress = False
    validate(cfg)
    return cfg


def make_trainer(base_run, method: str, sampling: str, num_demos: int, steps: int, model):
    """The driver's Trainer for ``method``, with the method's batch layout (Vanilla ICT's or MMICT's)."""
    cfg = run_config_for(base_run.cfg, sampling, num_demos, steps)
    return Trainer(cfg, run=dataclasses.replace(base_run, cfg=cfg, model=model), builder_cls=builder_class(method))


def build_aim(backbone_model, base_run, bank_dir: str | None):
    """AIM on a frozen copy of ``backbone_model`` (an MMICT model), with a bank in ``bank_dir`` (None: no bank)."""
    tok = base_run.llm_tokenizer
    bank = DemonstrationBank(bank_dir) if bank_dir else None
    return AIMModel(
        MMICTBackbone(fresh_model(backbone_model)),
        bank=bank,
        backend=base_run.cfg.model.backend,
        pad_id=tok.pad_token_id,
        eos_id=tok.eos_token_id,
    )


class Stepper:
    """One optimizer step of a method: the driver's ``Trainer.train_step``, or AIM's projection step."""

    def __init__(self, trainer, aim=None):
        self.trainer, self.aim = trainer, aim
        if aim is not None:
            self.aim = aim.to(trainer.device)
            self.optimizer = make_optimizer(self.aim, trainer.cfg.train)  # only the projection requires grad
            self.params = [p for p in self.aim.parameters() if p.requires_grad]

    @property
    def model(self):
        return self.aim if self.aim is not None else self.trainer.model

    def __call__(self, step: int) -> float:
        if self.aim is None:
            return float(self.trainer.train_step(step))
        t = self.trainer
        batch = aim_batch_to(aim_batch(t.batch_groups(step), t.run.train_set, t.run.train_set, t.builder), t.device)
        for g in self.optimizer.param_groups:
            g["lr"] = t.lr(step)  # the run's schedule and unit (per step, or per epoch as LAVIS)
        self.aim.train()
        nll, count = self.aim(batch)
        if not nll.requires_grad:  # zero demonstrations: the projection is not used, nothing to train
            return float(nll) / max(count, 1)
        (nll / max(count, 1)).backward()
        if t.cfg.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, t.cfg.train.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(nll.detach()) / max(count, 1)


def aim_batch_to(batch, device):
    """An AIMBatch's tensors moved to ``device``, in place (its token-id lists stay Python lists)."""
    for name in ("demo_images", "query_images", "query_group"):
        v = getattr(batch, name)
        if v is not None:
            setattr(batch, name, v.to(device))
    return batch


def train(stepper: Stepper, steps: int) -> list[float]:
    """``steps`` optimizer steps from step 0; their losses."""
    torch.manual_seed(stepper.trainer.cfg.train.seed)  # dropout streams, as Trainer.fit seeds them
    return [stepper(s) for s in range(steps)]
