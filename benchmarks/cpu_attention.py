"""CPU decode attention vs a plain memory copy, measured side by side in one run.

Decode attention reads each sequence's K and V once, so at best it runs at memory bandwidth. This
prints the attention's achieved GB/s (bytes of KV read / time) beside the GB/s of a plain copy of the
same number of bytes on the same machine (bytes read + written / time), and their ratio.

    python benchmarks/cpu_attention.py [--dtype bfloat16] [--batch 32] [--context 512]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from moe_lightning.engine.model import decode_attention


def best_of(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="all", choices=["all", "float32", "bfloat16", "float16"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    dtypes = ["float32", "bfloat16", "float16"] if args.dtype == "all" else [args.dtype]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; B={args.batch} S={args.context} "
          f"nq={args.heads} nkv={args.kv_heads} hd={args.head_dim} (Mixtral-8x7B heads by default)")
    print(f"{'dtype':>9} | {'KV MB':>7} | {'attention GB/s':>14} | {'memcpy GB/s':>11} | ratio")
    for name in dtypes:
        dt = getattr(torch, name)
        B, S = args.batch, args.context
        k = torch.randn(B, args.kv_heads, S, args.head_dim).to(dt)
        v = torch.randn(B, args.kv_heads, S, args.head_dim).to(dt)
        q = torch.randn(B, args.heads, args.head_dim).to(dt)
        lengths = torch.randint(S // 2, S + 1, (B,))
        kv_bytes = (k.numel() + v.numel()) * k.element_size()
        read = sum(int(n) for n in lengths) * 2 * args.kv_heads * args.head_dim * k.element_size()
        t_attn = best_of(lambda q=q, k=k, v=v, n=lengths: decode_attention(q, k, v, n), args.repeats)
        src, dst = torch.empty(kv_bytes, dtype=torch.uint8).fill_(1), torch.empty(kv_bytes, dtype=torch.uint8)
        t_copy = best_of(lambda s=src, d=dst: d.copy_(s), args.repeats)
        # Attention here reads the whole padded cache tile (masked), report the useful bytes and the tile.
        attn_gbps = kv_bytes / t_attn / 1e9
        copy_gbps = 2 * kv_bytes / t_copy / 1e9
        print(f"{name:>9} | {kv_bytes / 1e6:7.1f} | {attn_gbps:14.2f} | {copy_gbps:11.2f} | "
              f"{attn_gbps / copy_gbps:.2f}  (useful KV {read / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
