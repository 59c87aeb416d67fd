"""The MMICT driver: model assembly, data, demonstration sampling, training and evaluation.

- ``config``: the run configuration (YAML) -- ``load_config``; ``dataclass_from_dict`` reads every config here.
- ``shapes`` / ``data``: the embedded shapes data, the JSONL format and the frozen-feature cache.
- ``sampling``: demonstrations (random, similar, one-to-many) as pure functions of (seed, step).
- ``batch``: the MMICT layout of one batch (turns for ONE M-Hub call, LLM sequences).
- ``model``: ``MMICTModel`` (trainable ln_vision + M-Hub + FC, frozen LLM).
- ``build``: everything a run needs from its config.
- ``training`` / ``evaluation``: the loop (DDP, resume) and the generation metrics; ``schedule``: the
  learning-rate schedule every optimiser here follows.
- ``baselines``: the paper's baselines (VanillaFine-Tune, Vanilla ICT) on the driver's layout.
- ``aim/``: AIM (model, backbones, demonstration bank, its end-to-end run).
- ``comparison/``: the paper's comparison of all methods (the engine of ``python -m mmict_kernels.compare``).

CLI: ``python -m mmict_kernels.train --config configs/tiny.yaml``, ``python -m mmict_kernels.evaluate --run runs/tiny``,
``python -m mmict_kernels.aim`` and ``python -m mmict_kernels.compare``.
"""

from .config import RunConfig, load_config  # noqa: F401  (light: no torch model code imported)

__all__ = ["RunConfig", "load_config"]
