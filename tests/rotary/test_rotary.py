"""embedattn.rotary against the float64 reference: forward, gradient, layouts, offsets, varlen, errors."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import BACKENDS, DEVICE, DTYPES, HAS_TRITON, ON_CUDA, ROADS, assert_fa_close, on_road, skip_if_unsupported

import embedattn
from embedattn.reference import rotary as ref_rotary

_EPS = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _tables(s_ro, half, dtype, gen):
    """cos/sin of random angles (S_ro, half), in ``dtype``."""
    angle = torch.rand(s_ro, half, generator=gen, dtype=torch.float64) * (2 * math.pi)
    return angle.cos().to(DEVICE, dtype), angle.sin().to(DEVICE, dtype)


def _run(fn, x, grad, *args, **kw):
    """Output and x-gradient of fn on a fresh leaf copy of x."""
    x = x.detach().clone().requires_grad_()
    out = fn(x, *args, **kw)
    out.backward(grad.to(out.dtype))
    return out.detach(), x.grad


def check(backend, x, cos, sin, gen, *args, road="eager", **kw):
    """Output and gradient vs the float64 reference, with FlashAttention's rule (error <= 2 x that of
    plain PyTorch in x's dtype + eps); returns the output."""
    grad = torch.randn(x.shape, generator=gen).to(DEVICE)
    fn = on_road(road, lambda x, cos, sin: embedattn.rotary(x, cos, sin, *args, backend=backend, **kw))
    out, gx = _run(fn, x, grad, cos, sin)
    o64, g64 = _run(ref_rotary, x.double(), grad, cos.double(), sin.double(), *args, **kw)
    plain = _run(ref_rotary, x, grad, cos, sin, *args, upcast=False, **kw)
    assert out.dtype == x.dtype and out.shape == x.shape
    assert_fa_close(out, o64, plain[0], "out")
    assert_fa_close(gx, g64, plain[1], "grad x")
    return out


# (B, S, H, D, rotary_dim, heads_first)
SHAPES = [(1, 1, 1, 8, 8, False), (2, 7, 3, 10, 6, True), (3, 33, 5, 40, 32, False), (1, 33, 3, 66, 2, True)]


# every shape both ways on the eager road; under torch.compile each shape once (the trace costs ~0.5 s)
GRID = [("eager", shape, il) for shape in SHAPES for il in (False, True)] + \
    [("compiled", shape, i % 2 == 1) for i, shape in enumerate(SHAPES)]
assert set(ROADS) == {"eager", "compiled"}


@pytest.mark.parametrize("road,shape,interleaved", GRID, ids=[
    f"{r}-{'x'.join(map(str, sh[:4]))}-rd{sh[4]}{'-heads_first' if sh[5] else ''}{'-interleaved' if il else ''}"
    for r, sh, il in GRID])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_backward(backend, dtype, road, shape, interleaved):
    skip_if_unsupported(backend, dtype)
    b, s, h, d, rd, heads_first = shape
    gen = torch.Generator().manual_seed(SHAPES.index(shape) * 10 + DTYPES.index(dtype) * 2 + interleaved)
    # cos/sin in float32 for some shapes and in x's dtype for the others
    cos, sin = _tables(s + 3, rd // 2, torch.float32 if SHAPES.index(shape) % 2 else dtype, gen)
    x = torch.randn((b, h, s, d) if heads_first else (b, s, h, d), generator=gen).to(DEVICE, dtype)
    out = check(backend, x, cos, sin, gen, interleaved, road=road, heads_first=heads_first, seqlen_offsets=2)
    assert torch.equal(out[..., rd:], x[..., rd:])  # the features past rotary_dim pass through


def _each_offsets_and_layout(test):
    """Parametrize over backend, dtype, int or per-sequence tensor offsets, and tokens- or heads-first x."""
    test = pytest.mark.parametrize("backend", BACKENDS)(test)
    test = pytest.mark.parametrize("dtype", DTYPES)(test)
    test = pytest.mark.parametrize("offsets", ["int", "tensor"])(test)
    return pytest.mark.parametrize("heads_first", [False, True])(test)


def _offsets_gen(base, dtype, offsets, heads_first):
    """A generator seeded apart for each case of an _each_offsets_and_layout test."""
    return torch.Generator().manual_seed(base + DTYPES.index(dtype) + 2 * heads_first + 4 * (offsets == "int"))


@_each_offsets_and_layout
def test_seqlen_offsets(backend, dtype, offsets, heads_first):
    """KV-cache decoding: each sequence starts at its own position; the last rows of the table are used."""
    skip_if_unsupported(backend, dtype)
    gen = _offsets_gen(100, dtype, offsets, heads_first)
    b, s, h, d, s_ro = 3, 5, 3, 12, 20
    cos, sin = _tables(s_ro, 4, dtype, gen)
    off = s_ro - s if offsets == "int" else torch.tensor([0, s_ro - s, 7], device=DEVICE, dtype=torch.int32)
    x = torch.randn((b, h, s, d) if heads_first else (b, s, h, d), generator=gen).to(DEVICE, dtype)
    check(backend, x, cos, sin, gen, True, seqlen_offsets=off, heads_first=heads_first)
    out = check(backend, x, cos, sin, gen, False, seqlen_offsets=off, heads_first=heads_first)
    # the same as rotating each sequence on its own with the table shifted by its offset
    for i in range(b):
        o = off if isinstance(off, int) else int(off[i])
        alone = embedattn.rotary(x[i:i + 1], cos[o:o + s], sin[o:o + s], heads_first=heads_first, backend=backend)
        torch.testing.assert_close(out[i:i + 1], alone, rtol=0, atol=0)


@pytest.mark.parametrize("heads_first", [False, True])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace(backend, dtype, interleaved, heads_first):
    """In place: x itself is returned, rotated (equal to the out-of-place result), its tail untouched;
    the gradient through it equals the out-of-place one."""
    skip_if_unsupported(backend, dtype)
    gen = torch.Generator().manual_seed(200 + DTYPES.index(dtype) + 2 * interleaved + 4 * heads_first)
    b, s, h, d, rd = 2, 7, 3, 14, 10
    cos, sin = _tables(s + 2, rd // 2, torch.float32, gen)
    x = torch.randn((b, h, s, d) if heads_first else (b, s, h, d), generator=gen).to(DEVICE, dtype)
    kw = dict(seqlen_offsets=torch.tensor([2, 0], device=DEVICE), heads_first=heads_first, backend=backend)
    expect = embedattn.rotary(x, cos, sin, interleaved, **kw)
    y = x.clone()
    ptr, version = y.data_ptr(), y._version
    got = embedattn.rotary(y, cos, sin, interleaved, True, **kw)
    assert got is y and y.data_ptr() == ptr and y._version > version
    torch.testing.assert_close(y, expect, rtol=0, atol=0)
    assert not torch.equal(y[..., :rd], x[..., :rd]) and torch.equal(y[..., rd:], x[..., rd:])
    # gradient through the in-place op (on a non-leaf), against the out-of-place gradient
    grad = torch.randn(x.shape, generator=gen).to(DEVICE, dtype)
    leaf = x.detach().clone().requires_grad_()
    embedattn.rotary(leaf * 1, cos, sin, interleaved, True, **kw).backward(grad)
    leaf2 = x.detach().clone().requires_grad_()
    embedattn.rotary(leaf2, cos, sin, interleaved, **kw).backward(grad)
    torch.testing.assert_close(leaf.grad, leaf2.grad, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous(backend):
    """x a strided slice (read through its strides), cos/sin column-strided, an expanded (stride-0)
    gradient, and an in-place rotation of a view that leaves the rest of its base alone."""
    gen = torch.Generator().manual_seed(300)
    b, s, h, d, rd = 2, 9, 3, 12, 8
    big = torch.randn(b, s + 2, h + 1, d + 4, generator=gen).to(DEVICE)
    x = big[:, 1:s + 1, 1:, 2:d + 2]
    assert not x.is_contiguous()
    tab = torch.randn(s, rd, generator=gen).to(DEVICE)
    cos, sin = tab[:, ::2].cos(), tab[:, 1::2].sin()
    cos_s = torch.stack([cos, -cos], -1)[..., 0]  # column stride 2
    sin_t = sin.t().contiguous().t()  # column-major
    assert cos_s.stride() == (rd, 2) and sin_t.stride() == (1, s) and torch.equal(cos_s, cos)
    for interleaved in (False, True):
        check(backend, x, cos_s, sin_t, gen, interleaved)
        # transposed layout: a (B, S, H, D) view of (B, H, S, D) memory, and back
        check(backend, x.transpose(1, 2).contiguous().transpose(1, 2), cos, sin, gen, interleaved)
    # expanded gradient (stride 0) from a sum
    xl = x.detach().clone().requires_grad_()
    embedattn.rotary(xl, cos, sin, backend=backend).sum().backward()
    x64 = x.detach().double().requires_grad_()
    ref_rotary(x64, cos.double(), sin.double()).sum().backward()
    torch.testing.assert_close(xl.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    # in place on the view: the base outside the view is untouched
    base = big.clone()
    view = base[:, 1:s + 1, 1:, 2:d + 2]
    expect = embedattn.rotary(view, cos, sin, backend=backend)
    embedattn.rotary(view, cos, sin, inplace=True, backend=backend)
    torch.testing.assert_close(view, expect, rtol=0, atol=0)
    outside = torch.ones_like(base, dtype=torch.bool)
    outside[:, 1:s + 1, 1:, 2:d + 2] = False
    assert torch.equal(base[outside], big[outside])


@_each_offsets_and_layout
def test_varlen(backend, dtype, offsets, heads_first):
    """Packed sequences (lengths 3, 0, 7, 1): matches the reference and per-sequence dense calls."""
    skip_if_unsupported(backend, dtype)
    gen = _offsets_gen(400, dtype, offsets, heads_first)
    lens, h, d, rd, s_ro = [3, 0, 7, 1], 3, 10, 8, 16
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    total, max_len = sum(lens), max(lens) + 1  # max_seqlen need only bound the lengths
    off = 5 if offsets == "int" else torch.tensor([8, 0, 2, 15], device=DEVICE)
    cos, sin = _tables(s_ro, rd // 2, torch.float32, gen)
    x = torch.randn((h, total, d) if heads_first else (total, h, d), generator=gen).to(DEVICE, dtype)
    kw = dict(seqlen_offsets=off, cu_seqlens=cu, max_seqlen=max_len, heads_first=heads_first)
    interleaved = offsets == "int"  # the other mode: checked against the reference only
    check(backend, x, cos, sin, gen, not interleaved, **kw)
    out = check(backend, x, cos, sin, gen, interleaved, **kw)
    seq_dim = 1 if heads_first else 0
    for i, n in enumerate(lens):
        o = off if isinstance(off, int) else int(off[i])
        xi = x.narrow(seq_dim, int(cu[i]), n).unsqueeze(0)
        alone = embedattn.rotary(xi, cos, sin, interleaved, seqlen_offsets=o, heads_first=heads_first, backend=backend)
        torch.testing.assert_close(out.narrow(seq_dim, int(cu[i]), n).unsqueeze(0), alone, rtol=0, atol=0)


def test_reference_is_a_complex_rotation():
    """The reference against an independent formula: pair (a, b) as a + ib times e^(i angle)."""
    gen = torch.Generator().manual_seed(500)
    b, s, h, d, rd = 2, 6, 3, 11, 8
    angle = torch.rand(s + 4, rd // 2, generator=gen, dtype=torch.float64) * 10
    x = torch.randn(b, s, h, d, generator=gen, dtype=torch.float64)
    off = torch.tensor([4, 1])
    rot = torch.polar(torch.ones(b, s, 1, rd // 2, dtype=torch.float64),
                      torch.stack([angle[int(o):int(o) + s] for o in off])[:, :, None, :])
    for interleaved in (False, True):
        pairs = x[..., :rd].unflatten(-1, (rd // 2, 2)) if interleaved else \
            x[..., :rd].unflatten(-1, (2, rd // 2)).transpose(-1, -2)
        z = torch.view_as_real(torch.view_as_complex(pairs.contiguous()) * rot)
        z = z.flatten(-2) if interleaved else z.transpose(-1, -2).flatten(-2)
        expect = torch.cat([z, x[..., rd:]], -1)
        got = ref_rotary(x, angle.cos(), angle.sin(), interleaved, seqlen_offsets=off)
        torch.testing.assert_close(got, expect, rtol=0, atol=1e-13)
        # rotation: norms per pair kept; the conjugate rotation (sin negated) undoes it
        back = ref_rotary(got, angle.cos(), -angle.sin(), interleaved, seqlen_offsets=off)
        torch.testing.assert_close(back, x, rtol=0, atol=1e-13)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled(backend):
    """torch.compile(fullgraph=True) (aot_eager on the CPU, Inductor on CUDA): tensor offsets (their
    bounds check skipped while tracing) with the backward, and in place without and with a gradient."""
    gen = torch.Generator().manual_seed(600)
    b, s, h, d, rd = 2, 5, 3, 12, 8
    cos, sin = _tables(s + 3, rd // 2, torch.float32, gen)
    x = torch.randn(b, h, s, d, generator=gen).to(DEVICE)
    off = torch.tensor([3, 0], device=DEVICE)

    def f(x, cos, sin, off):
        return embedattn.rotary(x, cos, sin, True, seqlen_offsets=off, heads_first=True, backend=backend) * 2

    def g(x, cos, sin):
        y = x * 1
        embedattn.rotary(y, cos, sin, inplace=True, seqlen_offsets=2, heads_first=True, backend=backend)
        return y

    cf, cg = on_road("compiled", f), on_road("compiled", g)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad = torch.randn(x.shape, generator=gen).to(DEVICE)
    f(xe, cos, sin, off).backward(grad)
    out = cf(xc, cos, sin, off)
    out.backward(grad)
    torch.testing.assert_close(out, f(x, cos, sin, off), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cg(x, cos, sin), g(x, cos, sin), rtol=1e-6, atol=1e-6)
    # in place with a gradient (mark_dirty traced)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    g(xe, cos, sin).backward(grad)
    cg(xc, cos, sin).backward(grad)
    torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-6, atol=1e-6)


def test_cos_sin_gradients():
    """The reference differentiates cos/sin too; the kernels do not: auto runs the reference then, and
    backend='triton' says so."""
    gen = torch.Generator().manual_seed(700)
    x = torch.randn(1, 4, 2, 6, generator=gen).to(DEVICE)
    cos, sin = (t.requires_grad_() for t in _tables(4, 3, torch.float32, gen))
    out = embedattn.rotary(x, cos, sin, backend="auto")
    out.sum().backward()
    assert cos.grad is not None and sin.grad is not None
    if HAS_TRITON:
        with pytest.raises(ValueError, match="no gradient for cos/sin"):
            embedattn.rotary(x, cos, sin, backend="triton")
        with torch.no_grad():  # no gradient wanted: the kernels run
            torch.testing.assert_close(embedattn.rotary(x, cos, sin, backend="triton"), out.detach())


def test_float64_and_empty():
    gen = torch.Generator().manual_seed(800)
    x = torch.randn(2, 3, 2, 4, generator=gen, dtype=torch.float64).to(DEVICE)
    cos, sin = _tables(3, 2, torch.float64, gen)
    expect = ref_rotary(x, cos, sin)
    for backend in ("auto", "reference"):
        assert torch.equal(embedattn.rotary(x, cos, sin, backend=backend), expect)
    if HAS_TRITON:
        with pytest.raises(TypeError, match="float64"):
            embedattn.rotary(x, cos, sin, backend="triton")
    c32, s32 = cos.float(), sin.float()
    for backend in BACKENDS:
        for shape in [(0, 3, 2, 4), (2, 0, 2, 4), (2, 3, 0, 4)]:
            out = embedattn.rotary(torch.randn(shape, device=DEVICE), c32, s32, backend=backend)
            assert out.shape == shape
        cu = torch.tensor([0, 0], device=DEVICE)
        out = embedattn.rotary(torch.randn(0, 2, 4, device=DEVICE), c32, s32, cu_seqlens=cu, max_seqlen=0,
                               backend=backend)
        assert out.shape == (0, 2, 4)


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
def test_unchecked_positions_stay_in_bounds():
    """check_bounds=False with offsets past the table: nothing is read out of bounds; those positions
    get the identity rotation (cos 1, sin 0), the others their rotation."""
    gen = torch.Generator().manual_seed(900)
    cos, sin = _tables(6, 2, torch.float32, gen)
    x = torch.randn(2, 4, 1, 4, generator=gen).to(DEVICE)
    off = torch.tensor([0, 4], device=DEVICE)
    with pytest.raises(IndexError, match="out of range"):
        embedattn.rotary(x, cos, sin, seqlen_offsets=off, backend="triton")
    out = embedattn.rotary(x, cos, sin, seqlen_offsets=off, check_bounds=False, backend="triton")
    torch.testing.assert_close(out[0], ref_rotary(x[:1], cos, sin)[0])
    torch.testing.assert_close(out[1, :2], ref_rotary(x[1:, :2], cos, sin, seqlen_offsets=4)[0])
    assert torch.equal(out[1, 2:], x[1, 2:])


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
def test_opcheck():
    """torch.library.opcheck on both registered ops (schema, fake implementation, autograd registration)."""
    gen = torch.Generator().manual_seed(1000)
    cos, sin = _tables(6, 2, torch.float32, gen)
    x = torch.randn(2, 3, 2, 6, generator=gen).to(DEVICE)
    off = torch.tensor([1, 0], device=DEVICE)
    tests = ("test_schema", "test_faketensor")
    for ok in (torch.empty(0, dtype=torch.int32), torch.ones(1, dtype=torch.int32)):  # unchecked, checked
        args = (x, cos, sin, off, None, 0, 0, True, False, False, ok.to(DEVICE))
        torch.library.opcheck(torch.ops.embedattn.rotary_fwd.default, args, test_utils=tests)
        torch.library.opcheck(torch.ops.embedattn.rotary_fwd_inplace.default, (x.clone(), *args[1:]),
                              test_utils=tests)


_FAKE_CUDA_TRACE = r"""
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
import embedattn.kernels.rotary as KR

hits = []
KR.wrap_triton = lambda k, orig=KR.wrap_triton: hits.append(getattr(k, "fn", k).__name__) or orig(k)
mode = FakeTensorMode()
fc = lambda *s, dtype=torch.float16: FakeTensor(mode, torch.empty(*s, dtype=dtype, device="meta"), torch.device("cuda"))
E = torch.ops.embedattn
with mode:
    x, cos = fc(2, 37, 3, 24), fc(40, 8, dtype=torch.float32)
    off, cu = fc(2, dtype=torch.int32), fc(3, dtype=torch.int32)
    ok, no = fc(1, dtype=torch.int32), fc(0, dtype=torch.int32)
    out = E.rotary_fwd(x, cos, cos, off, None, 0, 0, True, False, False, ok)
    assert out.shape == x.shape and out.device.type == "cuda" and out.dtype == x.dtype
    E.rotary_fwd_inplace(x, cos, cos, None, None, 3, 0, False, True, False, no)
    E.rotary_fwd(fc(3, 37, 24), cos, cos, off, cu, 0, 20, False, False, True, ok)
print(",".join(hits))
"""


@pytest.mark.skipif(not HAS_TRITON or ON_CUDA, reason="CPU-side check of the CUDA path")
def test_cuda_path_traces_with_fake_tensors():
    """Without the interpreter the ops register as triton_op; on fake CUDA tensors (as torch.compile
    traces them) every launch reaches wrap_triton and nothing reads device memory. A fresh process."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", "import embedattn\n" + _FAKE_CUDA_TRACE], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1] == "_rotary_kernel,_rotary_kernel,_rotary_kernel"


# ----------------------------------------------------------------------------------------------------
# bad input: every backend (the checks run before dispatch)

_G = torch.Generator().manual_seed(1100)
X = torch.randn(2, 5, 3, 8, generator=_G)
COS, SIN = torch.rand(9, 3, generator=_G), torch.rand(9, 3, generator=_G)
CU = torch.tensor([0, 4, 10], dtype=torch.int32)

BAD = {
    "x not a tensor": (dict(x=X.tolist()), TypeError, "x must be a torch.Tensor"),
    "x int": (dict(x=X.long()), TypeError, "x must be float16"),
    "x 3-D": (dict(x=X[0]), ValueError, r"x must be 4-D \(B, S, H, D\)"),
    "x 4-D varlen": (dict(cu_seqlens=CU, max_seqlen=6), ValueError, r"x must be 3-D \(total, H, D\)"),
    "cos 1-D": (dict(cos=COS[:, 0]), ValueError, "cos must be 2-D"),
    "cos not a tensor": (dict(cos=1.0), TypeError, "cos must be a torch.Tensor"),
    "cos float16": (dict(cos=COS.half()), TypeError, "cos must be float32 or x's dtype"),
    "sin dtype": (dict(x=X.half(), sin=SIN.half()), TypeError, "sin dtype"),
    "sin shape": (dict(sin=SIN[:, :2]), ValueError, "sin must have the shape of cos"),
    "cos device": (dict(cos=COS.to("meta")), ValueError, "cos is on meta"),
    "rotary_dim > D": (dict(cos=torch.rand(9, 8), sin=torch.rand(9, 8)), ValueError, "exceeds the head dim 8"),
    "odd head dim": (dict(x=X[..., :5]), ValueError, "rotary_dim = 2 \\* cos.shape\\[1\\] = 6 exceeds the head dim 5"),
    "no rotary columns": (dict(cos=COS[:, :0], sin=SIN[:, :0]), ValueError, "rotary_dim >= 2"),
    "interleaved not bool": (dict(interleaved=1), TypeError, "interleaved must be a bool"),
    "heads_first not bool": (dict(heads_first="no"), TypeError, "heads_first must be a bool"),
    "offset float": (dict(seqlen_offsets=1.0), TypeError, "seqlen_offsets must be an int"),
    "offset float tensor": (dict(seqlen_offsets=torch.zeros(2)), TypeError, "seqlen_offsets must be an int"),
    "offset shape": (dict(seqlen_offsets=torch.zeros(3, dtype=torch.long)), ValueError, r"shape \(2,\)"),
    "offset int past cos": (dict(seqlen_offsets=5), IndexError, r"positions 5..9 .* 9 rows"),
    "offset int negative": (dict(seqlen_offsets=-1), IndexError, "positions -1..3"),
    "offset tensor past cos": (dict(seqlen_offsets=torch.tensor([0, 5])), IndexError, r"positions 0..9"),
    "offset tensor negative": (dict(seqlen_offsets=torch.tensor([-2, 0])), IndexError, r"positions -2..4"),
    "cos too short": (dict(cos=COS[:4], sin=SIN[:4]), IndexError, r"positions 0..4 .* 4 rows"),
    "inplace broadcast": (dict(x=X[:1].expand(2, -1, -1, -1), inplace=True), ValueError, "stride-0"),
    "max_seqlen alone": (dict(max_seqlen=5), ValueError, "max_seqlen goes with cu_seqlens"),
    "cu without max": (dict(x=X.flatten(0, 1), cu_seqlens=CU), ValueError, "needs max_seqlen"),
    "cu float": (dict(x=X.flatten(0, 1), cu_seqlens=CU.float(), max_seqlen=6), TypeError, "cu_seqlens must be int"),
    "cu 2-D": (dict(x=X.flatten(0, 1), cu_seqlens=CU[None], max_seqlen=6), ValueError, "cu_seqlens must be 1-D"),
    "cu start": (dict(x=X.flatten(0, 1), cu_seqlens=CU + 1, max_seqlen=6), ValueError, "start at 0"),
    "cu decreasing": (dict(x=X.flatten(0, 1), cu_seqlens=torch.tensor([0, 6, 4, 10]), max_seqlen=6), ValueError,
                      "never decrease"),
    "cu total": (dict(x=X.flatten(0, 1)[:9], cu_seqlens=CU, max_seqlen=6), ValueError, r"cu_seqlens\[-1\] = 10"),
    "max_seqlen short": (dict(x=X.flatten(0, 1), cu_seqlens=CU, max_seqlen=5), ValueError, "length 6 > max_seqlen 5"),
    "max_seqlen negative": (dict(x=X.flatten(0, 1), cu_seqlens=CU, max_seqlen=-1), ValueError, "max_seqlen must be"),
    "varlen offset past cos": (dict(x=X.flatten(0, 1), cu_seqlens=CU, max_seqlen=6, seqlen_offsets=4), IndexError,
                               r"positions 4..9"),
    "check_bounds not a mode": (dict(check_bounds=1), TypeError, "check_bounds must be None, a bool or one of"),
    "check_bounds bad mode": (dict(check_bounds="fatal"), ValueError, "check_bounds must be None, a bool or one of"),
    "cu no sequence": (dict(x=X.flatten(0, 1), cu_seqlens=CU[:1], max_seqlen=6), ValueError, "holds no sequence"),
}


@pytest.mark.parametrize("case", list(BAD))
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input(backend, case):
    kw, err, match = BAD[case]
    kw = dict(dict(x=X, cos=COS, sin=SIN), **kw)
    kw = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) and v.device.type != "meta" else v) for k, v in kw.items()}
    if isinstance(kw["x"], torch.Tensor) and kw["x"].requires_grad:  # a leaf on DEVICE
        kw["x"] = kw["x"].detach().requires_grad_()
    with pytest.raises(err, match=match):
        embedattn.rotary(backend=backend, **kw)


def test_bad_backend():
    with pytest.raises(ValueError, match="backend must be"):
        embedattn.rotary(X, COS, SIN, backend="cuda")


# ----------------------------------------------------------------------------------------------------
# bounds on every mode and road: nothing outside the output is written, no row is left unwritten, and
# both backends give the same result or the same error


def _partition(cu, total):
    """What an unchecked cu_seqlens means (the module docstring), written out: entries clamped into
    [0, total], the first 0 and the last total, then their running maximum."""
    c = [min(max(int(v), 0), total) for v in cu]
    c[0], c[-1] = 0, total
    for i in range(1, len(c)):
        c[i] = max(c[i], c[i - 1])
    return torch.tensor(c, dtype=cu.dtype, device=cu.device)


def _padded(total, h, d, gen, pad=3):
    """A (total, h, d) view into a buffer with ``pad`` NaN rows on each side (a write past x lands there)."""
    buf = torch.full((total + 2 * pad, h, d), float("nan"))
    buf[pad:pad + total] = torch.randn(total, h, d, generator=gen)
    buf = buf.to(DEVICE)
    return buf, buf[pad:pad + total]


# (cu_seqlens, max_seqlen) for 10 packed rows: a valid partition with max_seqlen too small, past the end,
# negative and decreasing entries, a first entry past 0, a last one short of the end
BAD_VARLEN = {
    "short max_seqlen": ([0, 3, 8, 10], 2),
    "max_seqlen 0": ([0, 3, 8, 10], 0),
    "past the end": ([0, 3, 8, 15], 5),
    "far past the end": ([0, 40, 80, 120], 5),
    "negative": ([0, -4, 8, 10], 8),
    "decreasing": ([0, 7, 4, 10], 6),
    "late start": ([2, 3, 8, 10], 5),
    "early end": ([0, 3, 6, 7], 5),
}


@pytest.mark.parametrize("case", list(BAD_VARLEN))
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("road", ROADS)
def test_unchecked_varlen_stays_in_bounds_and_writes_every_row(road, backend, inplace, case):
    """check_bounds=False with a bad cu_seqlens or a max_seqlen below a length: x's neighbours (NaN rows
    around it) are untouched, every output row is written (outputs are poisoned), and the result is the
    rotation over the partition the module docstring defines, on both backends, eager and compiled. The
    gradient is the conjugate rotation over the same partition."""
    cu, max_len = BAD_VARLEN[case]
    gen = torch.Generator().manual_seed(1200 + list(BAD_VARLEN).index(case))
    total, h, d = 10, 2, 6
    cos, sin = _tables(24, 2, torch.float32, gen)
    buf, x = _padded(total, h, d, gen)
    cu = torch.tensor(cu, dtype=torch.int32, device=DEVICE)
    off = torch.tensor([1, 0, 2], device=DEVICE)
    expect = ref_rotary(x.double(), cos.double(), sin.double(), seqlen_offsets=off, cu_seqlens=_partition(cu, total))
    fn = on_road(road, lambda x, cu: embedattn.rotary(x, cos, sin, False, inplace, off, cu, max_len, check_bounds=False,
                                                      backend=backend))
    outside = torch.cat([buf[:3], buf[-3:]])
    if inplace:
        out = fn(x, cu)
        assert out is x or road == "compiled"
        got = x
    else:
        xl = x.clone().requires_grad_()
        got = fn(xl, cu)
        grad = torch.randn(got.shape, generator=gen).to(DEVICE)
        got.backward(grad)
        x64 = x.double().requires_grad_()
        ref_rotary(x64, cos.double(), sin.double(), seqlen_offsets=off, cu_seqlens=_partition(cu, total)).backward(
            grad.double())
        torch.testing.assert_close(xl.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    assert torch.isnan(outside).all()  # nothing written next to x
    assert torch.isfinite(got).all()  # every row written
    torch.testing.assert_close(got.double(), expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("road", ROADS)
def test_unchecked_out_of_range_positions_are_the_identity(road, backend):
    """check_bounds=False with positions past cos/sin (tensor offsets, dense and varlen): those tokens are
    rotated by the identity and the others by their angle, the same on both backends (the reference
    once raised a raw IndexError here)."""
    gen = torch.Generator().manual_seed(1300)
    cos, sin = _tables(6, 2, torch.float32, gen)
    x = torch.randn(2, 4, 1, 4, generator=gen).to(DEVICE)
    off = torch.tensor([0, 4], device=DEVICE)
    fn = on_road(road, lambda x, off, **kw: embedattn.rotary(x, cos, sin, seqlen_offsets=off, check_bounds=False,
                                                             backend=backend, **kw))
    out = fn(x, off)
    torch.testing.assert_close(out[0], ref_rotary(x[:1], cos, sin)[0])
    torch.testing.assert_close(out[1, :2], ref_rotary(x[1:, :2], cos, sin, seqlen_offsets=4)[0])
    assert torch.equal(out[1, 2:], x[1, 2:])
    # varlen: the same two sequences packed, and a negative offset
    cu = torch.tensor([0, 4, 8], dtype=torch.int32, device=DEVICE)
    packed = fn(x.flatten(0, 1), torch.tensor([-1, 4], device=DEVICE), cu_seqlens=cu, max_seqlen=4)
    assert torch.equal(packed[0], x[0, 0])  # position -1
    torch.testing.assert_close(packed[1:4], ref_rotary(x[:1, 1:], cos, sin)[0])  # positions 0..2
    torch.testing.assert_close(packed[4:], out[1])


# calls that are bad in a way only the device values show: (x, kwargs) for 10 packed rows or a (2, 4) batch
_G2 = torch.Generator().manual_seed(1400)
_XV = torch.randn(10, 2, 6, generator=_G2)
_XD = torch.randn(2, 4, 2, 6, generator=_G2)
DEVICE_BAD = {
    "cu past the end": (_XV, dict(cu_seqlens=torch.tensor([0, 3, 8, 15]), max_seqlen=7), ValueError,
                        r"cu_seqlens\[-1\] = 15"),
    "cu decreasing": (_XV, dict(cu_seqlens=torch.tensor([0, 7, 4, 10]), max_seqlen=7), ValueError,
                      "never decrease"),
    "short max_seqlen": (_XV, dict(cu_seqlens=torch.tensor([0, 3, 8, 10]), max_seqlen=4), ValueError,
                         "length 5 > max_seqlen 4"),
    "varlen positions": (_XV, dict(cu_seqlens=torch.tensor([0, 3, 8, 10]), max_seqlen=5,
                                   seqlen_offsets=torch.tensor([0, 0, 11])), IndexError, r"positions 0..12"),
    "dense positions": (_XD, dict(seqlen_offsets=torch.tensor([0, 10])), IndexError, r"positions 0..13"),
    "negative offset": (_XD, dict(seqlen_offsets=torch.tensor([-1, 0])), IndexError, r"positions -1..3"),
}


@pytest.mark.parametrize("check_bounds", [None, "device"])
@pytest.mark.parametrize("case", list(DEVICE_BAD))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("road", ROADS)
def test_checked_bad_bounds_fail_on_every_road(road, backend, case, check_bounds):
    """The default check (and "device"): eagerly on the CPU an IndexError/ValueError naming the problem;
    under torch.compile(fullgraph=True) the same conditions checked on the device (no host read) fail the
    call with a RuntimeError, on both backends. A good call passes on the same compiled function."""
    if ON_CUDA:
        pytest.skip("a device-side assertion poisons the CUDA context")
    x, kw, err, match = DEVICE_BAD[case]
    cos, sin = _tables(12, 2, torch.float32, torch.Generator().manual_seed(1401))
    kw = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    fn = on_road(road, lambda x, **kw: embedattn.rotary(x, cos, sin, check_bounds=check_bounds, backend=backend, **kw))
    if road == "compiled":
        err, match = RuntimeError, "rotary: a position .* lies outside cos/sin, or cu_seqlens is not a partition"
    with pytest.raises(err, match=match):
        fn(x.to(DEVICE), **kw)
    good = dict(kw)
    if "cu_seqlens" in kw:
        good.update(cu_seqlens=torch.tensor([0, 3, 8, 10], device=DEVICE), max_seqlen=5)
    if "seqlen_offsets" in kw:
        good["seqlen_offsets"] = torch.zeros_like(kw["seqlen_offsets"])
    torch.testing.assert_close(fn(x.to(DEVICE), **good), ref_rotary(x.to(DEVICE), cos, sin, **good))


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
def test_kernel_flags_each_bad_bound():
    """The kernel's own check (CHECK): the flag is cleared by each bad condition alone and kept otherwise,
    and the kernel writes in bounds whatever it is given."""
    from embedattn.kernels.rotary import rotary_forward

    gen = torch.Generator().manual_seed(1500)
    cos, sin = _tables(12, 2, torch.float32, gen)
    x = torch.randn(10, 2, 6, generator=gen).to(DEVICE)
    good_cu, good_off = [0, 3, 8, 10], [0, 2, 1]
    cases = {
        "good": (good_cu, good_off, 5, 1), "max_seqlen": (good_cu, good_off, 4, 0),
        "first": ([1, 3, 8, 10], good_off, 5, 0), "last": ([0, 3, 8, 9], good_off, 5, 0),
        "past": ([0, 3, 8, 11], good_off, 8, 0), "decreasing": ([0, 8, 3, 10], good_off, 8, 0),
        "position past": (good_cu, [0, 8, 1], 5, 0), "negative position": (good_cu, [0, 0, -1], 5, 0),
        "empty sequence anywhere": ([0, 3, 3, 10], [0, 50, 0], 7, 1),
    }
    for name, (cu, off, max_len, want) in cases.items():
        ok = torch.ones(1, dtype=torch.int32, device=DEVICE)
        cu_t, off_t = torch.tensor(cu, dtype=torch.int32, device=DEVICE), torch.tensor(off, device=DEVICE)
        out = rotary_forward(x, cos, sin, off_t, cu_t, offset=0, max_seqlen=max_len, interleaved=False,
                             conjugate=False, heads_first=False, ok=ok)
        assert ok.item() == want, name
        assert torch.isfinite(out).all(), name
    ok = torch.ones(1, dtype=torch.int32, device=DEVICE)
    rotary_forward(x.view(2, 5, 2, 6), cos, sin, torch.tensor([0, 8], device=DEVICE), None, offset=0, max_seqlen=0,
                   interleaved=True, conjugate=False, heads_first=False, ok=ok)
    assert ok.item() == 0  # dense: positions 8..12 past 12 rows


@pytest.mark.parametrize("backend", BACKENDS)
def test_kvcache_rotary_same_on_both_backends(backend):
    """flash_attn_with_kvcache with rotary, causal, more queries than new keys and cos/sin exactly the
    cache's length: the queries past the table are rotated by the identity (what cos = 1, sin = 0 rows
    appended to the table give) on both backends; a length past the cache is the attention's error on
    both (the reference once raised a raw IndexError from the rotary)."""
    from embedattn.flash_attn_interface import flash_attn_with_kvcache

    gen = torch.Generator().manual_seed(1600)
    B, S, H, D, nq, nnew = 2, 8, 2, 16, 5, 2
    kc, vc = (torch.randn(B, S, H, D, generator=gen).to(DEVICE) for _ in range(2))
    q, k, v = (torch.randn(B, n, H, D, generator=gen).to(DEVICE) for n in (nq, nnew, nnew))
    cos, sin = _tables(S, 4, torch.float32, gen)
    cos_id = torch.cat([cos, torch.ones(nq, 4, device=DEVICE)])
    sin_id = torch.cat([sin, torch.zeros(nq, 4, device=DEVICE)])
    seq = torch.tensor([6, 3], dtype=torch.int32, device=DEVICE)  # batch 0: queries at 6..10, table 0..7
    kc1, vc1, kc2, vc2 = kc.clone(), vc.clone(), kc.clone(), vc.clone()
    out = flash_attn_with_kvcache(q, kc1, vc1, k, v, cos, sin, cache_seqlens=seq, causal=True, backend=backend)
    want = flash_attn_with_kvcache(q, kc2, vc2, k, v, cos_id, sin_id, cache_seqlens=seq, causal=True,
                                   backend="reference")
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kc1, kc2, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"cache_seqlens \+ Nnew must lie in \[0, 8\]"):
        flash_attn_with_kvcache(q, kc.clone(), vc.clone(), k, v, cos, sin, cache_seqlens=seq + 1, causal=True,
                                backend=backend)


# ----------------------------------------------------------------------------------------------------
# FlashAttention's flash_attn.layers.rotary names: apply_rotary_emb (in place on a leaf), the packed
# apply_rotary_emb_qkv_ / apply_rotary_emb_kv_ (written from FA's docstrings, not its tests)

from embedattn.rotary import (  # noqa: E402
    apply_rotary_emb,
    apply_rotary_emb_kv_,
    apply_rotary_emb_qkv_,
    apply_rotary_emb_torch,
)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("road", ROADS)
def test_inplace_on_a_leaf_runs_as_in_flash_attention(road, backend):
    """apply_rotary_emb(x, inplace=True) on a leaf that requires grad: x holds the rotation afterwards, the
    returned tensor equals it and x.grad is the gradient with respect to x's values before the call; an op
    that saved x for its backward fails loudly (the in-place write bumped x's version)."""
    gen = torch.Generator().manual_seed(1700)
    cos, sin = _tables(9, 3, torch.float32, gen)
    x0 = torch.randn(2, 5, 3, 8, generator=gen).to(DEVICE)
    off = torch.tensor([1, 3], device=DEVICE)
    fn = on_road(road, lambda x: apply_rotary_emb(x, cos, sin, True, True, off, backend=backend))
    x = x0.clone().requires_grad_()
    out = fn(x)
    x64 = x0.double().requires_grad_()
    want = ref_rotary(x64, cos.double(), sin.double(), True, seqlen_offsets=off)
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.detach().double(), want, rtol=1e-6, atol=1e-6)
    grad = torch.randn(x0.shape, generator=gen).to(DEVICE)
    out.backward(grad)
    want.backward(grad.double())
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-6, atol=1e-6)
    # x saved by another op before the in-place rotation: its backward refuses the changed x
    y = x0.clone().requires_grad_()
    s = y.sin()
    apply_rotary_emb(y, cos, sin, inplace=True, seqlen_offsets=off, backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        s.sum().backward()


def _qkv_want(qkv, cos, sin, cos_k, sin_k, interleaved, off, nq, grad):
    """float64 (out, d qkv) of the packed rotation, from the reference on each part."""
    x = qkv.double().requires_grad_()
    c64, s64 = cos.double(), sin.double()
    ck, sk = (c64, s64) if cos_k is None else (cos_k.double(), sin_k.double())
    rot = lambda t, c, s: ref_rotary(t, c, s, interleaved, seqlen_offsets=off)
    if x.dim() == 5:
        out = torch.stack([rot(x[:, :, 0], c64, s64), rot(x[:, :, 1], ck, sk), x[:, :, 2]], 2)
    else:
        nk = (x.shape[2] - nq) // 2
        out = torch.cat([rot(x[:, :, :nq], c64, s64), rot(x[:, :, nq:nq + nk], ck, sk), x[:, :, nq + nk:]], 2)
    out.backward(grad.double())
    return out.detach(), x.grad


QKV_GRID = [(layout, own_k, leaf, offsets) for layout in ("qkv", "gqa", "qkv_strided") for own_k in (False, True)
            for leaf in (True, False) for offsets in ("int", "tensor")]


@pytest.mark.parametrize("layout,own_k,leaf,offsets", QKV_GRID)
@pytest.mark.parametrize("backend", BACKENDS)
def test_apply_rotary_emb_qkv_(backend, layout, own_k, leaf, offsets):
    """Q and K of a packed qkv rotated in place (K with its own tables when given), V untouched; qkv is
    (B, S, 3, H, D), a strided view of one, or (B, S, Hq + 2 Hkv, D) with num_heads_q; gradients to qkv
    against the float64 reference, on a leaf (FlashAttention's case) and on a non-leaf."""
    gen = torch.Generator().manual_seed(1800 + QKV_GRID.index((layout, own_k, leaf, offsets)))
    b, s, h, d, nq = 2, 5, 2, 8, 4
    cos, sin = _tables(s + 4, 3, torch.float32, gen)
    cos_k, sin_k = _tables(s + 4, 3, torch.float32, gen) if own_k else (None, None)
    off = 2 if offsets == "int" else torch.tensor([4, 0], device=DEVICE)
    if layout == "gqa":
        base = torch.randn(b, s, nq + 2 * h, d, generator=gen).to(DEVICE)
    elif layout == "qkv":
        base = torch.randn(b, s, 3, h, d, generator=gen).to(DEVICE)
    else:  # (B, S, H, 3, D) memory viewed as (B, S, 3, H, D): Q and K not one strided view
        base = torch.randn(b, s, h, 3, d, generator=gen).to(DEVICE).transpose(2, 3)
    nq_arg = nq if layout == "gqa" else None
    grad = torch.randn(base.shape, generator=gen).to(DEVICE)
    want, dwant = _qkv_want(base, cos, sin, cos_k, sin_k, True, off, nq, grad)
    leaf_t = base.clone().requires_grad_()
    qkv = leaf_t if leaf else leaf_t * 1
    if layout == "qkv_strided":
        qkv = leaf_t.detach().transpose(2, 3).contiguous().transpose(2, 3).requires_grad_() if leaf else \
            (leaf_t.transpose(2, 3) * 1).contiguous().transpose(2, 3)
        if leaf:
            leaf_t = qkv
    out = apply_rotary_emb_qkv_(qkv, cos, sin, cos_k, sin_k, True, off, nq_arg, backend=backend)
    if not leaf:
        assert out is qkv  # in place, with the history
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(qkv.detach().double(), want, rtol=1e-6, atol=1e-6)  # rotated in place
    out.backward(grad)
    torch.testing.assert_close(leaf_t.grad.double(), dwant, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("leaf", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("road", ROADS)
def test_apply_rotary_emb_kv_(road, backend, leaf):
    gen = torch.Generator().manual_seed(1900 + leaf)
    b, s, h, d = 2, 6, 3, 10
    cos, sin = _tables(s + 2, 4, torch.float32, gen)
    off = torch.tensor([2, 1], device=DEVICE)
    base = torch.randn(b, s, 2, h, d, generator=gen).to(DEVICE)
    grad = torch.randn(base.shape, generator=gen).to(DEVICE)
    x64 = base.double().requires_grad_()
    want = torch.stack([ref_rotary(x64[:, :, 0], cos.double(), sin.double(), seqlen_offsets=off), x64[:, :, 1]], 2)
    want.backward(grad.double())
    fn = on_road(road, lambda kv: apply_rotary_emb_kv_(kv if leaf else kv * 1, cos, sin, seqlen_offsets=off,
                                                       backend=backend))
    kv = base.clone().requires_grad_()
    out = fn(kv)
    torch.testing.assert_close(out.double(), want.detach(), rtol=1e-6, atol=1e-6)
    out.backward(grad)
    torch.testing.assert_close(kv.grad.double(), x64.grad, rtol=1e-6, atol=1e-6)


def test_packed_bad_input():
    qkv5, qkv4 = torch.randn(1, 3, 3, 2, 8), torch.randn(1, 3, 8, 8)
    cos, sin = torch.rand(4, 4), torch.rand(4, 4)
    with pytest.raises(ValueError, match="needs num_heads_q"):
        apply_rotary_emb_qkv_(qkv4, cos, sin)
    with pytest.raises(ValueError, match="not num_heads_q \\+ 2 \\* num_heads_k"):
        apply_rotary_emb_qkv_(qkv4, cos, sin, num_heads_q=3)
    with pytest.raises(ValueError, match="contradicts qkv"):
        apply_rotary_emb_qkv_(qkv5, cos, sin, num_heads_q=3)
    with pytest.raises(ValueError, match="qkv must be"):
        apply_rotary_emb_qkv_(torch.randn(1, 3, 2, 2, 8), cos, sin)
    with pytest.raises(TypeError, match="num_heads_q must be an int"):
        apply_rotary_emb_qkv_(qkv4, cos, sin, num_heads_q=2.0)
    with pytest.raises(ValueError, match="kv must be"):
        apply_rotary_emb_kv_(qkv5, cos, sin)
    with pytest.raises(TypeError, match="kv must be a torch.Tensor"):
        apply_rotary_emb_kv_(None, cos, sin)


def test_apply_rotary_emb_torch():
    """FlashAttention's plain formula (tables already at the tokens' positions, (S, rd/2) or (B, S, rd/2))
    against the reference with offsets."""
    gen = torch.Generator().manual_seed(2000)
    x = torch.randn(2, 4, 3, 10, generator=gen, dtype=torch.float64)
    cos, sin = (t.double() for t in _tables(9, 3, torch.float32, gen))
    off = torch.tensor([0, 5])
    idx = off[:, None] + torch.arange(4)
    for interleaved in (False, True):
        got = apply_rotary_emb_torch(x, cos[idx], sin[idx], interleaved)
        torch.testing.assert_close(got, ref_rotary(x, cos, sin, interleaved, seqlen_offsets=off), rtol=0, atol=1e-14)
        torch.testing.assert_close(apply_rotary_emb_torch(x, cos[:4], sin[:4], interleaved),
                                   ref_rotary(x, cos, sin, interleaved), rtol=0, atol=1e-14)


_AOT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from embedattn.kernels import rotary as KR

fn = KR._rotary_kernel
for varlen, check, offsets in ((True, True, True), (True, False, False), (False, True, True), (False, False, False)):
    sig = {a: "i32" for a in fn.arg_names}
    sig.update(x_ptr="*bf16", cos_ptr="*fp32", sin_ptr="*fp32", out_ptr="*bf16", offsets_ptr="*i64",
               cu_ptr="*i32", ok_ptr="*i32")
    consts = dict(INTERLEAVED=False, CONJUGATE=False, OFFSETS_TENSOR=offsets, VARLEN=varlen, CHECK=check,
                  BLOCK_M=16, BLOCK_K=64)
    sig.update({c: "constexpr" for c in consts})
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(c),): v for c, v in consts.items()})
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]
    print(varlen, check, "st.global" in ptx)
"""


@pytest.mark.skipif(not HAS_TRITON or ON_CUDA, reason="needs Triton; on CUDA the kernel tests run it")
def test_kernel_compiles_for_sm90():
    """What the interpreter cannot show: the kernel (varlen clamp, grid-stride loop, the in-kernel check)
    compiles for an H100/H200 (ptxas runs here, no GPU needed)."""
    from helpers import compile_sm90_in_subprocess

    out = compile_sm90_in_subprocess(_AOT).strip().splitlines()
    assert out == ["True True True", "True False True", "False True True", "False False True"], out
