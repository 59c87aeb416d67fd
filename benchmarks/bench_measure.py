"""Measure one provider of one case in fwd / bwd / fwd+bwd mode (shared by ops and modules).

What each mode times, per repetition, on the next of the rotated input sets:
- ``fwd``: one forward with autograd recording (as in a training step); the output is dropped.
- ``bwd``: one ``backward`` of a forward that was run beforehand, outside the timed region
  (``retain_graph=True`` so each set's graph can be replayed).
- ``fwd+bwd``: a forward and its backward.
Accumulated ``.grad`` of the leaves is dropped before each repetition, outside the timing.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence

import torch
from bench_timing import Timing, bench, peak_extra_memory_mb


@dataclasses.dataclass
class TimingConfig:
    warmup_ms: float
    rep_ms: float
    min_reps: int
    max_reps: int
    untimed_first: bool = True  # False: the first call counts (CPU --quick, where a call can take seconds)


def timing_config(device: torch.device, quick: bool) -> TimingConfig:
    if device.type == "cuda":
        return TimingConfig(10.0, 40.0, 5, 300) if quick else TimingConfig(25.0, 100.0, 10, 1000)
    # CPU (wall clock): tiny shapes, and the Triton interpreter is slow (about a second a call),
    # so --quick times from the first call on (the correctness check before it warmed the forward).
    return TimingConfig(0.0, 40.0, 1, 5, untimed_first=False) if quick else TimingConfig(20.0, 300.0, 3, 50)


def measure(
    fn: Callable[[dict], torch.Tensor],
    input_sets: Sequence[dict],
    leaves: Callable[[dict], list[torch.Tensor]],
    mode: str,
    device: torch.device,
    cfg: TimingConfig,
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> tuple[Timing, float | None]:
    """Return the timing and the peak extra memory (MB, CUDA only) of one call in ``mode``."""
    n = len(input_sets)

    def drop_grads(i: int) -> None:
        for t in leaves(input_sets[i]):
            t.grad = None

    with context():
        if mode == "fwd":
            step = lambda i: fn(input_sets[i])  # noqa: E731
            once = lambda: fn(input_sets[0])  # noqa: E731
        elif mode == "bwd":
            # Each set's forward runs once here, untimed; its graph is kept for the repetitions.
            outs = [fn(x) for x in input_sets]
            grads = [torch.randn_like(o) for o in outs]  # a fixed upstream gradient per set

            def step(i):
                outs[i].backward(grads[i], retain_graph=True)

            def once():
                outs[0].backward(grads[0], retain_graph=True)

        elif mode == "fwd+bwd":
            grads = {}  # made on a set's first (warm-up) use, so its creation stays out of the timings

            def step(i):
                out = fn(input_sets[i])
                if i not in grads:
                    grads[i] = torch.randn_like(out)
                out.backward(grads[i])

            def once():
                step(0)

        else:
            raise ValueError(f"mode: expected one of fwd, bwd, fwd+bwd, got {mode!r}")
        timing = bench(
            step,
            n,
            device,
            warmup_ms=cfg.warmup_ms,
            rep_ms=cfg.rep_ms,
            min_reps=cfg.min_reps,
            max_reps=cfg.max_reps,
            before_each=drop_grads,
            untimed_first=cfg.untimed_first,
        )
        drop_grads(0)
        peak = peak_extra_memory_mb(once, device)
        for i in range(n):
            drop_grads(i)
    return timing, peak
