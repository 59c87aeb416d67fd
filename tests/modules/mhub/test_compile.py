"""torch.compile(fullgraph=True) over FusedMHub: one graph, same outputs and gradients as eager.

On CPU the graphs are checked with the ``aot_eager`` compiler backend (dynamo capture + AOT autograd,
no code generation: seconds instead of minutes on 2 cores); on a GPU with inductor as well.
"""

from __future__ import annotations

import pytest
import torch

from helpers.mhub import make_hf, make_inputs
from mmict_kernels import FusedMHub

TOL = dict(rtol=1e-5, atol=1e-5)


def _grads(module, out, *inputs):
    params = [p for p in module.parameters() if p.requires_grad]
    return torch.autograd.grad(out.square().sum(), list(inputs) + params, allow_unused=True)


def _compare(eager_fn, compiled_fn, image):
    x1, x2 = image.clone().requires_grad_(True), image.clone().requires_grad_(True)
    ref = eager_fn(x1)
    out = compiled_fn(x2)
    torch.testing.assert_close(out, ref, **TOL)
    return ref, out, x1, x2


def test_compile_fullgraph_forward_and_backward_torch_backend():
    torch._dynamo.reset()
    hub = FusedMHub.from_hf(make_hf("instructblip", layers=2, freq=1), backend="torch").eval()
    inputs = make_inputs("instructblip", batch=2, nq=5, image_tokens=7, image_lengths=[7, 3], text_lengths=[2, 4])
    image = inputs.pop("encoder_hidden_states")
    compiled = torch.compile(hub, fullgraph=True, backend="aot_eager")  # fullgraph: any graph break fails

    def run(module, x):
        return module(**inputs, encoder_hidden_states=x).last_hidden_state

    ref, out, x1, x2 = _compare(lambda x: run(hub, x), lambda x: run(compiled, x), image)
    for a, b in zip(_grads(hub, ref, x1), _grads(hub, out, x2)):
        if a is None:
            assert b is None
        else:
            torch.testing.assert_close(b, a, **TOL)


def test_compile_fullgraph_cache_and_objectives_and_training():
    torch._dynamo.reset()
    hub = FusedMHub.from_hf(make_hf("blip2", layers=1, freq=1, text=True, dropout=0.2), backend="torch").eval()
    inputs = make_inputs("blip2", batch=2, nq=5, image_tokens=8, image_lengths=[8, 2], text_lengths=[3, 1])
    image, mask = inputs.pop("encoder_hidden_states"), inputs.pop("encoder_attention_mask")

    def objectives(x):
        cache = hub.encode_image(x, mask)  # dense layout under compile (no data-dependent sizes)
        outs = hub.forward_objectives(**inputs, image_kv=cache, masks=("unimodal", "multimodal_causal"))
        return torch.stack([o.last_hidden_state for o in outs])

    compiled = torch.compile(objectives, fullgraph=True, backend="aot_eager")
    ref, out, x1, x2 = _compare(objectives, compiled, image)
    g_ref, g_out = _grads(hub, ref, x1), _grads(hub, out, x2)
    for a, b in zip(g_ref, g_out):
        if a is None:
            assert b is None
        else:
            torch.testing.assert_close(b, a, **TOL)

    # training mode (dropout in the attention ops and the epilogues) also captures as one graph
    hub.train()
    out = compiled(image)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="inductor code generation is checked on a GPU (minutes on 2 CPU cores)")
def test_compile_inductor_on_gpu():
    torch._dynamo.reset()
    hf = make_hf("instructblip", layers=2, freq=1, num_attention_heads=2).cuda()
    hub = FusedMHub.from_hf(hf, backend="auto").eval()
    inputs = {
        k: v.cuda()
        for k, v in make_inputs("instructblip", batch=2, nq=5, image_tokens=7, image_lengths=[7, 3], text_lengths=[2, 4]).items()
    }
    compiled = torch.compile(hub, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(**inputs).last_hidden_state, hub(**inputs).last_hidden_state, rtol=1e-4, atol=1e-4)
