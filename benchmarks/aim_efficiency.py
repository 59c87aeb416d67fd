"""AIM efficiency against shots: context tokens, K/V memory and time per query.

Three ways to put N demonstrations in front of a query, on the same frozen LLaVA-style backbone:

- ``aim``: fused virtual tokens (one per demonstration text token), the demonstrations of a
  group of queries held ONCE as a shared prefix (DemoPrefixCache + ops.prefix_attention); the
  frozen aggregations come from the demonstration bank (timed after its first fill);
- ``aim_per_row``: the same fused tokens, one prefix per query (random demonstrations);
- ``raw_multimodal``: each demonstration's image tokens and text kept in every query's context
  (the stock model on the concatenated sequence, copied per query);
- ``mmict_layout``: MMICT's context length (demo text features + separator per demonstration,
  32 query features + prompt), tokens only (its timing is the driver's benchmark).

Per query: LLM context tokens; K/V bytes the LLM holds (measured from the actual cache tensors for
AIM; tokens x per-token K/V bytes for the expanded versions, which is exactly what a K/V cache of
that length holds); peak GPU memory (``torch.cuda.max_memory_allocated``) on a GPU; wall time of a
training step (forward + backward into the trainable part) and of greedy generation. CPU numbers
are labelled CPU. Writes a CSV (and a PNG of memory against shots when matplotlib is present).

    python benchmarks/aim_efficiency.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from mmict_kernels.icl.aim import AIMBatch, AIMModel, LlavaBackbone  # noqa: E402


def build_backbone(hidden: int, layers: int, heads: int, kv_heads: int, image_size: int, patch: int, device, dtype):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=image_size, patch_size=patch
    )
    text = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=1000,
        max_position_embeddings=8192,
    )
    cfg = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=999, vision_feature_layer=-1, vision_feature_select_strategy="full"
    )
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(cfg).to(device=device, dtype=dtype).eval()


def kv_bytes_per_token(llava) -> int:
    c = llava.config.get_text_config()
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * llava.dtype.itemsize


def make_batch(shots, queries, group_size, demo_len, prompt_len, answer_len, image_size, device, gen):
    groups = queries // group_size
    n_demos = groups * shots
    ids = lambda n: torch.randint(4, 990, (n,), generator=gen).tolist()  # noqa: E731
    return AIMBatch(
        demo_images=torch.randn(n_demos, 3, image_size, image_size, generator=gen).to(device) if n_demos else None,
        demo_text=[ids(demo_len) for _ in range(n_demos)],
        group_demos=[list(range(g * shots, (g + 1) * shots)) for g in range(groups)],
        query_images=torch.randn(queries, 3, image_size, image_size, generator=gen).to(device),
        query_group=torch.arange(queries) // group_size,
        query_prompt=[ids(prompt_len) for _ in range(queries)],
        query_answer=[ids(answer_len) for _ in range(queries)],
    )


def timed(fn, device, repeat=3):
    """Median wall time (s) and peak GPU bytes (None on CPU) of ``fn``."""
    times, peak = [], None
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], peak


def raw_multimodal_rows(model: AIMModel, b: AIMBatch):
    """The expanded version: every query's context holds its demonstrations' image tokens and text."""
    bb = model.backbone
    demo_img = bb.image_tokens(b.demo_images) if b.demo_images is not None else None
    q_img = bb.image_tokens(b.query_images)
    rows = []
    for r in range(len(b.query_prompt)):
        parts = []
        for d in b.group_demos[int(b.query_group[r])]:
            parts += [demo_img[d], bb.embed(torch.tensor(b.demo_text[d], device=q_img.device))]
        ids = torch.tensor(b.query_prompt[r] + b.query_answer[r], device=q_img.device)
        parts += [q_img[r], bb.embed(ids)]
        rows.append(torch.cat(parts))
    return torch.stack(rows)  # equal lengths by construction


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shots", default="1,2,4,8,16")
    p.add_argument("--queries", type=int, default=16)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--patch", type=int, default=8)  # (64/8)^2 + 1 = 65 image tokens
    p.add_argument("--demo-len", type=int, default=12)
    p.add_argument("--prompt-len", type=int, default=8)
    p.add_argument("--answer-len", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    llava = build_backbone(args.hidden, args.layers, args.heads, args.kv_heads, args.image_size, args.patch, device, dtype)
    import tempfile

    from mmict_kernels.icl.aim import DemonstrationBank

    # The frozen aggregations come from the demonstration bank after their first use, as in training.
    bank = DemonstrationBank(tempfile.mkdtemp(prefix="aim_bank_"))
    model = AIMModel(LlavaBackbone(llava), eos_id=None, bank=bank).to(device=device, dtype=dtype)
    per_tok = kv_bytes_per_token(llava)
    n_img = model.backbone.image_tokens(torch.randn(1, 3, args.image_size, args.image_size, device=device, dtype=dtype)).shape[1]
    gen = torch.Generator().manual_seed(0)
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        commit = ""
    rows = []
    own = n_img + args.prompt_len + args.answer_len
    for shots in [int(s) for s in args.shots.split(",")]:
        b = make_batch(
            shots, args.queries, args.group_size, args.demo_len, args.prompt_len, args.answer_len, args.image_size, device, gen
        )

        # --- AIM, shared prefix: training step (projection grads) and generation
        def aim_step():
            loss, n = model(b)
            loss.backward()
            model.zero_grad(set_to_none=True)

        t_aim, peak_aim = timed(aim_step, device)
        prefixes, lengths = model.fused_prefixes(b)
        from mmict_kernels.modules.prefix_cache import DemoPrefixCache

        with torch.no_grad():
            cache = DemoPrefixCache.build(llava, prefixes, lengths)
        aim_kv = cache.nbytes() / args.queries + own * per_tok
        gen_b = AIMBatch(**{**b.__dict__, "query_answer": [[] for _ in b.query_answer]})
        t_aim_gen, _ = timed(lambda: model.generate(gen_b, max_new_tokens=args.new_tokens), device, repeat=1)
        # --- raw multimodal, expanded per row: forward + backward into the input embeddings
        raw = raw_multimodal_rows(model, b).detach()

        def raw_step():
            x = raw.clone().requires_grad_(True)
            llava(inputs_embeds=x).logits[:, -args.answer_len - 1 : -1].float().sum().backward()

        t_raw, peak_raw = timed(raw_step, device)
        raw_ctx = shots * (n_img + args.demo_len) + own
        aim_ctx = shots * args.demo_len + own
        mmict_ctx = shots * (args.demo_len + 1) + 32 + args.prompt_len + args.answer_len
        common = {
            "shots": shots,
            "queries": args.queries,
            "group_size": args.group_size,
            "image_tokens": n_img,
            "demo_text_tokens": args.demo_len,
            "llm": f"llama h{args.hidden} L{args.layers} H{args.heads}/{args.kv_heads}",
            "dtype": str(dtype).replace("torch.", ""),
            "device": label,
            "torch": torch.__version__,
            "commit": commit,
            "date": datetime.date.today().isoformat(),
        }
        rows.append(
            {
                **common,
                "method": "aim",
                "context_tokens_per_query": aim_ctx,
                "kv_bytes_per_query": round(aim_kv),
                "peak_gpu_bytes": peak_aim,
                "train_step_ms_per_query": 1e3 * t_aim / args.queries,
                "generate_ms_per_query": 1e3 * t_aim_gen / args.queries,
            }
        )
        rows.append(
            {
                **common,
                "method": "aim_per_row",
                "context_tokens_per_query": aim_ctx,
                "kv_bytes_per_query": aim_ctx * per_tok,
                "peak_gpu_bytes": None,
                "train_step_ms_per_query": None,
                "generate_ms_per_query": None,
            }
        )
        rows.append(
            {
                **common,
                "method": "raw_multimodal",
                "context_tokens_per_query": raw_ctx,
                "kv_bytes_per_query": raw_ctx * per_tok,
                "peak_gpu_bytes": peak_raw,
                "train_step_ms_per_query": 1e3 * t_raw / args.queries,
                "generate_ms_per_query": None,
            }
        )
        rows.append(
            {
                **common,
                "method": "mmict_layout",
                "context_tokens_per_query": mmict_ctx,
                "kv_bytes_per_query": mmict_ctx * per_tok,
                "peak_gpu_bytes": None,
                "train_step_ms_per_query": None,
                "generate_ms_per_query": None,
            }
        )
        print(
            f"shots {shots:2d}: context tokens/query aim {aim_ctx}, raw {raw_ctx}, mmict {mmict_ctx}; K/V KiB/query aim(shared) "
            f"{aim_kv / 1024:.0f}, raw {raw_ctx * per_tok / 1024:.0f}; train ms/query aim {1e3 * t_aim / args.queries:.1f}, raw {1e3 * t_raw / args.queries:.1f}"
        )
    os.makedirs(args.out, exist_ok=True)
    tag = "cuda" if device.type == "cuda" else "cpu"
    path = os.path.join(args.out, f"aim_efficiency_{tag}.csv")
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {path}" + ("  (CPU numbers: times are CPU wall clock; memory is tensor bytes)" if tag == "cpu" else ""))
    plot(rows, os.path.join(args.out, f"aim_efficiency_{tag}.png"), label)


def plot(rows, path, label):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)")
        return
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for method in ("raw_multimodal", "mmict_layout", "aim_per_row", "aim"):
        pts = [
            (r["shots"], r["kv_bytes_per_query"] / 2**20, r["context_tokens_per_query"]) for r in rows if r["method"] == method
        ]
        ax[0].plot([s for s, _, _ in pts], [m for _, m, _ in pts], marker="o", label=method)
        ax[1].plot([s for s, _, _ in pts], [t for _, _, t in pts], marker="o", label=method)
    ax[0].set(xlabel="shots", ylabel="LLM K/V MiB per query", xscale="log", title="memory per query")
    ax[1].set(xlabel="shots", ylabel="LLM context tokens per query", xscale="log", title="context per query")
    ax[0].legend()
    fig.suptitle(f"AIM vs raw multimodal demonstrations ({label})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
