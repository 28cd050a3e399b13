"""Negative-sampling loss, its kernels and the unigram sampler, against the float64 reference."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    BACKENDS,
    DEVICE,
    DTYPES,
    HAS_TRITON,
    ON_CUDA,
    ROADS,
    assert_fa_close,
    compile_sm90_in_subprocess,
    max_err,
    on_road,
    sgns_step_reference,
    skip_if_unsupported,
)

import embedattn
from embedattn.reference._negative_sampling import negative_sampling_loss as ref_loss

# (B, K, V, D): singletons, tails not divisible by the blocks, a D spanning several chunks, and small
# vocabularies where ids collide a lot inside one tile (the atomic scatter must add them all)
SHAPES = [(1, 1, 3, 4), (37, 5, 13, 70), (50, 15, 200, 33), (9, 3, 2, 129)]


def _inputs(B, K, V, D, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    wi = (torch.randn(V, D, generator=g, dtype=torch.float64) * scale / D**0.5).to(DEVICE)
    wo = (torch.randn(V, D, generator=g, dtype=torch.float64) * scale / D**0.5).to(DEVICE)
    c = torch.randint(0, V, (B,), generator=g).to(DEVICE)
    x = torch.randint(0, V, (B,), generator=g).to(DEVICE)
    n = torch.randint(0, V, (B, K), generator=g).to(DEVICE)
    up = torch.rand(B, generator=g, dtype=torch.float64).to(DEVICE)  # upstream gradient per pair
    return c, x, n, wi.to(dtype), wo.to(dtype), up


def _run(fn, c, x, n, wi, wo, up, **kw):
    wi = wi.detach().clone().requires_grad_()
    wo = wo.detach().clone().requires_grad_()
    loss = fn(c, x, n, wi, wo, reduction="none", **kw)
    (loss * up.to(loss.dtype)).sum().backward()
    return loss.detach(), wi.grad, wo.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("road", ROADS)
def test_parity_with_float64_reference(road, backend, dtype, shape):
    skip_if_unsupported(backend, dtype)
    c, x, n, wi, wo, up = _inputs(*shape, dtype, seed=hash(shape) % 1000)
    fn = on_road(road, lambda c, x, n, wi, wo, reduction: embedattn.negative_sampling_loss(
        c, x, n, wi, wo, reduction=reduction, backend=backend))
    out = _run(fn, c, x, n, wi, wo, up)
    ref = _run(ref_loss, c, x, n, wi.double(), wo.double(), up)
    plain = _run(ref_loss, c, x, n, wi, wo, up, upcast=False)
    for name, o, r, p in zip(("loss", "grad_in", "grad_out"), out, ref, plain):
        loss_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        assert o.dtype == (loss_dtype if name == "loss" else dtype)
        assert_fa_close(o, r, p, name=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions(backend, reduction):
    c, x, n, wi, wo, _ = _inputs(29, 4, 31, 20, torch.float32, seed=3)
    out = embedattn.negative_sampling_loss(c, x, n, wi, wo, reduction=reduction, backend=backend)
    ref = ref_loss(c, x, n, wi.double(), wo.double(), reduction=reduction)
    assert out.shape == ref.shape
    assert max_err(out, ref) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("logit", [50.0, -50.0, 300.0, -300.0])
def test_extreme_logits_are_stable(backend, logit):
    # every score is exactly ±logit: σ saturates, the loss must be ~0 or ~|logit|, never inf/NaN
    B, K, V, D = 6, 3, 5, 8
    wi = torch.zeros(V, D, device=DEVICE)
    wi[:, 0] = 1.0
    wo = torch.zeros(V, D, device=DEVICE)
    wo[:, 0] = torch.tensor([logit, -logit, logit, -logit, logit])
    g = torch.Generator().manual_seed(1)
    c, x = (torch.randint(0, V, (B,), generator=g).to(DEVICE) for _ in range(2))
    n = torch.randint(0, V, (B, K), generator=g).to(DEVICE)
    up = torch.ones(B, dtype=torch.float64, device=DEVICE)
    out = _run(embedattn.negative_sampling_loss, c, x, n, wi, wo, up, backend=backend)
    ref = _run(ref_loss, c, x, n, wi.double(), wo.double(), up)
    for o, r in zip(out, ref):
        assert torch.isfinite(o).all()
        assert max_err(o, r) <= 1e-6 * max(1.0, abs(logit)) * K
    assert out[0].max() > abs(logit) * 0.9  # the wrong-side pairs really cost |logit|


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_int32_ids_and_tied_tables(backend):
    c, x, n, wi, wo, up = _inputs(21, 6, 17, 10, torch.float32, seed=5)
    n_view = n.int()[:, ::2]  # (B, 3) with a column stride of 2
    c32 = c.int()
    out = _run(lambda *a, **k: embedattn.negative_sampling_loss(*a, backend=backend, **k),
               c32, x, n_view, wi, wo, up)
    ref = _run(ref_loss, c, x, n_view.long(), wi.double(), wo.double(), up)
    for o, r in zip(out, ref):
        assert max_err(o, r) < 1e-5
    # the same table as input and output: autograd adds both gradients
    w = wi.clone().requires_grad_()
    embedattn.negative_sampling_loss(c, x, n, w, w, reduction="sum", backend=backend).backward()
    w64 = wi.double().clone().requires_grad_()
    ref_loss(c, x, n, w64, w64, reduction="sum").backward()
    assert max_err(w.grad, w64.grad) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_gradients_match_dense_and_train(backend):
    c, x, n, wi, wo, up = _inputs(33, 5, 40, 12, torch.float32, seed=7)
    dense = _run(embedattn.negative_sampling_loss, c, x, n, wi, wo, up, backend=backend)
    sparse = _run(embedattn.negative_sampling_loss, c, x, n, wi, wo, up, backend=backend, sparse=True)
    for d, s in zip(dense[1:], sparse[1:]):
        assert s.is_sparse
        assert max_err(s.to_dense(), d) < 1e-6
    # usable with the sparse optimizers, like nn.Embedding(sparse=True)
    for opt_cls in (torch.optim.SparseAdam, torch.optim.SGD):
        a, b = wi.clone().requires_grad_(), wo.clone().requires_grad_()
        opt = opt_cls([a, b], lr=0.1)
        before = embedattn.negative_sampling_loss(c, x, n, a, b, sparse=True, backend=backend)
        before.backward()
        opt.step()
        after = embedattn.negative_sampling_loss(c, x, n, a, b, sparse=True, backend=backend)
        assert after < before
        untouched = torch.ones(40, dtype=torch.bool, device=DEVICE)
        untouched[c] = False
        assert torch.equal(a.detach()[untouched], wi[untouched])


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_one_table_requires_grad(backend):
    c, x, n, wi, wo, _ = _inputs(11, 2, 9, 6, torch.float32, seed=9)
    wo = wo.clone().requires_grad_()
    embedattn.negative_sampling_loss(c, x, n, wi, wo, backend=backend).backward()
    w64 = wo.double().detach().requires_grad_()
    ref_loss(c, x, n, wi.double(), w64).backward()
    assert max_err(wo.grad, w64.grad) < 1e-6


def test_module_with_sampler_trains():
    torch.manual_seed(0)
    V = 30
    counts = torch.arange(1, V + 1).float()
    sampler = embedattn.UnigramSampler(counts, device=DEVICE)
    mod = embedattn.NegativeSamplingLoss(V, 8, sampler=sampler, num_negatives=4, reduction="sum",
                                         device=DEVICE)
    assert mod.in_weight.abs().max() <= 0.5 / 8 and mod.out_weight.abs().max() == 0
    c = torch.randint(0, V, (64,), device=DEVICE)
    x = (c + 1) % V
    opt = torch.optim.SGD(mod.parameters(), lr=0.2)
    losses = []
    for _ in range(30):
        loss = mod(c, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert "num_negatives=4" in repr(mod)


# ----------------------------------------------------------------------------- the fused SGD step

def _sgns_batch(seed, B, K, D, distinct, v_colliding):
    """B (input, target, K negatives) triples and two (V, D) tables: every row distinct, or ids drawn
    from a tiny vocabulary of v_colliding rows so that they collide (skipped on a GPU)."""
    if not distinct and ON_CUDA:
        pytest.skip("colliding rows race (Hogwild) across programs on a GPU; checked under the interpreter")
    g = torch.Generator().manual_seed(seed)
    if distinct:  # no row is touched by two programs: the result is exact on any device
        V = B * (K + 2)
        perm = torch.randperm(V, generator=g)
        inp, tgt, neg = perm[:B], perm[B:2 * B], perm[2 * B:2 * B + B * K].view(B, K)
    else:
        V = v_colliding
        inp, tgt = torch.randint(0, V, (B,), generator=g), torch.randint(0, V, (B,), generator=g)
        neg = torch.randint(0, V, (B, K), generator=g)
    wi = torch.randn(V, D, generator=g) * 0.3
    wo = torch.randn(V, D, generator=g) * 0.3
    return inp, tgt, neg, wi, wo


def _minibatch_reference(inp, tgt, neg, wi, wo, lr, size):
    """sgns_step_reference over consecutive minibatches of `size` pairs: (all losses, final wi, final wo)."""
    losses, wi_r, wo_r = [], wi.double(), wo.double()
    for s in range(0, len(inp), size):
        lo, wi_r, wo_r = sgns_step_reference(inp[s:s + size], tgt[s:s + size], neg[s:s + size], wi_r, wo_r, lr)
        losses.append(lo)
    return torch.cat(losses), wi_r, wo_r


def _assert_step_matches(loss, wi_k, wo_k, loss_r, wi_r, wo_r):
    assert max_err(loss.cpu(), loss_r) < 1e-5
    assert max_err(wi_k.cpu(), wi_r) < 1e-5
    assert max_err(wo_k.cpu(), wo_r) < 1e-5


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
@pytest.mark.parametrize("distinct", [True, False])
def test_sgns_step_kernel(distinct):
    from embedattn.kernels.negative_sampling import sgns_step

    B, K, D = 13, 4, 70
    # colliding: B fits one interpreter program, which applies all its updates from the same snapshot
    inp, tgt, neg, wi, wo = _sgns_batch(11, B, K, D, distinct, v_colliding=7)
    if not distinct:
        assert (neg == tgt[:, None]).any()  # the skip rule is exercised
    ref = sgns_step_reference(inp, tgt, neg, wi, wo, lr=0.05)
    wi_k, wo_k = wi.to(DEVICE), wo.to(DEVICE)
    loss = sgns_step(inp.to(DEVICE), tgt.to(DEVICE), neg.to(DEVICE), wi_k, wo_k, 0.05)
    _assert_step_matches(loss, wi_k, wo_k, *ref)


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
@pytest.mark.parametrize("distinct", [True, False])
def test_sgns_step_chunked_launches(distinct):
    # chunk=16 over 45 pairs: three launches walking the batch in order, the last one short; each
    # launch is one minibatch (under the interpreter one program holds a whole chunk, so colliding
    # rows give the exact per-chunk minibatch result; on a GPU only distinct rows are race-free)
    from embedattn.kernels.negative_sampling import sgns_step

    B, K, D, chunk = 45, 3, 20, 16
    inp, tgt, neg, wi, wo = _sgns_batch(12, B, K, D, distinct, v_colliding=6)
    ref = _minibatch_reference(inp, tgt, neg, wi, wo, 0.1, chunk)
    wi_k, wo_k = wi.to(DEVICE), wo.to(DEVICE)
    # int32 ids, a non-contiguous target column: the launch loop keeps the strides
    tgt2 = torch.stack([tgt, tgt], 1).to(DEVICE, torch.int32)[:, 1]
    loss = sgns_step(inp.to(DEVICE), tgt2, neg.to(DEVICE), wi_k, wo_k, 0.1, chunk=chunk)
    assert loss.shape == (B,)
    _assert_step_matches(loss, wi_k, wo_k, *ref)


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
@pytest.mark.parametrize("distinct", [True, False])
@pytest.mark.parametrize("tiles_in_flight", [1, 2])
def test_sgns_hogwild(distinct, tiles_in_flight):
    # one launch, programs walking their share of the pairs a tile at a time. Under the interpreter
    # the programs run one after another, so the result is the sequential minibatches of one tile;
    # on a GPU only distinct rows are race-free. B = 100: several tiles per program, a masked last one
    from embedattn.kernels.negative_sampling import _fixed_config, sgns_hogwild

    B, K, D = 100, 3, 20
    tile = _fixed_config(K, D)["BLOCK_B"]
    inp, tgt, neg, wi, wo = _sgns_batch(13, B, K, D, distinct, v_colliding=6)
    ref = _minibatch_reference(inp, tgt, neg, wi, wo, 0.1, tile)
    wi_k, wo_k = wi.to(DEVICE), wo.to(DEVICE)
    loss = sgns_hogwild(inp.to(DEVICE), tgt.to(DEVICE, torch.int32), neg.to(DEVICE), wi_k, wo_k, 0.1,
                        in_flight=tiles_in_flight * tile)
    assert loss.shape == (B,)
    _assert_step_matches(loss, wi_k, wo_k, *ref)


# ----------------------------------------------------------------------------- the sampler

def test_sampler_statistics():
    counts = torch.tensor([0.0, 1.0, 5.0, 20.0, 100.0, 3.0])
    s = embedattn.UnigramSampler(counts, power=0.75, device=DEVICE)
    p = counts.double().pow(0.75) * (counts > 0)
    p /= p.sum()
    assert max_err(s.probs.cpu(), p) < 1e-12
    g = torch.Generator(device=DEVICE).manual_seed(0)
    n = 400_000
    draw = s.sample(n // 8, 8, generator=g)
    assert draw.shape == (n // 8, 8) and draw.dtype == torch.int64 and draw.device.type == DEVICE
    freq = torch.bincount(draw.flatten().cpu(), minlength=6).double() / n
    assert freq[0] == 0  # zero count: never drawn
    assert max_err(freq, p) < 5 * (0.25 / n) ** 0.5  # 5 sigma of a binomial frequency
    # excluding the positive: never drawn, and the others keep their relative odds
    ex = torch.tensor([4, 3, 2, 1, 5] * (n // 40), device=DEVICE)
    draw = s.sample(ex.numel(), 8, exclude=ex, generator=g)
    assert not (draw == ex[:, None]).any()
    rows = draw[ex == 4].flatten().cpu()
    freq = torch.bincount(rows, minlength=6).double() / rows.numel()
    q = p.clone()
    q[4] = 0
    q /= q.sum()
    assert max_err(freq, q) < 5 * (0.25 / rows.numel()) ** 0.5


def test_sampler_exclude_out_of_range():
    """An excluded id outside the vocabulary is an error naming exclude (-1 used to exclude the last id,
    V a raw IndexError from torch's indexing)."""
    s = embedattn.UnigramSampler([1.0, 3.0, 2.0])
    for bad in (-1, 3, 10):
        ex = torch.tensor([0, bad, 1])
        with pytest.raises(IndexError, match=rf"exclude contains id {bad}, out of range for the sampler's "
                                             r"vocabulary with 3 ids \(\[0, 3\)\)"):
            s.sample(3, 4, exclude=ex)
    with pytest.raises(IndexError, match="exclude contains id -1"):
        s.sample(5, exclude=torch.tensor(-1))
    with pytest.raises(TypeError, match="exclude must hold integer ids"):
        s.sample(3, exclude=torch.tensor([0.0, 1.0, 2.0]))
    assert s.sample(3, 4, exclude=torch.tensor([0, 2, 1], dtype=torch.int32)).shape == (3, 4)


def test_sampler_bad_input():
    with pytest.raises(ValueError, match="non-negative"):
        embedattn.UnigramSampler([1.0, -1.0])
    with pytest.raises(ValueError, match="no positive"):
        embedattn.UnigramSampler([0.0, 0.0])
    with pytest.raises(ValueError, match="1-D"):
        embedattn.UnigramSampler([])
    s = embedattn.UnigramSampler([0.0, 3.0])
    assert (s.sample(50) == 1).all()
    with pytest.raises(ValueError, match="only one id"):
        s.sample(4, 2, exclude=torch.ones(4, dtype=torch.long))
    s = embedattn.UnigramSampler([1.0, 3.0, 2.0])
    with pytest.raises(ValueError, match="exclude"):  # (4, 3): more dims than the draw's (4,)
        s.sample(4, exclude=torch.ones(4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="exclude"):  # (3,) is not the leading dims of (2, 3)
        s.sample(2, 3, exclude=torch.ones(3, dtype=torch.long))
    assert s.sample(2, 3, exclude=torch.ones(2, dtype=torch.long)).shape == (2, 3)
    assert s.sample(5, exclude=torch.tensor(1)).shape == (5,)  # a 0-d id excludes it everywhere


# ----------------------------------------------------------------------------- bad input

def _good():
    c, x, n, wi, wo, _ = _inputs(5, 2, 7, 4, torch.float32, seed=0)
    return dict(center=c, context=x, negatives=n, in_weight=wi, out_weight=wo)


# on CUDA None and "device" assert on the device (test_cuda_graph_capture_and_fullgraph_compile's subprocess)
CHECKING = [True, "sync"] + ([] if ON_CUDA else [None, "device"])


@pytest.mark.parametrize("check_bounds", CHECKING)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arg,bad", [("center", 7), ("context", -1), ("negatives", 100)])
def test_ids_out_of_range(backend, arg, bad, check_bounds):
    """Every checking mode raises on the CPU in eager mode ("device" is "sync" there), naming the id."""
    kw = _good()
    t = kw[arg].clone()
    t.view(-1)[0] = bad
    kw[arg] = t
    with pytest.raises(IndexError, match=f"{arg} contains id {bad}"):
        embedattn.negative_sampling_loss(**kw, check_bounds=check_bounds, backend=backend)


@pytest.mark.parametrize(
    "change,err,match",
    [
        (lambda k: k.update(negatives=k["negatives"][:, :0]), ValueError, "K = 0"),
        (lambda k: k.update(out_weight=k["out_weight"][:, :3]), ValueError, "same shape"),
        (lambda k: k.update(out_weight=k["out_weight"][:6]), ValueError, "same shape"),
        (lambda k: k.update(out_weight=k["out_weight"].double()), TypeError, "share a dtype"),
        (lambda k: k.update(in_weight=k["in_weight"].flatten()), ValueError, "in_weight must be"),
        (lambda k: k.update(out_weight=torch.empty(7, 4, device="meta")), ValueError, "one device"),
        (lambda k: k.update(center=k["center"].float()), TypeError, "center must be int64"),
        (lambda k: k.update(context=k["context"][:3]), ValueError, "context"),
        (lambda k: k.update(negatives=k["negatives"][:3]), ValueError, "negatives must be"),
        (lambda k: k.update(center=k["center"][:, None]), ValueError, "center must be 1-D"),
        (lambda k: k.update(in_weight=k["in_weight"].int(), out_weight=k["out_weight"].int()), TypeError,
         "float16"),
        (lambda k: k.update(reduction="max"), ValueError, "reduction"),
        (lambda k: k.update(backend="cuda"), ValueError, "backend"),
    ],
)
def test_bad_input(change, err, match):
    kw = _good()
    change(kw)
    with pytest.raises(err, match=match):
        embedattn.negative_sampling_loss(**kw)


def test_empty_batch():
    kw = _good()
    kw.update(center=kw["center"][:0], context=kw["context"][:0], negatives=kw["negatives"][:0])
    assert embedattn.negative_sampling_loss(**kw, reduction="sum") == 0
    assert embedattn.negative_sampling_loss(**kw, reduction="none").shape == (0,)


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
def test_launcher_outputs_fully_written():
    # poisoned outputs (NaN) that survive would show up here as NaN in the loss or coefficients
    from embedattn.kernels.negative_sampling import negative_sampling_forward

    c, x, n, wi, wo, _ = _inputs(45, 7, 19, 21, torch.float32, seed=4)
    loss, coef = negative_sampling_forward(c, x, n, wi, wo)
    assert torch.isfinite(loss).all() and torch.isfinite(coef).all()
    assert coef.shape == (45, 8)


_AOT = """
import re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from embedattn.kernels.negative_sampling import _sgns_loop_kernel as fn

consts = {"BLOCK_B": 4, "BLOCK_K": 8, "BLOCK_D": 128}
sig = dict(zip(fn.arg_names, ["*i64", "*i32", "*i64", "*fp32", "*fp32", "*fp32", "fp32"] + ["i32"] * 10))
sig.update({c: "constexpr" for c in consts})
src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(c),): v for c, v in consts.items()})
ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]
print(" ".join(sorted(set(re.findall(r"(?:red|atom|ld)[.]global[.a-z0-9_]*", ptx)))), ptx.count("bar.sync"))
"""


@pytest.mark.skipif(not HAS_TRITON or ON_CUDA, reason="needs Triton; on CUDA the kernel tests run it")
def test_hogwild_kernel_compiles_for_sm90():
    # what the interpreter cannot show: the persistent Hogwild kernel compiles for an H100 (ptxas runs
    # here, no GPU needed; in a subprocess, as this one interprets), its table rows are read through
    # L2 (a stale L1 line would outlive the launch), its scatters are relaxed fire-and-forget
    # reductions (Triton's default is an acq_rel atom) and its tiles are separated by a CTA barrier
    out = compile_sm90_in_subprocess(_AOT, timeout=300)
    *ops, barriers = out.split()
    assert "red.global.gpu.relaxed.add.f32" in ops and not any(o.startswith("atom") for o in ops), ops
    assert "ld.global.cg.b32" in ops and int(barriers) >= 1, (ops, barriers)



# ----------------------------------------------------------------------------- bounds checks

def _poisoned(v, d, pad=4, seed=0):
    """A (v, d) table viewing the middle of a buffer whose rows around it are NaN (out-of-bounds reads show)."""
    g = torch.Generator().manual_seed(seed)
    buf = torch.full((v + 2 * pad, d), float("nan"))
    buf[pad:pad + v] = torch.randn(v, d, generator=g) / d**0.5
    return buf.to(DEVICE)[pad:pad + v]


def _bad_batch(v=9, b=6, k=3):
    g = torch.Generator().manual_seed(v)
    c, x, n = torch.randint(0, v, (b,), generator=g), torch.randint(0, v, (b,), generator=g), \
        torch.randint(0, v, (b, k), generator=g)
    c[1], x[2], n[3, 1], n[4, 0], n[5, 2] = v, -1, -4, v + 3, -1
    return c.to(DEVICE), x.to(DEVICE), n.to(DEVICE)


def _dropped_reference(c, x, n, wi, wo, up):
    """float64 gradients with every bad lookup removed (a bad center removes its pair): what the kernels'
    backward computes when the check is off."""
    v = wi.shape[0]
    ids = torch.cat([x[:, None], n], 1)
    keep = ((ids >= 0) & (ids < v) & ((c >= 0) & (c < v))[:, None]).double()
    wi64, wo64 = wi.double().requires_grad_(), wo.double().requires_grad_()
    s = (wo64[ids.clamp(0, v - 1)] * wi64[c.clamp(0, v - 1)][:, None]).sum(-1)
    z = torch.cat([s[:, :1], -s[:, 1:]], 1)
    (-(torch.nn.functional.logsigmoid(z) * keep).sum(1) * up).sum().backward()
    return wi64.grad, wo64.grad


@pytest.mark.parametrize("check_bounds", [False, "off"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("road", ROADS)
def test_unchecked_bad_ids_never_read_out_of_bounds(road, backend, check_bounds):
    """With the check off, bad center/context/negative ids read row 0 (never the NaN rows around the tables):
    the loss is finite and equals the loss at row 0; on both backends, eager and compiled, the gradient of a
    bad lookup is dropped (checked against a float64 reference without those lookups)."""
    v, d = 9, 5
    wi, wo = _poisoned(v, d, seed=1), _poisoned(v, d, seed=2)
    c, x, n = _bad_batch(v)
    up = torch.rand(c.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    fn = on_road(road, lambda *a, **k: embedattn.negative_sampling_loss(*a, check_bounds=check_bounds,
                                                                        backend=backend, **k))
    loss, gi, go = _run(fn, c, x, n, wi, wo, up)
    safe = [torch.where((t >= 0) & (t < v), t, 0) for t in (c, x, n)]
    assert torch.isfinite(loss).all() and torch.isfinite(gi).all() and torch.isfinite(go).all()
    torch.testing.assert_close(loss.double(), ref_loss(*safe, wi.double(), wo.double(), reduction="none"))
    ei, eo = _dropped_reference(c, x, n, wi, wo, up)
    assert max_err(gi, ei) < 1e-6 and max_err(go, eo) < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_unchecked_bad_ids_sparse_gradients_match_dense(backend):
    """sparse=True with bad ids (check off) gives the dropped-lookup gradients on both backends."""
    v, d = 9, 5
    wi, wo = _poisoned(v, d, seed=8), _poisoned(v, d, seed=9)
    c, x, n = _bad_batch(v)
    up = torch.ones(c.shape[0], dtype=torch.float64, device=DEVICE)
    _, gi, go = _run(lambda *a, **k: embedattn.negative_sampling_loss(*a, check_bounds=False, sparse=True,
                                                                       backend=backend, **k), c, x, n, wi, wo, up)
    ei, eo = _dropped_reference(c, x, n, wi, wo, up)
    assert gi.is_sparse and go.is_sparse
    assert max_err(gi.to_dense(), ei) < 1e-6 and max_err(go.to_dense(), eo) < 1e-6


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
def test_unchecked_bad_ids_sparse_gradients_stay_in_the_table():
    """Sparse gradients with bad ids (check off): every COO index is a row of the table, none repeated, and
    the values are the dropped-lookup gradients."""
    v, d = 9, 5
    wi, wo = _poisoned(v, d, seed=4), _poisoned(v, d, seed=5)
    c, x, n = _bad_batch(v)
    up = torch.ones(c.shape[0], dtype=torch.float64, device=DEVICE)
    _, gi, go = _run(lambda *a, **k: embedattn.negative_sampling_loss(*a, check_bounds=False, sparse=True,
                                                                       backend="triton", **k), c, x, n, wi, wo, up)
    ei, eo = _dropped_reference(c, x, n, wi, wo, up)
    for g, e in ((gi, ei), (go, eo)):
        assert g.is_sparse
        idx = g._indices()[0]
        assert idx.min() >= 0 and idx.max() < v and idx.unique().numel() == idx.numel()
        assert max_err(g.to_dense(), e) < 1e-6


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
def test_forward_kernel_flags_bad_ids():
    """The "device" check inside the forward kernel: the flag is cleared by a bad center, context or negative
    (one at a time) and stays set otherwise; outputs stay finite."""
    from embedattn.kernels.negative_sampling import negative_sampling_forward

    v, d = 9, 5
    wi, wo = _poisoned(v, d, seed=6), _poisoned(v, d, seed=7)
    c, x, n = (t.clamp(0, v - 1) for t in _bad_batch(v))
    cases = {"none": (c, x, n)}
    for name, i in (("center", 0), ("context", 1), ("negatives", 2)):
        ts = [c, x, n]
        bad = ts[i].clone()
        bad.view(-1)[-1] = v
        ts[i] = bad
        cases[name] = tuple(ts)
    for name, (cc, xx, nn_) in cases.items():
        ok = torch.ones(1, dtype=torch.int32, device=DEVICE)
        loss, coef = negative_sampling_forward(cc, xx, nn_, wi, wo, ok)
        assert torch.isfinite(loss).all() and torch.isfinite(coef).all()
        assert ok.item() == (1 if name == "none" else 0), name


@pytest.mark.skipif(ON_CUDA, reason="a device-side assertion poisons the CUDA context: see the subprocess test")
@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_default_check_has_no_host_sync(backend):
    """Under torch.compile (fullgraph) the default is the "device" check: no host read, and a bad id fails the
    call (on the CPU at once, a RuntimeError from torch._assert_async)."""
    v, d = 9, 5
    wi, wo = _poisoned(v, d, seed=8), _poisoned(v, d, seed=9)
    f = on_road("compiled", lambda c, x, n, wi, wo: embedattn.negative_sampling_loss(c, x, n, wi, wo,
                                                                                     backend=backend))
    c, x, n = (t.clamp(0, v - 1) for t in _bad_batch(v))
    torch.testing.assert_close(f(c, x, n, wi, wo).double(), ref_loss(c, x, n, wi.double(), wo.double()))
    with pytest.raises(RuntimeError, match="negative_sampling_loss: a center, context or negative id is out"):
        f(*_bad_batch(v), wi, wo)


def test_empty_tables_are_an_error_in_every_mode():
    kw = {k: t.cpu() for k, t in _good().items()}
    kw.update(in_weight=torch.randn(0, 4), out_weight=torch.randn(0, 4))
    for mode in (None, "device", False):
        with pytest.raises(IndexError, match="center index the tables, which has no rows"):
            embedattn.negative_sampling_loss(**kw, check_bounds=mode)


def cuda_only(f):
    return pytest.mark.cuda(pytest.mark.skipif(not ON_CUDA, reason="needs CUDA")(f))


@cuda_only
def test_cuda_graph_capture_and_fullgraph_compile():
    """The default check has no host sync: a training step (loss, backward) captures in a CUDA graph and
    replays with new ids, and compiles with fullgraph=True; a bad id fails at the next synchronization
    (in a subprocess: a device-side assertion poisons the CUDA context)."""
    import subprocess
    import sys

    import torch._dynamo.testing

    torch.manual_seed(0)
    wi = (torch.randn(500, 64, device="cuda") * 0.1).requires_grad_()
    wo = (torch.randn(500, 64, device="cuda") * 0.1).requires_grad_()
    c, x = torch.randint(0, 500, (256,), device="cuda"), torch.randint(0, 500, (256,), device="cuda")
    n = torch.randint(0, 500, (256, 5), device="cuda")
    step = lambda: embedattn.negative_sampling_loss(c, x, n, wi, wo)  # noqa: E731
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step().backward()
    torch.cuda.current_stream().wait_stream(s)
    wi.grad.zero_()
    wo.grad.zero_()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        loss = step()
        loss.backward()
    c.copy_(torch.randint(0, 500, (256,), device="cuda"))
    wi.grad.zero_()
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(loss.double(), ref_loss(c, x, n, wi.detach().double(), wo.detach().double()),
                               rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
    cnt = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    torch.compile(step, fullgraph=True, backend=cnt)().backward()
    assert cnt.frame_count == 1
    script = ("import torch, embedattn\n"
              "w = torch.randn(50, 8, device='cuda')\n"
              "c = torch.randint(0, 50, (16,), device='cuda'); n = torch.randint(0, 50, (16, 3), device='cuda')\n"
              "n[3, 1] = 50\n"
              "embedattn.negative_sampling_loss(c, c, n, w, w)\nprint('returned', flush=True)\n"
              "torch.cuda.synchronize()\nprint('synchronized', flush=True)\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "returned" in r.stdout and "synchronized" not in r.stdout, r.stdout + r.stderr


@pytest.mark.skipif(ON_CUDA or not HAS_TRITON, reason="the CPU interpreter road under Inductor")
@pytest.mark.parametrize("check_bounds", [False, None])
def test_inductor_compiles_the_unchecked_call(check_bounds):
    """torch.compile's default backend (Inductor) on the kernels' op, check on and off (the "ok" flag is always
    a tensor: Inductor cannot functionalize a None mutated argument)."""
    v, d = 9, 5
    wi, wo = _poisoned(v, d, seed=10), _poisoned(v, d, seed=11)
    c, x, n = (t.clamp(0, v - 1) for t in _bad_batch(v))
    torch._dynamo.reset()
    fn = torch.compile(lambda *a: embedattn.negative_sampling_loss(*a, reduction="none", check_bounds=check_bounds,
                                                                  backend="triton"))
    torch.testing.assert_close(fn(c, x, n, wi, wo).double(), ref_loss(c, x, n, wi.double(), wo.double(),
                                                                        reduction="none"))
