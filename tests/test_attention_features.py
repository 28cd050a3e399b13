"""Attention features: sliding window, softcap, ALiBi, dropout, varlen, KV-cache decoding."""

from __future__ import annotations

import pytest
import torch
from helpers import BACKENDS, DEVICE, DTYPES, ON_CUDA, assert_fa_close, skip_if_unsupported

import embedattn
from embedattn import reference

needs_triton = pytest.mark.skipif("triton" not in BACKENDS, reason="triton not installed")


def _rand(*shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)


def _compare(kernel_fn, ref_fn, inputs, grads=True, seed=0):
    """kernel_fn(*leaves) vs ref_fn(*leaves, upcast) in float64 and in the same dtype (FA rule)."""
    dtype = inputs[0].dtype
    leaves = [t.detach().clone().requires_grad_(grads) for t in inputs]
    out = kernel_fn(*leaves)
    r64 = [t.detach().double().requires_grad_(grads) for t in inputs]
    ref = ref_fn(*r64, True)
    rp = [t.detach().clone().requires_grad_(grads) for t in inputs]
    plain = ref_fn(*rp, False)
    assert_fa_close(out, ref, plain, "out")
    if not grads:
        return
    dout = _rand(*out.shape, dtype=dtype, seed=seed + 100)
    got = torch.autograd.grad(out, leaves, dout)
    want = torch.autograd.grad(ref, r64, dout.double())
    base = torch.autograd.grad(plain, rp, dout)
    for name, a, b, c in zip(("dq", "dk", "dv"), got, want, base):
        assert_fa_close(a, b, c, name)


WINDOWS = [((3, 0), False), ((5, 2), False), ((0, 0), False), ((-1, 4), False), ((4, -1), True), ((6, 3), True)]


@pytest.mark.parametrize("window,causal", WINDOWS, ids=lambda x: str(x))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_sliding_window(backend, dtype, window, causal):
    skip_if_unsupported(backend, dtype)
    q, k, v = _rand(1, 4, 37, 32, dtype=dtype, seed=1), _rand(1, 2, 45, 32, dtype=dtype, seed=2), \
        _rand(1, 2, 45, 32, dtype=dtype, seed=3)
    _compare(lambda q, k, v: embedattn.attention(q, k, v, causal=causal, window=window, backend=backend),
             lambda q, k, v, up: reference.attention(q, k, v, causal=causal, window=window, upcast=up), (q, k, v))


@pytest.mark.parametrize("window", [(2**31 - 1, 2**31 - 1), (2**31 - 1, 0), (2**63 - 1, 3)], ids=str)
def test_window_sides_past_int32(window):
    """Huge window sides (INT_MAX, sys.maxsize: "unbounded" idioms) act as unbounded, without wrapping."""
    q, k, v = _rand(1, 2, 9, 16, seed=44), _rand(1, 1, 21, 16, seed=45), _rand(1, 1, 21, 16, seed=46)
    for be in BACKENDS:
        _compare(lambda q, k, v, be=be: embedattn.attention(q, k, v, window=window, backend=be),
                 lambda q, k, v, up: reference.attention(q, k, v, window=window, upcast=up), (q, k, v))


def test_window_matches_explicit_mask():
    q, k, v = _rand(1, 2, 20, 16, seed=4), _rand(1, 2, 26, 16, seed=5), _rand(1, 2, 26, 16, seed=6)
    i, j = torch.arange(20)[:, None], torch.arange(26)[None, :]
    rel = i + 6 - j
    mask = ((rel <= 3) & (rel >= -2)).to(DEVICE)
    for be in BACKENDS:
        a = embedattn.attention(q, k, v, window=(3, 2), backend=be)
        b = embedattn.attention(q, k, v, attn_mask=mask, backend=be)
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap(backend, dtype, causal):
    skip_if_unsupported(backend, dtype)
    # scores large enough that tanh saturates for some entries
    q, k, v = _rand(2, 2, 23, 24, dtype=dtype, seed=7, scale=3), _rand(2, 1, 31, 24, dtype=dtype, seed=8, scale=3), \
        _rand(2, 1, 31, 24, dtype=dtype, seed=9)
    _compare(lambda q, k, v: embedattn.attention(q, k, v, causal=causal, softcap=5.0, backend=backend),
             lambda q, k, v, up: reference.attention(q, k, v, causal=causal, softcap=5.0, upcast=up), (q, k, v))


@pytest.mark.parametrize("slopes_shape", ["h", "bh"])
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_alibi(backend, dtype, with_mask, slopes_shape):
    skip_if_unsupported(backend, dtype)
    B, H = 2, 4
    q, k, v = _rand(B, H, 19, 32, dtype=dtype, seed=10), _rand(B, 2, 29, 32, dtype=dtype, seed=11), \
        _rand(B, 2, 29, 32, dtype=dtype, seed=12)
    slopes = torch.tensor([2 ** (-8 * (h + 1) / H) for h in range(H)], device=DEVICE)
    if slopes_shape == "bh":
        slopes = torch.stack([slopes, slopes * 0.5])
    mask = (torch.rand(B, 1, 19, 29, generator=torch.Generator().manual_seed(1)) > 0.3).to(DEVICE) \
        if with_mask else None
    _compare(lambda q, k, v: embedattn.attention(q, k, v, causal=True, alibi_slopes=slopes, attn_mask=mask,
                                                 backend=backend),
             lambda q, k, v, up: reference.attention(q, k, v, causal=True, alibi_slopes=slopes.to(q.dtype),
                                                     attn_mask=mask, upcast=up), (q, k, v))


# ------------------------------------------------------------------------------------------- dropout
@needs_triton
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dropout_matches_reference_fed_the_kernel_mask(dtype, causal):
    skip_if_unsupported("triton", dtype)
    B, H, Nq, Nk, D, p, seed = 1, 2, 21, 35, 16, 0.3, 1234
    q, k, v = _rand(B, H, Nq, D, dtype=dtype, seed=13), _rand(B, 1, Nk, D, dtype=dtype, seed=14), \
        _rand(B, 1, Nk, D, dtype=dtype, seed=15)
    keep = embedattn.attention_dropout_mask((B, H, Nq, Nk), p, seed, device=DEVICE, backend="triton")
    assert keep.shape == (B, H, Nq, Nk) and keep.dtype == torch.bool
    _compare(lambda q, k, v: embedattn.attention(q, k, v, causal=causal, dropout_p=p, seed=seed, backend="triton"),
             lambda q, k, v, up: reference.attention(q, k, v, causal=causal, dropout_p=p, dropout_mask=keep,
                                                     upcast=up), (q, k, v))


@needs_triton
def test_dropout_keep_rate_and_seeding():
    p = 0.25
    keep = embedattn.attention_dropout_mask((2, 3, 64, 96), p, seed=7, device=DEVICE, backend="triton")
    rate = keep.float().mean().item()
    n = keep.numel()
    assert abs(rate - (1 - p)) < 4 * (p * (1 - p) / n) ** 0.5  # 4 sigma
    mask = lambda seed: embedattn.attention_dropout_mask((2, 3, 64, 96), p, seed, device=DEVICE, backend="triton")
    assert torch.equal(keep, mask(7))
    assert not torch.equal(keep, mask(8))
    # rows and columns are not correlated: per-row keep rates spread like a binomial
    per_row = keep.float().mean(-1).flatten()
    assert per_row.std().item() < 3 * (p * (1 - p) / 96) ** 0.5
    q = _rand(1, 2, 16, 16, seed=3)
    a = embedattn.attention(q, q, q, dropout_p=0.5, seed=3, backend="triton")
    b = embedattn.attention(q, q, q, dropout_p=0.5, seed=3, backend="triton")
    assert torch.equal(a, b)


@needs_triton
def test_sdpa_drop_in_runs_dropout_in_kernel(monkeypatch):
    monkeypatch.setenv("EMBEDATTN_BACKEND", "triton")
    q = _rand(1, 2, 16, 16, seed=4)
    torch.manual_seed(0)
    a = embedattn.scaled_dot_product_attention(q, q, q, dropout_p=0.5)
    torch.manual_seed(0)
    b = embedattn.scaled_dot_product_attention(q, q, q, dropout_p=0.5)
    assert torch.equal(a, b)
    assert not torch.allclose(a, embedattn.scaled_dot_product_attention(q, q, q))


# -------------------------------------------------------------------------------------------- varlen
VARLEN_CASES = [([5, 1, 17, 33], [9, 1, 17, 20]), ([1], [1]), ([12, 0, 7], [12, 3, 7])]


@pytest.mark.parametrize("lens", VARLEN_CASES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen(backend, dtype, causal, lens):
    skip_if_unsupported(backend, dtype)
    lq, lk = lens
    cu_q = torch.tensor([0] + list(torch.tensor(lq).cumsum(0)), dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0] + list(torch.tensor(lk).cumsum(0)), dtype=torch.int32, device=DEVICE)
    H, HK, D = 4, 2, 24
    q, k, v = _rand(sum(lq), H, D, dtype=dtype, seed=16), _rand(sum(lk), HK, D, dtype=dtype, seed=17), \
        _rand(sum(lk), HK, D, dtype=dtype, seed=18)
    mq, mk = max(lq), max(lk)
    _compare(lambda q, k, v: embedattn.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, causal=causal, backend=backend),
             lambda q, k, v, up: reference.attention_varlen(q, k, v, cu_q, cu_k, causal=causal, upcast=up),
             (q, k, v))


@needs_triton
def test_varlen_with_window_and_alibi():
    lq = [7, 19]
    cu = torch.tensor([0, 7, 26], dtype=torch.int32, device=DEVICE)
    q, k, v = _rand(26, 2, 16, seed=19), _rand(26, 2, 16, seed=20), _rand(26, 2, 16, seed=21)
    slopes = torch.tensor([[0.5, 0.25], [0.1, 0.2]], device=DEVICE)
    kw = dict(causal=True, window=(4, 0), alibi_slopes=slopes)
    _compare(lambda q, k, v: embedattn.attention_varlen(q, k, v, cu, cu, max(lq), max(lq), backend="triton", **kw),
             lambda q, k, v, up: reference.attention_varlen(q, k, v, cu, cu, upcast=up, **kw), (q, k, v))


# ----------------------------------------------------------------------------------------- KV cache
@pytest.mark.parametrize("nq,num_splits", [(1, 1), (1, 3), (3, 2), (4, 0)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_kvcache_decoding(backend, dtype, nq, num_splits):
    skip_if_unsupported(backend, dtype)
    B, H, HK, S, D = 3, 4, 2, 80, 32
    k_cache, v_cache = _rand(B, HK, S, D, dtype=dtype, seed=22), _rand(B, HK, S, D, dtype=dtype, seed=23)
    lens = torch.tensor([0, 17, 70], dtype=torch.int32, device=DEVICE)  # an empty cache included
    q = _rand(B, H, nq, D, dtype=dtype, seed=24)
    k_new, v_new = _rand(B, HK, nq, D, dtype=dtype, seed=25), _rand(B, HK, nq, D, dtype=dtype, seed=26)
    kc, vc = k_cache.clone(), v_cache.clone()
    out = embedattn.attention_with_kvcache(q, kc, vc, lens, k_new, v_new, causal=True, num_splits=num_splits,
                                           backend=backend)
    for b in range(B):  # appended in place, the rest untouched
        n = int(lens[b])
        assert torch.equal(kc[b, :, n:n + nq], k_new[b]) and torch.equal(vc[b, :, n:n + nq], v_new[b])
        assert torch.equal(kc[b, :, :n], k_cache[b, :, :n]) and torch.equal(kc[b, :, n + nq:], k_cache[b, :, n + nq:])
    total = lens + nq
    ref = reference.attention_with_kvcache(q.double(), kc.double(), vc.double(), total, causal=True)
    plain = reference.attention_with_kvcache(q, kc, vc, total, causal=True, upcast=False)
    assert_fa_close(out, ref, plain)


@needs_triton
def test_kvcache_split_matches_unsplit_long_cache():
    B, H, S, D = 2, 2, 300, 16
    kc, vc = _rand(B, H, S, D, seed=27), _rand(B, H, S, D, seed=28)
    q = _rand(B, H, 1, D, seed=29)
    lens = torch.tensor([300, 123], dtype=torch.int32, device=DEVICE)
    a = embedattn.attention_with_kvcache(q, kc, vc, lens, num_splits=1, backend="triton")
    b = embedattn.attention_with_kvcache(q, kc, vc, lens, num_splits=5, backend="triton")
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("backend", BACKENDS)
def test_feature_bad_input(backend):
    q = _rand(1, 2, 4, 16)
    with pytest.raises(ValueError, match="window"):
        embedattn.attention(q, q, q, window=(1,), backend=backend)
    with pytest.raises(ValueError, match="softcap"):
        embedattn.attention(q, q, q, softcap=-1.0, backend=backend)
    with pytest.raises(ValueError, match="alibi_slopes"):
        embedattn.attention(q, q, q, alibi_slopes=torch.ones(3, device=DEVICE), backend=backend)
    with pytest.raises(ValueError, match="dropout_p"):
        embedattn.attention(q, q, q, dropout_p=1.0, backend=backend)
    qp = _rand(5, 2, 16)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        embedattn.attention_varlen(qp, qp, qp, torch.tensor([0, 3], device=DEVICE),
                                   torch.tensor([0, 5], device=DEVICE), 5, 5, backend=backend)
    with pytest.raises(ValueError, match="max_seqlen"):
        embedattn.attention_varlen(qp, qp, qp, torch.tensor([0, 5], device=DEVICE),
                                   torch.tensor([0, 5], device=DEVICE), 2, 5, backend=backend)
    with pytest.raises(ValueError, match="scale"):
        embedattn.attention_varlen(qp, qp, qp, torch.tensor([0, 5], device=DEVICE),
                                   torch.tensor([0, 5], device=DEVICE), 5, 5, scale=float("nan"), backend=backend)
    kc = _rand(1, 2, 8, 16)
    with pytest.raises(ValueError, match="scale"):
        embedattn.attention_with_kvcache(q[:, :, :1], kc, kc.clone(), torch.tensor([1], device=DEVICE),
                                         scale=float("inf"), backend=backend)
    with pytest.raises(ValueError, match="cache"):
        embedattn.attention_with_kvcache(q[:, :, :1], kc, kc.clone(), torch.tensor([8], device=DEVICE),
                                         kc[:, :, :1], kc[:, :, :1], backend=backend)
    with pytest.raises(TypeError, match="cache_seqlens"):
        embedattn.attention_with_kvcache(q[:, :, :1], kc, kc.clone(), torch.tensor([1.0], device=DEVICE),
                                         backend=backend)


@pytest.mark.skipif(not ON_CUDA, reason="large shapes run on CUDA only")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_features_large_cuda(dtype):
    q, k, v = _rand(2, 8, 1024, 128, dtype=dtype, seed=30), _rand(2, 2, 1024, 128, dtype=dtype, seed=31), \
        _rand(2, 2, 1024, 128, dtype=dtype, seed=32)
    slopes = torch.rand(8, device=DEVICE) * 0.1
    kw = dict(causal=True, window=(256, 0), softcap=30.0, alibi_slopes=slopes)
    _compare(lambda q, k, v: embedattn.attention(q, k, v, backend="triton", **kw),
             lambda q, k, v, up: reference.attention(q, k, v, upcast=up, **{**kw, "alibi_slopes": slopes.to(q.dtype)}),
             (q, k, v))


@pytest.mark.parametrize("backend", BACKENDS)
def test_kvcache_bad_input_leaves_cache_untouched(backend):
    """Every argument is checked before k_new/v_new are written into the cache in place."""
    kc, vc = _rand(1, 2, 8, 16, seed=40), _rand(1, 2, 8, 16, seed=41)
    k0, v0 = kc.clone(), vc.clone()
    q, kn = _rand(1, 2, 1, 16, seed=42), _rand(1, 2, 1, 16, seed=43)
    lens = torch.tensor([3], device=DEVICE)
    for kw in (dict(window=(1,)), dict(alibi_slopes=torch.ones(5, device=DEVICE)), dict(softcap=-1.0)):
        with pytest.raises(ValueError):
            embedattn.attention_with_kvcache(q, kc, vc, lens, kn, kn.clone(), backend=backend, **kw)
        assert torch.equal(kc, k0) and torch.equal(vc, v0), kw


_AOT = """
import re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import embedattn.kernels.attention as K

PTR = {"LSE": "*fp32", "DELTA": "*fp32", "SLOPES": "*fp32", "CU_Q": "*i32", "CU_K": "*i32", "K_LENS": "*i32",
       "M": "*u8"}
FLOAT = {"qk_scale", "sm_scale", "sc_scale", "sc_log2e", "drop_p", "drop_scale"}

def compile_(fn, consts, split=False):
    sig = {}
    for a in fn.arg_names:
        if a in consts:
            sig[a] = "constexpr"
        elif a in PTR:
            sig[a] = PTR[a]
        elif a in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV"):
            sig[a] = "*fp32" if (a == "O" and split) else "*bf16"
        elif a in FLOAT:
            sig[a] = "fp32"
        elif a == "SEED":
            sig[a] = "*i64"
        else:
            sig[a] = "i32"
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": 4})
    return k.asm["ptx"]

every = dict(HEAD_DIM=96, BLOCK_D=128, PREC="tf32", CAUSAL=False, WINDOW=True, MASK_KIND=1, SOFTCAP=True,
             ALIBI=True, DROPOUT=True, VARLEN=False)
ptx = [compile_(K._attn_fwd, dict(every, BLOCK_M=64, BLOCK_N=64, KLENS=False, SPLIT=False)),
       compile_(K._attn_bwd_dkdv, dict(every, BLOCK_M=32, BLOCK_N=64)),
       compile_(K._attn_bwd_dq, dict(every, BLOCK_M=64, BLOCK_N=32)),
       compile_(K._attn_fwd, dict(every, MASK_KIND=0, DROPOUT=False, VARLEN=True, BLOCK_M=64, BLOCK_N=64,
                                  KLENS=False, SPLIT=False)),
       compile_(K._attn_fwd, dict(every, MASK_KIND=0, DROPOUT=False, WINDOW=False, CAUSAL=True, BLOCK_M=16,
                                  BLOCK_N=64, KLENS=True, SPLIT=True), split=True)]
print(" ".join(str(len(re.findall(r"\\bw?gmma|\\bmma[.]sync", p))) for p in ptx))
"""


@pytest.mark.skipif("triton" not in BACKENDS or ON_CUDA, reason="needs Triton; on CUDA the kernels run for real")
def test_feature_kernels_compile_for_sm90():
    """What the interpreter cannot show: every kernel with all feature flags on (and the varlen and
    split-KV decoding variants) lowers and assembles for an H100 (ptxas runs here, no GPU needed;
    in a subprocess, since this one interprets), with tensor-core instructions in each."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _AOT], env=env, capture_output=True, text=True, timeout=600)
    if r.returncode:
        tail = r.stderr.strip().splitlines()[-1:] or [""]
        if any(x in tail[0] for x in ("ImportError", "ptxas", "FileNotFoundError", "backend")):
            pytest.skip(f"cannot compile for sm_90 here: {tail[0]}")
        raise AssertionError(r.stderr[-3000:])
    counts = [int(c) for c in r.stdout.split()]
    assert len(counts) == 5 and all(c > 0 for c in counts), counts


@needs_triton
@pytest.mark.parametrize("causal", [False, True])
def test_window_and_alibi_follow_a_top_left_diagonal_on_both_backends(causal):
    """With causal_offset=0 (torch's top-left alignment, used by the SDPA drop-in and integrations)
    the reference measures window and ALiBi from the same diagonal as the kernels."""
    q, k, v = _rand(1, 2, 5, 16, seed=40), _rand(1, 2, 11, 16, seed=41), _rand(1, 2, 11, 16, seed=42)
    slopes = torch.tensor([0.5, 0.25], device=DEVICE)
    kw = dict(causal=causal, causal_offset=0, window=(2, 1), alibi_slopes=slopes)
    a = embedattn.attention(q, k, v, backend="reference", **kw)
    b = embedattn.attention(q, k, v, backend="triton", **kw)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # and the diagonal really is top-left: query 0 sees keys 0..1 only (window right side 1)
    i, j = torch.arange(5)[:, None], torch.arange(11)[None, :]
    rel = i - j
    allowed = (rel <= 2) & (rel >= -1) & ((rel >= 0) if causal else True)
    bias = -(slopes[None, :, None, None].cpu() * rel.abs())
    additive = bias + torch.where(allowed, 0.0, float("-inf"))
    want = reference.attention(q, k, v, attn_mask=additive.to(DEVICE))
    torch.testing.assert_close(a, want, atol=1e-5, rtol=1e-5)
