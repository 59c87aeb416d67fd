"""FusedMHub's call signature: transformers' arguments bound to names, checked, and turned into kernel inputs.

FusedMHub is a drop-in for two transformers classes whose ``forward`` differ in their positional
order (BLIP-2 takes embeddings first, InstructBLIP token ids first). Binding is kept apart from the
layer loop so that the loop reads the same for both flavors and only sees named, checked inputs:

- :func:`bind_forward_arguments`: positional/keyword arguments -> one dict of names, per flavor;
  transformers' generic flags (``output_attentions``, ``use_cache``, ``head_mask``) accepted only
  at the values the fused kernels can honour;
- :func:`check_flavor_arguments`, :func:`default_query_batch`, :func:`query_positions`: which of
  queries / text a flavor takes, and how many query positions a call has;
- :func:`text_lengths`: the right-padded ``attention_mask`` -> the per-sample text lengths the
  kernels build their masks from (the mask itself never reaches a kernel).
"""

from __future__ import annotations

import torch

from ...ops import checks as C

FLAVORS = ("blip2", "instructblip")

# forward's positional parameters, per flavor, in transformers' order.
POSITIONAL = {
    "blip2": ("query_embeds", "query_length", "attention_mask", "encoder_hidden_states", "encoder_attention_mask"),
    "instructblip": (
        "input_ids",
        "attention_mask",
        "position_ids",
        "query_embeds",
        "encoder_hidden_states",
        "encoder_attention_mask",
    ),
}
# FusedMHub's own keyword arguments, on top of the flavor's positional ones.
EXTRA_KEYWORDS = ("image_kv", "mask", "return_dict", "output_hidden_states")
# The arguments that are tensors (``check_devices``).
TENSOR_ARGUMENTS = (
    "input_ids",
    "position_ids",
    "query_embeds",
    "attention_mask",
    "encoder_hidden_states",
    "encoder_attention_mask",
)
# transformers' generic keyword arguments that we accept (and what they must be).
IGNORED_FALSE = ("output_attentions", "use_cache")


def bind_forward_arguments(flavor: str, args: tuple, kwargs: dict) -> dict:
    """Map positional/keyword arguments of this flavor's signature to names; reject the rest."""
    names = POSITIONAL[flavor]
    if len(args) > len(names):
        raise TypeError(f"forward: takes at most {len(names)} positional arguments ({', '.join(names)}), got {len(args)}")
    kwargs = dict(kwargs)
    for name, value in zip(names, args):
        if name in kwargs:
            raise TypeError(f"forward: got multiple values for argument {name!r}")
        kwargs[name] = value
    inputs = {
        "input_ids": None,
        "position_ids": None,
        "query_embeds": None,
        "query_length": None,
        "attention_mask": None,
        "encoder_hidden_states": None,
        "encoder_attention_mask": None,
        "image_kv": None,
        "mask": "bidirectional",
        "return_dict": None,
        "output_hidden_states": None,
    }
    allowed = set(names) | set(EXTRA_KEYWORDS)
    for name, value in kwargs.items():
        if name in allowed:
            inputs[name] = value
        elif name in IGNORED_FALSE:
            if value:
                if name == "output_attentions":
                    raise ValueError(
                        "output_attentions=True: FusedMHub's fused kernels never materialize attention probabilities; "
                        "use transformers' eager Q-Former to inspect them"
                    )
                raise ValueError(f"{name}=True is not supported by FusedMHub")
        elif name == "head_mask":
            if value is not None:
                raise ValueError("head_mask: not supported by FusedMHub (pass None)")
        else:
            raise TypeError(f"forward: unexpected keyword argument {name!r} for flavor {flavor!r}")
    return inputs


def check_flavor_arguments(flavor: str, input_ids, position_ids, query_length) -> None:
    """BLIP-2 reads embeddings only; ``query_length`` exists only in BLIP-2's signature."""
    if flavor == "blip2":
        if input_ids is not None or position_ids is not None:
            raise TypeError("input_ids/position_ids: the BLIP-2 Q-Former takes embeddings (query_embeds), not token ids")
    elif query_length is not None:
        raise TypeError("query_length: only for flavor 'blip2' (InstructBLIP counts query_embeds)")


def default_query_batch(input_ids, encoder_hidden_states, image_kv) -> int:
    """The batch size the module's own ``query_tokens`` are expanded to when no ``query_embeds`` are given."""
    if input_ids is not None:
        return input_ids.shape[0]
    if encoder_hidden_states is not None:
        return encoder_hidden_states.shape[0]
    if image_kv is not None:
        return image_kv.batch_size
    raise ValueError("query_embeds: required when no images (encoder_hidden_states / image_kv) give the batch size")


def check_query_embeds(query_embeds, hidden_size: int) -> None:
    C.check_tensor("query_embeds", query_embeds, ndim=3, dtypes=C.FLOAT_DTYPES)
    if query_embeds.shape[-1] != hidden_size:
        raise ValueError(f"query_embeds: expected last dim hidden_size = {hidden_size}, got shape {tuple(query_embeds.shape)}")


def query_positions(flavor: str, query_embeds, query_length, seq_len: int) -> int:
    """How many of the ``seq_len`` positions are queries (the rest is text)."""
    if flavor == "blip2":
        nq = seq_len if query_length is None else query_length
        if not isinstance(nq, int) or isinstance(nq, bool) or not 0 <= nq <= seq_len:
            raise ValueError(f"query_length: expected an int in [0, {seq_len}] (query_embeds' length), got {query_length!r}")
        return nq
    return 0 if query_embeds is None else query_embeds.shape[1]


def check_devices(device: torch.device, inputs: dict) -> None:
    """Every tensor argument of bound ``inputs`` on ``device`` (the module's parameters); None means "not given"."""
    for name in TENSOR_ARGUMENTS:
        t = inputs[name]
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor or None, got {type(t).__name__}")
        if t is not None and t.device != device:
            raise ValueError(f"{name}: expected device {device} (the FusedMHub's parameters), got {t.device}")


def check_input_ids(input_ids, position_ids, query_embeds, max_position_embeddings: int) -> None:
    """InstructBLIP's text ids: 2-D integers, within the position table unless positions are given."""
    C.check_tensor("input_ids", input_ids, ndim=2, dtypes=(torch.int32, torch.int64))
    if input_ids.shape[1] > max_position_embeddings and position_ids is None:
        raise ValueError(
            f"input_ids: {input_ids.shape[1]} text tokens exceed max_position_embeddings = {max_position_embeddings}"
        )
    if query_embeds is not None and input_ids.shape[0] != query_embeds.shape[0]:
        raise ValueError(f"input_ids: batch {input_ids.shape[0]} differs from query_embeds' batch {query_embeds.shape[0]}")


def text_lengths(attention_mask, batch: int, seq_len: int, nq: int):
    """Right-padded attention mask -> int32 valid text lengths (B,), or None for no mask.

    The mask is (B, queries + text) as transformers takes it, or (B, text) alone (the queries
    are always valid, so their ones may be left out).
    """
    if attention_mask is None:
        return None
    C.check_tensor("attention_mask", attention_mask, ndim=(2, 3, 4))
    if attention_mask.dim() != 2:
        raise ValueError(
            "attention_mask: expected a 2-D (B, L) padding mask (1 = valid, 0 = padding), "
            f"got shape {tuple(attention_mask.shape)}"
        )
    text_only = nq > 0 and tuple(attention_mask.shape) == (batch, seq_len - nq)
    if tuple(attention_mask.shape) != (batch, seq_len) and not text_only:
        raise ValueError(
            f"attention_mask: expected shape {(batch, seq_len)} (B, queries + text) or {(batch, seq_len - nq)} "
            f"(B, text), got {tuple(attention_mask.shape)}"
        )
    valid = attention_mask != 0
    start = 0 if text_only else nq
    lengths = valid[:, start:].sum(dim=1, dtype=torch.int32)
    if C.value_checks_enabled(attention_mask):
        positions = torch.arange(valid.shape[1], device=valid.device)
        expected = positions[None, :] < (start + lengths)[:, None]
        # Once per forward, and on a GPU a device-side assert: no host sync.
        C.expect(
            valid == expected,
            f"attention_mask: FusedMHub needs every query position ({nq}) valid and the text right-padded "
            "(1s then 0s per row); got another pattern",
        )
    return lengths
