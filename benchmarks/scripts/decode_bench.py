"""Decoding (Nq = 1) from a KV cache: paged vs contiguous vs torch SDPA, in tokens/s and fraction of copy bandwidth.

    EMBEDATTN_AUTOTUNE=0 python benchmarks/scripts/decode_bench.py --out reports/<gpu>/decode.csv
    python benchmarks/scripts/decode_bench.py --profile tiny --out /tmp/decode.csv      # CPU smoke run

One decoding step of every sequence in the batch: q (B, Hq, 1, D) against a cache of L positions per sequence
(Hq = 32 query heads on Hkv = 8 kv heads, D = 128, every sequence at length L so SDPA can run the same call).
Providers: embedattn.attention_with_kvcache on a contiguous (B, Hkv, S, D) cache, on a paged pool
(num_pages, Hkv, page, D) read through a randomly permuted block table (page 16: vLLM's default, row gather; 64:
one page per key tile; 256: FlashAttention 2's minimum), and torch SDPA (enable_gqa) on the contiguous cache
sliced to L. Decoding is bandwidth-bound: the bytes are K and V of the L positions (plus q, out and the table), and
the rows report GB/s and its fraction of the device's measured copy bandwidth, and tokens/s (B / step time).

Rows go to a long-format CSV (benchmarks.harness.COLUMNS; suite "decode", kernel "kvcache_fwd"), one per metric.
"""

from __future__ import annotations

import argparse
import math
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: run as a plain script

import embedattn  # noqa: E402
from benchmarks.harness import Context, Recorder, measure_copy_bandwidth, time_fn, versions  # noqa: E402

PAGES = (16, 64, 256)
PROFILES = {
    # batch sizes, cache lengths, (Hq, Hkv, D)
    "full": ((1, 4, 16, 64), (1024, 4096, 16384, 32768), (32, 8, 128)),
    "tiny": ((1, 2), (64, 96), (4, 2, 16)),
}


def _cache(B, Hkv, L, D, dtype, device, page=None):
    """(k, v, table): contiguous (B, Hkv, L, D), or pools of pages with a randomly permuted (B, L / page) table."""
    if page is None:
        k = torch.randn(B, Hkv, L, D, device=device, dtype=dtype)
        return k, torch.randn_like(k), None
    n = math.ceil(L / page)
    k = torch.randn(B * n, Hkv, page, D, device=device, dtype=dtype)
    table = torch.randperm(B * n, device=device).view(B, n).to(torch.int32)
    return k, torch.randn_like(k), table


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", choices=sorted(PROFILES), default="full")
    ap.add_argument("--dtype", choices=("fp16", "bf16"), default="bf16")
    ap.add_argument("--out", default=None, help="CSV path (default: print only)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    if device.type != "cuda":
        dtype = torch.float32  # the CPU smoke run: the reference backend
    ctx = Context(device=device, profile="tiny" if args.profile == "tiny" else "full",
                  device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
    if device.type != "cuda":
        ctx.warmup_ms, ctx.rep_ms = 1.0, 5.0
    ctx.copy_gbps = measure_copy_bandwidth(ctx)
    rec = Recorder(ctx, args.out)
    batches, lengths, (Hq, Hkv, D) = PROFILES[args.profile]
    elt = torch.empty((), dtype=dtype).element_size()
    print(f"{ctx.device_name} torch {versions()['torch']} triton {versions()['triton']} {dtype} "
          f"copy {ctx.copy_gbps:.0f} GB/s; Hq={Hq} Hkv={Hkv} D={D}")
    for L in lengths:
        for B in batches:
            q = torch.randn(B, Hq, 1, D, device=device, dtype=dtype)
            lens = torch.full((B,), L, dtype=torch.int32, device=device)
            kv_bytes = 2 * B * Hkv * L * D * elt + 2 * B * Hq * D * elt
            runs = []
            k, v, _ = _cache(B, Hkv, L, D, dtype, device)
            runs.append(("embedattn-contiguous", kv_bytes, partial(embedattn.attention_with_kvcache, q, k, v, lens)))
            runs.append(("torch-sdpa", kv_bytes, partial(F.scaled_dot_product_attention, q, k, v, enable_gqa=True)))
            for page in PAGES:
                if page > L:
                    continue
                kp, vp, table = _cache(B, Hkv, L, D, dtype, device, page)
                runs.append((f"embedattn-paged{page}", kv_bytes + table.numel() * 4,
                             partial(embedattn.attention_with_kvcache, q, kp, vp, lens, block_table=table)))
            for provider, nbytes, fn in runs:
                fn()  # compile (and, with autotuning on, tune) outside the timing
                t = time_fn(ctx, fn)
                base = dict(suite="decode", kernel="kvcache_fwd", provider=provider, mode="fwd", dtype=str(dtype)[6:],
                            shape=f"B{B} Hq{Hq} Hkv{Hkv} L{L} D{D}", x_name="cache_len", x_value=L,
                            config=f"batch={B}")
                # throughput quantiles from the time quantiles: p20 of a throughput is work / p80 of the time
                gbps = [nbytes / (ms * 1e-3) / 1e9 for ms in (t.p50, t.p80, t.p20)]
                toks = [B / (ms * 1e-3) for ms in (t.p50, t.p80, t.p20)]
                rows = [rec.row(**base, metric="ms", unit="ms", p50=t.p50, p20=t.p20, p80=t.p80),
                        rec.row(**base, metric="tokens_per_s", unit="tokens/s", p50=toks[0], p20=toks[1],
                                p80=toks[2]),
                        rec.row(**base, metric="gbps", unit="GB/s", p50=gbps[0], p20=gbps[1], p80=gbps[2]),
                        rec.row(**base, metric="copy_fraction", unit="fraction of copy bandwidth",
                                p50=gbps[0] / ctx.copy_gbps, p20=gbps[1] / ctx.copy_gbps,
                                p80=gbps[2] / ctx.copy_gbps)]
                rec.add(rows)
                print(f"L={L:6d} B={B:3d} {provider:22s} {t.p50 * 1e3:9.1f} us {toks[0]:11.0f} tok/s "
                      f"{gbps[0]:7.0f} GB/s ({gbps[0] / ctx.copy_gbps:5.1%} of copy)", flush=True)
            del runs, k, v
            if device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
