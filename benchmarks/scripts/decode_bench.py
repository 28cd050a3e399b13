"""Decoding (Nq = 1) from a KV cache: paged vs contiguous vs torch SDPA, in tokens/s and fraction of copy bandwidth.

    EMBEDATTN_AUTOTUNE=0 python benchmarks/scripts/decode_bench.py --out reports/<gpu>/decode.csv --max-seconds 30
    python benchmarks/scripts/decode_bench.py --dry-run --out /tmp/decode.csv     # CPU: the Triton road, interpreted

One decoding step of every sequence in the batch: q (B, Hq, 1, D) against a cache of L positions per sequence
(Hq = 32 query heads on Hkv = 8 kv heads, D = 128, every sequence at length L so SDPA can run the same call).
Providers: embedattn.attention_with_kvcache on a contiguous (B, Hkv, S, D) cache, on a paged pool
(num_pages, Hkv, page, D) read through a randomly permuted block table (page 64: one page per key tile, the
issue #27 target's page; 16: vLLM's default, row gather; 256: FlashAttention 2's minimum), and torch SDPA
(enable_gqa) on the contiguous cache. Decoding is bandwidth-bound: the bytes are K and V of the L positions (plus
q, out and the table); rows report GB/s and its fraction of the device's measured copy bandwidth, and tokens/s
(B / step time).

MLA decoding (DeepSeek's latent cache: one kv head of 576 whose first 512 columns are V, read as the view
``v_cache = k_cache[..., :512]``) runs too where the installed embedattn takes it: probed at run time against its
float64 reference (``--mla auto``), never assumed.

Points run most telling first (the page-64 target's (L, B) pairs, then the rest) until ``--max-seconds`` is spent;
a SIGINT keeps the rows written so far. Rows go to a long-format CSV (benchmarks.harness.COLUMNS; suite "decode",
kernel "kvcache_fwd" / "kvcache_fwd_mla"), one per metric.
"""

from __future__ import annotations

import sys

if "--dry-run" in sys.argv:  # before anything imports triton: the interpreter runs the kernels on the CPU
    import os as _os

    _os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from functools import partial  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: run as a plain script

import embedattn  # noqa: E402
from benchmarks.harness import Context, Recorder, measure_copy_bandwidth, run_points, time_fn, versions  # noqa: E402

PAGES = (64, 16, 256)  # the target's page first
PROFILES = {
    # (cache length, batch) points in the order they run, (Hq, Hkv, D, Dv), the MLA points, MLA (Hq, D, Dv)
    "full": ([(4096, 16), (32768, 16), (16384, 64), (1024, 64), (32768, 1), (4096, 1), (16384, 4), (1024, 4),
              (32768, 64), (4096, 64), (16384, 16), (1024, 16), (16384, 1), (1024, 1), (32768, 4), (4096, 4)],
             (32, 8, 128, 128), [(4096, 16), (16384, 64), (32768, 4)], (16, 576, 512)),
    "tiny": ([(64, 2), (96, 1)], (4, 2, 16, 16), [(64, 2)], (2, 40, 32)),
}


def _cache(B, Hkv, L, D, dtype, device, page=None, Dv=None):
    """(k, v, table): contiguous (B, Hkv, L, D), or pools of pages with a randomly permuted (B, L / page) table.
    ``Dv`` < D: MLA's latent cache, v the view of k's first Dv columns (no copy)."""
    if page is None:
        k = torch.randn(B, Hkv, L, D, device=device, dtype=dtype)
        table = None
    else:
        n = math.ceil(L / page)
        k = torch.randn(B * n, Hkv, page, D, device=device, dtype=dtype)
        table = torch.randperm(B * n, device=device).view(B, n).to(torch.int32)
    v = k[..., :Dv] if Dv is not None and Dv < D else torch.randn_like(k)
    return k, v, table


def mla_supported(device, dtype, backend) -> bool | str:
    """True when the installed embedattn decodes D 576 / Dv 512 on a latent cache within 2e-2 of float64 (relative),
    else why not (an exception's first line, or the error)."""
    _, _, _, (Hq, D, Dv) = PROFILES["tiny"]
    if device.type == "cuda":
        Hq, D, Dv = PROFILES["full"][3]
    try:
        g = torch.Generator(device=device).manual_seed(0)
        B, L = 2, 80
        q = torch.randn(B, Hq, 1, D, device=device, generator=g).to(dtype)
        k = torch.randn(B, 1, L, D, device=device, generator=g).to(dtype)
        lens = torch.tensor([L, L - 17], dtype=torch.int32, device=device)
        out = embedattn.attention_with_kvcache(q, k, k[..., :Dv], lens, backend=backend or "triton")
        kd = k.double()
        ref = embedattn.attention_with_kvcache(q.double(), kd, kd[..., :Dv], lens, backend="reference")
        err = ((out.double() - ref).norm() / ref.norm()).item()
        return True if err < 2e-2 else f"relative error {err:.1e} against float64"
    except Exception as e:
        text = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        return f"{type(e).__name__}: {text}"


def run_point(ctx, rec, L, B, Hq, Hkv, D, Dv, dtype, device, backend, kernel, pages, sdpa=True) -> None:
    elt = torch.empty((), dtype=dtype).element_size()
    q = torch.randn(B, Hq, 1, D, device=device, dtype=dtype)
    lens = torch.full((B,), L, dtype=torch.int32, device=device)
    mla = Dv != D
    # K (and V unless it is K's view) of the L positions, q and out
    kv_bytes = B * Hkv * L * (D + (0 if mla else Dv)) * elt + B * Hq * (D + Dv) * elt
    kw = {"backend": backend} if backend else {}
    runs = []
    k, v, _ = _cache(B, Hkv, L, D, dtype, device, Dv=Dv)
    runs.append(("embedattn-contiguous", kv_bytes, partial(embedattn.attention_with_kvcache, q, k, v, lens, **kw)))
    for page in pages:
        if page > L:
            continue
        kp, vp, table = _cache(B, Hkv, L, D, dtype, device, page, Dv=Dv)
        runs.append((f"embedattn-paged{page}", kv_bytes + table.numel() * 4,
                     partial(embedattn.attention_with_kvcache, q, kp, vp, lens, block_table=table, **kw)))
        if page == pages[0] and sdpa:  # SDPA right after the target's pair
            runs.append(("torch-sdpa", kv_bytes, partial(F.scaled_dot_product_attention, q, k, v,
                                                         enable_gqa=Hq != Hkv)))
    for provider, nbytes, fn in runs:
        try:
            fn()  # compile outside the timing
            t = time_fn(ctx, fn)
        except Exception as e:
            ctx.note(f"  {provider} {kernel}: {type(e).__name__}: {str(e).strip()[:160]}", key=(provider, kernel))
            continue
        base = dict(suite="decode", kernel=kernel, provider=provider, mode="fwd", dtype=str(dtype)[6:],
                    shape=f"B{B} Hq{Hq} Hkv{Hkv} L{L} D{D}" + (f" Dv{Dv}" if mla else ""), x_name="cache_len",
                    x_value=L, config=f"batch={B}")
        # throughput quantiles from the time quantiles: p20 of a throughput is work / p80 of the time
        gbps = [nbytes / (ms * 1e-3) / 1e9 for ms in (t.p50, t.p80, t.p20)]
        toks = [B / (ms * 1e-3) for ms in (t.p50, t.p80, t.p20)]
        rows = [rec.row(**base, metric="ms", unit="ms", p50=t.p50, p20=t.p20, p80=t.p80),
                rec.row(**base, metric="tokens_per_s", unit="tokens/s", p50=toks[0], p20=toks[1], p80=toks[2]),
                rec.row(**base, metric="gbps", unit="GB/s", p50=gbps[0], p20=gbps[1], p80=gbps[2]),
                rec.row(**base, metric="copy_fraction", unit="fraction of copy bandwidth",
                        p50=gbps[0] / ctx.copy_gbps, p20=gbps[1] / ctx.copy_gbps, p80=gbps[2] / ctx.copy_gbps)]
        rec.add(rows)
        print(f"{kernel} L={L:6d} B={B:3d} {provider:22s} {t.p50 * 1e3:9.1f} us {toks[0]:11.0f} tok/s "
              f"{gbps[0]:7.0f} GB/s ({gbps[0] / ctx.copy_gbps:5.1%} of copy)", flush=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", choices=sorted(PROFILES), default=None, help="default: full (tiny with --dry-run)")
    ap.add_argument("--dtype", choices=("fp16", "bf16"), default="bf16")
    ap.add_argument("--out", default=None, help="CSV path (default: print only)")
    ap.add_argument("--device", default=None, help="default: cuda when available (cpu with --dry-run)")
    ap.add_argument("--max-seconds", type=float, default=None, help="stop starting points after this many seconds")
    ap.add_argument("--mla", choices=("auto", "off"), default="auto",
                    help="MLA decoding rows (D 576 / Dv 512) where the installed embedattn takes them")
    ap.add_argument("--backend", default=None, help="attention_with_kvcache's backend (default: its own choice)")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU, tiny shapes, the Triton kernels through the interpreter (backend='triton')")
    args = ap.parse_args(argv)
    t_start = time.time()
    profile = args.profile or ("tiny" if args.dry_run else "full")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"))
    backend = args.backend or ("triton" if args.dry_run else None)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    if device.type != "cuda":
        dtype = torch.float32  # the CPU runs: no bf16 arithmetic in the interpreter
    ctx = Context(device=device, profile="tiny" if profile == "tiny" else "full",
                  device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
    if device.type != "cuda":
        ctx.warmup_ms, ctx.rep_ms = 0.0, 1.0
    ctx.copy_gbps = measure_copy_bandwidth(ctx)
    rec = Recorder(ctx, args.out)
    pts, (Hq, Hkv, D, Dv), mla_pts, (mHq, mD, mDv) = PROFILES[profile]
    print(f"{ctx.device_name} torch {versions()['torch']} triton {versions()['triton']} {dtype} "
          f"copy {ctx.copy_gbps:.0f} GB/s; Hq={Hq} Hkv={Hkv} D={D}", flush=True)
    mla = mla_supported(device, dtype, backend) if args.mla == "auto" else "off"
    print(f"MLA decoding (D {mD}, Dv {mDv}, v = k[..., :{mDv}]): "
          f"{'supported' if mla is True else 'not run: ' + str(mla)}", flush=True)
    todo = [("kvcache_fwd", L, B, Hq, Hkv, D, Dv) for L, B in pts]
    if mla is True:  # after the target's first points, before the fill-ins
        todo[2:2] = [("kvcache_fwd_mla", L, B, mHq, 1, mD, mDv) for L, B in mla_pts]
    run_points(ctx, "decode_bench", todo,
               lambda kernel, L, B, hq, hkv, d, dv: run_point(ctx, rec, L, B, hq, hkv, d, dv, dtype, device, backend,
                                                              kernel, PAGES),
               args.max_seconds, t_start)


if __name__ == "__main__":
    main()
