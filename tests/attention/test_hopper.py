"""Hopper attention kernels (kernels/attention_hopper.py): correctness against the float64 reference where they
can run (the interpreter runs tensor descriptors; an sm90+ GPU), the "descriptor or pointer" decision, and
what only the compiled code shows: each default config built for sm_90 with the Triton the GPU machine has
(3.6, from a side environment when one exists) and with this environment's Triton, asserting wgmma/HGMMA,
TMA loads, the warp-specialized partitions where claimed, the TMA reduce-add of dQ, and no spills.

    python tests/attention/test_hopper.py [PYTHON ...]   prints the compile report (one row per kernel config)
"""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch
from helpers import DEVICE, HAS_TRITON, INTERPRET, ON_CUDA, assert_fa_close
from sm90 import run_rows

from embedattn import reference
from embedattn.attention import AttnSpec

if HAS_TRITON:
    from embedattn.kernels import attention_gluon as KG
    from embedattn.kernels import attention_hopper as KH

# the GPU machine's Triton (3.6.0) in a side environment; CI has none and skips those rows
TRITON36_PYTHON = os.environ.get("EMBEDATTN_TRITON36_PYTHON", "/work/tri36/bin/python")


def _runs_here() -> bool:
    if not HAS_TRITON:
        return False
    if INTERPRET:
        return KH.device_ok(torch.device("cpu"))
    return ON_CUDA and KH.device_ok(torch.device("cuda"))


needs_hopper = pytest.mark.skipif(not _runs_here(), reason="needs the Triton interpreter or an sm90+ GPU")

# (B, Hq, Hkv, Nq, Nk, D, causal, causal_offset): odd tails, Nq != Nk both ways, GQA, one query, empty rows
# (bottom-right with Nq > Nk), top-left (offset 0), key counts that divide the key block (the one-loop path)
CASES = [
    (1, 2, 2, 33, 47, 64, False, None),
    (2, 4, 2, 9, 33, 64, False, None),
    (1, 2, 2, 1, 7, 64, False, None),
    (1, 2, 1, 40, 29, 128, True, None),
    (1, 2, 2, 17, 50, 64, True, 0),
    (1, 2, 1, 65, 64, 128, False, None),
    (1, 1, 1, 37, 37, 256, True, None),
    (1, 2, 1, 20, 48, 256, False, None),
]
if ON_CUDA:
    CASES += [
        (2, 8, 2, 1000, 1000, 128, True, None),
        (1, 4, 4, 513, 2049, 64, False, None),
        (1, 4, 1, 257, 257, 256, True, None),
        (2, 4, 4, 1024, 1024, 128, False, None),
        (1, 4, 2, 300, 129, 64, True, 0),
    ]
DTYPES = [torch.float16] + ([torch.bfloat16] if ON_CUDA else [])


def _inputs(B, Hq, Hkv, Nq, Nk, D, dtype, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float32).to(device=DEVICE, dtype=dtype)
    return mk(B, Hq, Nq, D), mk(B, Hkv, Nk, D), mk(B, Hkv, Nk, D)


def _check(q, k, v, causal, off, *, seed=0, dlse=False):
    """hopper_forward/hopper_backward vs the float64 reference (plain PyTorch in the same dtype as the
    yardstick, FlashAttention's 2x rule), lse2 included; ``dlse`` also feeds a gradient into the lse."""
    Nq, Nk, D = q.shape[2], k.shape[2], q.shape[3]
    scale = D**-0.5
    spec = AttnSpec(causal=causal, causal_offset=Nk - Nq if off is None else off, scale=scale)
    assert KH.supports(q, k, v, spec)
    out, lse2 = KH.hopper_forward(q, k, v, spec)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    plain_in = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    kw = dict(causal=causal, scale=scale, causal_offset=off, return_lse=True)
    ref, ref_lse = reference.attention(*ref_in, **kw)
    plain, _ = reference.attention(*plain_in, upcast=False, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_fa_close(out, ref, plain, "out")
    want2 = ref_lse.detach() / math.log(2.0)
    assert torch.equal(torch.isinf(lse2.cpu()), torch.isinf(want2.cpu())), "lse2: -inf rows differ"
    fin = torch.isfinite(want2)
    torch.testing.assert_close(lse2[fin].double(), want2[fin], atol=1e-4, rtol=1e-4)

    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    dout = torch.randn(out.shape, generator=g).to(device=q.device, dtype=q.dtype)
    dl2 = torch.randn(lse2.shape, generator=g).to(q.device) if dlse else None
    got = KH.hopper_backward(dout, q, k, v, out, lse2, spec, dlse2=dl2)

    def grads(o, lse, leaves, do):
        loss = (o * do).sum()
        if dlse:
            # d/d lse2 with lse2 = lse / ln 2; rows with no key (lse = -inf) have a zero gradient
            lse_f = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
            loss = loss + (lse_f / math.log(2.0) * dl2.to(lse.dtype)).sum()
        return torch.autograd.grad(loss, leaves)

    want = grads(ref, ref_lse, ref_in, dout.double())
    plain2, plain_lse = reference.attention(*plain_in, upcast=False, **kw)
    base = grads(plain2, plain_lse, plain_in, dout)
    for name, a, b, c in zip(("dq", "dk", "dv"), got, want, base):
        assert a.shape == b.shape and a.dtype == q.dtype
        assert_fa_close(a, b, c, name)


@needs_hopper
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}H{}x{}N{}x{}D{}{}{}".format(
    *c[:6], "c" if c[6] else "", "tl" if c[7] == 0 else ""))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_backward_match_reference(case, dtype):
    B, Hq, Hkv, Nq, Nk, D, causal, off = case
    q, k, v = _inputs(B, Hq, Hkv, Nq, Nk, D, dtype, seed=sum(case[:6]))
    _check(q, k, v, causal, off, seed=Nq)


@needs_hopper
def test_lse_gradient_shifts_delta():
    q, k, v = _inputs(1, 2, 1, 24, 19, 64, torch.float16, seed=5)
    _check(q, k, v, True, None, dlse=True)


@needs_hopper
def test_strided_views_a_descriptor_can_address():
    """(B, N, H, D) storage seen as (B, H, N, D): not contiguous, but 16-byte aligned strides take TMA."""
    g = torch.Generator(device="cpu").manual_seed(3)
    mk = lambda n, h: torch.randn(2, n, h, 64, generator=g).to(DEVICE, torch.float16).transpose(1, 2)
    q, k, v = mk(21, 4), mk(30, 2), mk(30, 2)
    assert not q.is_contiguous() and KH.tma_ok(q)
    _check(q, k, v, False, None)


@needs_hopper
def test_backward_runs_twice_the_same_up_to_atomics_order():
    """Fresh dQ accumulator per call (zeroed), so a second call does not add onto the first."""
    q, k, v = _inputs(1, 2, 2, 40, 40, 64, torch.float16, seed=9)
    spec = AttnSpec(scale=0.125)
    out, lse = KH.hopper_forward(q, k, v, spec)
    do = torch.randn_like(out)
    a = KH.hopper_backward(do, q, k, v, out, lse, spec)
    b = KH.hopper_backward(do, q, k, v, out, lse, spec)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=2e-3, rtol=0)


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
def test_supports_takes_only_what_the_kernels_compute():
    t = lambda *s, dtype=torch.float16: torch.zeros(*s, dtype=dtype)
    q, k, v = t(1, 4, 8, 64), t(1, 2, 8, 64), t(1, 2, 8, 64)
    here = KH.device_ok(q.device)
    plain = AttnSpec(scale=0.1)
    assert KH.supports(q, k, v, AttnSpec(scale=0.1, causal=True, causal_offset=3)) == here
    assert KH.supports(q, k, v, plain) == here
    # every feature field of the spec off but causal/causal_offset/scale: a field added later is refused too
    assert not KH.supports(q, k, v, AttnSpec(mask=torch.ones(1, 4, 8, 8, dtype=torch.bool)))
    assert not KH.supports(q, k, v, AttnSpec(window_left=4, window_right=0))
    assert not KH.supports(q, k, v, AttnSpec(softcap=30.0))
    assert not KH.supports(q, k, v, AttnSpec(alibi=torch.ones(4)))
    assert not KH.supports(q, k, v, AttnSpec(dropout_p=0.1))
    assert not KH.supports(q, k, v, AttnSpec(sinks=torch.zeros(4)))  # issue 23: learned sinks
    assert not KH.supports(q, k, t(1, 2, 8, 128), plain)  # a value head dim of its own (MLA)
    assert not KH.supports(t(1, 4, 8, 512), t(1, 2, 8, 512), t(1, 2, 8, 512), plain)  # D512: the pointer kernels
    assert KH.supports_backward(q, k, v, plain) == here
    # the Gluon forward: never under the interpreter or without Gluon, never causal, D 64/128 only
    assert not KG.supports(q, k, v, AttnSpec(causal=True))
    assert not KG.supports(t(1, 4, 8, 256), t(1, 2, 8, 256), t(1, 2, 8, 256), plain)
    if INTERPRET or not KG.AVAILABLE:
        assert not KG.supports(q, k, v, plain)
    assert not KH.supports_backward(t(1, 4, 8, 256), t(1, 2, 8, 256), t(1, 2, 8, 256), plain)  # spills
    assert not KH.supports(q, k, v, AttnSpec(scale=-0.1))
    assert not KH.supports(t(1, 4, 8, 96), t(1, 2, 8, 96), t(1, 2, 8, 96), plain)  # D not 64/128/256
    assert not KH.supports(t(1, 4, 8, 64, dtype=torch.float32), t(1, 2, 8, 64, dtype=torch.float32),
                           t(1, 2, 8, 64, dtype=torch.float32), plain)
    assert not KH.supports(q, t(1, 3, 8, 64), t(1, 3, 8, 64), plain)  # 4 heads over 3 KV heads
    assert not KH.supports(q, k, t(1, 2, 9, 64), plain)  # k and v disagree
    assert not KH.supports(t(4, 8, 64), t(2, 8, 64), t(2, 8, 64), plain)  # varlen-style packed input
    # D not unit-stride, an odd row stride, a misaligned base: the pointer kernels take them
    assert not KH.tma_ok(t(1, 4, 64, 8).transpose(2, 3))
    assert not KH.tma_ok(t(1, 4, 8, 65)[..., :64])
    assert not KH.tma_ok(t(4 * 8 * 64 + 1)[1:].view(1, 4, 8, 64))
    assert KH.tma_ok(t(1, 8, 4, 64).transpose(1, 2))
    assert KH.tma_ok(t(1, 1, 8, 64).expand(1, 4, 8, 64))  # broadcast heads: stride 0 is aligned


# ------------------------------------------------------------------------------------------------
# EMBEDATTN_ATTENTION_IMPL: decided at the entry, the same kernels eagerly and compiled
# ------------------------------------------------------------------------------------------------
def _spy_variants(monkeypatch, gluon: bool):
    """Record which launchers run. With ``gluon``, a stand-in Gluon forward (the interpreter has no Gluon): it takes
    what the Hopper forward takes, non-causal, and computes with it."""
    import embedattn
    from embedattn import _backend

    ran, real_fwd = [], KH.hopper_forward
    for name in ("hopper_forward", "hopper_backward"):
        real = getattr(KH, name)
        monkeypatch.setattr(KH, name, lambda *a, real=real, name=name, **kw: ran.append(name) or real(*a, **kw))
    if gluon:
        monkeypatch.setattr(KG, "supports", lambda q, k, v, spec: not spec.causal and KH.supports(q, k, v, spec))
        monkeypatch.setattr(KG, "gluon_forward", lambda q, k, v, spec: ran.append("gluon_forward") or
                            real_fwd(q, k, v, spec))
    assert _backend.attention_impl() in ("hopper", "gluon")
    return ran, embedattn


@needs_hopper
@pytest.mark.parametrize("impl", ["hopper", "gluon"])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_impl_takes_the_same_kernels_eagerly_and_compiled(impl, causal, monkeypatch):
    """Issue 22.3: the variant EMBEDATTN_ATTENTION_IMPL asks for is chosen once at the entry, and the compiled road
    runs the same kernels as the eager one (the Gluon forward, which is no wrap_triton target, through its own opaque
    op: under torch.compile it used to become the Hopper one silently). Deterministic algorithms keep the
    atomic-free backward on both roads."""
    from helpers import on_road

    monkeypatch.setenv("EMBEDATTN_ATTENTION_IMPL", impl)
    ran, embedattn = _spy_variants(monkeypatch, gluon=impl == "gluon")
    q, k, v = (t.requires_grad_() for t in _inputs(1, 2, 1, 24, 19, 64, torch.float16, seed=31))
    fwd = "gluon_forward" if impl == "gluon" and not causal else "hopper_forward"
    outs = []
    for road in ("eager", "compiled"):
        ran.clear()
        f = on_road(road, lambda q, k, v: embedattn.attention(q, k, v, causal=causal, backend="triton"))
        out = f(q, k, v)
        torch.autograd.grad(out.float().sum(), (q, k, v))
        assert ran == [fwd, "hopper_backward"], (road, ran)
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)
    ref = reference.attention(q.double(), k.double(), v.double(), causal=causal)
    assert_fa_close(outs[0], ref, reference.attention(q, k, v, causal=causal, upcast=False))
    torch.use_deterministic_algorithms(True)
    try:
        for road in ("eager", "compiled"):
            ran.clear()
            out = on_road(road, lambda q, k, v: embedattn.attention(q, k, v, causal=causal, backend="triton"))(q, k, v)
            torch.autograd.grad(out.float().sum(), (q, k, v))
            assert ran == [fwd], (road, ran)
    finally:
        torch.use_deterministic_algorithms(False)


@needs_hopper
def test_attention_impl_misaligned_base_takes_the_default_kernels_on_both_roads(monkeypatch):
    """A view whose strides a descriptor takes but whose base is not 16-byte aligned: the default kernels on both
    roads (the compiled entry cannot see addresses; the op checks them at the launch)."""
    from helpers import on_road

    monkeypatch.setenv("EMBEDATTN_ATTENTION_IMPL", "hopper")
    ran, embedattn = _spy_variants(monkeypatch, gluon=False)
    q, k, v = _inputs(1, 2, 1, 16, 16, 64, torch.float16, seed=33)
    flat = torch.zeros(q.numel() + 1, dtype=q.dtype, device=q.device)
    q = flat[1:].view(q.shape).copy_(q)  # 2 bytes past an aligned address
    assert not KH.tma_ok(q) and KH._strides_ok(q)
    for road in ("eager", "compiled"):
        out = on_road(road, lambda q, k, v: embedattn.attention(q, k, v, backend="triton"))(q, k, v)
        assert ran == [] and torch.isfinite(out).all(), (road, ran)


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
def test_attention_impl_bad_value_raises_on_both_roads(monkeypatch):
    from helpers import on_road

    import embedattn

    monkeypatch.setenv("EMBEDATTN_ATTENTION_IMPL", "fastest")
    q = torch.zeros(1, 1, 4, 16, device=DEVICE)
    for road in ("eager", "compiled"):  # compiled: Dynamo's error names the ValueError
        with pytest.raises((ValueError, RuntimeError), match="EMBEDATTN_ATTENTION_IMPL='fastest'"):
            on_road(road, lambda q: embedattn.attention(q, q, q, backend="triton"))(q)


@needs_hopper
def test_measured_defaults_from_the_tuned_table(monkeypatch, tmp_path):
    """Issue 27.3: with EMBEDATTN_ATTENTION_IMPL unset, a plain call runs the variant the device's table names for
    its shape (``attention.impl_fwd`` / ``_bwd``, as benchmarks/gpu/hopper_attention.py writes them; the nearest N
    bucket), the same eagerly and compiled; shapes, dtypes and features the table does not name, an explicit
    ``default`` and ``EMBEDATTN_TUNED_CONFIGS=0`` keep the default kernels."""
    from helpers import on_road

    from embedattn import configs
    from embedattn.attention import _kernel_impls, make_spec

    monkeypatch.delenv("EMBEDATTN_ATTENTION_IMPL", raising=False)
    fields = dict(dtype="float16", head_dim=64, nq=32, nk=32, flags="causal", gqa=1)
    table = {"format": 1, "kernels": {
        "attention.impl_fwd": {configs.key(**fields).text: {"config": {"impl": "hopper"}}},
        "attention.impl_bwd": {configs.key(**fields).text: {"config": {"impl": "hopper"}}}}}
    (tmp_path / f"{configs.device_key(DEVICE)}.json").write_text(json.dumps(table))
    monkeypatch.setenv("EMBEDATTN_CONFIGS_DIR", str(tmp_path))
    configs.clear_cache()
    try:
        q, k, v = _inputs(1, 4, 2, 40, 40, 64, torch.float16, seed=35)  # N 40: bucket 64, the nearest entry is 32

        def impls(q=q, k=k, v=v, **kw):
            return _kernel_impls(q, k, v, make_spec(q, n_keys=k.shape[2], **kw))

        assert impls(causal=True) == ("hopper", "hopper")
        assert impls(causal=False) == ("default", "default")  # another flags field: no entry
        assert impls(causal=True, window=(8, 0)) == ("default", "default")  # a feature the variant lacks
        q1, k1, v1 = _inputs(1, 4, 4, 40, 40, 64, torch.float16, seed=36)
        assert impls(q1, k1, v1, causal=True) == ("default", "default")  # gqa 0: no entry
        torch.use_deterministic_algorithms(True)
        try:
            assert impls(causal=True) == ("hopper", "default")
        finally:
            torch.use_deterministic_algorithms(False)
        monkeypatch.setenv("EMBEDATTN_ATTENTION_IMPL", "hopper")  # _spy_variants checks a variant is asked for
        ran, embedattn = _spy_variants(monkeypatch, gluon=False)
        monkeypatch.delenv("EMBEDATTN_ATTENTION_IMPL")
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        for road in ("eager", "compiled"):
            ran.clear()
            out = on_road(road, lambda q, k, v: embedattn.attention(q, k, v, causal=True, backend="triton"))(q, k, v)
            torch.autograd.grad(out.float().sum(), (q, k, v))
            assert ran == ["hopper_forward", "hopper_backward"], (road, ran)
        ref = reference.attention(q.double(), k.double(), v.double(), causal=True)
        assert_fa_close(out, ref, reference.attention(q, k, v, causal=True, upcast=False))
        monkeypatch.setenv("EMBEDATTN_ATTENTION_IMPL", "default")
        assert impls(causal=True) == ("default", "default")
        monkeypatch.delenv("EMBEDATTN_ATTENTION_IMPL")
        monkeypatch.setenv("EMBEDATTN_TUNED_CONFIGS", "0")
        configs.clear_cache()
        assert impls(causal=True) == ("default", "default")
    finally:
        monkeypatch.delenv("EMBEDATTN_CONFIGS_DIR")
        monkeypatch.delenv("EMBEDATTN_TUNED_CONFIGS", raising=False)
        configs.clear_cache()


# ------------------------------------------------------------------------------------------------
# compiled for sm_90: what the interpreter cannot show
# ------------------------------------------------------------------------------------------------
_AOT = r'''
import json, os, re, subprocess, sys, tempfile
import triton
from triton.compiler import ASTSource
import embedattn.kernels.attention_hopper as KH
import embedattn.kernels.attention_gluon as KG
from sm90 import build, error_row, ptxas_usage
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
TENSORS, F32 = ("Q", "K", "V", "O", "DO", "DK", "DV"), ("LSE", "DELTA", "DQA")

def signature(fn, consts, dtype):
    sig, attrs = {}, {}
    for i, a in enumerate(fn.arg_names):
        sig[a] = ("constexpr" if a in consts else "*" + dtype if a in TENSORS else "*fp32" if a in F32
                  else "fp32" if a in ("qk_scale", "sm_scale") else "i32")
        if sig[a].startswith("*") or a.startswith("stride"):  # as the launcher's 16-byte aligned inputs specialize
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs

def count(pat, text):
    return len(re.findall(pat, text))

for s in json.loads(sys.argv[1]):
    bm, bn, w, st = s["config"]
    consts = dict(HEAD_DIM=s["D"], BLOCK_M=bm, BLOCK_N=bn, CAUSAL=s["causal"])
    source = ASTSource
    if s["kernel"] == "fwd":
        fn = KH._attn_fwd_hopper
        consts.update(EVEN_N=s.get("even", True), WARP_SPECIALIZE=s["ws"])
    elif s["kernel"] == "gluon":
        from triton.experimental.gluon._runtime import GluonASTSource as source
        fn = KG._gluon_attn_fwd
        consts = dict(HEAD_DIM=s["D"], BLOCK_M=bm, BLOCK_N=bn, EVEN_N=s.get("even", True), num_warps=w)
    else:
        fn = KH._attn_bwd_hopper
        consts.update(TMA_REDUCE=s["reduce"])
    row = dict(s, triton=triton.__version__)
    try:
        sig, attrs = signature(fn, consts, s.get("dtype", "bf16"))
        k, info = build(fn, sig, consts, attrs, w, st, source)
    except Exception as e:
        print(json.dumps(error_row(row, e)), flush=True)
        continue
    ptx, ttgir = k.asm["ptx"], k.asm["ttgir"]
    with tempfile.TemporaryDirectory() as d:
        cubin = os.path.join(d, "k.cubin")
        open(cubin, "wb").write(k.asm["cubin"])
        sass = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", cubin], capture_output=True, text=True).stdout
    ins = [ln for ln in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/", ln)]
    ws_regs = re.search(r"requestedRegisters = array<i32: ([\d, ]+)>", ttgir)
    row.update(
        ptxas_usage(info),
        smem=k.metadata.shared,
        wgmma=count(r"wgmma\.mma_async", ptx),
        tma_ptx=count(r"cp\.async\.bulk\.tensor", ptx),
        tma_reduce_ptx=count(r"cp\.reduce\.async\.bulk\.tensor", ptx),
        red_ptx=count(r"\b(red|atom)\.global", ptx),
        setmaxnreg=count(r"setmaxnreg", ptx),
        ws_op=("ttg.warp_specialize" in ttgir),
        partitions=count(r"partition\d+\(", ttgir),
        ws_regs=ws_regs.group(1) if ws_regs else "",
        hgmma=sum("HGMMA" in x for x in ins),
        utmaldg=sum("UTMALDG" in x for x in ins),
        utmaredg=sum("UTMAREDG" in x for x in ins),
        ldl_stl=sum(bool(re.search(r"\b(LDL|STL)\b", x)) for x in ins),
        sass_ins=len(ins),
        serialized=("C7514" in info),  # ptxas: wgmma serialized by a read of an in-flight accumulator
    )
    print(json.dumps(row), flush=True)
'''

SMEM_LIMIT = 232448  # bytes of shared memory one block may use on sm_90 (227 KB)


def default_specs(every_bwd: bool = False) -> list[dict]:
    """One row per default config the launchers pick on a GPU: forward non-causal (warp-specialized) and
    causal, backward with dQ through the TMA reduce-add (for the head dims ``supports_backward`` takes, or
    ``every_bwd``: D256 too, which spills)."""
    specs = []
    for d, conf in KH.FWD_CONFIGS.items():
        specs.append(dict(kernel="fwd", D=d, causal=False, ws=True, config=list(conf)))
    # Nk % BLOCK_N != 0: the key tail's bias inside the one warp-specialized loop
    specs.append(dict(kernel="fwd", D=128, causal=False, ws=True, even=False, config=list(KH.FWD_CONFIGS[128])))
    for d, conf in KH.PLAIN_FWD_CONFIGS.items():
        specs.append(dict(kernel="fwd", D=d, causal=True, ws=False, config=list(conf)))
    # lever 2's ablation: non-causal without warp specialization
    specs.append(dict(kernel="fwd", D=128, causal=False, ws=False, config=list(KH.PLAIN_FWD_CONFIGS[128])))
    for d, conf in KH.BWD_CONFIGS.items():
        if d in KH.BWD_HEAD_DIMS or every_bwd:
            specs.append(dict(kernel="bwd", D=d, causal=True, reduce=True, config=list(conf)))
    if KG.AVAILABLE:  # the Gluon forward (non-causal), key tail on: its masked last block is the larger body
        for d, (bm, bn, w) in KG.CONFIGS.items():
            specs.append(dict(kernel="gluon", D=d, causal=False, ws=False, even=False, config=[bm, bn, w, 1]))
    return specs


COLUMNS = ("triton", "kernel", "D", "causal", "config", "ws", "ws_op", "partitions", "ws_regs", "regs", "spill_bytes",
           "smem", "wgmma", "hgmma", "tma_ptx", "utmaldg", "tma_reduce_ptx", "utmaredg", "red_ptx", "ldl_stl",
           "serialized", "sass_ins")


def format_rows(rows: list[dict]) -> str:
    lines = [" | ".join(COLUMNS)]
    for r in rows:
        if "error" in r:
            head = " | ".join(str(r.get(c, "")) for c in COLUMNS[:5])
            lines.append(f"{head} | ERROR {r['error']}")
        else:
            lines.append(" | ".join(str(r.get(c, "")) for c in COLUMNS))
    return "\n".join(lines)


def _assert_hopper_path(rows: list[dict], claim_ws: bool) -> None:
    for r in rows:
        name = f"{r['kernel']} D{r['D']} causal={r['causal']} {r['config']} (triton {r.get('triton')})"
        assert "error" not in r, f"{name}: {r['error']}"
        assert r["wgmma"] > 0 and r["hgmma"] > 0, f"{name}: no wgmma/HGMMA"
        assert r["tma_ptx"] > 0 and r["utmaldg"] > 0, f"{name}: no TMA loads"
        assert r["spill_bytes"] == 0 and r["ldl_stl"] == 0, f"{name}: spills ({r['spill_bytes']} bytes)"
        assert r["smem"] <= SMEM_LIMIT, f"{name}: {r['smem']} bytes of shared memory"
        assert not r["serialized"], f"{name}: ptxas serialized its wgmmas (C7514)"
        if r["kernel"] == "fwd" and r["ws"] and claim_ws:
            assert r["ws_op"] and r["partitions"] >= 1 and r["setmaxnreg"] > 0, f"{name}: not warp-specialized"
        if r["kernel"] == "bwd" and r["reduce"]:
            assert r["tma_reduce_ptx"] > 0 and r["utmaredg"] > 0, f"{name}: dQ not through the TMA reduce-add"


_compile_ok = pytest.mark.skipif(not HAS_TRITON or ON_CUDA, reason="needs Triton; on CUDA the kernels run for real")


@_compile_ok
@pytest.mark.skipif(not os.path.exists(TRITON36_PYTHON), reason=f"no Triton 3.6 side environment at {TRITON36_PYTHON}")
def test_default_configs_compile_to_the_hopper_path_with_triton_36():
    """The GPU machine's Triton: wgmma, TMA, warp specialization (non-causal forward), TMA reduce-add of dQ,
    no spills, shared memory within sm_90's limit, for every default config."""
    rows = run_rows(_AOT, default_specs(), TRITON36_PYTHON, timeout=1500)
    print("\n" + format_rows(rows))
    assert all(r.get("triton", "").startswith("3.6") for r in rows)
    _assert_hopper_path(rows, claim_ws=True)


@_compile_ok
def test_default_configs_compile_to_the_hopper_path_with_this_triton():
    """This environment's Triton: the same, except that warp specialization is claimed for 3.6 only."""
    rows = run_rows(_AOT, default_specs(), timeout=1500)
    print("\n" + format_rows(rows))
    _assert_hopper_path(rows, claim_ws=False)


if __name__ == "__main__":  # the compile report, for the issue notes
    pythons = sys.argv[1:] or [p for p in (TRITON36_PYTHON, sys.executable) if os.path.exists(p)]
    for py in pythons:
        print(format_rows(run_rows(_AOT, default_specs(every_bwd=True), py, timeout=1500)))
