"""Swap FusedMHub into transformers' BLIP-2 / InstructBLIP models in place (Liger-Kernel style).

    from transformers import Blip2ForConditionalGeneration
    from mmict_kernels import apply_mmict_kernels

    model = Blip2ForConditionalGeneration.from_pretrained(...)
    apply_mmict_kernels(model)              # model.qformer is now a FusedMHub
    model.generate(pixel_values=..., input_ids=...)

The model's own code keeps calling ``self.qformer(...)`` with transformers' arguments; FusedMHub takes
the same arguments, holds the same weights under the same names (so ``model.state_dict()`` and
``save_pretrained`` keep their keys), and gives the same outputs. The learned query tokens stay where
transformers keeps them (``model.query_tokens``); the swapped-in hub owns none.
"""

from __future__ import annotations

from torch import nn

from ...backends import check_backend_name
from .hub import FusedMHub

# Models whose ``qformer`` attribute is a Q-Former FusedMHub can replace.
SUPPORTED_MODELS = (
    "Blip2Model",
    "Blip2ForConditionalGeneration",
    "Blip2ForImageTextRetrieval",
    "InstructBlipModel",
    "InstructBlipForConditionalGeneration",
)


def _qformer_types():
    from transformers import Blip2QFormerModel, InstructBlipQFormerModel

    return (Blip2QFormerModel, InstructBlipQFormerModel)


def apply_mmict_kernels(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Replace ``model.qformer`` (and any nested one) by a :class:`FusedMHub` with the same weights, in place.

    Args:
        model: a transformers ``Blip2ForConditionalGeneration``, ``Blip2Model``,
            ``Blip2ForImageTextRetrieval``, ``InstructBlipModel`` or ``InstructBlipForConditionalGeneration``
            (or any module holding such a model's Q-Former as a ``qformer`` attribute somewhere inside).
        backend: the attention backend of the swapped-in hub ("auto", "cuda", "triton", "torch").

    Returns the same ``model`` object. Calling it again re-targets the backend only. Raises TypeError
    when the model holds no transformers Q-Former.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a transformers BLIP-2 / InstructBLIP model (nn.Module), got {type(model).__name__}")
    qformer_types = _qformer_types()
    swapped = 0
    for parent in list(model.modules()):
        child = getattr(parent, "qformer", None)
        if isinstance(child, FusedMHub):
            child.backend = check_backend_name(backend)
            swapped += 1
        elif isinstance(child, qformer_types):
            # The parent keeps its query_tokens and passes them as query_embeds: the hub owns none.
            parent.qformer = FusedMHub.from_hf(child, backend=backend, num_query_tokens=0)
            swapped += 1
    if swapped == 0:
        raise TypeError(
            f"model: found no transformers Q-Former (`qformer` attribute) in {type(model).__name__}; "
            f"expected one of {', '.join(SUPPORTED_MODELS)}"
        )
    return model


def apply_mmict_kernels_to_blip2(model: nn.Module, backend: str = "auto") -> nn.Module:
    """:func:`apply_mmict_kernels` for BLIP-2 models only (raises TypeError for anything else)."""
    if not type(model).__name__.startswith("Blip2"):
        raise TypeError(f"model: expected a transformers Blip2* model, got {type(model).__name__}")
    return apply_mmict_kernels(model, backend)


def apply_mmict_kernels_to_instructblip(model: nn.Module, backend: str = "auto") -> nn.Module:
    """:func:`apply_mmict_kernels` for InstructBLIP models only (raises TypeError for anything else)."""
    if not type(model).__name__.startswith("InstructBlip"):
        raise TypeError(f"model: expected a transformers InstructBlip* model, got {type(model).__name__}")
    return apply_mmict_kernels(model, backend)


__all__ = ["apply_mmict_kernels", "apply_mmict_kernels_to_blip2", "apply_mmict_kernels_to_instructblip", "SUPPORTED_MODELS"]
