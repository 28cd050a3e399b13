"""embedattn.embedding / FusedEmbedding against the float64 reference: forward, both gradients, errors."""

from __future__ import annotations

import pytest
import torch
from helpers import BACKENDS, DEVICE, DTYPES, HAS_TRITON, ON_CUDA, ROADS, assert_fa_close, on_road, skip_if_unsupported
from helpers import compile_sm90_in_subprocess as compile_sm90
from torch import nn

import embedattn
from embedattn.reference._embedding import embedding as ref_embedding
from embedattn.reference._embedding import sinusoidal_positions

MODES = ["learned", "sinusoidal", "none"]
_EPS = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _tables(v, p, d, dtype, mode, gen):
    w = torch.randn(v, d, generator=gen).to(DEVICE, dtype)
    pw = torch.randn(p, d, generator=gen).to(DEVICE, dtype) if mode == "learned" else None
    return w, pw


def _run(fn, w, pw, ids, grad, **kw):
    """Output and gradients of fn with fresh leaves (w, pw in their own dtype)."""
    w = w.detach().clone().requires_grad_()
    pw = None if pw is None else pw.detach().clone().requires_grad_()
    out = fn(ids, w, pw, **kw)
    out.backward(grad.to(out.dtype))
    return out.detach(), w.grad, None if pw is None else pw.grad


def check(backend, dtype, ids, w, pw, gen, road="eager", **kw):
    """Compare kernel/backend output and gradients with the float64 reference (FlashAttention rule:
    error <= 2 x plain PyTorch error in the same dtype + eps; eps scaled by the gradient's magnitude,
    since a row summed over thousands of tokens carries that many roundings)."""
    d = w.shape[1]
    grad = torch.randn(*ids.shape, d, generator=gen).to(DEVICE)
    fn = on_road(road, lambda ids, w, pw: embedattn.embedding(ids, w, pw, backend=backend, **kw))
    out, gw, gp = _run(lambda ids, w, pw: fn(ids, w, pw), w, pw, ids, grad)
    o64, gw64, gp64 = _run(ref_embedding, w.double(), None if pw is None else pw.double(), ids, grad, **kw)
    plain = _run(lambda *a, **k: ref_embedding(*a, upcast=False, **k), w, pw, ids, grad, **kw)
    assert out.dtype == dtype and out.shape == (*ids.shape, d)
    assert_fa_close(out, o64, plain[0], "out")
    eps = _EPS[dtype]
    assert_fa_close(gw, gw64, plain[1], "grad weight", eps=eps * max(1.0, gw64.abs().max().item()))
    if pw is not None:
        assert_fa_close(gp, gp64, plain[2], "grad pos_weight", eps=eps * max(1.0, gp64.abs().max().item()))
    return out, gw, gp


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("d", [7, 8, 100, 128, 1024])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("road", ROADS)
def test_forward_backward(road, backend, dtype, d, mode):
    skip_if_unsupported(backend, dtype)
    gen = torch.Generator().manual_seed(1000 * d + 7 * MODES.index(mode) + DTYPES.index(dtype))
    v, p, b, n = 37, 25, 2, 13 if d >= 1024 else 21
    w, pw = _tables(v, p, d, dtype, mode, gen)
    ids = torch.randint(0, v, (b, n), generator=gen).to(DEVICE)
    check(backend, dtype, ids, w, pw, gen, road=road, sinusoidal=mode == "sinusoidal")


@pytest.mark.parametrize("pos", ["offset", "explicit"])
@pytest.mark.parametrize("padding_idx", [None, 3, -1])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("d", [7, 100])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_offsets_positions(backend, dtype, d, mode, padding_idx, pos):
    skip_if_unsupported(backend, dtype)
    if mode == "none" and pos == "explicit":
        pytest.skip("explicit positions need a position table or sinusoids (test_positions_without_a_table)")
    gen = torch.Generator().manual_seed(d + 31 * MODES.index(mode) + 3 * (padding_idx or 0) + len(pos))
    v, p, b, n = 29, 40, 3, 11
    w, pw = _tables(v, p, d, dtype, mode, gen)
    ids = torch.randint(0, v, (b, n), generator=gen)
    if padding_idx is not None:
        ids[:, :4] = padding_idx % v  # left padding: the padding row is used, and gets no gradient
    ids = ids.to(DEVICE)
    kw = dict(sinusoidal=mode == "sinusoidal", padding_idx=padding_idx, scale=1.7)
    if pos == "offset":
        kw["position_offset"] = p - n  # the last rows of the table
    else:  # transformers-style position_ids for a left-padded batch, repeated and out of order
        kw["positions"] = torch.randint(0, p, (b, n), generator=gen).to(DEVICE)
    out, gw, gp = check(backend, dtype, ids, w, pw, gen, **kw)
    if padding_idx is not None:
        assert torch.all(gw[padding_idx] == 0)  # (and its lookup was checked with the rest of out)


@pytest.mark.parametrize("pos", ["default", "explicit"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_heavy_repetition(backend, dtype, pos):
    """A few ids thousands of times (where atomics collide and sorted runs are long)."""
    skip_if_unsupported(backend, dtype)
    gen = torch.Generator().manual_seed(5 + DTYPES.index(dtype))
    v, d, b, n = 64, 8, 2, 1000
    w, pw = _tables(v, n, d, dtype, "learned", gen)
    ids = torch.randint(0, v, (b, n), generator=gen)
    ids[torch.rand(b, n, generator=gen) < 0.9] = 5  # ~1800 times
    ids[:, ::7] = 9
    kw = {}
    if pos == "explicit":
        kw["positions"] = torch.randint(0, 4, (b, n), generator=gen).to(DEVICE)
    check(backend, dtype, ids.to(DEVICE), w, pw, gen, scale=0.5, padding_idx=9, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs_and_id_dtypes(backend):
    """Row-strided and transposed tables, non-contiguous ids, int32/int16 ids, 1-D/3-D ids."""
    gen = torch.Generator().manual_seed(11)
    v, p, d = 30, 20, 19
    big = torch.randn(v, d + 5, generator=gen).to(DEVICE)
    pbig = torch.randn(p, d + 3, generator=gen).to(DEVICE)
    w, pw = big[:, :d], pbig[:, 3:]
    ids = torch.randint(0, v, (9, 2), generator=gen).to(DEVICE).t()  # (2, 9), not contiguous
    check(backend, torch.float32, ids, w, pw, gen)
    check(backend, torch.float32, ids.to(torch.int32), w, pw, gen, position_offset=3)
    check(backend, torch.float32, ids.to(torch.int16)[0], w, pw, gen)
    check(backend, torch.float32, ids.reshape(3, 2, 3), w, None, gen, sinusoidal=True)
    wt = torch.randn(d, v, generator=gen).to(DEVICE).t()  # feature stride != 1 (a transposed table)
    check(backend, torch.float32, ids, wt, pw, gen, scale=2.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sinusoidal_large_positions(backend):
    gen = torch.Generator().manual_seed(12)
    w, _ = _tables(5, 1, 64, torch.float32, "none", gen)
    ids = torch.randint(0, 5, (2, 16), generator=gen).to(DEVICE)
    positions = torch.randint(0, 60000, (2, 16), generator=gen).to(DEVICE)
    out, _, _ = check(backend, torch.float32, ids, w, None, gen, sinusoidal=True, positions=positions)
    if backend == "triton":  # float64 angle and range reduction: only the float32 roundings remain
        exact = ref_embedding(ids, w.double(), sinusoidal=True, positions=positions)
        assert (out.double() - exact).abs().max().item() < 1e-6


def test_sinusoidal_reference_formula():
    pe = sinusoidal_positions(torch.arange(50), 7, torch.float64)
    p = torch.arange(50, dtype=torch.float64)[:, None]
    i = torch.arange(7, dtype=torch.float64)
    angle = p / 10000 ** ((i - i % 2) / 7)
    expect = torch.where(i % 2 == 0, torch.sin(angle), torch.cos(angle))
    torch.testing.assert_close(pe, expect, rtol=0, atol=1e-12)
    assert pe[0, 0] == 0 and pe[0, 1] == 1 and pe.shape == (50, 7)


def test_empty_ids():
    w = torch.randn(5, 8, device=DEVICE, requires_grad=True)
    pw = torch.randn(4, 8, device=DEVICE, requires_grad=True)
    for backend in BACKENDS:
        out = embedattn.embedding(torch.zeros(2, 0, dtype=torch.long, device=DEVICE), w, pw, backend=backend)
        assert out.shape == (2, 0, 8)
        out.sum().backward()
        assert torch.all(w.grad == 0) and torch.all(pw.grad == 0)
        w.grad = pw.grad = None


# ----------------------------------------------------------------------------------------------------
# backward modes


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
@pytest.mark.parametrize("mode", ["atomic", "sorted", "sorted-all-slots"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_scatter_modes(dtype, mode):
    """Both scatter launchers, in every dtype (the API picks one per dtype; this covers the other)."""
    skip_if_unsupported("triton", dtype)
    from embedattn.kernels.embedding import scatter_grad

    gen = torch.Generator().manual_seed(21)
    t, d, v = (5000, 300, 50) if ON_CUDA else (120, 300, 50)
    grad = torch.randn(t, d, generator=gen).to(DEVICE, dtype)
    ids = torch.randint(0, v, (t,), generator=gen)
    ids[::2] = 1
    ids = ids.to(DEVICE)
    got = scatter_grad(grad, ids, v + 3, scale=2.0, padding_idx=4, deterministic=mode != "atomic",
                       heads_only=mode == "sorted")
    expect = torch.zeros(v + 3, d, dtype=torch.float64, device=DEVICE).index_add_(0, ids, grad.double() * 2.0)
    expect[4] = 0
    plain = torch.zeros(v + 3, d, dtype=dtype, device=DEVICE).index_add_(0, ids, grad * 2.0)
    plain[4] = 0
    assert got.dtype == dtype
    assert_fa_close(got, expect, plain, "scatter", eps=_EPS[dtype] * expect.abs().max().item())


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
@pytest.mark.parametrize("dtype", DTYPES)
def test_deterministic_bitwise(dtype):
    """With torch.use_deterministic_algorithms(True) two backward passes are bit-identical."""
    skip_if_unsupported("triton", dtype)
    gen = torch.Generator().manual_seed(31)
    # on CUDA: large enough for many colliding atomics/programs; the interpreter is sequential anyway
    v, d, b, n = (16, 1000, 8, 2048) if ON_CUDA else (16, 40, 3, 100)
    w, pw = _tables(v, n, d, dtype, "learned", gen)
    ids = torch.randint(0, v, (b, n), generator=gen).to(DEVICE)
    positions = torch.randint(0, 8, (b, n), generator=gen).to(DEVICE)
    grad = torch.randn(b, n, d, generator=gen).to(DEVICE)
    fn = lambda *a, **k: embedattn.embedding(*a, backend="triton", **k)
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [_run(fn, w, pw, ids, grad, scale=3.0, padding_idx=2) for _ in range(2)]
        runs_pos = [_run(fn, w, pw, ids, grad, positions=positions) for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(old)
    for r in (runs, runs_pos):
        assert all(torch.equal(x, y) for x, y in zip(r[0], r[1]))
    assert torch.all(runs[0][1][2] == 0)


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
def test_sorted_scatter_bits_do_not_depend_on_the_config(monkeypatch):
    """The deterministic scatter gives the same bits whatever launch config runs it, so an autotuned
    choice (timing-dependent, per process) cannot change a deterministic backward from run to run.
    (It summed (BLOCK_T, BLOCK_D) tiles with tl.sum, whose grouping followed the config.)"""
    from embedattn.kernels import embedding as K

    gen = torch.Generator().manual_seed(51)
    t, d, v = (20000, 300, 7) if ON_CUDA else (300, 40, 3)  # long runs: many row steps per run
    grad = torch.randn(t, d, generator=gen).to(DEVICE)
    ids = torch.randint(0, v, (t,), generator=gen).to(DEVICE)
    from embedattn import configs

    # every config of the autotune space on CUDA; a spread of feature blocks under the interpreter
    cands = [configs.as_dict(c) for c in K.SORTED_CONFIGS] if ON_CUDA else \
        [dict(BLOCK_D=bd, num_warps=4) for bd in (8, 16, 32, 64)]
    outs = []
    for cfg in cands:  # forced through the launcher's tuned-config path, as a table entry would run
        with configs.tuning("embedding.bwd_sorted", cfg):
            outs.append(K.scatter_grad(grad, ids, v, deterministic=True))
        assert configs.last("embedding.bwd_sorted")[1] == cfg
    assert all(torch.equal(outs[0], o) for o in outs[1:])


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
@pytest.mark.parametrize("det", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_mode_selection(monkeypatch, dtype, det):
    """Sorted segments in deterministic mode, whatever the dtype; float32 atomics otherwise here (small
    tables: the float32 buffer of a half table is cheap). Both scatters of a call (token table, explicit
    positions) take the same road."""
    skip_if_unsupported("triton", dtype)
    from embedattn.kernels import embedding as K

    seen, real = [], K.scatter_mode
    monkeypatch.setattr(K, "scatter_mode", lambda *a: seen.append(real(*a)) or seen[-1])
    w = torch.randn(9, 5, device=DEVICE, dtype=dtype, requires_grad=True)
    pw = torch.randn(6, 5, device=DEVICE, dtype=dtype, requires_grad=True)
    ids = torch.randint(0, 9, (2, 6), device=DEVICE)
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(det)
    try:
        embedattn.embedding(ids, w, pw, positions=ids % 6, backend="triton").sum().backward()
    finally:
        torch.use_deterministic_algorithms(old)
    assert seen == ["sorted" if det else "atomic"] * 2


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
def test_scatter_mode_policy():
    """float32 atomics for half tables only where the float32 (V, D) buffer is small: at most 16 MiB, or no
    more rows than tokens; deterministic mode is always the sorted road."""
    from embedattn.kernels.embedding import scatter_mode

    for dt in (torch.float16, torch.bfloat16):
        assert scatter_mode(4096, 128, 64, dt, False) == "atomic"  # 1 MiB buffer
        assert scatter_mode(32768, 2048, 768, dt, False) == "sorted"  # 96 MiB buffer, 16 rows per token
        assert scatter_mode(32768, 32768, 768, dt, False) == "atomic"  # as many tokens as rows
        assert scatter_mode(32768, 131072, 4096, dt, True) == "sorted"
    assert scatter_mode(131072, 16, 4096, torch.float32, False) == "atomic"  # the buffer is the result
    assert scatter_mode(10, 10, 8, torch.float32, True) == "sorted"


def test_float64_runs_the_reference():
    """float64 tables: auto and reference run the reference; a pinned triton backend raises (as every op)."""
    w = torch.randn(9, 5, device=DEVICE, dtype=torch.float64)
    ids = torch.randint(0, 9, (2, 6), device=DEVICE)
    for backend in ("auto", "reference"):
        out = embedattn.embedding(ids, w, sinusoidal=True, backend=backend)
        assert torch.equal(out, ref_embedding(ids, w, sinusoidal=True))
    if HAS_TRITON:
        with pytest.raises(TypeError, match="embedding kernels take dtype float16, bfloat16, float32, got float64"):
            embedattn.embedding(ids, w, sinusoidal=True, backend="triton")


def _allocated_bytes(fn) -> int:
    """Bytes allocated while fn runs: the CUDA peak above the start, or the profiler's CPU total."""
    if ON_CUDA:
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(max(0, e.self_cpu_memory_usage) for e in prof.key_averages())


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
@pytest.mark.parametrize("det", [False, True])
@pytest.mark.parametrize("pos", ["default", "explicit"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_buffer_sizes(dtype, pos, det):
    """Forward allocates its output only (no B x N x D intermediate); backward the two gradients plus
    O(T) index buffers in the sorted (deterministic) mode, and the float32 buffer plus its cast for half
    tables in the atomic mode (measured, not assumed)."""
    skip_if_unsupported("triton", dtype)
    v, d, b, n, p = 4096, 64, 2, 64, 128
    w = torch.randn(v, d, device=DEVICE, dtype=dtype, requires_grad=True)
    pw = torch.randn(p, d, device=DEVICE, dtype=dtype, requires_grad=True)
    ids = torch.randint(0, v, (b, n), device=DEVICE)
    positions = torch.randint(0, p, (b, n), device=DEVICE) if pos == "explicit" else None
    res = {}
    fwd = _allocated_bytes(lambda: res.setdefault("out", embedattn.embedding(ids, w, pw, positions=positions,
                                                                             backend="triton")))
    g = torch.randn_like(res["out"])
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(det)
    try:
        bwd = _allocated_bytes(lambda: res["out"].backward(g))
    finally:
        torch.use_deterministic_algorithms(old)
    e, t = w.element_size(), b * n
    slack = 8192  # allocator rounding, min/max scalars, the bounds flag
    assert fwd <= t * d * e + slack, fwd
    # per table element: the result, plus a float32 buffer for half tables in the atomic mode
    per = e if det or e == 4 else 4 + e
    rows = v + p if pos == "explicit" else v
    expect = rows * d * per + (v + p - rows) * d * e + (2 * 4 * t * 8 if det else 0)
    assert bwd <= expect + slack, (bwd, expect)


# ----------------------------------------------------------------------------------------------------
# module


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_matches_embedding_pair(backend):
    torch.manual_seed(41)
    wte, wpe = nn.Embedding(23, 12, padding_idx=0).to(DEVICE), nn.Embedding(16, 12).to(DEVICE)
    m = embedattn.FusedEmbedding(23, 12, 16, padding_idx=0, device=DEVICE)
    m.load_state_dict({"weight": wte.weight.detach(), "pos_weight": wpe.weight.detach()})
    m.backend = backend
    ids = torch.randint(0, 23, (3, 10), device=DEVICE)
    out = m(ids, position_offset=4)
    expect = wte(ids) + wpe(torch.arange(4, 14, device=DEVICE))
    torch.testing.assert_close(out, expect)
    out.square().sum().backward()
    expect.square().sum().backward()
    torch.testing.assert_close(m.weight.grad, wte.weight.grad)
    torch.testing.assert_close(m.pos_weight.grad, wpe.weight.grad)


def test_module_state_dict_round_trip():
    torch.manual_seed(42)
    for positional in ["learned", "sinusoidal", "none"]:
        a = embedattn.FusedEmbedding(17, 9, 12 if positional == "learned" else None, positional=positional,
                                     padding_idx=-2, scale=2.0, device=DEVICE)
        keys = {"weight", "pos_weight"} if positional == "learned" else {"weight"}
        assert set(a.state_dict()) == keys
        assert torch.all(a.weight[15] == 0) and a.padding_idx == 15
        b = embedattn.FusedEmbedding(17, 9, 12 if positional == "learned" else None, positional=positional,
                                     padding_idx=-2, scale=2.0, device=DEVICE)
        b.load_state_dict(a.state_dict())
        ids = torch.randint(0, 17, (2, 5), device=DEVICE)
        assert torch.equal(a(ids), b(ids))
        assert positional in repr(a)
    c = embedattn.FusedEmbedding.from_pretrained(a.weight.detach(), scale=2.0, freeze=True)
    assert not c.weight.requires_grad and c.pos_weight is None
    torch.testing.assert_close(c(ids), a(ids))
    d = embedattn.FusedEmbedding.from_pretrained(torch.randn(5, 4), torch.randn(7, 4))
    assert d.positional == "learned" and d.weight.requires_grad and d.pos_weight.shape == (7, 4)


def test_module_errors():
    with pytest.raises(ValueError, match="max_positions"):
        embedattn.FusedEmbedding(10, 4)
    with pytest.raises(ValueError, match="positional"):
        embedattn.FusedEmbedding(10, 4, 8, positional="rotary")
    with pytest.raises(ValueError, match="padding_idx"):
        embedattn.FusedEmbedding(10, 4, 8, padding_idx=10)
    with pytest.raises(ValueError, match="pos_weight"):
        embedattn.FusedEmbedding.from_pretrained(torch.randn(5, 4), positional="learned")
    with pytest.raises(IndexError, match="position table"):
        embedattn.FusedEmbedding(10, 4, 8)(torch.zeros(1, 9, dtype=torch.long))


# ----------------------------------------------------------------------------------------------------
# bad input: one test each, on every backend (the checks run before dispatch)

W = torch.randn(10, 4)
PW = torch.randn(6, 4)
IDS = torch.randint(0, 10, (2, 5))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [-1, 10])
def test_ids_out_of_range(backend, bad):
    ids = IDS.clone()
    ids[1, 3] = bad
    with pytest.raises(IndexError, match=f"ids contains id {bad}, out of range"):  # the strict mode, any device
        embedattn.embedding(ids.to(DEVICE), W.to(DEVICE), check_bounds="sync", backend=backend)


@pytest.mark.parametrize("pos_dtype", [torch.int32, torch.int64])
def test_bounds_check_ids_and_positions_together(pos_dtype):
    """ids and explicit positions are checked with one host read (one buffer, or a promoting stack for
    mixed id dtypes); each bad tensor is still reported by name, ids first."""
    ids, pos = IDS.to(torch.int32), torch.zeros_like(IDS, dtype=pos_dtype)
    for backend in BACKENDS:
        torch.testing.assert_close(embedattn.embedding(ids, W, PW, positions=pos, backend=backend),
                                   ref_embedding(ids, W, PW, positions=pos))
        bad_pos = pos.clone()
        bad_pos[1, 2] = 6
        with pytest.raises(IndexError, match="positions contains id 6"):
            embedattn.embedding(ids, W, PW, positions=bad_pos, backend=backend)
        bad_ids = ids.clone()
        bad_ids[0, 0] = -3
        with pytest.raises(IndexError, match="ids contains id -3"):
            embedattn.embedding(bad_ids, W, PW, positions=bad_pos, backend=backend)


def test_check_bounds_false_skips_the_check():
    # valid ids: same result without the min/max check (invalid ones would read out of bounds)
    for backend in BACKENDS:
        ids, w, pw = IDS.to(DEVICE), W.to(DEVICE), PW.to(DEVICE)
        a = embedattn.embedding(ids, w, pw, check_bounds=False, backend=backend)
        torch.testing.assert_close(a, ref_embedding(ids, w, pw))


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_positions_beyond_table(backend):
    with pytest.raises(IndexError, match="position table"):
        embedattn.embedding(IDS, W, PW, position_offset=2, backend=backend)  # 2..6, table has 6 rows
    with pytest.raises(IndexError, match="position table"):  # host arithmetic: checked even then
        embedattn.embedding(IDS, W, PW, position_offset=2, check_bounds=False, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [-1, 6])
def test_explicit_positions_beyond_table(backend, bad):
    pos = torch.zeros_like(IDS)
    pos[0, 1] = bad
    with pytest.raises(IndexError, match=f"positions contains id {bad}, out of range for the position table"):
        embedattn.embedding(IDS, W, PW, positions=pos, backend=backend)


def test_positions_without_a_table():
    """Explicit positions with nothing to read at them are an error, not silently ignored."""
    with pytest.raises(ValueError, match="positions were given but there is nothing to read"):
        embedattn.embedding(IDS, W, positions=torch.zeros_like(IDS))


def test_non_integer_ids():
    with pytest.raises(TypeError, match="ids must have an integer dtype"):
        embedattn.embedding(IDS.float(), W)
    with pytest.raises(TypeError, match="ids must have an integer dtype"):
        embedattn.embedding(IDS.bool(), W)
    with pytest.raises(TypeError, match="ids must be a torch.Tensor"):
        embedattn.embedding([1, 2], W)


def test_scalar_ids():
    with pytest.raises(ValueError, match="at least one dimension"):
        embedattn.embedding(torch.tensor(3), W)


def test_weight_not_2d():
    with pytest.raises(ValueError, match="weight must be 2-D"):
        embedattn.embedding(IDS, W.reshape(10, 2, 2))


def test_weight_not_float():
    with pytest.raises(TypeError, match="weight must be floating point"):
        embedattn.embedding(IDS, W.long())


def test_pos_weight_dim_mismatch():
    with pytest.raises(ValueError, match="pos_weight must be 2-D"):
        embedattn.embedding(IDS, W, torch.randn(6, 5))


def test_pos_weight_dtype_mismatch():
    with pytest.raises(TypeError, match="pos_weight dtype"):
        embedattn.embedding(IDS, W, PW.double())


def test_device_mismatch():
    with pytest.raises(ValueError, match="ids is on meta"):
        embedattn.embedding(IDS.to("meta"), W)
    with pytest.raises(ValueError, match="pos_weight is on meta"):
        embedattn.embedding(IDS, W, PW.to("meta"))
    with pytest.raises(ValueError, match="positions is on meta"):
        embedattn.embedding(IDS, W, PW, positions=torch.zeros_like(IDS, device="meta"))


def test_positions_shape_and_dtype():
    with pytest.raises(ValueError, match="shape of ids"):
        embedattn.embedding(IDS, W, PW, positions=torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="positions must have an integer dtype"):
        embedattn.embedding(IDS, W, PW, positions=torch.zeros(2, 5))


def test_conflicting_position_arguments():
    with pytest.raises(ValueError, match="not both"):
        embedattn.embedding(IDS, W, PW, sinusoidal=True)
    with pytest.raises(ValueError, match="position_offset applies"):
        embedattn.embedding(IDS, W, PW, positions=torch.zeros_like(IDS), position_offset=1)
    with pytest.raises(ValueError, match="position_offset must be >= 0"):
        embedattn.embedding(IDS, W, PW, position_offset=-1)
    with pytest.raises(TypeError, match="position_offset must be an int"):
        embedattn.embedding(IDS, W, PW, position_offset=1.5)


def test_bad_padding_idx_scale_backend():
    with pytest.raises(ValueError, match="padding_idx must be in"):
        embedattn.embedding(IDS, W, padding_idx=-11)
    with pytest.raises(TypeError, match="scale"):
        embedattn.embedding(IDS, W, scale=float("nan"))
    with pytest.raises(ValueError, match="backend"):
        embedattn.embedding(IDS, W, backend="cuda")


# ----------------------------------------------------------------------------------------------------
# bounds checks: check_bounds="sync" | "device" | False/"off" (None: device on CUDA / compiling, else sync)


def _poisoned_table(v, d, pad=8):
    """A (v, d) table that is a view into a larger buffer whose rows before and after it are NaN: a read
    of row -pad..-1 or v..v+pad-1 (an out-of-bounds address for the table) shows up as NaN."""
    gen = torch.Generator().manual_seed(v + d)
    buf = torch.full((v + 2 * pad, d), float("nan"))
    buf[pad:pad + v] = torch.randn(v, d, generator=gen)
    return buf.to(DEVICE)[pad:pad + v]


def _bad_ids(v, b=3, n=7):
    ids = torch.randint(0, v, (b, n), generator=torch.Generator().manual_seed(v))
    ids[0, 1], ids[1, 4], ids[2, 6] = -1, v, v + 5  # also -8: the first poisoned row
    ids[2, 0] = -8
    return ids.to(DEVICE)


# on CUDA None and "device" assert on the device (test_cuda_bad_id_fails_at_the_next_synchronization)
CHECKING = [True, "sync"] + ([] if ON_CUDA else [None, "device"])


@pytest.mark.parametrize("check_bounds", CHECKING)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_id_raises_naming_it(backend, check_bounds):
    """Every checking mode raises on the CPU in eager mode: "device" is "sync" there (the check is free),
    an IndexError naming the tensor and its most negative (or largest) id."""
    w = _poisoned_table(10, 6)
    with pytest.raises(IndexError, match=r"ids contains id -8, out of range for the token table with 10 rows"):
        embedattn.embedding(_bad_ids(10), w, check_bounds=check_bounds, backend=backend)


@pytest.mark.parametrize("pos", ["default", "explicit"])
@pytest.mark.parametrize("check_bounds", [False, "off"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("road", ROADS)
def test_unchecked_bad_id_reads_row_zero(road, backend, check_bounds, pos):
    """With the check off a bad id (or position) reads row 0, never the NaN rows around the table; good ids
    are exact; the gradient of a bad id (or position) is dropped: every row, row 0 included, gets exactly
    the good lookups' gradient. One behaviour on both backends, eager and compiled."""
    v, p, d = 10, 9, 6
    w = _poisoned_table(v, d).requires_grad_()
    pw = _poisoned_table(p, d).requires_grad_()
    ids = _bad_ids(v)
    kw = {}
    if pos == "explicit":
        positions = torch.arange(7, device=DEVICE).expand(3, 7).clone()
        positions[1, 2], positions[2, 5] = -3, p + 1
        kw["positions"] = positions
    fn = on_road(road, lambda ids, w, pw, **kw: embedattn.embedding(ids, w, pw, check_bounds=check_bounds,
                                                                     backend=backend, **kw))
    out = fn(ids, w, pw, **kw)
    good = (ids >= 0) & (ids < v)
    safe = torch.where(good, ids, 0)
    safe_pos = kw.get("positions", torch.arange(7, device=DEVICE).expand(3, 7))
    safe_pos = torch.where((safe_pos >= 0) & (safe_pos < p), safe_pos, 0)
    expect = ref_embedding(safe, w.detach(), pw.detach(), positions=safe_pos)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expect)
    out.sum().backward()
    assert torch.isfinite(w.grad).all() and torch.isfinite(pw.grad).all()
    counts = torch.bincount(ids[good], minlength=v).float()
    torch.testing.assert_close(w.grad, counts[:, None].expand(-1, d), rtol=0, atol=0)
    q = kw.get("positions", torch.arange(7, device=DEVICE).expand(3, 7))
    pos_counts = torch.bincount(q[(q >= 0) & (q < p)], minlength=p).float()
    torch.testing.assert_close(pw.grad, pos_counts[:, None].expand(-1, d), rtol=0, atol=0)


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
@pytest.mark.parametrize("pos", ["none", "learned", "sinusoidal"])
def test_kernel_checks_ids_and_never_reads_out_of_bounds(pos):
    """The "device" check inside the kernel: the flag is cleared for a bad id or explicit position into a
    learned table (not for a sinusoid's, which has no table), set otherwise; bad entries read row 0."""
    from embedattn.kernels.embedding import embedding_forward

    v, p, d = 10, 7, 40  # D = 40: two feature blocks (the check runs in every one)
    w, pw = _poisoned_table(v, d), _poisoned_table(p, d)
    ids = _bad_ids(v).reshape(-1)
    mode = {"none": 0, "learned": 1, "sinusoidal": 2}[pos]
    positions = torch.arange(21, device=DEVICE) % 7
    for bad_ids, bad_pos in ((True, False), (False, True), (False, False)):
        i = ids if bad_ids else ids.clamp(0, v - 1)
        q = positions.clone()
        if bad_pos:
            q[3], q[11] = -1, p
        ok = torch.ones(1, dtype=torch.int32, device=DEVICE)
        out = embedding_forward(i, w, pw if mode == 1 else None, q if mode else None, n=7, pos_mode=mode,
                                scale=1.0, offset=0, ok=ok)
        assert torch.isfinite(out).all()
        flagged = bad_ids or (bad_pos and mode == 1)
        assert ok.item() == (0 if flagged else 1), (bad_ids, bad_pos, pos)
        safe_q = torch.where((q >= 0) & (q < p), q, 0) if mode == 1 else q  # a sinusoid takes any position
        expect = ref_embedding(torch.where((i >= 0) & (i < v), i, 0), w, pw if mode == 1 else None,
                               sinusoidal=mode == 2, positions=safe_q if mode else None)
        torch.testing.assert_close(out, expect)


@pytest.mark.skipif(ON_CUDA, reason="a device-side assertion poisons the CUDA context: see the subprocess test")
@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_default_check_has_no_host_sync(backend):
    """Under torch.compile (fullgraph: no graph break, so no host read) the default is the "device" check:
    good ids pass, a bad one fails the call (on the CPU at once, a RuntimeError from torch._assert_async;
    on CUDA a device-side assertion at the next synchronization)."""
    w = _poisoned_table(10, 6)
    f = on_road("compiled", lambda ids, w: embedattn.embedding(ids, w, backend=backend))
    good = _bad_ids(10).clamp(0, 9)
    torch.testing.assert_close(f(good, w), ref_embedding(good, w))
    with pytest.raises(RuntimeError, match="embedding: an id is out of range"):
        f(_bad_ids(10), w)


def test_check_bounds_modes():
    from embedattn._checks import bounds_mode

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [bounds_mode(x, cpu) for x in (None, True, "sync", "device", False, "off")] == \
        ["sync", "sync", "sync", "sync", "off", "off"]
    assert [bounds_mode(x, cuda) for x in (None, True, "sync", "device", False, "off")] == \
        ["device", "sync", "sync", "device", "off", "off"]
    with pytest.raises(ValueError, match="check_bounds must be"):
        embedattn.embedding(IDS, W, check_bounds="fatal")
    with pytest.raises(TypeError, match="check_bounds must be"):
        embedattn.embedding(IDS, W, check_bounds=1)


@pytest.mark.parametrize("check_bounds", [None, "device", False])
def test_empty_table_is_an_error_in_every_mode(check_bounds):
    """No row 0 to fall back on: ids into an empty table raise whatever the mode (the shapes say it)."""
    with pytest.raises(IndexError, match="ids index the token table, which has no rows"):
        embedattn.embedding(IDS, torch.randn(0, 4), check_bounds=check_bounds)
    assert embedattn.embedding(IDS[:, :0], torch.randn(0, 4), check_bounds=check_bounds).shape == (2, 0, 4)


# ----------------------------------------------------------------------------------------------------
# sinusoidal accuracy at large positions: reference and kernel against math.sin/cos in double precision


def _exact_sinusoid(positions, d):
    import math

    out = torch.empty(len(positions), d, dtype=torch.float64)
    for r, p in enumerate(positions):
        for c in range(d):
            angle = p * math.exp(-(c - c % 2) * math.log(10000.0) / d)
            out[r, c] = math.sin(angle) if c % 2 == 0 else math.cos(angle)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_sinusoid_accuracy_at_large_positions(backend):
    """Both roads stay at float32 rounding (~1e-7) up to 2^24; the float32 angle the reference used was
    off by 3.9e-3 at 1e5 and 0.93 at 2^24."""
    positions = [0, 1, 4095, 100_000, 1_234_567, 2**24 - 1, 2**24]
    d = 16
    exact = _exact_sinusoid(positions, d)
    pos = torch.tensor(positions, device=DEVICE)[None, :]
    w = torch.zeros(3, d, device=DEVICE)
    out = embedattn.embedding(torch.zeros_like(pos), w, sinusoidal=True, positions=pos, backend=backend)
    assert (out[0].double().cpu() - exact).abs().max().item() < (1e-6 if ON_CUDA else 2e-7)  # the GPU's sinf
    assert (sinusoidal_positions(pos[0].cpu(), d) - exact).abs().max().item() < 2e-7


# ----------------------------------------------------------------------------------------------------
# forward tiles


def test_gpu_tile_heuristic(monkeypatch):
    """The GPU tile: row chunks that give every thread 16-byte accesses without masked lanes where D
    allows (768 -> 256), at most 2 KB of a row per chunk, ~16 KB of rows per program, and smaller tiles
    when the grid would leave SMs idle."""
    from embedattn.kernels import embedding as K

    monkeypatch.setattr(K, "INTERPRETED", False)
    assert K._tile(768, 2) == (32, 256) and K._tile(768, 4) == (16, 256)
    assert K._tile(4096, 2) == (8, 1024) and K._tile(4096, 4) == (8, 512)
    assert K._tile(100, 2) == (64, 128)  # 100 = 4 x 25: rounded up instead
    assert K._tile(768, 2, t=2048, sms=132) == (8, 256)  # 768 programs >= 4 per SM
    assert K._tile(768, 2, t=131072, sms=132) == (32, 256)
    assert K._tile(4096, 2, t=4, sms=132) == (1, 1024)
    for d in (7, 64, 768, 1000, 4096, 8192):
        for e in (2, 4):
            bt, bd = K._tile(d, e)
            assert bd * e <= K.CHUNK_BYTES and bt * bd * e <= max(K.TILE_BYTES, 64 * bd * e)
    assert [K._t_class(t) for t in (1, 4095, 4096, 32767, 32768, 1 << 20)] == [0, 0, 1, 1, 2, 2]


_AOT = r"""
import re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from embedattn.kernels import embedding as KE, negative_sampling as KN


def ptx_ops(fn, types, consts, aligned=()):
    sig = {a: types.get(a, "i32") for a in fn.arg_names}
    sig.update({c: "constexpr" for c in consts})
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}  # what a launch specializes
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(c),): v for c, v in consts.items()}, attrs=attrs)
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]
    return " ".join(sorted(set(re.findall(r"(?:ld|st|red|atom)[.]global[.a-zA-Z0-9_:]*", ptx))))


bt, bd = 32, 256  # the GPU tile of D = 768 bf16
f = dict(scale="fp32", freq_hi="fp32", freq_lo="fp32", ids_ptr="*i64", pos_ptr="*i64", w_ptr="*bf16",
         p_ptr="*bf16", out_ptr="*bf16", ok_ptr="*i32")
al = ("ids_ptr", "pos_ptr", "w_ptr", "p_ptr", "out_ptr", "D", "stride_w", "stride_p")
print("fwd", ptx_ops(KE._fwd_kernel, f, dict(POS_MODE=1, EXPLICIT_POS=True, HAS_SCALE=True, CHECK=True,
                                          STREAM_OUT=True, BLOCK_T=bt, BLOCK_D=bd), al))
print("fwd_sin", ptx_ops(KE._fwd_kernel, f, dict(POS_MODE=2, EXPLICIT_POS=False, HAS_SCALE=False, CHECK=False,
                                              STREAM_OUT=False, BLOCK_T=8, BLOCK_D=1024), al))
b = dict(grad_ptr="*bf16", ids_ptr="*i64", gw_ptr="*fp32", scale="fp32")
print("bwd_atomic", ptx_ops(KE._bwd_atomic_kernel, b, dict(HAS_PAD=True, HAS_SCALE=True, BLOCK_T=16, BLOCK_D=256),
                            ("grad_ptr", "gw_ptr", "D")))
s = dict(grad_ptr="*bf16", sorted_ptr="*i64", perm_ptr="*i64", end_ptr="*i64", slots_ptr="*i64", gw_ptr="*bf16",
         scale="fp32")
print("bwd_sorted", ptx_ops(KE._bwd_sorted_kernel, s, dict(HAS_PAD=True, HAS_SCALE=True, SLOTS=False, ROWS=16,
                                                            BLOCK_D=256), ("grad_ptr", "gw_ptr", "D", "stride_gw")))
print("bwd_pos", ptx_ops(KE._bwd_pos_kernel, dict(grad_ptr="*bf16", gp_ptr="*bf16"), dict(BLOCK_T=32, BLOCK_D=256),
                         ("grad_ptr", "gp_ptr", "D", "stride_b")))
n = dict(center_ptr="*i64", context_ptr="*i64", neg_ptr="*i64", w_in_ptr="*bf16", w_out_ptr="*bf16",
         loss_ptr="*fp32", coef_ptr="*fp32", ok_ptr="*i32")
print("ns_fwd", ptx_ops(KN._fwd_kernel, n, dict(CHECK=True, BLOCK_B=4, BLOCK_K=8, BLOCK_D=128)))
n.update(dst_in_ptr="*i64", dst_out_ptr="*i64", grad_ptr="*fp32", gin_ptr="*fp32", gout_ptr="*fp32")
print("ns_bwd", ptx_ops(KN._bwd_kernel, n, dict(SPARSE=True, NEED_IN=True, NEED_OUT=True, BLOCK_B=4, BLOCK_K=8,
                                                BLOCK_D=128)))
"""


@pytest.mark.skipif(not HAS_TRITON or ON_CUDA, reason="needs Triton; on CUDA the kernel tests run them")
def test_kernels_compile_for_sm90():
    """What the interpreter cannot show: the embedding kernels (and the negative-sampling loss kernels, which
    share the id check) compile for an H100/H200 (ptxas runs here, no GPU needed), the forward gathers and
    stores with 16-byte accesses (v4.b32), keeps position rows in L2 (evict_last) and streams a large
    output (evict_first), and the scatters are relaxed reductions (red, not atom)."""
    out = compile_sm90(_AOT)
    ops = dict(line.split(" ", 1) for line in out.strip().splitlines())
    assert set(ops) == {"fwd", "fwd_sin", "bwd_atomic", "bwd_sorted", "bwd_pos", "ns_fwd", "ns_bwd"}, ops
    fwd = ops["fwd"].split()
    assert "ld.global.v4.b32" in fwd, fwd  # token rows, 16 bytes a thread
    assert any("evict_last" in o and o.endswith("v4.b32") and o.startswith("ld") for o in fwd), fwd
    assert any("evict_first" in o and o.endswith("v4.b32") and o.startswith("st") for o in fwd), fwd
    assert "st.global.v4.b32" in ops["fwd_sin"].split()
    assert "red.global.gpu.relaxed.add.v4.f32" in ops["bwd_atomic"].split()
    assert not any(o.startswith("atom") for v in ops.values() for o in v.split()), ops
    assert "red.global.gpu.relaxed.add.f32" in ops["ns_bwd"].split()


# ----------------------------------------------------------------------------------------------------
# CUDA: no host sync in the default mode (graph capture, fullgraph compile), the device-side failure


def cuda_only(f):
    return pytest.mark.cuda(pytest.mark.skipif(not ON_CUDA, reason="needs CUDA")(f))


@cuda_only
def test_cuda_graph_capture_and_fullgraph_compile():
    """With the default check a training step (forward, backward) and a decoding step capture in a CUDA
    graph and replay with new ids; the same step compiles with fullgraph=True (no graph break)."""
    import torch._dynamo.testing

    torch.manual_seed(0)
    m = embedattn.FusedEmbedding(1000, 256, 512, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, 1000, (4, 128), device="cuda")
    step = lambda ids: m(ids).float().square().mean()  # noqa: E731
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm-up: autotuning and compilation happen outside the capture
            step(ids).backward()
            m.zero_grad(set_to_none=False)
            m(ids[:, :1], position_offset=7)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        loss = step(ids)
        loss.backward()
        dec = m(ids[:, :1], position_offset=7)
    new = torch.randint(0, 1000, (4, 128), device="cuda")
    ids.copy_(new)
    m.zero_grad(set_to_none=False)
    g.replay()
    torch.cuda.synchronize()
    with torch.no_grad():
        torch.testing.assert_close(dec, embedattn.reference.embedding(new[:, :1], m.weight, m.pos_weight,
                                                                      position_offset=7))
        expect = embedattn.reference.embedding(new, m.weight, m.pos_weight).float().square().mean()
    torch.testing.assert_close(loss, expect, rtol=1e-2, atol=1e-2)
    torch._dynamo.reset()
    cnt = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(step, fullgraph=True, backend=cnt)
    compiled(ids).backward()
    assert cnt.frame_count == 1


_DEVICE_ASSERT = r"""
import torch, embedattn
w = torch.randn(100, 64, device="cuda")
ids = torch.randint(0, 100, (2, 50), device="cuda")
ids[1, 7] = 100
out = embedattn.embedding(ids, w)  # returns: no host sync
print("returned", flush=True)
torch.cuda.synchronize()
print("synchronized", flush=True)
"""


@cuda_only
def test_cuda_bad_id_fails_at_the_next_synchronization():
    """The default mode on CUDA: the call returns, the device-side assertion surfaces at the next sync (in a
    subprocess: a device assertion poisons the CUDA context)."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _DEVICE_ASSERT], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "returned" in r.stdout and "synchronized" not in r.stdout, r.stdout + r.stderr
    assert "device-side assert" in r.stderr or "embedding: an id is out of range" in r.stderr, r.stderr[-2000:]


@pytest.mark.skipif(ON_CUDA or not HAS_TRITON, reason="the CPU interpreter road under Inductor")
@pytest.mark.parametrize("check_bounds", [False, None])
def test_inductor_compiles_the_unchecked_call(check_bounds):
    """torch.compile's default backend (Inductor) on the kernels' op, check on and off: the op's "ok" flag is
    always a tensor (Inductor cannot functionalize a None mutated argument)."""
    w = torch.randn(10, 6).requires_grad_()
    ids = torch.tensor([[1, 2, 9], [0, 4, 4]])
    torch._dynamo.reset()
    out = torch.compile(lambda ids, w: embedattn.embedding(ids, w, check_bounds=check_bounds, backend="triton"))(ids, w)
    out.sum().backward()
    torch.testing.assert_close(out, ref_embedding(ids, w.detach()))
    torch.testing.assert_close(w.grad, torch.bincount(ids.flatten(), minlength=10)[:, None].float().expand(-1, 6))
