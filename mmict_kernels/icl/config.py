"""Run configuration: nested dataclasses read from YAML, with unknown keys rejected by name.

One file configures a whole run (model, data, demonstrations, training, evaluation), so a
run is reproducible from its YAML alone; the YAML is copied into the output folder.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
import warnings
from typing import Any

import yaml

from .. import backends
from .datasets.spec import check_data_spec
from .sampling import STRATEGIES


@dataclasses.dataclass
class ModelConfig:
    # Frozen image encoder: a transformers vision model ("blip2" | "clip" | "siglip"), built from
    # `vision_config` (random weights) or loaded from `vision_checkpoint` (a local folder).
    vision_family: str = "blip2"
    vision_checkpoint: str | None = None
    vision_config: dict = dataclasses.field(default_factory=dict)
    image_size: int = 32
    # M-Hub: an InstructBLIP Q-Former (instruction-aware: queries + text, bidirectional).
    mhub_checkpoint: str | None = None  # local folder of an InstructBLIP/BLIP-2 model, or None
    mhub_config: dict = dataclasses.field(default_factory=dict)
    num_query_tokens: int = 8  # the published M-Hub uses 32 (configs/mmict_paper.yaml)
    mhub_tokenizer: str | None = None  # local tokenizer folder (BERT for real Q-Formers); None: embedded word tokenizer
    # Frozen LLM: "decoder" (OPT, Llama-family: AutoModelForCausalLM) or "encoder-decoder" (T5).
    llm_family: str = "decoder"
    llm_type: str = "llama"  # model_type used when building from `llm_config`
    llm_checkpoint: str | None = None
    llm_config: dict = dataclasses.field(default_factory=dict)
    llm_tokenizer: str | None = None  # default: llm_checkpoint, else the embedded word tokenizer
    llm_dtype: str = "float32"  # storage of the frozen LLM: float32 | bfloat16 | float16 (halves its memory on GPU)
    separator: str = "<|endofchunk|>"
    mhub_impl: str = "fused"  # "fused" (mmict_kernels.FusedMHub) or "transformers" (InstructBlipQFormerModel, baseline)
    backend: str = "auto"  # kernels of the M-Hub and the prefix cache: auto | cuda | triton | torch
    init_seed: int = 0  # random weights of every part built from a config (frozen parts included)
    use_prefix_cache: bool = True  # one-to-many groups on a decoder-only LLM share the demo prefix


@dataclasses.dataclass
class DataConfig:
    # Each split: "shapes" (embedded, procedurally drawn), a path to a JSONL file, or a mapping naming a
    # published layout, e.g. {format: coco_karpathy, annotations: FILE, media: DIR} (docs/DRIVER.md;
    # the formats and their keys: icl/datasets/spec.py).
    train: str | dict = "shapes"
    eval: str | dict = "shapes"
    image_root: str | None = None  # relative image paths in a JSONL are resolved against it (default: the file's folder)
    feature_cache: str | None = None  # folder for cached frozen image features (None: memory only)
    feature_dtype: str = "float16"  # storage of the cached features: float16 | bfloat16 | float32
    feature_shard_mb: float = 256.0  # features per cache file (a killed extraction loses at most one)
    feature_batch_size: int = 64  # frames per frozen-encoder call during extraction
    num_frames: int = 8  # frames sampled uniformly from each video file
    shapes_train_size: int = 600
    shapes_eval_size: int = 200
    shapes_tasks: tuple = ("color", "shape", "what_color", "what_shape")
    max_text_tokens: int = 32
    seed: int = 0


@dataclasses.dataclass
class DemoConfig:
    num_demos: int = 2  # 0, 1, 2, 4, 8
    sampling: str = "random"  # random | similar | same-class | one-to-many
    group_size: int = 4  # one-to-many: queries sharing one demonstration set
    same_task: bool = True  # draw demonstrations from the query's own task


@dataclasses.dataclass
class TrainConfig:
    output_dir: str = "runs/tiny"
    epochs: float = 8.0
    max_steps: int | None = None  # overrides epochs when set
    batch_size: int = 16  # queries per optimizer step, over all processes
    lr: float = 5e-3
    warmup_start_lr: float = 0.0
    warmup_steps: int = 20
    # "step": the cosine decays every optimizer step; "epoch": LAVIS's LinearWarmupCosineLRScheduler
    # (warm-up per step in the first epoch, then one cosine value per epoch).
    lr_schedule_unit: str = "step"
    min_lr: float = 0.0
    # On every trainable tensor of >= 2 dims (weights and the query tokens, as LAVIS's rule
    # `p.ndim < 2 -> no decay` gives), none on biases and norm weights.
    weight_decay: float = 0.05
    betas: tuple = (0.9, 0.999)
    grad_clip: float = 1.0
    # Mixed precision on a GPU: bf16 autocast, fp16 autocast with a GradScaler, or fp32 (CPU runs
    # always compute in float32). The older `bf16: true | false` is read as bf16 | fp32.
    precision: str = "bf16"
    grad_accum_steps: int = 1  # micro-batches per optimizer step (batch_size is split between them)
    gradient_checkpointing: bool = False  # recompute M-Hub and frozen-LLM layers in the backward
    seed: int = 42
    log_every: int = 10
    save_every: int = 0  # steps; 0: only at the end
    keep_checkpoints: int = 2  # newest checkpoints kept; the best one (eval.every_steps) is always kept too
    device: str = "auto"
    progress: bool = True
    tensorboard: bool = True  # <output_dir>/tensorboard
    wandb: bool | str = False  # true or a project name: also log to Weights & Biases (when installed)
    # torchrun only: shard the frozen LLM over the processes (FSDP2 fully_shard) instead of a full
    # copy per process; `fsdp_shard_trainable` shards the M-Hub, FC and their optimizer state too.
    fsdp: bool = False
    fsdp_shard_trainable: bool = False

    @property
    def bf16(self) -> bool:
        """Deprecated: ``precision == "bf16"``."""
        return self.precision == "bf16"


@dataclasses.dataclass
class EvalConfig:
    batch_size: int = 32
    num_beams: int = 1
    max_new_tokens: int = 4
    min_new_tokens: int = 1
    # Per-task generation lengths: {task name or task kind ("caption" | "vqa"): [min_new_tokens,
    # max_new_tokens]}; a task name wins over its kind; unlisted tasks use the two values above.
    generation_lengths: dict = dataclasses.field(default_factory=dict)
    demo_counts: tuple = (0, 2)  # evaluate with each number of demonstrations
    output: str | None = None  # JSON path; default <output_dir>/eval.json
    # During training: evaluate on data.eval (with demos.num_demos) every this many steps and keep
    # the best checkpoint by the headline metric; 0: never.
    every_steps: int = 0
    limit: int | None = None  # evaluate only the first N query groups (None: all)


@dataclasses.dataclass
class RunConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    demos: DemoConfig = dataclasses.field(default_factory=DemoConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def dataclass_from_dict(cls, values: dict, what: str = "config", path: str = ""):
    """``cls(**values)`` for a config dataclass, with every key checked: the one reader of the driver's,
    the comparison's and AIM's configs.

    Unknown keys raise a ValueError naming them and the known ones. A field whose default is a
    dataclass is read from a nested mapping (a section); a list becomes a tuple where the default
    is a tuple (YAML has no tuples); a string or int becomes a float where the default is a float
    (YAML 1.1 reads "1e-5", without a dot, as a string). ``what`` names the config in messages,
    ``path`` the section being read ("" at the top).
    """
    where = f"{what} section {path!r}" if path else what
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(values).__name__}")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; expected some of {sorted(fields)}")
    defaults = cls()
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an annotation that cannot be evaluated: only the default's type is known
        hints = {}
    kwargs = {}
    for name, value in values.items():
        default = getattr(defaults, name)
        key = f"{path}.{name}" if path else name
        if dataclasses.is_dataclass(default):
            kwargs[name] = dataclass_from_dict(type(default), value or {}, what, key)
        else:
            kwargs[name] = _typed_value(value, hints.get(name, type(default)), f"{what} key {key}")
    return cls(**kwargs)


class ConfigTypeError(TypeError, ValueError):
    """A config value of the wrong type (a TypeError, and a ValueError so the CLIs report it as a user error)."""


_TYPE_NAMES = {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string",
               tuple: "a list", list: "a list", dict: "a mapping"}  # fmt: skip


def _typed_value(value, hint, where: str):
    """``value`` checked against the field's annotation ``hint`` (and converted where YAML cannot say it).

    A list becomes a tuple where the field is a tuple (YAML has no tuples); a string or int becomes a
    float where the field is a float (YAML 1.1 reads "1e-5", without a dot, as a string). Anything else
    of the wrong type raises :class:`ConfigTypeError` naming the key and the expected type.
    """
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    options = tuple(typing.get_origin(o) or o for o in options)
    if value is None and type(None) in options:
        return None
    known = [o for o in options if o in _TYPE_NAMES]
    if len(known) < len([o for o in options if o is not type(None)]):
        return value  # a type this reader does not check (Any, a class, ...)
    for option in known:
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                return float(value)
            except ValueError:
                continue
        if option is str and isinstance(value, str):
            return value
        if option in (tuple, list) and isinstance(value, (list, tuple)):
            return option(value)
        if option is dict and isinstance(value, dict):
            return value
    expected = " or ".join([_TYPE_NAMES[o] for o in known] + (["null"] if type(None) in options else []))
    raise ConfigTypeError(f"{where}: expected {expected}, got {value!r} ({type(value).__name__})")


def config_from_dict(values: dict) -> RunConfig:
    cfg = dataclass_from_dict(RunConfig, _read_deprecated_keys(values or {}))
    validate(cfg)
    return cfg


def _read_deprecated_keys(values: dict) -> dict:
    """``train.bf16: true | false`` (older configs) read as ``train.precision: bf16 | fp32``, with a warning."""
    train = values.get("train") if isinstance(values, dict) else None
    if not isinstance(train, dict) or "bf16" not in train:
        return values
    train = dict(train)
    bf16 = train.pop("bf16")
    if not isinstance(bf16, bool):
        raise ConfigTypeError(f"config key train.bf16: expected a boolean (true/false), got {bf16!r} ({type(bf16).__name__})")
    implied = "bf16" if bf16 else "fp32"
    if "precision" in train and train["precision"] != implied:
        raise ValueError(
            f"config keys train.bf16 ({bf16}) and train.precision ({train['precision']!r}) disagree; keep precision only"
        )
    train["precision"] = implied
    warnings.warn(f"config key train.bf16 is deprecated: read as train.precision: {implied}", FutureWarning, stacklevel=3)
    return {**values, "train": train}


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """``section.key=value`` strings (YAML-parsed values) applied on top of a config mapping."""
    for item in overrides or ():
        if "=" not in item:
            raise ValueError(f"--set: expected section.key=value, got {item!r}")
        path, raw = item.split("=", 1)
        keys = path.split(".")
        node = values
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = yaml.safe_load(raw)
    return values


def load_config(path: str | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config (None: the defaults, i.e. the tiny embedded run)."""
    values: dict[str, Any] = {}
    if path is not None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file not found: {path}")
        with open(path, encoding="utf-8") as f:
            try:
                values = yaml.safe_load(f) or {}
            except yaml.YAMLError as exc:
                raise ValueError(f"config file {path} is not valid YAML: {exc}") from exc
    return config_from_dict(apply_overrides(values, overrides or []))


def validate(cfg: RunConfig) -> None:
    m, d, t = cfg.model, cfg.demos, cfg.train
    if m.llm_family not in ("decoder", "encoder-decoder"):
        raise ValueError(f"model.llm_family: expected 'decoder' or 'encoder-decoder', got {m.llm_family!r}")
    if m.vision_family not in ("blip2", "clip", "siglip"):
        raise ValueError(f"model.vision_family: expected 'blip2', 'clip' or 'siglip', got {m.vision_family!r}")
    backends.check_backend_name(m.backend, "model.backend")
    if m.llm_dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"model.llm_dtype: expected float32, bfloat16 or float16, got {m.llm_dtype!r}")
    if m.mhub_impl not in ("fused", "transformers"):
        raise ValueError(f"model.mhub_impl: expected 'fused' or 'transformers', got {m.mhub_impl!r}")
    if m.num_query_tokens < 1:
        raise ValueError(f"model.num_query_tokens: expected >= 1, got {m.num_query_tokens}")
    if d.num_demos < 0:
        raise ValueError(f"demos.num_demos: expected >= 0, got {d.num_demos}")
    if d.sampling not in STRATEGIES:
        raise ValueError(f"demos.sampling: expected {', '.join(STRATEGIES[:-1])} or {STRATEGIES[-1]}, got {d.sampling!r}")
    if d.group_size < 1:
        raise ValueError(f"demos.group_size: expected >= 1, got {d.group_size}")
    if t.batch_size < 1:
        raise ValueError(f"train.batch_size: expected >= 1, got {t.batch_size}")
    if d.sampling == "one-to-many" and t.batch_size % d.group_size:
        raise ValueError(
            f"train.batch_size ({t.batch_size}) must be a multiple of demos.group_size ({d.group_size}) for one-to-many"
        )
    if t.lr_schedule_unit not in ("step", "epoch"):
        raise ValueError(f"train.lr_schedule_unit: expected 'step' or 'epoch', got {t.lr_schedule_unit!r}")
    check_generation_lengths(cfg.eval.generation_lengths, "eval.generation_lengths")
    check_data_config(cfg.data)
    if t.grad_clip is not None and t.grad_clip < 0:
        raise ValueError(f"train.grad_clip: expected >= 0 or null, got {t.grad_clip}")
    validate_training(cfg)


PRECISIONS = ("bf16", "fp16", "fp32")


def validate_training(cfg: RunConfig) -> None:
    """Ranges of the training, run-management and evaluation keys (types were checked when read)."""
    t, e = cfg.train, cfg.eval
    at_least = [
        ("train.epochs", t.epochs, 0, False), ("train.max_steps", t.max_steps, 1, True), ("train.lr", t.lr, 0, True),
        ("train.warmup_start_lr", t.warmup_start_lr, 0, True), ("train.min_lr", t.min_lr, 0, True),
        ("train.warmup_steps", t.warmup_steps, 0, True), ("train.weight_decay", t.weight_decay, 0, True),
        ("train.grad_accum_steps", t.grad_accum_steps, 1, True), ("train.log_every", t.log_every, 1, True),
        ("train.save_every", t.save_every, 0, True), ("train.keep_checkpoints", t.keep_checkpoints, 1, True),
        ("eval.batch_size", e.batch_size, 1, True), ("eval.num_beams", e.num_beams, 1, True),
        ("eval.max_new_tokens", e.max_new_tokens, 1, True), ("eval.min_new_tokens", e.min_new_tokens, 0, True),
        ("eval.every_steps", e.every_steps, 0, True), ("eval.limit", e.limit, 1, True),
        ("data.max_text_tokens", cfg.data.max_text_tokens, 1, True),
    ]  # fmt: skip
    for key, value, low, inclusive in at_least:
        if value is not None and (value < low if inclusive else value <= low):
            raise ValueError(f"{key}: expected {'>=' if inclusive else '>'} {low}, got {value}")
    if e.min_new_tokens > e.max_new_tokens:
        raise ValueError(f"eval.min_new_tokens ({e.min_new_tokens}) exceeds eval.max_new_tokens ({e.max_new_tokens})")
    if len(t.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in t.betas):
        raise ValueError(f"train.betas: expected two numbers in [0, 1), got {list(t.betas)}")
    if t.precision not in PRECISIONS:
        raise ValueError(f"train.precision: expected one of {list(PRECISIONS)}, got {t.precision!r}")
    if t.batch_size % t.grad_accum_steps:
        raise ValueError(f"train.batch_size ({t.batch_size}) must be a multiple of train.grad_accum_steps ({t.grad_accum_steps})")
    if t.fsdp_shard_trainable and not t.fsdp:
        raise ValueError("train.fsdp_shard_trainable: needs train.fsdp: true")
    if not all(isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in e.demo_counts):
        raise ValueError(f"eval.demo_counts: expected numbers of demonstrations >= 0, got {list(e.demo_counts)}")


def check_data_config(d: DataConfig) -> None:
    """The data section: each split's source (``datasets.check_data_spec``), frames, feature storage."""
    check_data_spec(d.train, "data.train")
    check_data_spec(d.eval, "data.eval")
    for key in ("num_frames", "feature_batch_size"):
        value = getattr(d, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"data.{key}: expected an integer >= 1, got {value!r}")
    if d.feature_dtype not in ("float16", "bfloat16", "float32"):
        raise ValueError(f"data.feature_dtype: expected float16, bfloat16 or float32, got {d.feature_dtype!r}")
    if not isinstance(d.feature_shard_mb, (int, float)) or isinstance(d.feature_shard_mb, bool) or d.feature_shard_mb <= 0:
        raise ValueError(f"data.feature_shard_mb: expected a number > 0, got {d.feature_shard_mb!r}")


def check_generation_lengths(lengths, where: str = "generation_lengths") -> dict:
    """``{task or kind: (min_new_tokens, max_new_tokens)}`` from a mapping of 2-item lists, checked."""
    if not isinstance(lengths, dict):
        raise ValueError(f"{where}: expected a mapping {{task or kind: [min, max]}}, got {type(lengths).__name__}")
    out = {}
    for key, value in lengths.items():
        ok = (
            isinstance(value, (list, tuple))
            and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        )
        if not ok or not 0 <= value[0] <= value[1] or value[1] < 1:
            raise ValueError(
                f"{where}.{key}: expected [min_new_tokens, max_new_tokens] with 0 <= min <= max and max >= 1, got {value!r}"
            )
        out[str(key)] = (int(value[0]), int(value[1]))
    return out
