"""Issue 23: learned attention sinks, a value head dim of its own (MLA) and head dims up to 512 (576 in decoding).

Every path (dense, varlen, KV cache contiguous and paged, split-KV) on both backends against the float64 reference
with FlashAttention's 2x rule, gradients included (dsinks too); the reference itself against transformers' gpt-oss
eager attention; rows with no visible key; the MLA decoding cache whose values are a view of its keys; one dropout
stream on both backends; and the sm_90 compile report (registers, spills, tensor-core instructions) of the D512 and
MLA kernels.
"""

from __future__ import annotations

import pytest
import torch
import torch.utils._python_dispatch
from helpers import (
    BACKENDS,
    DEVICE,
    DTYPES,
    ON_CUDA,
    ROADS,
    assert_fa_close,
    needs_triton,
    on_road,
    pages_to_cache,
    rand,
    skip_if_unsupported,
)
from sm90 import ATTENTION, run_rows

import embedattn
from embedattn import reference


def _sinks(h, seed=0, dtype=torch.float32):
    # logits around the scores' own range, so that the sink takes a real share of each row
    return rand(h, seed=seed, scale=1.5).to(dtype)


def _compare(kernel_fn, ref_fn, inputs, *, grads=True, seed=0, lse=False):
    """kernel_fn(*leaves) vs ref_fn(*leaves, upcast) against float64 with plain PyTorch in the same dtype as the
    yardstick (FA rule), outputs and the gradients of every input (q, k, v, sinks). With ``lse`` both return
    (out, lse) and the loss uses the lse too."""
    dtype = inputs[0].dtype
    leaves = [t.detach().clone().requires_grad_(grads) for t in inputs]
    r64 = [t.detach().double().requires_grad_(grads) for t in inputs]
    rp = [t.detach().clone().requires_grad_(grads) for t in inputs]
    got, want, plain = kernel_fn(*leaves), ref_fn(*r64, True), ref_fn(*rp, False)
    outs = (got, want, plain) if lse else ((got, None), (want, None), (plain, None))
    (out, got_lse), (ref, ref_lse), (pl, pl_lse) = outs
    assert_fa_close(out, ref, pl, "out")
    if lse:
        assert got_lse.dtype == torch.float32 and not torch.isnan(got_lse).any()
        assert_fa_close(got_lse, ref_lse, pl_lse.float(), "lse", eps=1e-3 if dtype == torch.float16 else None)
    if not grads:
        return
    dout = rand(*out.shape, dtype=dtype, seed=seed + 100)
    dl = rand(*got_lse.shape, seed=seed + 101) if lse else None

    def loss(o, ls, dt):
        value = (o.to(dt) * dout.to(dt)).sum()
        if ls is not None:
            value = value + (torch.where(torch.isfinite(ls), ls, 0).to(dt) * dl.to(dt)).sum()
        return value

    g = torch.autograd.grad(loss(out, got_lse, torch.float64), leaves)
    w = torch.autograd.grad(loss(ref, ref_lse, torch.float64), r64)
    b = torch.autograd.grad(loss(pl, pl_lse, dtype), rp)
    for name, a, bb, c in zip(("dq", "dk", "dv", "dsinks"), g, w, b):
        assert a.shape == bb.shape and a.dtype == inputs[("dq", "dk", "dv", "dsinks").index(name)].dtype, name
        assert_fa_close(a, bb, c, name)


# ------------------------------------------------------------------------------------------ the reference
def _gpt_oss_eager(q, k, v, sinks, *, mask=None, scale=None):
    """transformers' gpt-oss eager attention, as its models/gpt_oss/modeling_gpt_oss.py writes it (the sink column
    concatenated to the scores, the max over both subtracted, the column dropped after the softmax)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    w = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if mask is not None:
        w = w + mask
    s = sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[-2], -1)
    combined = torch.cat([w, s], dim=-1)
    combined = combined - combined.max(dim=-1, keepdim=True).values
    probs = torch.softmax(combined, dim=-1)[..., :-1]
    return probs @ v


def test_reference_sinks_match_gpt_oss_eager_and_transformers():
    """The reference with sinks equals gpt-oss's eager formula (and transformers' own function where it imports),
    with GQA, a causal mask and a value head dim of its own; its lse is log(sum exp(s) + exp(sink))."""
    q, k, v = (rand(*s, dtype=torch.float64, seed=i) for i, s in enumerate(((2, 4, 7, 16), (2, 2, 9, 16),
                                                                             (2, 2, 9, 24))))
    sinks = _sinks(4, seed=5).double()
    causal = torch.ones(7, 9, dtype=torch.bool, device=DEVICE).tril(2)
    additive = torch.zeros(7, 9, dtype=torch.float64, device=DEVICE).masked_fill(~causal, float("-inf"))
    want = _gpt_oss_eager(q, k, v, sinks, mask=additive)
    got, lse = reference.attention(q, k, v, causal=True, sinks=sinks, return_lse=True)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    scores = q @ k.repeat_interleave(2, 1).transpose(-1, -2) / 4.0 + additive
    want_lse = torch.logaddexp(torch.logsumexp(scores, -1), sinks.view(1, 4, 1))
    torch.testing.assert_close(lse, want_lse, atol=1e-12, rtol=1e-10)
    try:
        from transformers.models.gpt_oss import modeling_gpt_oss as hf
    except Exception:  # an older or trimmed transformers: the formula above stands in
        return
    module = torch.nn.Module()
    module.sinks, module.num_key_value_groups, module.training = sinks, 2, False
    hf_out, _ = hf.eager_attention_forward(module, q, k, v, additive[None, None], scaling=0.25, dropout=0.0)
    torch.testing.assert_close(hf_out.transpose(1, 2), want, atol=1e-12, rtol=1e-10)


# ------------------------------------------------------------------------------------------ dense
# (B, Hq, Hkv, Nq, Nk, D, Dv, kwargs): odd lengths, GQA, every feature beside the sinks
SINK_CASES = {
    "gqa_causal": (2, 4, 2, 13, 21, 16, 16, lambda: dict(causal=True)),
    "nq_gt_nk_empty_rows": (1, 2, 1, 19, 7, 24, 24, lambda: dict(causal=True)),
    "window_softcap_alibi": (1, 4, 2, 17, 29, 32, 32, lambda: dict(window=(5, 2), softcap=3.0,
                                                                   alibi_slopes=rand(4, seed=9).abs() * 0.3)),
    "mask_rows_masked": (2, 2, 2, 11, 14, 8, 8, lambda: dict(attn_mask=_masked_rows(2, 11, 14))),
    "mla_causal": (1, 4, 2, 15, 23, 40, 24, lambda: dict(causal=True)),
}


def _masked_rows(b, nq, nk, seed=3):
    keep = torch.rand(b, 1, nq, nk, generator=torch.Generator().manual_seed(seed)) > 0.3
    keep[..., 4, :] = False  # a row with no visible key
    return keep.to(DEVICE)


@pytest.mark.parametrize("case", list(SINK_CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("road", ROADS)
def test_sinks_dense(road, backend, dtype, case):
    """Output, lse and the gradients of q, k, v and the sinks (the lse in the loss too) against float64."""
    skip_if_unsupported(backend, dtype)
    if road == "compiled" and case not in ("gqa_causal", "mla_causal"):
        pytest.skip("the compiled road runs two cases")
    B, Hq, Hkv, Nq, Nk, D, Dv, kwf = SINK_CASES[case]
    kw = kwf()
    q, k, v = rand(B, Hq, Nq, D, dtype=dtype, seed=1), rand(B, Hkv, Nk, D, dtype=dtype, seed=2), \
        rand(B, Hkv, Nk, Dv, dtype=dtype, seed=3)
    sinks = _sinks(Hq, seed=4)
    ref_kw = {key: val.double() if key == "alibi_slopes" else val for key, val in kw.items()}
    fn = on_road(road, lambda q, k, v, s: embedattn.attention(q, k, v, sinks=s, return_lse=True, backend=backend,
                                                              **kw))
    _compare(fn, lambda q, k, v, s, up: reference.attention(q, k, v, sinks=s, return_lse=True, upcast=up,
                                                            **(ref_kw if up else kw)),
             (q, k, v, sinks), lse=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sinks_rows_with_no_key_give_zeros_and_no_nan(backend):
    """Rows that see no key (causal with Nq > Nk, a fully masked row, Nk = 0): out = 0, lse = the sink, and every
    gradient finite; the sinks' gradient of such a row is its lse's weight (d lse / d sink = 1)."""
    q, k, v = rand(1, 2, 9, 16, seed=11), rand(1, 1, 4, 16, seed=12), rand(1, 1, 4, 8, seed=13)
    sinks = _sinks(2, seed=14).requires_grad_()
    mask = torch.ones(1, 1, 9, 4, dtype=torch.bool, device=DEVICE)
    mask[..., 7, :] = False
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = embedattn.attention(*leaves, causal=True, attn_mask=mask, sinks=sinks, return_lse=True,
                                   backend=backend)
    empty = [0, 1, 2, 3, 4, 7]  # bottom-right causal: rows 0..4 see no key; row 7 is masked
    assert torch.equal(out[:, :, empty], torch.zeros_like(out[:, :, empty]))
    torch.testing.assert_close(lse[:, :, empty], sinks.detach().view(1, 2, 1).expand(1, 2, 6))
    grads = torch.autograd.grad(out.sum() + lse.sum(), leaves + [sinks])
    assert all(torch.isfinite(g).all() for g in grads)
    r = [t.double().requires_grad_() for t in (q, k, v, sinks.detach())]
    ro, rl = reference.attention(*r[:3], causal=True, attn_mask=mask, sinks=r[3], return_lse=True)
    for a, b in zip(grads, torch.autograd.grad(ro.sum() + rl.sum(), r)):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5)
    kz = k[:, :, :0]
    out, lse = embedattn.attention(q, kz, v[:, :, :0], sinks=sinks, return_lse=True, backend=backend)
    assert torch.equal(out, torch.zeros(1, 2, 9, 8, device=DEVICE))
    torch.testing.assert_close(lse, sinks.detach().view(1, 2, 1).expand(1, 2, 9))
    (ds,) = torch.autograd.grad(lse.sum(), sinks)
    torch.testing.assert_close(ds, torch.full_like(ds, 9.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sinks_lse_includes_the_sink(backend):
    """The returned lse with sinks is logaddexp(lse without them, sink) (FlashAttention 4's choice); a sink of -inf
    is no sink."""
    q, k, v = rand(2, 2, 5, 16, seed=15), rand(2, 2, 8, 16, seed=16), rand(2, 2, 8, 16, seed=17)
    sinks = _sinks(2, seed=18)
    _, without = embedattn.attention(q, k, v, return_lse=True, backend=backend)
    out, lse = embedattn.attention(q, k, v, sinks=sinks, return_lse=True, backend=backend)
    torch.testing.assert_close(lse, torch.logaddexp(without, sinks.view(1, 2, 1)), atol=1e-5, rtol=1e-5)
    plain = embedattn.attention(q, k, v, backend=backend)
    # the sink's share is missing mass: out = plain * (1 - p_sink)
    torch.testing.assert_close(out, plain * (1 - torch.exp(sinks.view(1, 2, 1) - lse)).unsqueeze(-1), atol=1e-5,
                               rtol=1e-5)
    neg = torch.full((2,), float("-inf"), device=DEVICE)
    torch.testing.assert_close(embedattn.attention(q, k, v, sinks=neg, backend=backend), plain, atol=1e-6,
                               rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sinks_any_float_dtype_and_their_gradient_dtype(backend):
    """sinks in fp16, bf16 or fp64 with fp32 q/k/v: used in fp32, the gradient in the sinks' own dtype."""
    q, k, v = rand(1, 2, 6, 16, seed=19), rand(1, 2, 9, 16, seed=20), rand(1, 2, 9, 16, seed=21)
    exact = _sinks(2, seed=22).bfloat16().float()  # values every float dtype holds exactly
    want = embedattn.attention(q, k, v, sinks=exact, backend="reference")
    for dt in (torch.float16, torch.bfloat16, torch.float64):
        sinks = exact.to(dt).requires_grad_()
        out = embedattn.attention(q, k, v, sinks=sinks, backend=backend)
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
        (ds,) = torch.autograd.grad(out.sum(), sinks)
        assert ds.dtype == dt and torch.isfinite(ds).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_sinks_with_dropout_are_never_dropped(backend):
    """Dropout drops probabilities of keys, never the sink (it has no value): with v = identity the output is the
    dropped probabilities, whose kept entries are p / (1 - p_drop) with p normalized by the sink too."""
    Nk, p_drop, seed = 16, 0.3, 77
    q, k = rand(1, 2, 12, 16, seed=23, scale=2), rand(1, 2, Nk, 16, seed=24, scale=2)
    sinks = _sinks(2, seed=25)
    eye = torch.eye(Nk, device=DEVICE).expand(1, 2, Nk, Nk)
    dropped = embedattn.attention(q, k, eye, sinks=sinks, dropout_p=p_drop, seed=seed, backend=backend)
    probs = reference.attention(q.double(), k.double(), eye.double(), sinks=sinks.double())
    keep = reference.dropout_keep_mask((1, 2, 12, Nk), p_drop, seed)
    torch.testing.assert_close(dropped.double(), probs * keep.to(DEVICE) / (1 - p_drop), atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------ head dim 512
@pytest.mark.parametrize("dv", [512, 128])
@pytest.mark.parametrize("backend", BACKENDS)
def test_head_dim_512_forward_backward(backend, dv):
    """D = 512 (Gemma's global layers; a value head dim of 128 beside it too), causal, GQA, sinks, odd lengths:
    the forward's QK^T over 64-wide column chunks and the backward's dK/dV in two launches, against float64."""
    q, k, v = rand(1, 2, 11, 512, seed=26), rand(1, 1, 13, 512, seed=27), rand(1, 1, 13, dv, seed=28)
    _compare(lambda q, k, v, s: embedattn.attention(q, k, v, causal=True, sinks=s, return_lse=True,
                                                    backend=backend),
             lambda q, k, v, s, up: reference.attention(q, k, v, causal=True, sinks=s, return_lse=True, upcast=up),
             (q, k, v, _sinks(2, seed=29)), lse=True)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_head_dim_512_features_on_kernels(dtype):
    """D512 with window, softcap, ALiBi, a bool mask and dropout (the reference draws the same mask)."""
    skip_if_unsupported("triton", dtype)
    q, k, v = rand(1, 2, 9, 512, dtype=dtype, seed=30), rand(1, 2, 10, 512, dtype=dtype, seed=31), \
        rand(1, 2, 10, 512, dtype=dtype, seed=32)
    kw = dict(window=(4, 1), softcap=2.0, alibi_slopes=rand(2, seed=33).abs() * 0.2,
              attn_mask=_masked_rows(1, 9, 10), dropout_p=0.2, seed=5)
    ref_kw = {key: val.double() if key == "alibi_slopes" else val for key, val in kw.items()}
    _compare(lambda q, k, v: embedattn.attention(q, k, v, backend="triton", **kw),
             lambda q, k, v, up: reference.attention(q, k, v, upcast=up, **(ref_kw if up else kw)), (q, k, v))


# ------------------------------------------------------------------------------------------ varlen
@pytest.mark.parametrize("dv", [24, 40])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("road", ROADS)
def test_varlen_sinks_and_value_head_dim(road, backend, dv):
    """Packed sequences (one with no key, one longer on the query side), causal, GQA, sinks, Dv != D."""
    if road == "compiled" and dv == 24:
        pytest.skip("the compiled road runs Dv != D")
    lq, lk = [5, 3, 11], [9, 0, 7]
    cu_q, cu_k = (torch.tensor([0] + list(torch.tensor(n).cumsum(0)), dtype=torch.int32, device=DEVICE)
                  for n in (lq, lk))
    q, k, v = rand(sum(lq), 4, 24, seed=34), rand(sum(lk), 2, 24, seed=35), rand(sum(lk), 2, dv, seed=36)
    run = on_road(road, lambda q, k, v, s: embedattn.attention_varlen(q, k, v, cu_q, cu_k, max(lq), max(lk),
                                                                      causal=True, sinks=s, backend=backend))
    _compare(run, lambda q, k, v, s, up: reference.attention_varlen(q, k, v, cu_q, cu_k, causal=True, sinks=s,
                                                                    upcast=up), (q, k, v, _sinks(4, seed=37)))
    out, lse = embedattn.attention_varlen(q, k, v, cu_q, cu_k, max(lq), max(lk), causal=True, return_lse=True,
                                          sinks=_sinks(4, seed=37), backend=backend)
    assert out.shape == (sum(lq), 4, dv)
    torch.testing.assert_close(lse[:, 5:8], _sinks(4, seed=37).view(4, 1).expand(4, 3))  # the keyless sequence


# ------------------------------------------------------------------------------------------ dropout: one stream
@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
@needs_triton
def test_dropout_same_mask_on_both_backends(varlen):
    """The reference draws the kernels' Philox mask for the same seed: the same output and gradients on both
    backends, dense and varlen (where the reference used to refuse dropout), with sinks and GQA."""
    kw = dict(dropout_p=0.25, seed=2**40 + 3, causal=True, sinks=_sinks(4, seed=38))
    if varlen:
        lq, lk = [4, 9], [7, 9]
        cu_q, cu_k = (torch.tensor([0] + list(torch.tensor(n).cumsum(0)), dtype=torch.int32, device=DEVICE)
                      for n in (lq, lk))
        inputs = (rand(13, 4, 16, seed=39), rand(16, 2, 16, seed=40), rand(16, 2, 8, seed=41))
        fn = lambda be, *t: embedattn.attention_varlen(*t, cu_q, cu_k, 11, 10, backend=be, **kw)  # loose maxima
    else:
        inputs = (rand(2, 4, 7, 16, seed=39), rand(2, 2, 10, 16, seed=40), rand(2, 2, 10, 8, seed=41))
        fn = lambda be, *t: embedattn.attention(*t, backend=be, **kw)
    results = []
    for be in ("reference", "triton"):
        leaves = [t.clone().requires_grad_() for t in inputs]
        out = fn(be, *leaves)
        results.append((out, *torch.autograd.grad(out, leaves, rand(*out.shape, seed=42))))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)
    kw["dropout_p"] = 0.0  # and the mask changes the answer
    assert (fn("reference", *inputs) - results[0][0]).abs().max() > 1e-2


# ------------------------------------------------------------------------------------------ KV cache
class _Copies(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the element counts of every tensor an aten copy (clone, copy_, contiguous's _to_copy) produces."""

    COPIES = ("aten.clone", "aten.copy_", "aten._to_copy", "aten.contiguous")

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if str(func).startswith(self.COPIES) and isinstance(out, torch.Tensor):
            self.sizes.append(out.numel())
        return out


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("backend", BACKENDS)
def test_mla_decoding_values_are_a_view_of_the_keys(backend, num_splits, paged):
    """DeepSeek's MLA decoding: a 576-wide latent cache whose first 512 columns are the values (v_cache a view of
    k_cache, read without a copy), k_new appended with v_new=None (it writes the values too), sinks, GQA-like
    sharing of the one latent head, split-KV adding the sink once; output and lse against float64."""
    B, H, S, D, Dv, page = 2, 4, 24, 576, 512, 8
    lens = torch.tensor([0, 17], dtype=torch.int32, device=DEVICE)
    q, kn = rand(B, H, 1, D, seed=43), rand(B, 1, 1, D, seed=44)
    sinks = _sinks(H, seed=45)
    if paged:
        pool = rand(B * S // page + 1, 1, page, D, seed=46)
        table = torch.randperm(B * S // page, generator=torch.Generator().manual_seed(1)).view(B, -1)
        table = table.to(DEVICE, torch.int32)
    else:
        pool, table = rand(B, 1, S, D, seed=46), None
    kc = pool.clone()
    vc = kc[..., :Dv]
    assert vc.data_ptr() == kc.data_ptr() and not vc.is_contiguous()
    with _Copies() as copies:
        out, lse = embedattn.attention_with_kvcache(q, kc, vc, lens, kn, None, causal=True, num_splits=num_splits,
                                                    block_table=table, sinks=sinks, return_lse=True, backend=backend)
    if backend == "triton":  # no copy of the cache (or of a large part of it) on the way to the kernel
        assert not [n for n in copies.sizes if n >= vc.numel() // 2], copies.sizes
    kd = kc if table is None else pages_to_cache(kc, table)
    k0 = pool if table is None else pages_to_cache(pool, table)
    for b in range(B):  # the append wrote the keys, and so the values
        n = int(lens[b])
        assert torch.equal(kd[b, :, n], kn[b, :, 0]) and torch.equal(kd[b, :, :n], k0[b, :, :n])
    total = lens + 1
    ref, ref_lse = reference.attention_with_kvcache(q.double(), kd.double(), kd[..., :Dv].double(), total,
                                                    causal=True, sinks=sinks.double(), return_lse=True)
    plain, plain_lse = reference.attention_with_kvcache(q, kd, kd[..., :Dv], total, causal=True, sinks=sinks,
                                                        return_lse=True, upcast=False)
    assert out.shape == (B, H, 1, Dv)
    assert_fa_close(out, ref, plain)
    assert_fa_close(lse, ref_lse, plain_lse)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mla_decoding_compiled(backend):
    """The MLA step under torch.compile(fullgraph=True): the values a view of a latent cache that owns its memory,
    appended with v_new=None; and v_new=None with a copy for v_cache still refused."""
    B, H, S, D, Dv = 2, 4, 16, 96, 64
    kc, q, kn = rand(B, 1, S, D, seed=64), rand(B, H, 1, D, seed=65), rand(B, 1, 1, D, seed=66)
    lens = torch.tensor([3, 9], dtype=torch.int32, device=DEVICE)
    sinks = _sinks(H, seed=67)
    step = on_road("compiled", lambda q, kc, kn: embedattn.attention_with_kvcache(
        q, kc, kc[..., :Dv], lens, kn, None, causal=True, sinks=sinks, backend=backend))
    out = step(q, kc, kn)
    assert torch.equal(kc[1, :, 9], kn[1, :, 0])
    ref = reference.attention_with_kvcache(q.double(), kc.double(), kc[..., :Dv].double(), lens + 1, causal=True,
                                           sinks=sinks.double())
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises((ValueError, RuntimeError), match="column view"):
        on_road("compiled", lambda q, kc, kn: embedattn.attention_with_kvcache(
            q, kc, kc[..., :Dv].clone(), lens, kn, None, backend=backend))(q, kc, kn)


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("road", ROADS)
def test_kvcache_value_head_dim_and_sinks_with_v_new(road, backend, paged):
    """A separate value cache (or pool of pages) with Dv != D, v_new appended, sinks and split-KV: against float64."""
    if road == "compiled" and paged:
        pytest.skip("the compiled road runs the contiguous cache")
    B, H, HK, S, D, Dv, page = 2, 4, 2, 30, 24, 40, 5
    table = None
    if paged:  # the pools' pages in a random order, one spare
        table = torch.randperm(B * S // page, generator=torch.Generator().manual_seed(2)).view(B, -1)
        table = table.to(DEVICE, torch.int32)
        kc, vc = rand(B * S // page + 1, HK, page, D, seed=47), rand(B * S // page + 1, HK, page, Dv, seed=48)
    else:
        kc, vc = rand(B, HK, S, D, seed=47), rand(B, HK, S, Dv, seed=48)
    q, kn, vn = rand(B, H, 2, D, seed=49), rand(B, HK, 2, D, seed=50), rand(B, HK, 2, Dv, seed=51)
    lens = torch.tensor([3, 25], dtype=torch.int32, device=DEVICE)
    sinks = _sinks(H, seed=52)
    whole = lambda pool: pool if table is None else pages_to_cache(pool, table)
    for splits in (1, 2):
        k1, v1 = kc.clone(), vc.clone()
        out = on_road(road, lambda q, k1, v1, splits=splits: embedattn.attention_with_kvcache(
            q, k1, v1, lens, kn, vn, causal=True, num_splits=splits, block_table=table, sinks=sinks,
            backend=backend))(q, k1, v1)
        kw, vw = whole(k1), whole(v1)
        ref = reference.attention_with_kvcache(q.double(), kw.double(), vw.double(), lens + 2, causal=True,
                                               sinks=sinks.double())
        plain = reference.attention_with_kvcache(q, kw, vw, lens + 2, causal=True, sinks=sinks, upcast=False)
        assert torch.equal(vw[1, :, 25:27], vn[1]) and torch.equal(kw[0, :, 3:5], kn[0])
        assert_fa_close(out, ref, plain)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kvcache_aliasing_rules_and_errors(backend):
    """v_new with a v_cache that is a view of k_cache's columns is refused before anything is written, as is
    v_new=None for a cache that is not such a view; v_new alone too. A bad length names the batch and the value."""
    kc = rand(2, 1, 8, 16, seed=53)
    k0 = kc.clone()
    q, kn = rand(2, 2, 1, 16, seed=54), rand(2, 1, 1, 16, seed=55)
    lens = torch.tensor([2, 3], device=DEVICE)
    with pytest.raises(ValueError, match="v_new=None"):
        embedattn.attention_with_kvcache(q, kc, kc[..., :12], lens, kn, kn[..., :12], backend=backend)
    with pytest.raises(ValueError, match="column view"):
        embedattn.attention_with_kvcache(q, kc, kc[..., :12].clone(), lens, kn, None, backend=backend)
    with pytest.raises(ValueError, match="together"):
        embedattn.attention_with_kvcache(q, kc, kc[..., :12].clone(), lens, None, kn[..., :12], backend=backend)
    with pytest.raises(ValueError, match="Nnew"):
        embedattn.attention_with_kvcache(q, kc, kc[..., 2:14].clone(), lens, kn, kn[..., :3], backend=backend)
    assert torch.equal(kc, k0)
    with pytest.raises(ValueError, match=r"batch 1 has cache_seqlens\[1\] = 8 with Nnew = 1"):
        embedattn.attention_with_kvcache(q, kc, kc[..., :12], torch.tensor([2, 8], device=DEVICE), kn, None,
                                         check_bounds="sync", backend=backend)
    # a column view that does not start at column 0 is one too
    out = embedattn.attention_with_kvcache(q, kc, kc[..., 4:12], lens, kn, None, backend=backend)
    assert out.shape == (2, 2, 1, 8) and torch.equal(kc[1, :, 3, 4:12], kn[1, :, 0, 4:12])


@needs_triton
def test_decoding_head_dims_past_the_training_limit():
    """D 576 (with Dv <= 512) is a decoding shape: attention_with_kvcache takes it on the kernels, attention (which
    trains) stops at 512, and a value head dim past 512 is refused by name."""
    q, kc = rand(1, 2, 1, 576, seed=56), rand(1, 1, 8, 576, seed=57)
    lens = torch.tensor([8], dtype=torch.int32, device=DEVICE)
    out = embedattn.attention_with_kvcache(q, kc, kc[..., :512], lens, backend="triton")
    ref = reference.attention_with_kvcache(q.double(), kc.double(), kc[..., :512].double(), lens)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="head dims 1..512"):
        embedattn.attention(q, kc, kc, backend="triton")
    with pytest.raises(ValueError, match="value head dims 1..512"):
        embedattn.attention_with_kvcache(q, kc, kc, lens, backend="triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_sinks_bad_input(backend):
    q = rand(1, 2, 4, 16)
    for sinks, exc, match in ((torch.ones(3, device=DEVICE), ValueError, r"\(Hq,\) = \(2,\)"),
                              (torch.ones(1, 2, device=DEVICE), ValueError, "shape"),
                              (torch.ones(2, dtype=torch.int64, device=DEVICE), TypeError, "floating"),
                              ([0.0, 1.0], TypeError, "sinks"),
                              (torch.ones(2, device="meta"), ValueError, "sinks is on")):
        with pytest.raises(exc, match=match):
            embedattn.attention(q, q, q, sinks=sinks, backend=backend)
    qp, cu = rand(5, 2, 16), torch.tensor([0, 5], device=DEVICE)
    with pytest.raises(ValueError, match="sinks"):
        embedattn.attention_varlen(qp, qp, qp, cu, cu, 5, 5, sinks=torch.ones(4, device=DEVICE), backend=backend)
    with pytest.raises(ValueError, match="sinks"):
        embedattn.attention_with_kvcache(q[:, :, :1], q, q, torch.tensor([2], device=DEVICE),
                                         sinks=torch.ones(4, device=DEVICE), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sdpa_call_takes_sinks(backend):
    """embedattn.attention.sdpa_call (the transformers integration's decision) with sinks: torch's top-left causal,
    GQA, a value head dim of its own, on the backend it resolves, equal to attention with the same sinks."""
    from embedattn.attention import sdpa_call

    q, k, v = rand(2, 4, 6, 16, seed=60), rand(2, 2, 9, 16, seed=61), rand(2, 2, 9, 24, seed=62)
    sinks = _sinks(4, seed=63)
    call = sdpa_call(backend, q, k, v, is_causal=True, enable_gqa=True, sinks=sinks)
    assert call is not None and call.backend == backend
    want = embedattn.attention(q, k, v, causal=True, causal_offset=0, sinks=sinks, backend="reference")
    torch.testing.assert_close(call.run(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_multihead_self_attention_learns_its_sinks(backend):
    """embedattn.nn.MultiheadSelfAttention(sinks=True): a parameter per query head that the forward uses and the
    backward trains, decoding through a KV cache as the whole sequence does."""
    from embedattn.nn import KVCache, MultiheadSelfAttention

    m = MultiheadSelfAttention(32, 4, 2, sinks=True, backend=backend).to(DEVICE)
    assert m.sinks.shape == (4,) and "sinks=True" in repr(m)
    with torch.no_grad():
        m.sinks.copy_(_sinks(4, seed=58))
    x = rand(2, 7, 32, seed=59)
    out = m(x)
    qkv = m.qkv(x).view(2, 7, 8, 8)
    q, k, v = (qkv[:, :, a:b].transpose(1, 2).double() for a, b in ((0, 4), (4, 6), (6, 8)))
    ref = reference.attention(q, k, v, causal=True, sinks=m.sinks.double())
    torch.testing.assert_close(out.double(), m.proj(ref.transpose(1, 2).reshape(2, 7, 32).float()).double(),
                               atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert m.sinks.grad is not None and torch.isfinite(m.sinks.grad).all() and m.sinks.grad.abs().sum() > 0
    cache = KVCache()
    with torch.no_grad():
        steps = torch.cat([m(x[:, :4], kv_cache=cache)] + [m(x[:, i:i + 1], kv_cache=cache) for i in range(4, 7)],
                          dim=1)
    torch.testing.assert_close(steps, out.detach(), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ compiled for sm_90
def report_specs() -> list[dict]:
    """The kernels issue 23 adds, with the configs and constexprs the launchers pick on a GPU (bf16): D512 training
    (forward; backward dK, dV, dQ), MLA training (Q/K 192, V 128) and MLA decoding (Q/K 576, V 512 on the keys' view;
    split-KV, and paged with sinks)."""
    from embedattn.kernels import attention as K

    def fixed(kind, flags):  # the GPU's row of the launchers' table (this process interprets)
        row = 1 + (K._width(flags) > 64) + (K._width(flags) > 128) + (K._width(flags) > 256)
        return list(K._FIXED[kind][row])

    specs = []
    for name, d, dv in (("D512", 512, 512), ("MLA train 192/128", 192, 128)):
        fwd = dict(K._head_flags(d, dv, torch.bfloat16, forward=True), CAUSAL=True, SINK=True)
        specs.append(dict(name=name, kernel="fwd", config=fixed("fwd", fwd), consts=fwd))
        bwd = dict(K._head_flags(d, dv, torch.bfloat16), CAUSAL=True)
        conf = fixed("bwd", bwd)
        parts = [(True, True)] if K._width(bwd) <= 256 else [(True, False), (False, True)]
        for gk, gv in parts:
            specs.append(dict(name=name, kernel="dkdv", config=conf, consts=dict(bwd, GRAD_K=gk, GRAD_V=gv)))
        specs.append(dict(name=name, kernel="dq", config=[conf[1], conf[0], *conf[2:]], consts=bwd))
    dec = dict(K._head_flags(576, 512, torch.bfloat16, forward=True), CAUSAL=True, KLENS=True)
    c = K.decode_config(dict(zip(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"), fixed("fwd", dec))),
                        K._width(dec), 1)
    conf = [c["BLOCK_M"], c["BLOCK_N"], c["num_warps"], c["num_stages"]]
    specs.append(dict(name="MLA decode 576/512 split", kernel="fwd", config=conf, consts=dict(dec, SPLIT=True)))
    specs.append(dict(name="MLA decode 576/512 paged", kernel="fwd", config=conf,
                      consts=dict(dec, SINK=True, PAGE=64)))
    return specs


def format_rows(rows: list[dict]) -> str:
    cols = ("name", "kernel", "config", "regs", "spill_bytes", "smem", "wgmma", "mma_sync")
    lines = [" | ".join(cols)]
    for r in rows:
        extra = {k: r["consts"][k] for k in ("HEAD_DIM", "HEAD_DIM_V", "NUM_DK", "GRAD_K", "GRAD_V", "SPLIT", "PAGE")
                 if r["consts"].get(k) not in (None, 0, False)}
        lines.append(" | ".join(str(r.get(c, r.get("error", ""))) for c in cols) + f" | {extra}")
    return "\n".join(lines)


@pytest.mark.skipif("triton" not in BACKENDS or ON_CUDA, reason="needs Triton; on CUDA the kernels run for real")
def test_d512_and_mla_kernels_compile_to_tensor_cores_without_spills():
    """What the interpreter cannot show: the default configs of the D512 and MLA kernels lower and assemble for an
    H100 (ptxas, no GPU needed) with tensor-core instructions (wgmma or mma.sync), no register spills and shared
    memory within sm_90's 227 KB. The table (registers, spills per kernel) is printed for the issue's notes."""
    rows = run_rows(ATTENTION, report_specs())
    print("\n" + format_rows(rows))
    for r in rows:
        name = f"{r['name']} {r['kernel']} {r['config']}"
        assert "error" not in r, f"{name}: {r.get('error')}"
        assert r["wgmma"] + r["mma_sync"] > 0, f"{name}: no tensor-core instruction"
        assert r["spill_bytes"] == 0, f"{name}: {r['spill_bytes']} bytes of spills"
        assert r["smem"] <= 232448, f"{name}: {r['smem']} bytes of shared memory"


if __name__ == "__main__":  # the compile report, for the issue notes
    print(format_rows(run_rows(ATTENTION, report_specs())))
