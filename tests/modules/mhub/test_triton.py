"""FusedMHub on the Triton backend (attention kernels + fused epilogues) against transformers.

Runs in the CPU interpreter (TRITON_INTERPRET=1, tiny ragged shapes) or on a GPU. The Triton
attention kernels take head dims 32/64/128, so these configs use 2 heads of 32.
"""

from __future__ import annotations

import pytest
import torch

from helpers.devices import INTERPRET, TRITON_DEVICE, requires_triton
from helpers.mhub import ENCODER, as_fused, assert_matches_hf, make_hf, make_inputs
from mmict_kernels import FusedMHub

pytestmark = requires_triton
DEVICE = TRITON_DEVICE


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


def test_triton_backend_compiles_fullgraph():
    """torch.compile(fullgraph=True) captures the Triton attention kernels and fused epilogues (as custom ops)."""
    torch._dynamo.reset()
    hf = make_hf("instructblip", layers=1, freq=1, num_attention_heads=2).to(DEVICE)
    hub = FusedMHub.from_hf(hf, backend="triton").eval()
    inputs = _to(make_inputs("instructblip", batch=2, nq=5, image_tokens=7, image_lengths=[7, 3], text_lengths=[2, 4]))
    image = inputs.pop("encoder_hidden_states")
    compiled = torch.compile(hub, fullgraph=True, backend="aot_eager")
    x1, x2 = image.clone().requires_grad_(True), image.clone().requires_grad_(True)
    ref = hub(**inputs, encoder_hidden_states=x1).last_hidden_state
    out = compiled(**inputs, encoder_hidden_states=x2).last_hidden_state
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    ref.square().sum().backward()
    out.square().sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_capture_fixed_shape():
    hf = make_hf("instructblip", layers=2, freq=1, num_attention_heads=2).to(DEVICE)
    hub = FusedMHub.from_hf(hf, backend="auto").eval()
    static = _to(make_inputs("instructblip", batch=2, nq=5, image_tokens=9, image_lengths=[9, 4], text_lengths=[3, 1]))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(stream):
        for _ in range(2):  # warm-up: kernel compilation and autotuning happen outside the capture
            hub(**static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        captured = hub(**static).last_hidden_state
    fresh = _to(make_inputs("instructblip", batch=2, nq=5, image_tokens=9, image_lengths=[5, 2], text_lengths=[4, 0], seed=9))
    for k, v in fresh.items():
        static[k].copy_(v)
    graph.replay()
    with torch.no_grad():
        torch.testing.assert_close(captured, hub(**fresh).last_hidden_state, rtol=1e-4, atol=1e-4)


def test_autocast_bfloat16_fused_path():
    """Mixed precision (the official recipe): bf16 matmuls and kernels, float32 residual stream and LayerNorm."""
    hf = make_hf("instructblip", layers=1, freq=1, num_attention_heads=2).to(DEVICE)
    hub = FusedMHub.from_hf(hf, backend="triton").train()
    inputs = _to(make_inputs("instructblip", batch=2, nq=5, image_tokens=7, image_lengths=[7, 3], text_lengths=[2, 4]))
    x = inputs.pop("encoder_hidden_states").requires_grad_(True)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = hub(**inputs, encoder_hidden_states=x).last_hidden_state
    assert out.dtype == torch.float32  # the residual stream (LayerNorm output) stays in the parameters' dtype
    out.square().sum().backward()
    assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad).all() for p in hub.parameters() if p.grad is not None)
    with torch.no_grad():
        ref = as_fused(hf(**inputs, encoder_hidden_states=x).last_hidden_state, inputs)
    torch.testing.assert_close(out.detach(), ref, rtol=0, atol=3e-2)  # bf16 rounding of the matmul inputs
