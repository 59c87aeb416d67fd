"""FusedMHub on the Triton backend (attention kernels + fused epilogues) against transformers.

Runs in the CPU interpreter (TRITON_INTERPRET=1, tiny ragged shapes) or on a GPU. The Triton
attention kernels take head dims 32/64/128, so these configs use 2 heads of 32.
"""

from __future__ import annotations

import os

import pytest
import torch

from fused_mhub_testing import ENCODER, assert_matches_hf, make_hf, make_inputs
from mmict_kernels import FusedMHub

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
pytestmark = pytest.mark.skipif(
    not (INTERPRET or torch.cuda.is_available()), reason="needs TRITON_INTERPRET=1 (CPU interpreter) or a CUDA GPU"
)
DEVICE = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"


def _to(inputs):
    return {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}


@pytest.mark.parametrize("flavor,freq,text", [("instructblip", 1, [3, 0]), ("blip2", 2, None)])
def test_triton_backend_matches_transformers(flavor, freq, text):
    hf = make_hf(flavor, layers=2, freq=freq, num_attention_heads=2).to(DEVICE)
    hub = FusedMHub.from_hf(hf, backend="triton")
    inputs = _to(make_inputs(flavor, batch=2, nq=5, image_tokens=9, image_lengths=[4, 9], text_lengths=text))
    assert_matches_hf(hub, hf, inputs)


def test_triton_backend_packed_video_cache():
    hf = make_hf("instructblip", layers=2, freq=1, num_attention_heads=2).to(DEVICE)
    hub = FusedMHub.from_hf(hf, backend="triton").eval()
    ref_hub = FusedMHub.from_hf(hf, backend="torch").eval()
    frames = torch.randn(3, 4, ENCODER, device=DEVICE)
    inputs = _to(make_inputs("instructblip", batch=2, nq=5, image_tokens=1, text_lengths=[2, 4]))
    inputs.pop("encoder_hidden_states")
    with torch.no_grad():
        out = hub(**inputs, image_kv=hub.encode_image(frames, num_frames=[1, 2])).last_hidden_state
        ref = ref_hub(**inputs, image_kv=ref_hub.encode_image(frames, num_frames=[1, 2])).last_hidden_state
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_triton_training_dropout_reproducible_from_seed():
    """Training-mode dropout (attention kernels and fused epilogues) is reproduced by torch.manual_seed."""
    hf = make_hf("instructblip", layers=1, freq=1, num_attention_heads=2, dropout=0.2).to(DEVICE)
    hub = FusedMHub.from_hf(hf, backend="triton").train()
    inputs = _to(make_inputs("instructblip", batch=2, nq=5, image_tokens=7, image_lengths=[7, 3], text_lengths=[2, 4]))

    def run(seed, backward=True):
        torch.manual_seed(seed)
        x = inputs["encoder_hidden_states"].clone().requires_grad_(backward)
        out = hub(**dict(inputs, encoder_hidden_states=x)).last_hidden_state
        if backward:
            out.square().sum().backward()
        return out.detach(), x.grad

    a, ga = run(0)
    b, gb = run(0)
    with torch.no_grad():
        c, _ = run(1, backward=False)
    assert torch.equal(a, b) and torch.equal(ga, gb)
    assert not torch.equal(a, c)
    with torch.no_grad():
        evals = hub.eval()(**inputs).last_hidden_state
    assert not torch.allclose(a, evals)
