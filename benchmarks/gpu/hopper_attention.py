# ruff: noqa: B023  (the closures are timed inside their own iteration)
"""The GPU lease's attention step (issue #27 item 3): the sm90 kernels against today's and every SDPA backend.

    python benchmarks/gpu/hopper_attention.py --out DIR --max-seconds 115       # an sm90 machine, checkout installed
    python benchmarks/gpu/hopper_attention.py --out DIR --dry-run               # the same code path on a CPU (seconds)

In order, each step bounded so the run ends inside ``--max-seconds`` (a SIGINT writes what is done):

1. compile in parallel: a pool of processes (one per CPU core) compiles every kernel specialization the run will
   launch (the launches under ``benchmarks.tune.compile_only``: nothing runs) into Triton's disk cache, and runs the
   probes: each sm90 family (hopper, gluon) on two small shapes against float64, in a process of its own (a hang or
   a sticky CUDA error there leaves the run standing; a family that fails is left out);
2. meanwhile, capabilities: what the installed embedattn runs beyond D 256 (D512; MLA's 192/128 value head dim), by
   calling it (``backend="triton"``) against its float64 reference: rows for those shapes run only where it does
   (their compiles join the pool);
3. the two ceilings: device copy bandwidth, bf16 matmul;
4. correctness: relative error of out/dq/dk/dv against float64 per kernel on odd shapes (GQA, Nq != Nk, causal
   bottom-right), against a bound from torch SDPA's own error on the same inputs (2x + 1e-3, FlashAttention's rule);
5. the sweep, the points that decide the defaults first (bf16, D 128/64/256, N 4k/16k, causal or not, GQA), then
   D512 / MLA where supported, then N 1k, fp16, then the fill-ins (N 2k/8k), until the budget is spent. B*N = 16k
   tokens, H*D = 2048. Forward: embedattn (kernels.attention at its tuned/heuristic config), hopper (TMA + warp
   specialization where it applies), hopper-nows (non-causal ablation), gluon (non-causal D 64/128), alternative
   hopper configs (bf16, N 4k/16k), sdpa-flash/-cudnn/-efficient. Backward: embedattn (deterministic), hopper
   (5 matmuls, dQ by TMA reduce-add), hopper-atomic, alternative configs, sdpa-*. TFLOP/s: forward
   2*B*H*Nq*Nk*(D + Dv) (halved when causal), backward 2.5x.

Writes into DIR: hopper_attention.csv (benchmarks.harness's long format), hopper_correctness.csv,
hopper_attention.md (TFLOP/s per point, each lever's prediction and outcome, the defaults decided), and
impl_defaults.json: per measured (dtype, head dim, causal, GQA, N bucket) the attention kernels to run by
default, as entries ``attention.impl_fwd`` / ``attention.impl_bwd`` of the device's config table
(embedattn/configs' format; ``--merge-into`` adds them to a table file). The rule (``decide``): a variant becomes
the default at a point where it passed correctness and is measured faster beyond the timing spread (median at
least 2% lower and its p80 below the default's p20); everywhere else the default stays. Timing:
``triton.testing.do_bench`` (L2 flushed), median and p20/p80.
"""

from __future__ import annotations

import sys

if "--dry-run" in sys.argv:  # before anything imports triton: the interpreter runs the kernels on the CPU
    import os as _os

    _os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import csv  # noqa: E402
import inspect  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

os.environ.setdefault("EMBEDATTN_AUTOTUNE", "0")  # a table miss runs the heuristic config, never an autotune
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

from benchmarks.harness import (  # noqa: E402
    Context,
    Recorder,
    Timing,
    environment,
    measure_copy_bandwidth,
    measure_matmul_peak,
    measurement_rows,
    time_fn,
    write_json,
)
from embedattn.kernels import attention as KA  # noqa: E402
from embedattn.kernels import attention_gluon as KG  # noqa: E402
from embedattn.kernels import attention_hopper as KH  # noqa: E402
from embedattn.reference import attention as ref_attention  # noqa: E402

DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SDPA = ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION")
# kernel families that passed their isolated probe (a family that fails is left out of the run)
USE = {"hopper": True, "gluon": bool(getattr(KG, "AVAILABLE", False))}
DECIDE_MARGIN = 1.02  # a variant must be at least this much faster (median) to become the default at a point


@dataclass
class Run:
    """What the steps share: the device, the dtypes and shapes of a GPU run or of the CPU dry run."""

    device: str = "cuda"
    dry: bool = False
    tokens: int = 16384
    width: int = 2048  # H * D

    @property
    def dtypes(self) -> tuple[str, ...]:
        return ("fp16",) if self.dry else ("bf16", "fp16")  # the interpreter has no bf16 arithmetic


RUN = Run()

PREDICTIONS = [
    ("1. tensor descriptors (TMA)",
     "hopper (causal, no warp specialization) vs embedattn, causal fwd",
     "1.00-1.05x: the pointer kernel's loads are already cp.async-pipelined; TMA frees the address registers and "
     "issue slots, and the per-(b,h) descriptors cost ~1 us of tensormap setup per program"),
    ("2. warp specialization (Triton 3.6 Hopper pass)",
     "hopper vs hopper-nows, non-causal fwd",
     "1.08-1.15x (FlashAttention-3's ablation: -14% without it); with it, non-causal D128 N>=4k at 520-580 "
     "TFLOP/s, i.e. 1.10-1.20x embedattn's 466-479 and ~0.8x cuDNN"),
    ("3. QK^T of the next block overlapped with the softmax (Gluon, no warp specialization)",
     "gluon vs hopper-nows (the overlap alone) and vs hopper (overlap against warp specialization), non-causal fwd",
     "1.05-1.15x hopper-nows (FlashAttention-3's ablation: 582 -> 661 with the overlap); about equal to hopper; "
     "it has never run: a correctness failure here is the first thing to fix"),
    ("4. longest-first causal order",
     "part of hopper's causal fwd (not separable in this run)",
     "+2-5% causal at N<=4k (the tail of the grid), ~0 at 16k"),
    ("5. 5-matmul backward, dQ by fp32 atomics",
     "hopper vs embedattn, bwd (D64/D128)",
     "1.15-1.35x: 5 matmuls instead of 7 caps the gain at 1.4x, minus the dQ traffic (one fp32 reduce-add of "
     "BLOCK_M x D per tile); 0.85-1.0x cuDNN"),
    ("5b. dQ through the TMA reduce-add",
     "hopper vs hopper-atomic, bwd",
     "1.03-1.10x: one bulk reduce per tile instead of BLOCK_M*D/threads red.global per thread"),
    ("6. D256 backward tiles that fit",
     "hopper vs embedattn, bwd D256",
     "1.2-1.6x of today's 107 TFLOP/s, though its best tile (32x64, 8 warps) still spills 184 bytes at sm_90: "
     "informs lever 6, not a default (supports_backward leaves D256 to the pointer kernels)"),
]


def log(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------- the launchers, either API
# The launchers took (causal, causal_offset, scale) and now take one AttnSpec; the lease runs whichever is installed.
def _takes_spec(fn) -> bool:
    try:
        return "spec" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


SPEC_API = _takes_spec(KA.attention_forward)


def spec(causal: bool, offset: int, scale: float):
    """The launchers' spec (embedattn.attention.AttnSpec), or None with the old API."""
    if not SPEC_API:
        return None
    from embedattn.attention import AttnSpec

    return AttnSpec(causal=causal, causal_offset=offset, scale=scale)


def ka_fwd(q, k, v, causal, off, scale):
    if SPEC_API:
        return KA.attention_forward(q, k, v, spec(causal, off, scale))
    return KA.attention_forward(q, k, v, None, causal, off, scale)


def ka_bwd(do, q, k, v, o, lse, causal, off, scale):
    if SPEC_API:
        return KA.attention_backward(do, q, k, v, o, lse, spec(causal, off, scale))
    return KA.attention_backward(do, q, k, v, o, lse, None, causal, off, scale)


def kh_supports(q, k, v, causal, off, scale, backward=False) -> bool:
    fn = KH.supports_backward if backward else KH.supports
    if _takes_spec(fn):
        return bool(fn(q, k, v, spec(causal, off, scale)))
    return bool(fn(q, k, v, scale=scale, causal=causal, causal_offset=off))


def kh_fwd(q, k, v, causal, off, scale, **kw):
    if _takes_spec(KH.hopper_forward):
        return KH.hopper_forward(q, k, v, spec(causal, off, scale), **kw)
    return KH.hopper_forward(q, k, v, causal, off, scale, **kw)


def kh_bwd(do, q, k, v, o, lse, causal, off, scale, **kw):
    if _takes_spec(KH.hopper_backward):
        return KH.hopper_backward(do, q, k, v, o, lse, spec(causal, off, scale), **kw)
    return KH.hopper_backward(do, q, k, v, o, lse, causal, off, scale, **kw)


def kg_supports(q, k, v, causal, off, scale) -> bool:
    if not USE["gluon"]:
        return False
    if _takes_spec(KG.supports):
        return bool(KG.supports(q, k, v, spec(causal, off, scale)))
    return bool(KG.supports(q, k, v, causal=causal, scale=scale))


def kg_fwd(q, k, v, causal, off, scale):
    if _takes_spec(KG.gluon_forward):
        return KG.gluon_forward(q, k, v, spec(causal, off, scale))
    return KG.gluon_forward(q, k, v, causal, off, scale)


# ----------------------------------------------------------------------------- providers
def _sdpa_ctx(name):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, name)])


def _sdpa_call(q, k, v, causal):
    if k.shape[1] != q.shape[1]:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


# configs timed beside the defaults (bf16, N 4k and 16k, no GQA): the compile report's other spill-free
# candidates (and two that spill a little in the causal backward), so this lease can move the defaults
ALT_CONFIGS = {
    ("fwd", 64, False): [(128, 64, 4, 3)],
    ("fwd", 128, False): [(128, 64, 4, 2), (128, 64, 4, 3)],
    ("fwd", 128, True): [(128, 128, 8, 2), (64, 64, 4, 2)],
    ("fwd", 256, True): [(64, 64, 4, 2)],
    ("bwd", 64, None): [(64, 128, 8, 1)],
    ("bwd", 128, None): [(64, 64, 8, 1), (32, 128, 8, 2)],
}


def _tag(c: tuple) -> str:
    return "hopper@{}x{}w{}s{}".format(*c)


def fwd_providers(q, k, v, causal: bool, alts: bool) -> dict:
    """name -> (q, k, v) -> out, for the kernels that take this call. Causal is bottom-right (Nq == Nk here)."""
    D, s = q.shape[-1], q.shape[-1] ** -0.5
    provs = {"embedattn": lambda q, k, v: ka_fwd(q, k, v, causal, 0, s)[0]}
    if not (USE["hopper"] and kh_supports(q, k, v, causal, 0, s)):
        return provs
    provs["hopper"] = lambda q, k, v: kh_fwd(q, k, v, causal, 0, s)[0]
    if not causal:
        provs["hopper-nows"] = lambda q, k, v: kh_fwd(q, k, v, causal, 0, s, warp_specialize=False)[0]
    if kg_supports(q, k, v, causal, 0, s):
        provs["gluon"] = lambda q, k, v: kg_fwd(q, k, v, causal, 0, s)[0]
    for c in ALT_CONFIGS.get(("fwd", D, causal), []) if alts else []:
        provs[_tag(c)] = lambda q, k, v, c=c: kh_fwd(q, k, v, causal, 0, s, config=c)[0]
    return provs


def bwd_providers(q, k, v, causal: bool, alts: bool) -> dict:
    """name -> (q, k, v, o, lse, do) -> grads, for our kernels (their forward outputs precomputed)."""
    D, s = q.shape[-1], q.shape[-1] ** -0.5
    provs = {"embedattn": lambda q, k, v, o, lse, do: ka_bwd(do, q, k, v, o, lse, causal, 0, s)}
    if not (USE["hopper"] and kh_supports(q, k, v, causal, 0, s, backward=True)):
        return provs
    provs["hopper"] = lambda q, k, v, o, lse, do: kh_bwd(do, q, k, v, o, lse, causal, 0, s)
    provs["hopper-atomic"] = lambda q, k, v, o, lse, do: kh_bwd(do, q, k, v, o, lse, causal, 0, s, tma_reduce=False)
    for c in ALT_CONFIGS.get(("bwd", D, None), []) if alts else []:
        provs[_tag(c)] = lambda q, k, v, o, lse, do, c=c: kh_bwd(do, q, k, v, o, lse, causal, 0, s, config=c)
    return provs


# ----------------------------------------------------------------------------- points
@dataclass(frozen=True)
class Point:
    dtype: str
    D: int
    causal: bool
    N: int
    gqa: int = 1
    Dv: int = 0  # 0: D (MLA: another value head dim)

    @property
    def dv(self) -> int:
        return self.Dv or self.D

    def dims(self) -> tuple[int, int, int]:
        """(B, H, Hkv): B*N tokens, H*D = the run's width (at least 4 query heads for GQA)."""
        B = max(1, RUN.tokens // self.N)
        H = max(1, RUN.width // self.D, 4 if self.gqa > 1 else 1)
        return B, H, max(1, H // self.gqa)

    @property
    def shape(self) -> str:
        B, H, HKV = self.dims()
        dv = f" Dv{self.Dv}" if self.Dv else ""
        return f"B{B} H{H}/{HKV} N{self.N} D{self.D}{dv} causal={int(self.causal)}"

    @property
    def kernel(self) -> str:
        """benchmarks/attention.py's kernel names (so the lease report reads both CSVs alike)."""
        B, H, HKV = self.dims()
        gqa = f"_gqa{H}x{HKV}" if HKV != H else ""
        dv = f"_dv{self.Dv}" if self.Dv else ""
        return f"attention{gqa}_d{self.D}{dv}" + ("_causal" if self.causal else "")

    def flops(self, mode: str) -> float:
        B, H, _ = self.dims()
        f = 2.0 * B * H * self.N * self.N * (self.D + self.dv) * (0.5 if self.causal else 1.0)
        return f * (2.5 if mode == "bwd" else 1.0)

    def inputs(self, device: str, seed: int | None = None):
        B, H, HKV = self.dims()
        g = torch.Generator(device=device).manual_seed(self.N + self.D if seed is None else seed)
        mk = lambda h, d: torch.randn(B, h, self.N, d, device=device, generator=g).to(DT[self.dtype])
        return mk(H, self.D), mk(HKV, self.D), mk(HKV, self.dv), mk(H, self.dv)


def points(caps: dict) -> list[Point]:
    """Every point, the ones that decide the defaults first (a budget cuts from the end)."""
    if RUN.dry:
        return [Point("fp16", 64, False, 64), Point("fp16", 64, True, 64, gqa=2), Point("fp16", 64, True, 96)]
    pts = []
    for D in (128, 64, 256):  # the decisions: bf16 at the canonical lengths
        for N in (4096, 16384):
            pts += [Point("bf16", D, c, N) for c in (False, True)]
    pts += [Point("bf16", 128, c, N, gqa=4) for N in (4096, 16384) for c in (False, True)]
    if caps.get("d512"):
        pts += [Point("bf16", 512, c, N) for N in (4096, 1024) for c in (False, True)]
    if caps.get("mla"):
        pts += [Point("bf16", 192, c, N, Dv=128) for N in (4096, 16384) for c in (False, True)]
    pts += [Point("bf16", D, c, 1024) for D in (128, 64, 256) for c in (False, True)]
    pts += [Point("fp16", D, c, N) for D in (128, 64) for N in (4096, 16384) for c in (False, True)]
    pts += [Point("bf16", D, c, N) for N in (8192, 2048) for D in (128, 64, 256) for c in (False, True)]
    pts += [Point("bf16", 128, c, N, gqa=4) for N in (1024, 8192, 2048) for c in (False, True)]
    pts += [Point("fp16", 256, c, N) for N in (4096, 16384) for c in (False, True)]
    return list(dict.fromkeys(pts))


def _alts(p: Point) -> bool:
    return p.dtype == "bf16" and p.gqa == 1 and p.N in (4096, 16384) and not p.Dv


# ----------------------------------------------------------------------------- step 1: the compile pool
def _compile_point(p: Point, mode: str, name: str) -> str:
    """In a pool worker: compile provider ``name``'s ``mode`` launches at point ``p`` (nothing launches; the inputs
    are uninitialized, so no kernel touches the GPU a timing may be using). Returns what failed."""
    from benchmarks.tune import compile_only

    B, H, HKV = p.dims()
    e = lambda h, d: torch.empty(B, h, p.N, d, device=RUN.device, dtype=DT[p.dtype])
    q, k, v, do = e(H, p.D), e(HKV, p.D), e(HKV, p.dv), e(H, p.dv)
    try:
        with compile_only():
            if mode == "fwd":
                fwd_providers(q, k, v, p.causal, _alts(p))[name](q, k, v)
            else:
                lse = torch.empty(B, H, p.N, device=RUN.device, dtype=torch.float32)
                bwd_providers(q, k, v, p.causal, _alts(p))[name](q, k, v, torch.empty_like(do), lse, do)
    except Exception as e:
        return f"{mode} {name}: {type(e).__name__}: {str(e)[:160]}"
    return ""


def _provider_names(p: Point) -> list[tuple[str, str]]:
    """(mode, provider) of our kernels at ``p`` (asked on uninitialized tensors of the device: no kernel runs)."""
    B, H, HKV = p.dims()
    shell = lambda h, d: torch.empty(B, h, p.N, d, device=RUN.device, dtype=DT[p.dtype])
    q, k, v = shell(H, p.D), shell(HKV, p.D), shell(HKV, p.dv)
    try:
        f = list(fwd_providers(q, k, v, p.causal, _alts(p)))
        b = list(bwd_providers(q, k, v, p.causal, _alts(p)))
    except Exception:  # a supports() that looks at the device: the worker finds out
        f, b = ["embedattn"], ["embedattn"]
    return [("fwd", n) for n in f] + [("bwd", n) for n in b]


def _compile_shape(shape: tuple, dtype: str) -> str:
    """In a pool worker: compile the correctness step's launches at one odd shape."""
    from benchmarks.tune import compile_only

    with compile_only():
        try:
            for _ in _correctness_kernels(*_correctness_inputs(shape, dtype)):
                pass
        except Exception as e:
            return f"{type(e).__name__}: {str(e)[:120]}"
    return ""


def probe(name: str) -> str:
    """In a pool worker: one kernel family on two small shapes against float64 ("" when within 2e-2)."""
    worst, msgs = 0.0, []
    dt = DT[RUN.dtypes[0]]
    dev = RUN.device
    for B, H, HKV, N, D, causal in ((1, 4, 2, 300, 128, False), (1, 2, 2, 257, 64, name != "gluon")):
        if RUN.dry:
            N, D = N // 8, 64
        g = torch.Generator(device=dev).manual_seed(N)
        q, k, v, do = (torch.randn(B, h, N, D, device=dev, generator=g).to(dt) for h in (H, HKV, HKV, H))
        ins = [t.double().requires_grad_() for t in (q, k, v)]
        ref = ref_attention(*ins, causal=causal, scale=D**-0.5)
        if name == "gluon":
            if not kg_supports(q, k, v, causal, 0, D**-0.5):
                return "gluon does not take the probe's shape here"
            o, _ = kg_fwd(q, k, v, causal, 0, D**-0.5)
            errs = [rel(o, ref)]
        else:
            o, lse = kh_fwd(q, k, v, causal, 0, D**-0.5)
            grads = kh_bwd(do, q, k, v, o, lse, causal, 0, D**-0.5)
            want = torch.autograd.grad(ref, ins, do.double())
            errs = [rel(o, ref)] + [rel(a, b) for a, b in zip(grads, want)]
        if dev == "cuda":
            torch.cuda.synchronize()
        worst = max(worst, *errs)
        msgs.append(f"B{B} H{H}/{HKV} N{N} D{D} causal={causal}: " + " ".join(f"{e:.1e}" for e in errs))
    return "" if worst < 2e-2 else "too far from float64: " + "; ".join(msgs)


def _job(kind: str, arg) -> str:
    if kind == "point":
        return _compile_point(*arg)
    if kind == "shape":
        return _compile_shape(*arg)
    return probe(arg)


def _worker_init(device: str, dry: bool, tokens: int, width: int) -> None:
    RUN.device, RUN.dry, RUN.tokens, RUN.width = device, dry, tokens, width
    if device == "cuda":
        torch.cuda.set_device(0)


class CompilePool:
    """Probes and compiles in ``workers`` processes while the main process goes on (the capability probes): a probe
    that fails, or does not answer by ``finish``, leaves its family out of the run (USE); compiles not finished by
    then happen at first launch instead. In the dry run (the interpreter runs what it "compiles") only one point and
    one shape go to the pool: the plumbing, not the work."""

    def __init__(self, workers: int):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.t0, self.workers = time.time(), workers
        self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_worker_init, initargs=(RUN.device, RUN.dry, RUN.tokens, RUN.width))
        self.futures: dict = {}
        self.seen: set = set()
        self.submit([("probe", n) for n, on in USE.items() if on])

    def submit(self, jobs: list[tuple[str, object]]) -> None:
        for kind, arg in jobs:
            if (kind, arg) not in self.seen:
                self.seen.add((kind, arg))
                self.futures[self.pool.submit(_job, kind, arg)] = (kind, arg)

    def compile(self, pts: list[Point], shapes: list[tuple]) -> None:
        """One job per distinct specialization: (dtype, D, Dv, causal, GQA) at the smallest N of its points (the
        lengths are all multiples of 16, so N changes no specialization), and one per correctness shape."""
        groups: dict[tuple, Point] = {}
        for p in pts:  # in the sweep's order: what it measures first compiles first
            groups.setdefault((p.dtype, p.D, p.Dv, p.causal, p.gqa), p)
        jobs = [("point", (p, mode, name)) for p in groups.values() for mode, name in _provider_names(p)]
        jobs += [("shape", s) for s in shapes]
        if RUN.dry:
            jobs = [j for j in jobs if j[0] == "point"][:1] + [j for j in jobs if j[0] == "shape"][:1]
        self.submit(jobs)

    def finish(self, deadline: float) -> None:
        from concurrent.futures import wait

        done, pending = wait(self.futures, timeout=max(1.0, deadline - time.time()))
        probes, failed = {}, 0
        for f, (kind, arg) in self.futures.items():
            if f in done:
                try:
                    res = f.result()
                except Exception as e:  # the worker died: a crash in the kernel family
                    res = f"the worker died: {type(e).__name__}: {str(e)[:160]}"
            else:
                res = f"no answer in {time.time() - self.t0:.0f} s"
            if kind == "probe":
                probes[arg] = res
            elif res:
                failed += 1
                what = f"{arg[0].dtype} {arg[0].shape}" if kind == "point" else str(arg)
                log(f"  compile {kind} {what}: {res[:300]}")
        for name, res in probes.items():
            USE[name] = res == ""
            log(f"  probe {name}: {'ok' if USE[name] else 'FAILED, left out of this run: ' + res[:300]}")
        procs = list(getattr(self.pool, "_processes", {}).values())
        self.pool.shutdown(wait=False, cancel_futures=True)
        for p in procs:
            p.terminate()
        for p in procs:
            p.join(timeout=2)
            if p.is_alive():
                p.kill()
        log(f"compile pool: {len(done)}/{len(self.futures)} jobs in {time.time() - self.t0:.0f} s ({self.workers} "
            f"workers, {failed} with failures, {len(pending)} unfinished)")


# ----------------------------------------------------------------------------- step 2: capabilities
def capabilities() -> dict:
    """What the installed embedattn computes on the Triton backend beyond D 256: {name: True or why not}."""
    import embedattn

    dev, dt = RUN.device, (torch.float32 if RUN.dry else torch.bfloat16)
    cases = {"d512": (512, 512), "mla": (192, 128)}
    out = {}
    for name, (D, Dv) in cases.items():
        try:
            g = torch.Generator(device=dev).manual_seed(D)
            n = 48 if RUN.dry else 200
            q = torch.randn(1, 2, n, D, device=dev, generator=g).to(dt)
            k = torch.randn(1, 2, n, D, device=dev, generator=g).to(dt)
            v = torch.randn(1, 2, n, Dv, device=dev, generator=g).to(dt)
            do = torch.randn(1, 2, n, Dv, device=dev, generator=g).to(dt)
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            o = embedattn.attention(*leaves, causal=True, backend="triton")
            grads = torch.autograd.grad(o, leaves, do)
            ins = [t.double().requires_grad_() for t in (q, k, v)]
            ref = embedattn.attention(*ins, causal=True, backend="reference")
            want = torch.autograd.grad(ref, ins, do.double())
            errs = [rel(o, ref)] + [rel(a, b) for a, b in zip(grads, want)]
            out[name] = True if max(errs) < 2e-2 else "too far from float64: " + " ".join(f"{e:.1e}" for e in errs)
        except Exception as e:
            out[name] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}"
        log(f"  capability {name} (D {D}, Dv {Dv}): {'yes' if out[name] is True else 'no: ' + out[name]}")
    return out


# ----------------------------------------------------------------------------- step 3: the ceilings
def ceilings(ctx: Context, rec: Recorder) -> None:
    """Copy bandwidth and the matmul peak of each dtype the run times, as the sweep's "device" rows."""
    ctx.copy_gbps = measure_copy_bandwidth(ctx)
    common = dict(suite="device", provider="torch", shape="", x_name="", x_value="", config="")
    rows = [rec.row(**common, kernel="copy", mode="copy", dtype="uint8", metric="gbps", unit="GB/s",
                    p50=ctx.copy_gbps, p20=ctx.copy_gbps, p80=ctx.copy_gbps)]
    for d in (("fp32",) if RUN.dry else RUN.dtypes):
        tf = ctx.matmul_tflops[d] = measure_matmul_peak(ctx, DT[d])
        rows.append(rec.row(**common, kernel="matmul", mode="mm", dtype=d, metric="tflops", unit="TFLOP/s",
                            p50=tf, p20=tf, p80=tf))
    rec.add(rows)


# ----------------------------------------------------------------------------- step 4: correctness
def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


SHAPES = [(2, 8, 8, 1000, 1000, 128, False), (2, 8, 2, 1000, 1000, 128, True), (1, 8, 8, 777, 1531, 64, True),
          (1, 4, 4, 513, 513, 256, False), (1, 4, 2, 300, 129, 64, True)]
DRY_SHAPES = [(1, 2, 2, 40, 40, 64, False), (1, 2, 1, 24, 56, 64, True)]


def correctness_shapes() -> list[tuple[tuple, str]]:
    if RUN.dry:
        return [(s, "fp16") for s in DRY_SHAPES]
    return [(s, "bf16") for s in SHAPES] + [(SHAPES[0], "fp16")]


def _correctness_inputs(shape: tuple, dtype: str):
    B, H, HKV, NQ, NK, D, causal = shape
    g = torch.Generator(device=RUN.device).manual_seed(NQ + D)
    mk = lambda *s: torch.randn(*s, device=RUN.device, generator=g).to(DT[dtype])
    return mk(B, H, NQ, D), mk(B, HKV, NK, D), mk(B, HKV, NK, D), mk(B, H, NQ, D), causal


def _correctness_kernels(q, k, v, do, causal):
    """(name, out, lse, grads) of every kernel that takes the call."""
    s, off = q.shape[-1] ** -0.5, k.shape[2] - q.shape[2]
    o, lse = ka_fwd(q, k, v, causal, off, s)
    yield "embedattn", o, ka_bwd(do, q, k, v, o, lse, causal, off, s)
    if USE["hopper"] and kh_supports(q, k, v, causal, off, s):
        o, lse = kh_fwd(q, k, v, causal, off, s)
        if kh_supports(q, k, v, causal, off, s, backward=True):
            yield "hopper", o, kh_bwd(do, q, k, v, o, lse, causal, off, s)
            yield "hopper-atomic", o, kh_bwd(do, q, k, v, o, lse, causal, off, s, tma_reduce=False)
        else:
            yield "hopper", o, None
    if kg_supports(q, k, v, causal, off, s):
        o, lse = kg_fwd(q, k, v, causal, off, s)
        yield "gluon", o, None


def _sdpa_errors(q, k, v, do, causal, ins, ref, want) -> list[float]:
    """torch SDPA's own error in the inputs' dtype (bottom-right causal as a boolean mask): the bound's basis."""
    nq, nk = q.shape[2], k.shape[2]
    mask = None
    if causal:
        mask = torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril(nk - nq)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o = F.scaled_dot_product_attention(*leaves, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])
    grads = torch.autograd.grad(o, leaves, do)
    return [rel(o, ref)] + [rel(a, b) for a, b in zip(grads, want)]


def correctness(out_dir: str) -> list[dict]:
    """Relative error against float64, per kernel, against 2x torch SDPA's own error + 1e-3; NaN never passes."""
    rows = []
    fields = ("out", "dq", "dk", "dv")
    for shape, dt in correctness_shapes():
        q, k, v, do, causal = _correctness_inputs(shape, dt)
        B, H, HKV, NQ, NK, D, _ = shape
        ins = [t.double().requires_grad_() for t in (q, k, v)]
        ref = ref_attention(*ins, causal=causal, scale=D**-0.5)
        want = torch.autograd.grad(ref, ins, do.double())
        try:
            base = _sdpa_errors(q, k, v, do, causal, ins, ref, want)
        except Exception as e:
            log(f"  sdpa baseline failed ({type(e).__name__}: {str(e)[:100]}): bound 2e-2")
            base = [1e-2] * 4
        bound = [2 * b + 1e-3 for b in base]
        name_shape = f"B{B} H{H}/{HKV} N{NQ}x{NK} D{D} causal={int(causal)}"
        try:
            results = list(_correctness_kernels(q, k, v, do, causal))
        except Exception as e:
            results = []
            rows.append(dict(dtype=dt, shape=name_shape, kernel="(launch)", ok=0,
                             error=f"{type(e).__name__}: {str(e)[:200]}"))
        for name, o, grads in results:
            row = dict(dtype=dt, shape=name_shape, kernel=name, out=rel(o, ref))
            if grads is not None:
                row.update(dq=rel(grads[0], want[0]), dk=rel(grads[1], want[1]), dv=rel(grads[2], want[2]))
            row["ok"] = int(all(row[f] <= b for f, b in zip(fields, bound) if f in row))
            row["bound"] = " ".join(f"{b:.1e}" for b in bound)
            rows.append(row)
            log(f"  {'ok ' if row['ok'] else 'BAD'} {dt} {name_shape:<38} {name:<13} "
                + " ".join(f"{f} {row[f]:.1e}" for f in fields if f in row) + f"  (bound {row['bound']})")
    with open(os.path.join(out_dir, "hopper_correctness.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, ["dtype", "shape", "kernel", "out", "dq", "dk", "dv", "bound", "ok", "error"])
        w.writeheader()
        w.writerows(rows)
    return rows


def passed(correct: list[dict], name: str) -> bool:
    """A kernel passed when every correctness row of it is within its bound (and it has at least one)."""
    mine = [r for r in correct if r["kernel"] == name]
    return bool(mine) and all(r.get("ok") for r in mine)


# ----------------------------------------------------------------------------- step 5: the sweep
def sweep(ctx: Context, rec: Recorder, deadline: float, pts: list[Point]) -> list[dict]:
    summary: list[dict] = []
    try:
        for p in pts:
            if time.time() > deadline:
                log(f"budget spent: {len(pts) - len(summary)} points left, from {p.dtype} {p.shape}")
                break
            summary.append(_sweep_point(ctx, rec, p))
            log(_line(summary[-1]) + f"  ({summary[-1]['seconds']:.0f} s)")
    except KeyboardInterrupt:
        log("interrupted (the phase's time limit): reporting the points done")
    return summary


def _sweep_point(ctx: Context, rec: Recorder, p: Point) -> dict:
    t0 = time.time()
    q, k, v, do = p.inputs(RUN.device)
    point = dict(dtype=p.dtype, D=p.D, Dv=p.dv, causal=p.causal, N=p.N, gqa=p.gqa, shape=p.shape, timings={})
    base = dict(suite="attention", kernel=p.kernel, dtype=p.dtype, shape=p.shape, x_name="N", x_value=p.N)
    mm = ctx.matmul_tflops.get(p.dtype) or next(iter(ctx.matmul_tflops.values()), None)
    ref_out = None
    for mode in ("fwd", "bwd"):
        flops = p.flops(mode)
        timed: dict[str, tuple[Timing, str]] = {}
        for name in SDPA:
            try:
                with _sdpa_ctx(name):
                    if mode == "fwd":
                        o = _sdpa_call(q, k, v, p.causal)
                        ref_out = o if ref_out is None else ref_out
                        fn = lambda: _sdpa_call(q, k, v, p.causal)
                    else:
                        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
                        o = _sdpa_call(*leaves, p.causal)
                        fn = lambda: torch.autograd.grad(o, leaves, do, retain_graph=True)
                    fn()
                    timed["sdpa-" + name.split("_")[0].lower()] = (time_fn(ctx, fn), "")
            except Exception as e:
                ctx.note(f"  skip sdpa {name} {mode} {p.shape} {p.dtype}: {type(e).__name__}: {str(e)[:100]}",
                         key=(name, mode, p.D, p.dv, p.dtype, p.gqa))
        if mode == "fwd":
            for name, f in fwd_providers(q, k, v, p.causal, _alts(p)).items():
                try:
                    o = f(q, k, v)
                    err = (o.float() - ref_out.float()).abs().max().item() if ref_out is not None else float("nan")
                    timed[name] = (time_fn(ctx, lambda: f(q, k, v)), f"maxdiff_vs_sdpa={err:.2e}")
                except Exception as e:
                    ctx.note(f"  skip {name} fwd {p.shape}: {type(e).__name__}: {str(e)[:160]}", key=(name, "fwd"))
        else:
            o, lse = ka_fwd(q, k, v, p.causal, 0, p.D**-0.5)
            for name, f in bwd_providers(q, k, v, p.causal, _alts(p)).items():
                try:
                    f(q, k, v, o, lse, do)
                    timed[name] = (time_fn(ctx, lambda: f(q, k, v, o, lse, do)), "")
                except Exception as e:
                    ctx.note(f"  skip {name} bwd {p.shape}: {type(e).__name__}: {str(e)[:160]}", key=(name, "bwd"))
        for name, (t, note) in timed.items():
            cfg = note
            if name.startswith("hopper"):
                cfg = (KH.last_config().get(mode, "") + " " + note).strip()
            elif name == "embedattn":
                cfg = (" ".join(f"{a}:{b}" for a, b in KA.last_config().items()) + " " + note).strip()
            extra = (lambda tf: ("frac_matmul_peak", "fraction", tf / mm)) if mm else None
            rec.add(measurement_rows(rec, dict(base, provider=name, mode=mode, config=cfg), t, flops, "tflops",
                                     scale=1e-12, extra=extra))
            point[f"{mode}:{name}"] = flops / (t.p50 * 1e-3) / 1e12
            point["timings"][f"{mode}:{name}"] = (t.p50, t.p20, t.p80)
    point["seconds"] = time.time() - t0
    if RUN.device == "cuda":
        torch.cuda.empty_cache()
    return point


# ----------------------------------------------------------------------------- the defaults rule
def faster(t_var: tuple, t_def: tuple) -> bool:
    """Measured faster beyond the spread: median at least DECIDE_MARGIN lower and p80 below the default's p20."""
    return t_var[0] * DECIDE_MARGIN <= t_def[0] and t_var[2] < t_def[1]


def decide(summary: list[dict], correct: list[dict]) -> list[dict]:
    """Per point and mode: the kernels to run by default (``default``, ``hopper`` or ``gluon``) by the rule."""
    out = []
    cands = {"fwd": ("hopper", "gluon"), "bwd": ("hopper",)}
    for p in summary:
        for mode, names in cands.items():
            t_def = p["timings"].get(f"{mode}:embedattn")
            if t_def is None:
                continue
            best, best_t = "default", t_def
            for name in names:
                t = p["timings"].get(f"{mode}:{name}")
                if t is not None and passed(correct, name) and faster(t, t_def) and t[0] < best_t[0]:
                    best, best_t = name, t
            out.append(dict(dtype=p["dtype"], D=p["D"], Dv=p["Dv"], causal=p["causal"], N=p["N"], gqa=p["gqa"],
                            mode=mode, impl=best, speedup=t_def[0] / best_t[0], default_ms=t_def[0],
                            best_ms=best_t[0], shape=p["shape"]))
    return out


def impl_table(decisions: list[dict], device_name: str) -> dict:
    """The decisions as config-table entries: kernel ``attention.impl_<mode>``, key (dtype, head_dim, head_dim_v when
    it differs, nq, nk, flags, gqa), config ``{"impl": ...}``: what the attention entry would look up."""
    from embedattn import configs

    kernels: dict[str, dict] = {}
    for d in decisions:
        fields = dict(dtype=d["dtype"], head_dim=d["D"], nq=d["N"], nk=d["N"],
                      flags="causal" if d["causal"] else "none", gqa=int(d["gqa"] > 1))
        if d["Dv"] != d["D"]:
            fields["head_dim_v"] = d["Dv"]
        key = configs.key(**fields)
        kernels.setdefault(f"attention.impl_{d['mode']}", {})[key.text] = {
            "config": {"impl": d["impl"]}, "speedup": round(d["speedup"], 4), "default_ms": round(d["default_ms"], 5),
            "best_ms": round(d["best_ms"], 5), "shape": d["shape"],
            "rule": f"median >= {DECIDE_MARGIN}x faster, p80 < default p20, correctness passed"}
    return {"format": 1, "device": device_name, "device_key": configs.device_key(device_name),
            "what": "attention kernels per shape, decided by benchmarks/gpu/hopper_attention.py (read by "
                    "embedattn.attention._measured_impls when EMBEDATTN_ATTENTION_IMPL is unset)", "kernels": kernels}


def merge_into(table_path: str, impl: dict) -> None:
    """Add the impl entries to a config table file (created when missing), the tuner's way (benchmarks.tune)."""
    from benchmarks.tune import write_table
    from embedattn import configs

    table = configs.read_table(table_path) if os.path.exists(table_path) else {"format": 1, "kernels": {}}
    for k in ("device", "device_key"):
        table.setdefault(k, impl[k])
    for kernel, entries in impl["kernels"].items():
        table.setdefault("kernels", {})[kernel] = dict(entries)  # this run's decisions replace the last ones
    write_table(table_path, table)


# ----------------------------------------------------------------------------- reporting
FWD_COLS = ("embedattn", "hopper", "hopper-nows", "gluon", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient")
BWD_COLS = ("embedattn", "hopper", "hopper-atomic", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient")


def best_configs(summary: list[dict]) -> list[str]:
    """Per point that timed alternatives: the fastest hopper config per mode against the default's."""
    out = []
    for p in summary:
        for mode in ("fwd", "bwd"):
            alt = {k.split(":", 1)[1]: v for k, v in p.items() if k.startswith(mode + ":hopper@")}
            if not alt or not p.get(mode + ":hopper"):
                continue
            name, best = max(alt.items(), key=lambda kv: kv[1])
            out.append(f"- {p['dtype']} D{p['D']} causal={int(p['causal'])} N{p['N']} {mode}: default "
                       f"{p[mode + ':hopper']:.0f} TFLOP/s; best alternative {name} {best:.0f} "
                       f"({best / p[mode + ':hopper']:.3f}x)")
    return out


def _line(p: dict) -> str:
    f = " ".join(f"{c.replace('sdpa-', '')}={p.get('fwd:' + c, float('nan')):.0f}" for c in FWD_COLS)
    b = " ".join(f"{c.replace('sdpa-', '')}={p.get('bwd:' + c, float('nan')):.0f}" for c in BWD_COLS)
    dv = f"/{p['Dv']}" if p["Dv"] != p["D"] else ""
    return f"{p['dtype']} D{p['D']}{dv} c{int(p['causal'])} N{p['N']:>5} g{p['gqa']} | fwd {f} | bwd {b}"


def _ratio(points: list[dict], a: str, b: str, where=lambda p: True) -> str:
    rs = [p[a] / p[b] for p in points if where(p) and p.get(a) and p.get(b)]
    if not rs:
        return "not measured"
    return f"median {statistics.median(rs):.3f}x (min {min(rs):.3f}, max {max(rs):.3f}, {len(rs)} points)"


def write_reports(out_dir: str, ctx: Context, summary: list[dict], correct: list[dict], decisions: list[dict],
                  caps: dict, cmd: str) -> str:
    head = "| dtype | D | causal | N | GQA | " + " | ".join(f"fwd {c}" for c in FWD_COLS) + " | " + " | ".join(
        f"bwd {c}" for c in BWD_COLS) + " |"
    lines = [head, "|" + "---|" * (5 + len(FWD_COLS) + len(BWD_COLS))]
    for p in summary:
        d = f"{p['D']}/{p['Dv']}" if p["Dv"] != p["D"] else str(p["D"])
        cells = [p["dtype"], d, str(int(p["causal"])), str(p["N"]), str(p["gqa"])]
        cells += [f"{p.get('fwd:' + c, float('nan')):.0f}" for c in FWD_COLS]
        cells += [f"{p.get('bwd:' + c, float('nan')):.0f}" for c in BWD_COLS]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    nc = lambda p: not p["causal"]
    big128 = lambda p: p["D"] == 128 and p["N"] >= 4096 and not p["causal"]
    outcomes = {
        PREDICTIONS[0][0]: _ratio(summary, "fwd:hopper", "fwd:embedattn", lambda p: p["causal"]),
        PREDICTIONS[1][0]: _ratio(summary, "fwd:hopper", "fwd:hopper-nows", nc)
        + "; hopper vs embedattn non-causal: " + _ratio(summary, "fwd:hopper", "fwd:embedattn", nc)
        + "; D128 N>=4k non-causal hopper vs cuDNN: " + _ratio(summary, "fwd:hopper", "fwd:sdpa-cudnn", big128),
        PREDICTIONS[2][0]: _ratio(summary, "fwd:gluon", "fwd:hopper-nows", nc) + "; vs hopper: "
        + _ratio(summary, "fwd:gluon", "fwd:hopper", nc),
        PREDICTIONS[3][0]: "not separable in this run (see 1.)",
        PREDICTIONS[4][0]: _ratio(summary, "bwd:hopper", "bwd:embedattn", lambda p: p["D"] in (64, 128))
        + "; vs cuDNN: " + _ratio(summary, "bwd:hopper", "bwd:sdpa-cudnn", lambda p: p["D"] in (64, 128)),
        PREDICTIONS[5][0]: _ratio(summary, "bwd:hopper", "bwd:hopper-atomic"),
        PREDICTIONS[6][0]: _ratio(summary, "bwd:hopper", "bwd:embedattn", lambda p: p["D"] == 256)
        + "; vs cuDNN: " + _ratio(summary, "bwd:hopper", "bwd:sdpa-cudnn", lambda p: p["D"] == 256),
    }
    bad = [r for r in correct if not r.get("ok")]
    made = [d for d in decisions if d["impl"] != "default"]
    dec_lines = [f"- {d['mode']} {d['dtype']} {d['shape']}: **{d['impl']}** {d['speedup']:.3f}x the default"
                 for d in made] or ["- none: the default kernels stay everywhere measured"]
    cap_lines = [f"- {k}: {'supported: rows measured' if v is True else 'not run: ' + str(v)}" for k, v in caps.items()]
    probes = ", ".join(f"{k} {'ok' if on else 'FAILED'}" for k, on in USE.items())
    notes = [f"# {ctx.device_name}: the sm90 attention variants against today's kernels and SDPA (issue #27 item 3)",
             "", f"Command: `{cmd}` (torch {torch.__version__}, triton {triton.__version__}). Configs: kernels."
             "attention's tuned table where the run had one (EMBEDATTN_CONFIGS_DIR), else its heuristic "
             "(EMBEDATTN_AUTOTUNE=0); kernels.attention_hopper's FWD_CONFIGS / PLAIN_FWD_CONFIGS / BWD_CONFIGS "
             f"(per row in hopper_attention.csv). B*N = {RUN.tokens} tokens, H*D = {RUN.width}.", "",
             f"Ceilings measured in the same run: copy {ctx.copy_gbps:.0f} GB/s, bf16 matmul "
             f"{ctx.matmul_tflops.get('bf16', float('nan')):.0f} TFLOP/s.", "",
             f"Probes (isolated processes): {probes}.", "",
             f"Correctness (hopper_correctness.csv, relative error vs float64, bound 2x torch SDPA's + 1e-3): "
             f"{len(correct) - len(bad)}/{len(correct)} within." + ("" if not bad else " FAILING: " + "; ".join(
                 f"{r['dtype']} {r['shape']} {r['kernel']}" for r in bad)), "",
             "Capabilities of the installed embedattn (probed at run time):", *cap_lines, "",
             "## Defaults decided (impl_defaults.json)", "",
             f"Rule: at a measured point a variant replaces the default when it passed correctness and its median is "
             f">= {DECIDE_MARGIN}x faster with its p80 below the default's p20; elsewhere the default stays.", "",
             *dec_lines, "",
             "| lever | compared | prediction (written before the run) | measured |", "|---|---|---|---|"]
    for lever, compared, pred in PREDICTIONS:
        notes.append(f"| {lever} | {compared} | {pred} | {outcomes.get(lever, '')} |")
    notes += ["", "## TFLOP/s per point", "", table, "", "## Hopper configs: defaults against the alternatives timed",
              ""] + (best_configs(summary) or ["none timed"])
    notes.append("")
    with open(os.path.join(out_dir, "hopper_attention.md"), "w") as f:
        f.write("\n".join(notes))
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-seconds", type=float, default=115.0)
    ap.add_argument("--compile-seconds", type=float, default=None,
                    help="the compile pool's share (default: 30%% of --max-seconds)")
    ap.add_argument("--workers", type=int, default=None, help="compile processes (default: the CPU count, <= 16)")
    ap.add_argument("--merge-into", default=None, help="also add the decisions to this config table file")
    ap.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, fp16, tiny shapes")
    args = ap.parse_args()
    t_start = time.time()
    RUN.dry = args.dry_run
    RUN.device = "cpu" if args.dry_run else "cuda"
    if args.dry_run:
        RUN.tokens, RUN.width = 128, 128
    cmd = "python benchmarks/gpu/hopper_attention.py " + " ".join(sys.argv[1:])
    os.makedirs(args.out, exist_ok=True)
    if not args.dry_run and (not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9):
        sys.exit("needs an sm90+ GPU (H100/H200); --dry-run rehearses on a CPU")
    name = torch.cuda.get_device_name() if RUN.device == "cuda" else "cpu"
    log(f"{name}, torch {torch.__version__}, triton {triton.__version__}, launcher API "
        f"{'spec' if SPEC_API else 'positional'}; budget {args.max_seconds:.0f} s")
    ctx = Context(device=torch.device(RUN.device), profile="tiny" if RUN.dry else "full", device_name=name,
                  warmup_ms=0 if RUN.dry else 10, rep_ms=1 if RUN.dry else 50)
    summary: list[dict] = []
    correct: list[dict] = []
    caps: dict = {}
    try:
        workers = args.workers or (2 if RUN.dry else min(16, os.cpu_count() or 1))
        compile_s = args.compile_seconds if args.compile_seconds is not None else 0.3 * args.max_seconds
        pool = CompilePool(workers)  # the probes, and the points every run has, while the capabilities are probed
        pool.compile(points({}), correctness_shapes())
        log("capabilities:")
        caps = capabilities()
        pts = points({k: v is True for k, v in caps.items()})
        pool.compile(pts, [])  # the D512 / MLA points, where supported
        pool.finish(t_start + compile_s)
        rec = Recorder(ctx, os.path.join(args.out, "hopper_attention.csv"))
        ceilings(ctx, rec)
        peaks = ", ".join(f"{d} {v:.1f}" for d, v in ctx.matmul_tflops.items())
        log(f"ceilings: copy {ctx.copy_gbps:.0f} GB/s, matmul {peaks} TFLOP/s ({time.time() - t_start:.0f} s)")
        log("correctness (relative error vs float64):")
        correct = correctness(args.out)
        log(f"correctness done ({time.time() - t_start:.0f} s)")
        # stop starting points ~8 s before the end: a point takes 2-4 s once compiled
        summary = sweep(ctx, rec, t_start + args.max_seconds - 8, pts)
    except KeyboardInterrupt:
        log("interrupted (the phase's time limit): reporting what was measured")
    decisions = decide(summary, correct)
    impl = impl_table(decisions, name)
    write_json(os.path.join(args.out, "impl_defaults.json"), impl)
    if args.merge_into:
        merge_into(args.merge_into, impl)
    write_json(os.path.join(args.out, "hopper_env.json"), {
        **environment(ctx), "command": cmd, "elapsed_s": round(time.time() - t_start, 1), "probes": USE,
        "capabilities": {k: (v if v is True else str(v)) for k, v in caps.items()}, "launcher_api":
        "spec" if SPEC_API else "positional"})
    table = write_reports(args.out, ctx, summary, correct, decisions, caps, cmd)
    log(f"\ndone in {time.time() - t_start:.0f} s; {args.out}: hopper_attention.csv hopper_correctness.csv "
        "hopper_attention.md impl_defaults.json\n")
    log(table)
    if not math.isfinite(ctx.copy_gbps):
        sys.exit(1)


if __name__ == "__main__":
    main()
