"""AIM efficiency against shots, per backbone: context tokens, K/V bytes and step time per query.

Two ways to put N image demonstrations in front of a query, on each frozen backbone (LLaVA,
LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL):

- ``raw_multimodal``: each demonstration's visual tokens and text in every query's context (the
  stock model on the concatenated sequence, one copy per query: raw multimodal ICL);
- ``aim``: fused virtual tokens (one per demonstration text token) held ONCE per group of queries
  as a shared prefix (DemoPrefixCache + ops.prefix_attention), the frozen aggregations from the
  demonstration bank (timed after its first fill);
- ``aim_per_row``: the same fused tokens, one prefix per query (random demonstrations): tokens and
  K/V only.

The tiny random-weight models keep each real model's layout at a small width (``LAYOUTS``): the
attention's grouped-query ratio, the image token layout (LLaVA-NeXT's base view + 2 x 2 tiles +
row newlines, Qwen2-VL's 2 x 2 patch merging and vision wrappers). Per query, each row gives:

- ``context_tokens_per_query`` and ``kv_bytes_per_query`` of the tiny model (AIM: measured from the
  cache tensors; raw: tokens x per-token K/V bytes, exactly what a K/V cache of that length holds);
- the same two at the real model's layout (``real_*``: its image token count, layers, K/V heads,
  head dim, bfloat16), device-independent counts;
- ``step_ms_per_query``: AIM's training step (forward + backward into the projection; the queries'
  images through the vision tower, the demonstrations from the bank) against raw ICL's forward +
  backward into the demonstrations' input embeddings (what training anything in front of the LLM
  costs on raw demonstrations; all images through the vision tower); ``forward_ms_per_query``:
  both scoring the answer without gradients. CPU numbers are labelled CPU (wall clock, one thread).

    python benchmarks/aim_efficiency.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from mmict_kernels.icl.aim import AIMBatch, AIMModel, DemonstrationBank, backbone_for  # noqa: E402
from mmict_kernels.icl.aim.backbones import default_processor  # noqa: E402
from mmict_kernels.icl.aim.tiny import TinyShape, tiny_model  # noqa: E402
from mmict_kernels.icl.aim.visual import text_segment  # noqa: E402
from mmict_kernels.modules.prefix_cache import DemoPrefixCache  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Layout:
    """A real model's LLM and image-token layout, and the tiny model that keeps it."""

    name: str
    layers: int
    kv_heads: int
    head_dim: int
    image_tokens: int  # one image as the real model reads it (see ``note``)
    note: str
    tiny: TinyShape
    image_px: int  # the tiny model's image side


# Real layouts: config.json of each checkpoint (LLM layers, K/V heads, head dim) and its image
# token count for one image at the stated size. Tiny: the same K/V-head ratio and image layout.
LAYOUTS = {
    "llava": Layout(
        "llava-1.5-7b", 32, 32, 128, 576, "336 px: 24 x 24 patches",
        TinyShape(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=4, vision_hidden=64, image_size=64, patch_size=8),
        64,
    ),
    "llava_next": Layout(
        "llava-v1.6-vicuna-7b", 32, 32, 128, 2928, "672 x 672 px: 576 base + 2 x 2 tiles 48 x 48 + 48 newlines",
        TinyShape(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=4, vision_hidden=64, image_size=32, patch_size=8),
        64,
    ),
    "qwen2_vl": Layout(
        "Qwen2-VL-7B-Instruct", 28, 4, 128, 258, "448 x 448 px: 32 x 32 patches merged 2 x 2, + 2 wrappers",
        TinyShape(hidden_size=224, num_layers=2, num_heads=7, num_kv_heads=1, vision_hidden=64, image_size=64, patch_size=4),
        64,
    ),
    "qwen2_5_vl": Layout(
        "Qwen2.5-VL-7B-Instruct", 28, 4, 128, 258, "448 x 448 px: 32 x 32 patches merged 2 x 2, + 2 wrappers",
        TinyShape(hidden_size=224, num_layers=2, num_heads=7, num_kv_heads=1, vision_hidden=64, image_size=64, patch_size=4),
        64,
    ),
}  # fmt: skip
VOCAB = 1000


def kv_bytes_per_token(model) -> int:
    c = model.config.get_text_config()
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * model.dtype.itemsize


def real_kv_bytes_per_token(layout: Layout) -> int:
    return 2 * layout.layers * layout.kv_heads * layout.head_dim * 2  # bfloat16


def make_batch(backbone, shots, queries, group_size, demo_len, prompt_len, answer_len, image_px, rng) -> AIMBatch:
    groups = queries // group_size
    n_demos = groups * shots

    def images(n):
        return [backbone.preprocess([rng.integers(0, 256, (image_px, image_px, 3), dtype=np.uint8)]).to("cpu") for _ in range(n)]

    def ids(n):
        return rng.integers(4, VOCAB - 10, n).tolist()

    return AIMBatch(
        demo_images=images(n_demos) if n_demos else None,
        demo_text=[ids(demo_len) for _ in range(n_demos)],
        group_demos=[list(range(g * shots, (g + 1) * shots)) for g in range(groups)],
        query_images=images(queries),
        query_group=torch.arange(queries) // group_size,
        query_prompt=[ids(prompt_len) for _ in range(queries)],
        query_answer=[ids(answer_len) for _ in range(queries)],
    )


def timed(fn, repeat: int) -> float:
    """Median wall time (s) of ``fn``."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def raw_rows(model: AIMModel, b: AIMBatch) -> torch.Tensor:
    """Raw multimodal ICL: every query's context holds its demonstrations' visual tokens and text (B, L, d)."""
    bb = model.backbone
    demo = bb.visual_tokens(b.demo_images) if b.demo_images else []
    query = bb.visual_tokens(b.query_images)
    rows = []
    for r, q in enumerate(query):
        parts = []
        for d in b.group_demos[int(b.query_group[r])]:
            parts += [demo[d].embeds, bb.embed(torch.tensor(b.demo_text[d]))]
        parts += [q.embeds, bb.embed(torch.tensor(b.query_prompt[r] + b.query_answer[r]))]
        rows.append(torch.cat(parts))
    return torch.stack(rows)  # equal lengths by construction (same image size everywhere)


def raw_positions(model: AIMModel, b: AIMBatch, demo_len: int, tail_len: int):
    """The raw rows' own positions (Qwen: the model's M-RoPE positions of the interleaved layout), or None (1-D)."""
    bb = model.backbone
    probe = bb.visual_tokens(b.query_images[:1])[0]  # every image has the same size here
    shots = len(b.group_demos[0])
    layout = (probe.segments + (text_segment(demo_len),)) * shots + probe.segments + (text_segment(tail_len),)
    own = bb.row_positions(layout)
    return None if own is None else torch.from_numpy(own)[:, None].expand(-1, len(b.query_prompt), -1)


def measure(family: str, args, rng, commit: str, device_label: str) -> list[dict]:
    layout = LAYOUTS[family]
    torch.manual_seed(0)
    model_hf = tiny_model(family, VOCAB, layout.tiny).eval()
    backbone = backbone_for(model_hf, default_processor(model_hf, layout.image_px))
    bank = DemonstrationBank(tempfile.mkdtemp(prefix="aim_bank_"))
    model = AIMModel(backbone, eos_id=None, bank=bank)
    lm = backbone.lm
    per_tok, real_per_tok = kv_bytes_per_token(lm), real_kv_bytes_per_token(layout)
    probe = backbone.visual_tokens([backbone.preprocess([rng.integers(0, 256, (layout.image_px,) * 2 + (3,), dtype=np.uint8)])])
    n_img = probe[0].embeds.shape[0]
    own = n_img + args.prompt_len + args.answer_len
    real_own = layout.image_tokens + args.prompt_len + args.answer_len
    text_cfg = lm.config.get_text_config()
    common = {
        "backbone": family,
        "real_layout": layout.name,
        "queries": args.queries,
        "group_size": args.group_size,
        "image_tokens": n_img,
        "real_image_tokens": layout.image_tokens,
        "demo_text_tokens": args.demo_len,
        "llm": f"h{text_cfg.hidden_size} L{text_cfg.num_hidden_layers} H{text_cfg.num_attention_heads}/{text_cfg.num_key_value_heads}",
        "real_llm": f"L{layout.layers} Hkv{layout.kv_heads} d{layout.head_dim} bf16",
        "dtype": "float32",
        "device": device_label,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "commit": commit,
        "date": datetime.date.today().isoformat(),
    }
    rows = []
    for shots in [int(s) for s in args.shots.split(",")]:
        b = make_batch(
            backbone, shots, args.queries, args.group_size, args.demo_len, args.prompt_len, args.answer_len, layout.image_px, rng
        )
        repeat = 3 if shots <= 8 else 1

        def aim_step():
            loss, n = model(b)
            loss.backward()
            model.zero_grad(set_to_none=True)

        aim_step()  # fills the bank: later steps read the frozen aggregations from it
        t_aim = timed(aim_step, repeat)
        with torch.no_grad():
            t_aim_fwd = timed(lambda: model(b), repeat)
            prefixes, lengths = model.fused_prefixes(b)
            cache = DemoPrefixCache.build(lm, prefixes, lengths)
        aim_kv = cache.nbytes() / args.queries + own * per_tok

        def raw_inputs():
            with torch.no_grad():
                return raw_rows(model, b)

        x0 = raw_inputs()
        positions = raw_positions(model, b, args.demo_len, args.prompt_len + args.answer_len)
        extra = {} if positions is None else {"position_ids": positions}

        def raw_step():
            x = raw_inputs().requires_grad_(True)  # the vision tower reads every image, as raw ICL must
            lm(inputs_embeds=x, **extra).logits[:, -args.answer_len - 1 : -1].float().sum().backward()

        def raw_forward():
            with torch.no_grad():
                lm(inputs_embeds=raw_inputs(), **extra, logits_to_keep=args.answer_len + 1)

        t_raw = timed(raw_step, repeat)
        t_raw_fwd = timed(raw_forward, repeat)
        raw_ctx = shots * (n_img + args.demo_len) + own
        aim_ctx = shots * args.demo_len + own
        assert raw_ctx == x0.shape[1], (raw_ctx, x0.shape)
        real_raw_ctx = shots * (layout.image_tokens + args.demo_len) + real_own
        real_aim_ctx = shots * args.demo_len + real_own
        real_aim_kv = shots * args.demo_len * real_per_tok / args.group_size + real_own * real_per_tok
        for method, ctx, kv, real_ctx, real_kv, step, fwd in (
            ("aim", aim_ctx, aim_kv, real_aim_ctx, real_aim_kv, t_aim, t_aim_fwd),
            ("aim_per_row", aim_ctx, aim_ctx * per_tok, real_aim_ctx, real_aim_ctx * real_per_tok, None, None),
            ("raw_multimodal", raw_ctx, raw_ctx * per_tok, real_raw_ctx, real_raw_ctx * real_per_tok, t_raw, t_raw_fwd),
        ):
            rows.append(
                {
                    **common,
                    "shots": shots,
                    "method": method,
                    "context_tokens_per_query": ctx,
                    "kv_bytes_per_query": round(kv),
                    "real_context_tokens_per_query": real_ctx,
                    "real_kv_bytes_per_query": round(real_kv),
                    "step_ms_per_query": None if step is None else round(1e3 * step / args.queries, 3),
                    "forward_ms_per_query": None if fwd is None else round(1e3 * fwd / args.queries, 3),
                }
            )
        print(
            f"{family:11s} shots {shots:2d}: tokens/query aim {aim_ctx} raw {raw_ctx}; real-layout K/V MiB/query aim "
            f"{real_aim_kv / 2**20:.1f} raw {real_raw_ctx * real_per_tok / 2**20:.1f}; step ms/query aim "
            f"{1e3 * t_aim / args.queries:.1f} raw {1e3 * t_raw / args.queries:.1f}",
            flush=True,
        )
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbones", default=",".join(LAYOUTS), help=f"comma list of {list(LAYOUTS)}")
    p.add_argument("--shots", default="1,2,4,8,16,32")
    p.add_argument("--queries", type=int, default=8)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--demo-len", type=int, default=12)
    p.add_argument("--prompt-len", type=int, default=8)
    p.add_argument("--answer-len", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    unknown = set(args.backbones.split(",")) - set(LAYOUTS)
    if unknown:
        p.error(f"--backbones: unknown {sorted(unknown)}; expected some of {list(LAYOUTS)}")
    if torch.cuda.is_available():
        print("a GPU is present, but this script measures on the CPU (its rows say so)")
    torch.set_num_threads(1)  # steadier wall clock on a shared machine
    label = f"CPU ({platform.processor() or platform.machine()}, 1 thread)"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    rng = np.random.default_rng(0)
    rows = []
    for family in args.backbones.split(","):
        rows += measure(family, args, rng, commit, label)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "aim_efficiency_cpu.csv")
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {path}  (CPU numbers: times are CPU wall clock; K/V bytes are tensor bytes, device-independent)")
    plot(rows, os.path.join(args.out, "aim_efficiency_cpu.png"), label)


def plot(rows, path, label):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)")
        return
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.8))
    panels = (
        ("real_context_tokens_per_query", "LLM context tokens per query (real layout)", 1),
        ("real_kv_bytes_per_query", "LLM K/V MiB per query (real layout, bf16)", 2**20),
        ("step_ms_per_query", f"step ms per query (tiny model, {label})", 1),
    )
    styles = {"aim": "-", "raw_multimodal": "--", "aim_per_row": ":"}
    colors = dict(zip(LAYOUTS, ("C0", "C1", "C2", "C3")))
    for axis, (key, title, scale) in zip(ax, panels):
        for family in dict.fromkeys(r["backbone"] for r in rows):
            for method, style in styles.items():
                pts = [(r["shots"], r[key] / scale) for r in rows if r["backbone"] == family and r["method"] == method and r[key]]
                if pts:
                    axis.plot(*zip(*pts), style, marker="o", ms=3, color=colors.get(family), label=f"{family} {method}")
        axis.set(xlabel="shots", xscale="log", yscale="log", title=title)
    ax[0].legend(fontsize=7)
    fig.suptitle("AIM (shared fused prefix) vs raw multimodal demonstrations, per backbone. Times: CPU, not GPU")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
