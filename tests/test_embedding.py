"""embedattn.embedding / FusedEmbedding against the float64 reference: forward, both gradients, errors."""

from __future__ import annotations

import pytest
import torch
from helpers import BACKENDS, DEVICE, DTYPES, HAS_TRITON, ON_CUDA, ROADS, assert_fa_close, on_road, skip_if_unsupported
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
    outs = []
    if ON_CUDA:  # every config of the autotune space, through the tuned launch path (one config each)
        import triton

        monkeypatch.setattr(K, "autotune_enabled", lambda: True)
        for cfg in K._sorted_configs():
            monkeypatch.setattr(K, "_bwd_sorted_tuned", triton.autotune([cfg], key=["D"])(K._bwd_sorted_kernel))
            outs.append(K.scatter_grad(grad, ids, v, deterministic=True))
    else:  # the interpreter has no autotuner: vary the fixed tile
        monkeypatch.setattr(K, "autotune_enabled", lambda: False)
        for tile in [(1, 64), (4, 16), (16, 32), (32, 8)]:
            monkeypatch.setattr(K, "_tile", lambda d, tile=tile: tile)
            outs.append(K.scatter_grad(grad, ids, v, deterministic=True))
    assert all(torch.equal(outs[0], o) for o in outs[1:])


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
@pytest.mark.parametrize("det", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_mode_selection(monkeypatch, dtype, det):
    """Atomics only for float32 tables outside deterministic mode; sorted segments otherwise."""
    skip_if_unsupported("triton", dtype)
    from embedattn.kernels import embedding as K

    seen, real = [], K.scatter_grad
    monkeypatch.setattr(K, "scatter_grad", lambda *a, **k: seen.append(k["deterministic"]) or real(*a, **k))
    w = torch.randn(9, 5, device=DEVICE, dtype=dtype, requires_grad=True)
    pw = torch.randn(6, 5, device=DEVICE, dtype=dtype, requires_grad=True)
    ids = torch.randint(0, 9, (2, 6), device=DEVICE)
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(det)
    try:
        embedattn.embedding(ids, w, pw, positions=ids % 6, backend="triton").sum().backward()
    finally:
        torch.use_deterministic_algorithms(old)
    assert seen == [det or dtype != torch.float32] * 2


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
@pytest.mark.parametrize("pos", ["default", "explicit"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_buffer_sizes(dtype, pos):
    """Forward allocates its output only (no B x N x D intermediate); backward the two gradients plus
    O(T) index buffers: no float32 V x D buffer for half tables (measured, not assumed)."""
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
    bwd = _allocated_bytes(lambda: res["out"].backward(g))
    e, t = w.element_size(), b * n
    slack = 8192  # allocator rounding, min/max scalars
    assert fwd <= t * d * e + slack, fwd
    assert bwd <= (v + p) * d * e + 2 * 4 * t * 8 + slack, (bwd, (v + p) * d * e)


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
    with pytest.raises(IndexError, match=f"ids contains id {bad}, out of range"):
        embedattn.embedding(ids.to(DEVICE), W.to(DEVICE), backend=backend)


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
