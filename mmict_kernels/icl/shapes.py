"""The embedded data set: procedurally drawn coloured shapes with questions and answers.

Needs no download and is learnable by a tiny model on a CPU in minutes. Tasks:

- ``color`` ("what color is the shape ?") and ``shape`` ("what shape is it ?"): plain VQA.
- ``what_color`` and ``what_shape``: the SAME ambiguous prompt ("what is this ?"); only the
  demonstrations (drawn from the query's own task) say whether a colour or a shape is asked
  for. Without demonstrations the best possible accuracy on these two is about 50%, with
  them it can reach 100%: the task that shows in-context learning working.
- ``caption`` ("a short caption :" -> "red circle"): a two-word caption, for the caption metric.
"""

from __future__ import annotations

import numpy as np

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 190, 40),
    "blue": (40, 80, 230),
    "yellow": (230, 220, 40),
    "purple": (160, 60, 200),
}
SHAPES = ("circle", "square", "triangle", "cross")
PROMPTS = {
    "color": "what color is the shape ?",
    "shape": "what shape is it ?",
    "what_color": "what is this ?",
    "what_shape": "what is this ?",
    "caption": "a short caption :",
}
TASKS = tuple(PROMPTS)


def draw_shape(rng: np.random.Generator, color: str, shape: str, size: int = 32) -> np.ndarray:
    """One (size, size, 3) uint8 image: a jittered shape on a noisy dark background."""
    img = rng.normal(40, 12, (size, size, 3))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    # Near the centre with a small jitter: shapes stay easy to tell apart for a tiny random
    # encoder (a CPU-minutes task), while no two images are the same.
    r = rng.uniform(0.28, 0.34) * size
    cx, cy = size / 2 + rng.uniform(-2, 2, 2)
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        mask = dx**2 + dy**2 <= r**2
    elif shape == "square":
        mask = (np.abs(dx) <= 0.8 * r) & (np.abs(dy) <= 0.8 * r)
    elif shape == "triangle":  # apex up: the half-width grows linearly towards the base
        mask = (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    elif shape == "cross":
        arm = r / 3
        mask = ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    else:
        raise ValueError(f"shape: expected one of {SHAPES}, got {shape!r}")
    rgb = np.asarray(COLORS[color], dtype=np.float64) + rng.normal(0, 12, 3)
    img[mask] = rgb + rng.normal(0, 6, (int(mask.sum()), 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def answer_for(task: str, color: str, shape: str) -> str:
    if task in ("color", "what_color"):
        return color
    if task in ("shape", "what_shape"):
        return shape
    if task == "caption":
        return f"{color} {shape}"
    raise ValueError(f"task: expected one of {TASKS}, got {task!r}")


def make_shapes(num: int, tasks=("color", "shape", "what_color", "what_shape"), seed: int = 0, image_size: int = 32):
    """``num`` examples (dicts) with their images: returns (records, images uint8 (num, S, S, 3)).

    Tasks are assigned round-robin so every task has the same share; colours and shapes are
    uniform. Each record: ``image`` (index into images), ``task``, ``prompt``, ``answer``,
    ``label`` (the (colour, shape) class, for same-class demonstration sampling).
    """
    bad = [t for t in tasks if t not in PROMPTS]
    if bad or not tasks:
        raise ValueError(f"shapes tasks: expected a non-empty subset of {TASKS}, got {list(tasks)}")
    rng = np.random.default_rng(seed)
    colors, images, records = list(COLORS), [], []
    for i in range(num):
        color, shape = colors[rng.integers(len(colors))], SHAPES[rng.integers(len(SHAPES))]
        task = tasks[i % len(tasks)]
        images.append(draw_shape(rng, color, shape, image_size))
        records.append(
            {
                "image": i,
                "task": task,
                "prompt": PROMPTS[task],
                "answer": answer_for(task, color, shape),
                "label": f"{color} {shape}",
            }
        )
    return records, np.stack(images)


def shapes_vocabulary() -> list[str]:
    """Every text the shapes data can produce (to build the word tokenizer from)."""
    return list(PROMPTS.values()) + list(COLORS) + list(SHAPES)
