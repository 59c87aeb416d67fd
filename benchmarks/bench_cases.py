"""The benchmark cases: shapes (docs/DESIGN.md), input sets, and the analytic FLOP / byte counts.

A case is one op at one shape (and, for hub_self_attention, one mask mode). It knows how
to build a fresh input set, how to call our op on it, and what the op costs:

FLOPs (counting only the attention matmuls, 2 FLOPs per multiply-add, only visible pairs):
    fwd      = 4 * D * sum over (batch, head) of the visible (query, key) pairs
               (S = Q K^T and O = P V: 2 matmuls of 2 * D FLOPs per pair)
    bwd      = 2.5 * fwd  (recompute S, then dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q:
               5 matmuls; the FlashAttention-2 convention)
    fwd+bwd  = 3.5 * fwd
Bytes (unique tensors that must cross HBM at least once; a shared prefix counts once):
    fwd      = |q| + |k| + |v| (+ |prefix_k| + |prefix_v|) + |out| + |lse| (fp32)
    bwd      = reads q, k, v, (prefix), out, dout, lse; writes dq, dk, dv, (dprefix)
             = 2 * (inputs) + 2 * |out| + |lse|
    fwd+bwd  = fwd + bwd
These give the "achieved" TFLOP/s and GB/s of every provider of a case (peers that copy
the prefix per row are charged the same counts: they do the same job less efficiently).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from mmict_kernels import ops

CROSS, SELF, PREFIX = "hub_cross_attention", "hub_self_attention", "prefix_attention"
OPS = (CROSS, SELF, PREFIX)
MODES = ("fwd", "bwd", "fwd+bwd")

# Shape presets. GPU presets are the docs/DESIGN.md shapes; CPU presets are small enough for the
# Triton interpreter. Each preset lists, per op, the parameters of its case (or a list of cases).
# A cross-attention case with ``tokens_per_frame`` / ``max_frames`` instead of ``len_k`` is a
# ragged video batch: sample b has 1..max_frames frames (fixed seed), K/V packed with cu_seqlens_k.
GPU_PRESETS = {
    # M-Hub, image QA: 64 samples x (32 queries + 32 text) attending 257 ViT-g tokens; 12 x 64 heads.
    "image_qa": {
        CROSS: dict(batch=64, len_q=32, len_k=257, heads=12, head_dim=64),
        SELF: dict(batch=64, num_query=32, text=32, heads=12, head_dim=64),
    },
    # M-Hub, video: 32 samples x 8 frames x 257 tokens in one cross-attention sequence; then
    # ragged clips of 1 to 8 frames, packed (total_k, H, D) with cu_seqlens_k (varlen).
    "video": {
        CROSS: [
            dict(batch=32, len_q=32, len_k=8 * 257, heads=12, head_dim=64),
            dict(batch=32, len_q=32, tokens_per_frame=257, max_frames=8, heads=12, head_dim=64),
        ]
    },
    # Frozen LLM over a 4-demonstration prefix (4 x (32 fused text tokens + <|endofchunk|>)
    # = 132 tokens) shared by 64 rows of 64 own tokens (32 query features + 32 prompt).
    "llm2048": {PREFIX: dict(batch=64, len_q=64, len_prefix=132, heads=16, kv_heads=16, head_dim=128)},
    "llm4096_gqa": {PREFIX: dict(batch=64, len_q=64, len_prefix=132, heads=32, kv_heads=8, head_dim=128)},
}
CPU_PRESETS = {
    "tiny": {
        CROSS: [
            dict(batch=2, len_q=8, len_k=33, heads=2, head_dim=32),
            dict(batch=3, len_q=8, tokens_per_frame=5, max_frames=4, heads=2, head_dim=32),
        ],
        SELF: dict(batch=2, num_query=8, text=7, heads=2, head_dim=32),
        PREFIX: dict(batch=2, len_q=9, len_prefix=15, heads=4, kv_heads=2, head_dim=32),
    },
    "small": {
        CROSS: dict(batch=4, len_q=32, len_k=257, heads=4, head_dim=64),
        SELF: dict(batch=4, num_query=32, text=32, heads=4, head_dim=64),
        PREFIX: dict(batch=8, len_q=64, len_prefix=132, heads=8, kv_heads=2, head_dim=64),
    },
}


@dataclasses.dataclass
class Case:
    op: str
    preset: str
    params: dict
    mask: str | None = None  # hub_self_attention only

    # ----- naming -------------------------------------------------------------------
    @property
    def shape(self) -> str:
        p = self.params
        if self.op == CROSS and self.packed:
            total = sum(self.key_lengths())
            s = (f"B={p['batch']} Lq={p['len_q']} Lk={p['tokens_per_frame']}x(1..{p['max_frames']} frames) packed total={total}"
                 f" H={p['heads']} D={p['head_dim']}")  # fmt: skip
        elif self.op == CROSS:
            s = f"B={p['batch']} Lq={p['len_q']} Lk={p['len_k']} H={p['heads']} D={p['head_dim']}"
        elif self.op == SELF:
            s = f"B={p['batch']} L={p['num_query']}+{p['text']} H={p['heads']} D={p['head_dim']} mask={self.mask}"
        else:
            s = f"B={p['batch']} Lq={p['len_q']} Lp={p['len_prefix']} H={p['heads']} Hkv={p['kv_heads']} D={p['head_dim']} G=1"
        return f"{self.preset}: {s}"

    @property
    def head_dim(self) -> int:
        return self.params["head_dim"]

    @property
    def packed(self) -> bool:
        """A ragged video batch with packed K/V (cross-attention only)."""
        return "tokens_per_frame" in self.params

    def key_lengths(self) -> list[int]:
        """Image tokens per sample of a packed case: frames (1..max_frames, fixed seed) x tokens per frame."""
        p = self.params
        g = torch.Generator().manual_seed(4321)
        frames = torch.randint(1, p["max_frames"] + 1, (p["batch"],), generator=g)
        frames[0] = p["max_frames"]  # the longest clip is always there (it sets the padded width of the peers)
        return [int(f) * p["tokens_per_frame"] for f in frames]

    def cu_seqlens_k(self, device: torch.device) -> torch.Tensor:
        lengths = torch.tensor([0] + self.key_lengths())
        return lengths.cumsum(0).to(device=device, dtype=torch.int32)

    # ----- inputs -------------------------------------------------------------------
    def text_lengths(self, device: torch.device) -> torch.Tensor:
        """Ragged valid text lengths in [1, T] (fixed seed: every input set and every peer's
        mask share them). At least 1, so no row of any mask mode is empty (SDPA's math path
        would give NaN for an empty row, ours gives 0, and the check would flag a false mismatch)."""
        p = self.params
        g = torch.Generator().manual_seed(1234)
        return torch.randint(1, p["text"] + 1, (p["batch"],), generator=g, dtype=torch.int32).to(device)

    def make_inputs(self, dtype: torch.dtype, device: torch.device, seed: int) -> dict:
        """One input set: the differentiable tensors (leaves, requires_grad) plus side data."""
        p = self.params
        g = torch.Generator(device="cpu").manual_seed(seed)

        def leaf(*shape):
            return torch.randn(*shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype).requires_grad_()

        if self.op == CROSS and self.packed:
            b, lq, h, d, total = p["batch"], p["len_q"], p["heads"], p["head_dim"], sum(self.key_lengths())
            return dict(q=leaf(b, lq, h, d), k=leaf(total, h, d), v=leaf(total, h, d), cu_seqlens_k=self.cu_seqlens_k(device))
        if self.op == CROSS:
            b, lq, lk, h, d = p["batch"], p["len_q"], p["len_k"], p["heads"], p["head_dim"]
            return dict(q=leaf(b, lq, h, d), k=leaf(b, lk, h, d), v=leaf(b, lk, h, d))
        if self.op == SELF:
            b, length, h, d = p["batch"], p["num_query"] + p["text"], p["heads"], p["head_dim"]
            return dict(
                q=leaf(b, length, h, d), k=leaf(b, length, h, d), v=leaf(b, length, h, d), text_lengths=self.text_lengths(device)
            )
        b, lq, lp, h, hkv, d = p["batch"], p["len_q"], p["len_prefix"], p["heads"], p["kv_heads"], p["head_dim"]
        return dict(
            q=leaf(b, lq, h, d),
            k=leaf(b, lq, hkv, d),
            v=leaf(b, lq, hkv, d),
            prefix_k=leaf(1, lp, hkv, d),
            prefix_v=leaf(1, lp, hkv, d),
        )

    @staticmethod
    def leaves(inputs: dict) -> list[torch.Tensor]:
        return [t for t in inputs.values() if isinstance(t, torch.Tensor) and t.requires_grad]

    def call_ours(self, backend: str) -> Callable[[dict], torch.Tensor]:
        """Our public op with ``backend`` forced; returns out (B, Lq, H, D)."""
        if self.op == CROSS:
            return lambda x: ops.hub_cross_attention(x["q"], x["k"], x["v"], x.get("cu_seqlens_k"), backend=backend)
        if self.op == SELF:
            nq, mask = self.params["num_query"], self.mask
            return lambda x: ops.hub_self_attention(x["q"], x["k"], x["v"], nq, x["text_lengths"], mask=mask, backend=backend)
        return lambda x: ops.prefix_attention(x["q"], x["k"], x["v"], x["prefix_k"], x["prefix_v"], causal=True, backend=backend)

    # ----- analytic costs -----------------------------------------------------------
    def visible_pairs(self) -> int:
        """Number of (query, key) pairs that attend, summed over batch (per head)."""
        p = self.params
        if self.op == CROSS:
            return p["len_q"] * (sum(self.key_lengths()) if self.packed else p["batch"] * p["len_k"])
        if self.op == PREFIX:
            lq, lp = p["len_q"], p["len_prefix"]
            return p["batch"] * (lq * lp + lq * (lq + 1) // 2)  # full prefix + causal own block
        nq, t = p["num_query"], p["text"]
        total = 0
        for n in self.text_lengths(torch.device("cpu")).tolist():
            if self.mask == "bidirectional":
                total += (nq + t) * (nq + n)  # every row (padded text rows too) sees every valid key
            elif self.mask == "unimodal":
                total += nq * nq + t * n  # queries see queries; text rows see valid text
            else:  # multimodal_causal: queries see queries; text row i sees all queries + valid text j <= i
                total += nq * nq + sum(nq + min(i + 1, n) for i in range(t))
        return total

    def flops(self, mode: str) -> float:
        fwd = 4.0 * self.head_dim * self.params["heads"] * self.visible_pairs()
        return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[mode]

    def bytes(self, mode: str, dtype: torch.dtype) -> float:
        p, e = self.params, torch.empty((), dtype=dtype).element_size()
        h, d = p["heads"], p["head_dim"]
        if self.op == CROSS:
            rows = p["batch"] * p["len_q"]
            keys = sum(self.key_lengths()) if self.packed else p["batch"] * p["len_k"]
            inputs = (rows * h + 2 * keys * h) * d * e
        elif self.op == SELF:
            rows = p["batch"] * (p["num_query"] + p["text"])
            inputs = 3 * rows * h * d * e
        else:
            rows = p["batch"] * p["len_q"]
            inputs = (rows * h + 2 * rows * p["kv_heads"] + 2 * p["len_prefix"] * p["kv_heads"]) * d * e
        out, lse = rows * h * d * e, rows * h * 4
        fwd = inputs + out + lse
        bwd = 2 * inputs + 2 * out + lse
        return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]

    def set_bytes(self, dtype: torch.dtype) -> float:
        """Memory of one input set with its gradients and output (to size the L2 rotation)."""
        return self.bytes("fwd+bwd", dtype)


def build_cases(ops_wanted: list[str], presets: dict, preset_names: list[str]) -> list[Case]:
    cases = []
    for name in preset_names:
        for op, entry in presets[name].items():
            if op not in ops_wanted:
                continue
            for params in entry if isinstance(entry, list) else [entry]:
                if op == SELF:
                    cases.extend(Case(op, name, params, mask) for mask in ops.MASK_MODES)
                else:
                    cases.append(Case(op, name, params))
    return cases
