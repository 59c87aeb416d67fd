"""FusedMHub(backend="cuda") under the compile-only harness, with a CUDA extension stand-in.

Run as a script in a fresh process without ``TRITON_INTERPRET``. A stand-in ``mmict_kernels._C``
(built for ``--built``, e.g. 90a) defines the extension's op schemas (read from
``python/attention_ops.cpp``) with CPU implementations that only count their calls and return
empty outputs (nothing runs in a compile-only run anyway). The harness simulates ``--arch``.
One M-Hub forward + backward in eval mode (no dropout) and one in training mode (attention
dropout 0.1) then show, per op, where ``backend="cuda"`` sent the work: CUDA calls counted here,
Triton kernels compiled by the harness. Prints one ``RESULT`` JSON line.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
CALLS: collections.Counter = collections.Counter()


def op_schemas() -> list[str]:
    """The schema strings of every ``m.def(...)`` in the binding (adjacent C++ literals joined)."""
    text = (ROOT / "python" / "attention_ops.cpp").read_text()
    return ["".join(re.findall(r"\"([^\"]*)\"", m.group(1))) for m in re.finditer(r"m\.def\(\s*((?:\"[^\"]*\"\s*)+)\)", text)]


def install_stand_in(built: str) -> torch.library.Library:
    sys.modules["mmict_kernels._C"] = module = types.ModuleType("mmict_kernels._C")
    module.cuda_archs = built
    lib = torch.library.Library("mmict", "FRAGMENT")
    for schema in op_schemas():
        name = schema.split("(")[0]
        lib.define(schema)
        lib.impl(name, make_stand_in(name), "CPU")
    return lib


def make_stand_in(name: str):
    def forward(q, *args, **kwargs):
        CALLS[name] += 1
        batch, len_q, heads, _ = q.shape
        return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((batch, heads, len_q), dtype=torch.float32)

    def backward(dout, q, k, v, *args, **kwargs):
        CALLS[name] += 1
        grads = [q, k, v]
        if name.startswith("prefix"):
            grads += list(args[:2])  # prefix_k, prefix_v
        return tuple(torch.empty(t.shape, dtype=t.dtype) for t in grads)

    return backward if name.endswith("_bwd") else forward


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--built", default="90a", help="the archs the stand-in extension says it was built for")
    p.add_argument("--arch", type=int, default=90, help="the simulated GPU")
    args = p.parse_args(argv)
    _lib = install_stand_in(args.built)  # noqa: F841 - the library must stay alive

    from transformers import InstructBlipQFormerConfig

    from mmict_kernels import backends
    from mmict_kernels.modules import FusedMHub
    from mmict_kernels.testing.compile_only import compile_only

    result: dict = {}
    with compile_only(arch=args.arch) as log:
        caps = backends.explain("hub_cross_attention", device_type="cpu", dtype=torch.bfloat16, head_dim=64)
        result["explain_cross"] = caps
        config = InstructBlipQFormerConfig(num_hidden_layers=2)  # layer 0 cross-attends
        for mode in ("eval", "train"):
            before = collections.Counter(CALLS)
            records_before = len(log.records)
            with log.run(mode):
                hub = FusedMHub(config, flavor="instructblip", num_query_tokens=32, backend="cuda").to(torch.bfloat16)
                hub.train(mode == "train")
                ids = torch.randint(1, config.vocab_size, (2, 8))
                mask = torch.ones(2, 40, dtype=torch.long)
                images = torch.randn(2, 257, config.encoder_hidden_size, dtype=torch.bfloat16, requires_grad=True)
                out = hub(input_ids=ids, attention_mask=mask, encoder_hidden_states=images).last_hidden_state
                out.float().sum().backward()
            result[mode] = {
                "errors": [m for s, m in log.errors if s == mode],
                "cuda_calls": dict(CALLS - before),
                "triton_kernels": [(r.kernel, r.module, r.constexprs) for r in log.records[records_before:]]
                + [(r.kernel, r.module, r.constexprs) for r in log.records[:records_before] if mode in r.launched_in],
            }
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
