"""The tiny embedded run the run tests train: config overrides shared by tests/icl/runs/conftest.py
and the torchrun script tests/icl/runs/two_process_scenarios.py (which runs outside pytest)."""

TINY_RUN_OVERRIDES = [
    "data.shapes_train_size=48",
    "data.shapes_eval_size=12",
    "train.batch_size=8",
    "train.max_steps=5",
    "train.warmup_steps=2",
    "train.progress=false",
    "train.tensorboard=false",
    "model.backend=torch",
    "train.log_every=1",
]
