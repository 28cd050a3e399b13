"""Attention sweep: embedattn.attention vs torch SDPA (each backend) and the embedattn reference.

Every provider gets the same rotating (q, k, v, dO) sets. Shapes follow FlashAttention's benchmarks:
B*N tokens and H*D fixed, so each point does the same work per token and the curve shows how
throughput grows with N. Causal cases use Nq == Nk, where SDPA's top-left and embedattn's
bottom-right alignments coincide. The materializing providers (SDPA math, the reference) are
capped on GPU, where their N x N scores would dominate the time budget and memory.

Issue 23's rows (``MODEL_FEATURES``), on the CPU and the GPU alike: learned sinks (gpt-oss: the same call without
them, and transformers' eager gpt-oss attention, the one peer that computes sinks), DeepSeek's MLA in training
(Q/K 192, V 128) and decoding (one latent head of 576 whose first 512 columns are V, read as a view), and head dim
512 (Gemma's global layers), each against torch SDPA's backends (the ones that take the call).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .harness import (
    DTYPES,
    MODES,
    Case,
    Context,
    Provider,
    Recorder,
    Workload,
    attention_flops,
    chosen_config,
    coarse_first,
    measure_providers,
    measurement_rows,
    probe,
    run_speed_benchmark,
)

SUITE = "attention"
GPU_MATERIALIZE_MAX_N = 4096


def available(ctx: Context) -> str | None:
    """None when embedattn.attention runs on this device, else why the suite is skipped."""
    import embedattn

    q = torch.randn(1, 1, 8, 16, device=ctx.device)
    return probe("embedattn.attention", lambda: embedattn.attention(q, q, q, causal=False))


@dataclass
class Spec:
    dtype: str
    batch: int
    heads: int
    kv_heads: int
    n: int
    head_dim: int
    causal: bool
    modes: tuple[str, ...] = MODES
    feature: str = ""  # one of FEATURES or MODEL_FEATURES: the same shape with that option on, against its peers
    head_dim_v: int = 0  # the value head dim, where it differs (MLA); 0: head_dim
    kernel: str = field(init=False)

    def __post_init__(self):
        gqa = f"_gqa{self.heads}x{self.kv_heads}" if self.kv_heads != self.heads else ""
        dv = f"_dv{self.head_dim_v}" if self.head_dim_v and self.head_dim_v != self.head_dim else ""
        self.kernel = f"attention{gqa}_d{self.head_dim}{dv}" + ("_causal" if self.causal else "")
        if self.feature:
            self.kernel += f"_{self.feature}"

    @property
    def dv(self) -> int:
        return self.head_dim_v or self.head_dim

    @property
    def decoding(self) -> bool:
        return self.feature in ("kvcache", "mla_decode")

    @property
    def shape(self) -> str:
        nq = 1 if self.decoding else self.n
        feat = f" feature={self.feature}" if self.feature else ""
        dv = f" Dv={self.dv}" if self.dv != self.head_dim else ""
        return (f"B={self.batch} H={self.heads} Hkv={self.kv_heads} Nq={nq} Nk={self.n} "
                f"D={self.head_dim}{dv} causal={int(self.causal)}{feat}")  # fmt: skip


def _sdpa(backend) -> Provider:
    from torch.nn.attention import sdpa_kernel

    def fn(q, k, v, causal):
        if k.shape[1] != q.shape[1]:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    name = backend.name.lower().replace("_attention", "")
    return Provider(f"sdpa-{name}", fn, context=lambda: sdpa_kernel([backend]), materializes=name == "math")


def providers(ctx: Context) -> list[Provider]:
    import embedattn
    from embedattn.reference._attention import attention as ref_attention

    on_gpu = ctx.is_cuda
    out = [
        Provider(
            "embedattn",
            lambda q, k, v, causal: embedattn.attention(q, k, v, causal=causal),
            config=(lambda: chosen_config("attention")) if on_gpu else (lambda: "backend=reference"),
        )
    ]
    try:
        from torch.nn.attention import SDPBackend

        names = ["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"] if on_gpu else [
            "FLASH_ATTENTION", "MATH"]  # fmt: skip  (CPU has no efficient/cuDNN kernels)
        out += [_sdpa(getattr(SDPBackend, n)) for n in names if hasattr(SDPBackend, n)]
    except ImportError:  # torch < 2.3: SDPA with its own dispatch
        out.append(Provider("sdpa", lambda q, k, v, causal: F.scaled_dot_product_attention(q, k, v, is_causal=causal)))
    if on_gpu:  # on CPU the embedattn provider already is the reference path
        out.append(Provider("reference", lambda q, k, v, causal: ref_attention(q, k, v, causal=causal),
                            materializes=True))  # fmt: skip
    return out


# issue 7's options, each timed at the plain path's shapes: (kwargs for embedattn.attention, modes)
FEATURES = {
    "window": (lambda q: {"window": (1024, 0)}, MODES),
    "softcap": (lambda q: {"softcap": 30.0}, MODES),
    "alibi": (lambda q: {"alibi_slopes": _slopes(q.shape[1], q.device)}, MODES),
    "dropout": (lambda q: {"dropout_p": 0.1, "seed": 0}, MODES),
    "varlen": (lambda q: {}, ("fwd",)),
    "kvcache": (lambda q: {}, ("fwd",)),
}


@functools.lru_cache(maxsize=8)
def _slopes(h: int, device: torch.device) -> torch.Tensor:
    # built once, outside the timed region
    return torch.tensor([2.0 ** (-8 * (i + 1) / h) for i in range(h)], device=device)


def _packed(cache: dict, t: torch.Tensor) -> torch.Tensor:
    # (B, H, N, D) -> (B*N, H, D), built once per input set (in the warm-up), not in the timed region
    key = id(t)
    if key not in cache:
        cache[key] = t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3]).contiguous()
    return cache[key]


def _gpt_oss_eager() -> Callable | None:
    """transformers' eager gpt-oss attention (the sinks' reference implementation), or None without transformers."""
    try:
        from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward
    except Exception:
        return None
    return eager_attention_forward


def model_feature_providers(s: Spec, provs: list[Provider]) -> list[Provider]:
    """Issue 23's rows: embedattn and the peers that run the same call (see MODEL_FEATURES)."""
    import embedattn

    on_gpu = any(p.name == "sdpa-efficient" for p in provs)
    cfg = (lambda: chosen_config("attention")) if on_gpu else (lambda: "backend=reference")
    sdpa = [p for p in provs if p.name.startswith("sdpa")]
    if s.feature == "sinks":
        sinks: dict = {}

        def sink(q):  # built once per head count, outside the timed region
            return sinks.setdefault((q.shape[1], q.device), torch.linspace(-1.0, 1.0, q.shape[1], device=q.device))

        out = [Provider("embedattn", lambda q, k, v, causal: embedattn.attention(q, k, v, causal=causal,
                                                                                 sinks=sink(q)), config=cfg),
               Provider("embedattn-plain", lambda q, k, v, causal: embedattn.attention(q, k, v, causal=causal),
                        config=cfg)]
        eager = _gpt_oss_eager()
        if eager is not None:
            masks: dict = {}

            def hf(q, k, v, causal):
                n = q.shape[2]
                key = (n, q.dtype, q.device)
                if key not in masks:
                    masks[key] = torch.full((n, n), float("-inf"), dtype=q.dtype, device=q.device).triu(1)
                module = torch.nn.Module()
                module.sinks, module.num_key_value_groups, module.training = sink(q), q.shape[1] // k.shape[1], False
                out, _ = eager(module, q, k, v, masks[key][None, None] if causal else None,
                               scaling=q.shape[-1] ** -0.5, dropout=0.0)
                return out.transpose(1, 2)  # transformers' (B, N, H, D) as ours

            out.append(Provider("hf-eager-gpt-oss", hf, materializes=True))
        return out
    if s.feature == "mla_decode":
        lens: dict = {}

        def fn(q, k, v, causal):
            key = (q.shape[0], k.shape[2], q.device)
            if key not in lens:
                lens[key] = torch.full((q.shape[0],), k.shape[2], dtype=torch.int32, device=q.device)
            return embedattn.attention_with_kvcache(q[:, :, -1:], k, v, lens[key])

        def dec(f):  # SDPA on the one query: the latent head shared by every query head (GQA), v a view of k
            return lambda q, k, v, causal: f(q[:, :, -1:], k, v, False)

        return [Provider("embedattn", fn, config=cfg)] + [Provider(p.name, dec(p.fn), context=p.context)
                                                          for p in sdpa]
    # mla, d512: the call as it is, on embedattn and on each SDPA backend that takes it
    return [Provider("embedattn", lambda q, k, v, causal: embedattn.attention(q, k, v, causal=causal),
                     config=cfg)] + sdpa


def feature_providers(s: Spec, provs: list[Provider]) -> list[Provider]:
    """embedattn with the option on, embedattn plain at the same shape, and SDPA's flash backend."""
    import embedattn

    if s.feature in MODEL_FEATURES:
        return model_feature_providers(s, provs)
    kwargs_of = FEATURES[s.feature][0]
    cfg = lambda: chosen_config("attention")
    plain = [Provider("embedattn-plain", lambda q, k, v, causal: embedattn.attention(q, k, v, causal=causal),
                      config=cfg)]
    flash = [p for p in provs if p.name == "sdpa-flash"]
    if s.feature == "varlen":
        cache: dict = {}

        def fn(q, k, v, causal):
            b, n = q.shape[0], q.shape[2]
            cu = torch.arange(0, (b + 1) * n, n, device=q.device, dtype=torch.int32)
            out = embedattn.attention_varlen(_packed(cache, q), _packed(cache, k), _packed(cache, v), cu, cu, n, n,
                                             causal=causal)
            return out

        return [Provider("embedattn", fn, config=cfg)] + plain + flash
    if s.feature == "kvcache":
        lens: dict = {}

        def fn(q, k, v, causal):
            key = (q.shape[0], k.shape[2])
            if key not in lens:
                lens[key] = torch.full((q.shape[0],), k.shape[2], dtype=torch.int32, device=q.device)
            return embedattn.attention_with_kvcache(q[:, :, -1:], k, v, lens[key])

        dec = lambda f: (lambda q, k, v, causal: f(q[:, :, -1:], k, v, False))
        return [Provider("embedattn", fn, config=cfg),
                Provider("embedattn-plain", dec(lambda q, k, v, c: embedattn.attention(q, k, v)), config=cfg)] + [
            Provider(p.name, dec(p.fn), context=p.context) for p in flash]
    return [Provider("embedattn", lambda q, k, v, causal, kw=None: embedattn.attention(
        q, k, v, causal=causal, **kwargs_of(q)), config=cfg)] + plain + flash


# issue 23: today's models' attention, (heads, kv heads, head dim, value head dim, causal, modes) at each N
MODEL_FEATURES = {
    "sinks": (64, 8, 64, 64, True, MODES),  # gpt-oss-120b: 64 query heads on 8 kv heads, D 64, learned sinks
    "mla": (16, 16, 192, 128, True, MODES),  # DeepSeek-V3 training: Q/K 128 + 64 rope, V 128
    "d512": (8, 2, 512, 512, True, MODES),  # Gemma's global layers
    "mla_decode": (16, 1, 576, 512, False, ("fwd",)),  # DeepSeek decoding: one latent kv head, V = its 512 columns
}


def model_feature_specs(ctx: Context) -> list[Spec]:
    """Issue 23's rows: a few lengths per feature, on the CPU too (smaller there)."""
    if ctx.profile == "tiny":
        return []
    dt = ctx.pick_dtypes(["bf16"] if ctx.is_cuda else ["fp32"])[0]
    if ctx.is_cuda:
        ns = [2048, 8192] if ctx.profile == "quick" else [1024, 2048, 4096, 8192]
        tokens = 16384
    else:
        ns = [256] if ctx.profile == "quick" else [256, 1024]
        tokens = 1024
    out = []
    for feat, (h, hkv, d, dv, causal, modes) in MODEL_FEATURES.items():
        heads = h if ctx.is_cuda else max(1, h // 4)
        kv = max(1, hkv * heads // h)
        for n in ns:
            if feat == "mla_decode":  # a long cache per sequence, a few sequences
                out.append(Spec(dt, 8 if ctx.is_cuda else 2, heads, 1, 4 * n, d, causal, modes=modes, feature=feat,
                                head_dim_v=dv))
            else:
                out.append(Spec(dt, max(1, tokens // n), heads, kv, n, d, causal, modes=modes, feature=feat,
                                head_dim_v=dv))
    return out


def feature_specs(ctx: Context) -> list[Spec]:
    if not ctx.is_cuda or ctx.profile == "tiny":
        return []
    out = []
    dt = ctx.pick_dtypes(["bf16"])[0]
    for feat, (_, modes) in FEATURES.items():
        for n in ([8192] if ctx.profile == "quick" else [2048, 8192]):
            if feat == "kvcache":
                out.append(Spec(dt, 8, 16, 4, 4 * n, 128, False, modes=modes, feature=feat))
            else:
                out.append(Spec(dt, max(1, 16384 // n), 16, 16, n, 128, True, modes=modes, feature=feat))
    return out


def specs(ctx: Context) -> list[Spec]:
    """The sweep, most important first (a time budget cuts from the end)."""
    if ctx.profile == "tiny":
        ns, dims, tokens, width = [32, 64], [16], 64, 32
    elif ctx.is_cuda:
        ns = [512, 2048, 8192] if ctx.profile == "quick" else [512, 1024, 2048, 4096, 8192, 16384]
        dims = [128] if ctx.profile == "quick" else [128, 64, 256]
        tokens, width = 16384, 2048
    else:
        ns = [128, 256, 512] if ctx.profile == "quick" else [128, 256, 512, 1024, 2048]
        dims, tokens, width = [64, 128], 1024, 512
    dtypes = ctx.pick_dtypes(["bf16", "fp16"] if ctx.is_cuda else ["fp32"])
    out: list[Spec] = []
    for i, dt in enumerate(dtypes):
        for d in dims:
            for causal in (False, True):
                h = max(1, width // d)
                out += [Spec(dt, max(1, tokens // n), h, h, n, d, causal) for n in ns]
            if i == 0 and d == dims[0]:  # GQA 4:1 (as in Llama-style models), causal
                h = max(4, width // d)
                out += [Spec(dt, max(1, tokens // n), h, h // 4, n, d, True) for n in ns]
    ordered = coarse_first(out, lambda s: s.n, group=lambda s: dtypes.index(s.dtype))
    # the feature cases are few: they go after the first dtype's coarse pass, before the fill-in sizes
    first = [i for i, s in enumerate(ordered) if s.dtype == dtypes[0]]
    cut = len(first) // 2 if first else 0
    return ordered[:cut] + feature_specs(ctx) + ordered[cut:]


def _inputs(ctx: Context, s: Spec) -> tuple[list[tuple[torch.Tensor, ...]], list[torch.Tensor]]:
    """The rotating (q, k, v) sets and each one's upstream gradient dO."""
    dtype = DTYPES[s.dtype]
    g = torch.Generator(device=ctx.device).manual_seed(s.n * 131 + s.head_dim)

    def r(h, d=s.head_dim):
        return torch.randn(s.batch, h, s.n, d, device=ctx.device, dtype=dtype, generator=g)

    if s.feature == "mla_decode":  # the values are the latent cache's first Dv columns: a view, never a copy
        sets = [(q, k, k[..., :s.dv], None) for q, k in ((r(s.heads), r(s.kv_heads)) for _ in range(ctx.n_sets))]
    else:
        sets = [(r(s.heads), r(s.kv_heads), r(s.kv_heads, s.dv), r(s.heads, s.dv)) for _ in range(ctx.n_sets)]
    return [st[:3] for st in sets], [st[3] for st in sets]


def workload(ctx: Context, s: Spec) -> Workload:
    """embedattn's call at ``s`` on the suite's inputs (what ``benchmarks.tune`` times)."""
    sets, grads = _inputs(ctx, s)
    p = feature_providers(s, [])[0] if s.feature else providers(ctx)[0]
    return Workload(lambda q, k, v: p.fn(q, k, v, s.causal), sets, grads, grad_inputs=(0, 1, 2))


def _too_big(ctx: Context, p: Provider, s: Spec) -> str | None:
    if not (ctx.is_cuda and p.materializes):
        return None
    scores = s.batch * s.heads * s.n * s.n * 4  # fp32 N x N scores, several live copies in bwd
    free, _ = torch.cuda.mem_get_info(ctx.device)
    if s.n > GPU_MATERIALIZE_MAX_N or 6 * scores > 0.8 * free:
        return f"skipped above N={GPU_MATERIALIZE_MAX_N} on GPU (materializes N x N scores)"
    return None


def measure(ctx: Context, rec: Recorder, p: Provider, s: Spec, inputs, mode: str) -> list[dict]:
    sets, grads = inputs
    causal = s.causal
    with p.context():  # around the forwards of "bwd" too: SDPA's backward runs the forward's backend
        t, peak = run_speed_benchmark(ctx, lambda q, k, v: p.fn(q, k, v, causal), sets, mode, grad_outputs=grads,
                                      grad_inputs=(0, 1, 2), op="attention" if p.name == "embedattn" else None)
    base = dict(suite=SUITE, kernel=s.kernel, provider=p.name, mode=mode, dtype=s.dtype, shape=s.shape,
                x_name="N", x_value=s.n, config=p.config())  # fmt: skip
    nq = 1 if s.decoding else s.n
    # QK^T runs over D, PV over Dv: the mean is the head dim of the same work
    work = attention_flops(s.batch, s.heads, nq, s.n, (s.head_dim + s.dv) / 2, causal and not s.decoding, mode)
    mm = ctx.matmul_tflops.get(s.dtype)  # this run's dense-matmul TFLOP/s in the same dtype
    extra = (lambda tf: ("frac_matmul_peak", "fraction", tf / mm)) if mm else None
    return measurement_rows(rec, base, t, work, "tflops", scale=1e-12, peak_mib=peak, extra=extra)


def run_spec(ctx: Context, rec: Recorder, s: Spec, provs: list[Provider]) -> list[dict]:
    inputs = _inputs(ctx, s)
    if s.feature:
        provs = feature_providers(s, provs)
    return measure_providers(ctx, SUITE, f"{s.kernel} {s.dtype}", provs,
                             lambda p, mode: measure(ctx, rec, p, s, inputs, mode), modes=s.modes,
                             skip=lambda p: _too_big(ctx, p, s))  # fmt: skip


def sweep(ctx: Context) -> list[Spec]:
    """What the suite runs: ``specs`` (the points benchmarks.tune tunes) with issue 23's rows
    (``model_feature_specs``, not tuned yet) after its first half."""
    base = specs(ctx)
    cut = len(base) // 2
    return base[:cut] + model_feature_specs(ctx) + base[cut:]


def plan(ctx: Context) -> list[Case]:
    provs = providers(ctx)
    return [
        Case(SUITE, f"{s.kernel} {s.dtype} N={s.n}", lambda c, r, s=s: run_spec(c, r, s, provs),
             weight=float(s.n) / 512, dtype=s.dtype)  # fmt: skip
        for s in sweep(ctx)
    ]
