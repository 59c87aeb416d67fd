"""K/V memory of B rows sharing one demonstration prefix: DemoPrefixCache vs the expanded prefix.

For each number of rows B, both paths generate the same tokens for B prompts behind one shared
prefix of Lp demonstration tokens:

* shared: ``DemoPrefixCache`` (the prefix's K/V once) + the rows' own K/V (``RowKVCache``);
* expanded: the stock transformers model on [prefix ; prompt] per row (the prefix repeated B
  times), its ``DynamicCache`` after ``generate``.

Measured, not computed: on CPU the bytes of the K/V tensors each path actually holds
(``measure = cpu_tensor_bytes``); on CUDA, in addition, the peak of
``torch.cuda.max_memory_allocated`` during generation over what was allocated before
(``measure = cuda_peak_alloc_delta_bytes``; includes activations and logits, weights excluded).

With ``--time`` it also times (median of a few runs) one training step (forward + backward into
the demonstration embeddings) and a ``--time-tokens``-token greedy generation, shared prefix vs
the expanded-prefix baseline (the stock model with the prefix repeated per row, SDPA), and
writes those rows to ``--time-out``. Meant for a GPU session; on CPU the numbers mean little.

The model is a random-weight Llama with a real LLM's K/V shape per layer (Hkv x D) but a small
hidden size, so it runs on a laptop CPU; K/V bytes depend only on layers, Hkv, D, tokens, dtype.

    python benchmarks/prefix_cache_memory.py                    # CPU, writes results/prefix_cache_memory_cpu.csv
    python benchmarks/prefix_cache_memory.py --device cuda --dtype bfloat16 --out results/prefix_cache_memory_cuda.csv \
        --time --time-out results/prefix_cache_memory_timing_cuda.csv
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import statistics
import subprocess
import time

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from mmict_kernels.modules.prefix_cache import DemoPrefixCache, RowKVCache, forward_with_prefix, generate_with_prefix

HERE = os.path.dirname(os.path.abspath(__file__))


def _cache_tensor_bytes(cache) -> int:
    """Bytes of K/V in a transformers Cache (5.x: ``cache.layers[i].keys/values``)."""
    total = 0
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def _git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, text=True).strip()
    except Exception:
        return "unknown"


def _peak_delta(fn, device):
    """Run fn; return (result, peak bytes allocated during it above what was allocated before)."""
    if device.type != "cuda":
        return fn(), None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    return out, torch.cuda.max_memory_allocated() - before


def measure(model, rows: int, prefix_len: int, prompt_len: int, new_tokens: int, device, dtype):
    hidden = model.config.hidden_size
    gen = torch.Generator(device="cpu").manual_seed(rows)
    prefix = torch.randn(1, prefix_len, hidden, generator=gen).to(device, dtype) * 0.5
    prompts = torch.randint(1, model.config.vocab_size, (rows, prompt_len), generator=gen).to(device)

    def shared():
        cache = DemoPrefixCache.build(model, prefix)
        row_cache = RowKVCache(prompt_len + new_tokens)
        tokens = generate_with_prefix(model, cache, prompts, max_new_tokens=new_tokens, row_cache=row_cache)
        return cache.nbytes(), row_cache.nbytes(), tokens

    def expanded():
        embeds = torch.cat([prefix.expand(rows, -1, -1), model.get_input_embeddings()(prompts)], dim=1)
        out = model.generate(
            inputs_embeds=embeds, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, return_dict_in_generate=True
        )
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)  # 5.24 / 5.17 name
        return _cache_tensor_bytes(cache), out.sequences[:, -new_tokens:]

    with torch.no_grad():
        (prefix_bytes, row_bytes, tokens), shared_peak = _peak_delta(shared, device)
        (expanded_bytes, stock_tokens), expanded_peak = _peak_delta(expanded, device)
    same = bool(torch.equal(tokens, stock_tokens))
    base = dict(rows=rows, prefix_len=prefix_len, prompt_len=prompt_len, new_tokens=new_tokens, same_greedy_tokens=same)
    result = [
        dict(
            measure="cpu_tensor_bytes" if device.type == "cpu" else "tensor_bytes",
            shared_prefix_bytes=prefix_bytes,
            shared_rows_bytes=row_bytes,
            shared_total_bytes=prefix_bytes + row_bytes,
            expanded_total_bytes=expanded_bytes,
            **base,
        )
    ]
    if shared_peak is not None:
        result.append(
            dict(
                measure="cuda_peak_alloc_delta_bytes",
                shared_prefix_bytes="",
                shared_rows_bytes="",
                shared_total_bytes=shared_peak,
                expanded_total_bytes=expanded_peak,
                **base,
            )
        )
    return result


def _timed(fn, device, repeats: int) -> dict:
    """Median / p20 / p80 milliseconds of ``fn`` after one warm-up call."""

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))]  # noqa: E731
    return dict(median_ms=round(statistics.median(times), 3), p20_ms=round(pick(0.2), 3), p80_ms=round(pick(0.8), 3))


def time_paths(model, rows: int, prefix_len: int, prompt_len: int, new_tokens: int, device, dtype, repeats: int, backend: str):
    """Training step and generation, shared prefix (prefix_cache) vs expanded prefix (stock model, SDPA)."""
    hidden, vocab = model.config.hidden_size, model.config.vocab_size
    gen = torch.Generator(device="cpu").manual_seed(rows)
    demo = (torch.randn(1, prefix_len, hidden, generator=gen) * 0.5).to(device, dtype)
    row_embeds = (torch.randn(rows, prompt_len, hidden, generator=gen) * 0.5).to(device, dtype)
    targets = torch.randint(0, vocab, (rows, prompt_len), generator=gen).to(device)
    prompts = torch.randint(1, vocab, (rows, prompt_len), generator=gen).to(device)

    def loss_of(logits):
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    def train_shared():
        d = demo.detach().requires_grad_(True)
        cache = DemoPrefixCache.build(model, d, backend=backend)
        loss_of(forward_with_prefix(model, cache, inputs_embeds=row_embeds).logits).backward()

    def train_expanded():
        d = demo.detach().requires_grad_(True)
        embeds = torch.cat([d.expand(rows, -1, -1), row_embeds], dim=1)
        loss_of(model(inputs_embeds=embeds, use_cache=False).logits[:, prefix_len:]).backward()

    @torch.no_grad()
    def generate_shared():
        cache = DemoPrefixCache.build(model, demo, backend=backend)
        return generate_with_prefix(model, cache, prompts, max_new_tokens=new_tokens)

    @torch.no_grad()
    def generate_expanded():
        embeds = torch.cat([demo.expand(rows, -1, -1), model.get_input_embeddings()(prompts)], dim=1)
        return model.generate(
            inputs_embeds=embeds, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0
        )

    shape = f"B{rows} Lp{prefix_len} L{prompt_len}"
    out = []
    for mode, fn, provider in (
        ("train_step fwd+bwd", train_shared, f"prefix_cache-{backend}"),
        ("train_step fwd+bwd", train_expanded, "hf-sdpa-expanded"),
        (f"generate{new_tokens}", generate_shared, f"prefix_cache-{backend}"),
        (f"generate{new_tokens}", generate_expanded, "hf-sdpa-expanded"),
    ):
        out.append(dict(op="prefix_cache", provider=provider, mode=mode, shape=shape, **_timed(fn, device, repeats)))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--hidden", type=int, default=256, help="small on purpose: K/V bytes do not depend on it")
    p.add_argument("--prefix-len", type=int, default=256, help="demonstration tokens (e.g. 4 demos x 64)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--rows", default="1,4,16,32")
    p.add_argument("--out", default=os.path.join(HERE, "results", "prefix_cache_memory_cpu.csv"))
    p.add_argument("--time", action="store_true", help="also time a training step and a generation (GPU session)")
    p.add_argument("--time-tokens", type=int, default=64)
    p.add_argument("--time-repeats", type=int, default=5)
    p.add_argument("--backend", default="auto", help="ops.prefix_attention backend for the timed shared path")
    p.add_argument("--time-out", default=os.path.join(HERE, "results", "prefix_cache_memory_timing.csv"))
    args = p.parse_args()

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        vocab_size=1000,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config).to(device, dtype).eval()
    info = dict(
        model=f"llama-random L{args.layers} H{args.heads} Hkv{args.kv_heads} D{args.head_dim} hidden{args.hidden}",
        dtype=args.dtype,
        device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        torch=torch.__version__,
        transformers=transformers.__version__,
        commit=_git_commit(),
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
    )
    rows_out, time_rows = [], []
    for rows in (int(r) for r in args.rows.split(",")):
        for r in measure(model, rows, args.prefix_len, args.prompt_len, args.new_tokens, device, dtype):
            r["expanded_over_shared"] = round(r["expanded_total_bytes"] / r["shared_total_bytes"], 2)
            rows_out.append({**r, **info})
            print(
                f"B={rows:4d} {r['measure']:28s} shared {r['shared_total_bytes'] / 2**20:9.2f} MiB  "
                f"expanded {r['expanded_total_bytes'] / 2**20:9.2f} MiB  x{r['expanded_over_shared']}  same tokens: {r['same_greedy_tokens']}"
            )
        if args.time:
            for r in time_paths(
                model, rows, args.prefix_len, args.prompt_len, args.time_tokens, device, dtype, args.time_repeats, args.backend
            ):
                time_rows.append({**r, **info, "triton": _triton_version(), "cuda": torch.version.cuda or ""})
                print(f"{r['shape']:22s} {r['mode']:20s} {r['provider']:24s} {r['median_ms']:10.2f} ms")
    _write(args.out, rows_out)
    if time_rows:
        _write(args.time_out, time_rows)


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except Exception:
        return ""


def _write(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
