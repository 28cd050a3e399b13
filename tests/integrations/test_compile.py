"""The one road under torch.compile: the registered ops (schema, fake implementations), eager and compiled
runs agreeing (dropout masks included), the CUDA launch path traced with fake tensors, and Inductor on CUDA.

The per-op grids in test_attention.py, test_embedding.py and test_negative_sampling.py run every case on
both roads (``helpers.ROADS``); this file checks what is specific to the registration.
"""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch
from helpers import BACKENDS, DEVICE, HAS_TRITON, ON_CUDA, graph_targets, on_road

import embedattn
from embedattn.attention import AttnSpec

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")


def cuda_only(f):
    return pytest.mark.cuda(pytest.mark.skipif(not ON_CUDA, reason="needs CUDA")(f))


def _qkv(b=2, hq=4, hkv=2, nq=5, nk=7, d=8, dtype=torch.float32, device=DEVICE, grad=False):
    g = torch.Generator().manual_seed(3)
    mk = lambda *s: torch.randn(*s, generator=g).to(device, dtype).requires_grad_(grad)  # noqa: E731
    return mk(b, hq, nq, d), mk(b, hkv, nk, d), mk(b, hkv, nk, d)


@needs_triton
def test_ops_opcheck():
    """torch.library.opcheck on every registered op (schema, fake implementation vs the kernels, AOT
    dispatch), with every attention feature on."""
    q, k, v = _qkv()
    mask = torch.rand(2, 1, 5, 7, generator=torch.Generator().manual_seed(5)).to(DEVICE) > 0.2
    alibi = torch.rand(2, 4, device=DEVICE)
    seed = torch.tensor([9], device=DEVICE)
    E = torch.ops.embedattn
    spec = AttnSpec(mask=mask, alibi=alibi, seed=seed, causal=True, causal_offset=2, scale=0.5, window_left=3,
                    window_right=1, softcap=2.0, dropout_p=0.25).op_args()
    torch.library.opcheck(E.attention_fwd.default, (q, k, v, "default", *spec))
    out, lse2 = E.attention_fwd(q, k, v, "default", *spec)
    torch.library.opcheck(E.attention_bwd.default, (torch.randn_like(out), q, k, v, out, lse2, torch.randn_like(lse2),
                                                    "default", *spec))
    qp, kp, vp = (t[0].transpose(0, 1).contiguous() for t in (q, k, v))  # (total, H, D)
    cu_q, cu_k = torch.tensor([0, 2, 5], dtype=torch.int32), torch.tensor([0, 3, 7], dtype=torch.int32)
    cu_q, cu_k = cu_q.to(DEVICE), cu_k.to(DEVICE)
    vs = AttnSpec(scale=0.5).op_args()
    torch.library.opcheck(E.varlen_fwd.default, (qp, kp, vp, cu_q, cu_k, 3, 4, *vs))
    o, l2 = E.varlen_fwd(qp, kp, vp, cu_q, cu_k, 3, 4, *vs)
    torch.library.opcheck(E.varlen_bwd.default, (torch.randn_like(o), qp, kp, vp, o, l2, cu_q, cu_k, 3, 4, *vs))
    lens = torch.tensor([3, 7], dtype=torch.int32, device=DEVICE)
    torch.library.opcheck(E.kvcache_fwd.default, (q[:, :, :1], k, v, lens, None, 2, *vs))
    # issue 23: learned sinks (their gradient a fourth output) and a value head dim of its own
    sinks = torch.linspace(-1.0, 1.0, 4, device=DEVICE)
    wide = torch.randn(2, 2, 7, 12, device=DEVICE)
    ss = AttnSpec(sinks=sinks, causal=True, causal_offset=2, scale=0.5, softcap=2.0).op_args()
    torch.library.opcheck(E.attention_fwd.default, (q, k, wide, "default", *ss))
    out, lse2 = E.attention_fwd(q, k, wide, "default", *ss)
    torch.library.opcheck(E.attention_bwd.default, (torch.randn_like(out), q, k, wide, out, lse2,
                                                    torch.randn_like(lse2), "default", *ss))
    vw = wide[0].transpose(0, 1).contiguous()
    torch.library.opcheck(E.varlen_fwd.default, (qp, kp, vw, cu_q, cu_k, 3, 4, *ss))
    o, l2 = E.varlen_fwd(qp, kp, vw, cu_q, cu_k, 3, 4, *ss)
    torch.library.opcheck(E.varlen_bwd.default, (torch.randn_like(o), qp, kp, vw, o, l2, cu_q, cu_k, 3, 4, *ss))
    torch.library.opcheck(E.kvcache_fwd.default, (q[:, :, :1], k, k[..., :5], lens, None, 2, *ss))
    w, p = torch.randn(11, 6, device=DEVICE), torch.randn(9, 6, device=DEVICE)
    ids = torch.randint(0, 9, (15,), device=DEVICE)
    torch.library.opcheck(E.embedding_fwd.default, (ids, w, p, None, 5, 1, 1.5, 2))
    torch.library.opcheck(E.embedding_bwd.default, (torch.randn(15, 6, device=DEVICE), ids, None, 11, 9, 5, 1.5, 2,
                                                    3, True, True, True))
    c, x, n = (torch.randint(0, 11, s, device=DEVICE) for s in ((7,), (7,), (7, 3)))
    torch.library.opcheck(E.negative_sampling_fwd.default, (c, x, n, w, w.clone()))
    loss, coef = E.negative_sampling_fwd(c, x, n, w, w.clone())
    torch.library.opcheck(E.negative_sampling_bwd.default, (c, x, n, w, w.clone(), coef, torch.ones_like(loss), None,
                                                            None, 11, 11, True, True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_same_mask_eager_and_compiled(backend):
    """A seed draws one mask on a backend, eagerly and compiled (the same road); forward and backward
    agree; seed=None under fullgraph compile needs no capture_scalar_outputs and follows torch.manual_seed."""
    q, k, v = _qkv(grad=True)
    kw = dict(causal=True, softcap=2.0, dropout_p=0.3, backend=backend)
    f = lambda q, k, v, seed: embedattn.attention(q, k, v, seed=seed, **kw)  # noqa: E731
    eager = f(q, k, v, 7)
    compiled = on_road("compiled", lambda q, k, v: f(q, k, v, 7))(q, k, v)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    w = torch.randn_like(eager)
    for a, b in zip(torch.autograd.grad((eager * w).sum(), (q, k, v)), torch.autograd.grad((compiled * w).sum(),
                                                                                        (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    cf = on_road("compiled", lambda q, k, v: f(q, k, v, None))
    torch.manual_seed(1)
    a, b = cf(q, k, v), cf(q, k, v)
    torch.manual_seed(1)
    assert torch.equal(a, cf(q, k, v)) and not torch.equal(a, b)


@needs_triton
def test_compiled_graph_holds_the_kernel_ops():
    """Compiled with backend="triton", the graph holds the registered forward op (and the backward op in
    the backward graph); compiled on the reference, none of them (plain torch ops)."""
    import torch._dynamo.testing

    q, k, v = _qkv(grad=True)
    for backend, n in (("triton", 1), ("reference", 0)):
        torch._dynamo.reset()
        cnt = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
        out = torch.compile(lambda q, k, v, be=backend: embedattn.attention(q, k, v, causal=True, backend=be),
                            fullgraph=True, backend=cnt)(q, k, v)
        out.sum().backward()
        assert cnt.frame_count == 1
        assert graph_targets(cnt.graphs[0]).count("embedattn.attention_fwd") == n


def _fa_layout(t):
    return t.transpose(1, 2)  # (B, H, N, D) -> FlashAttention's (B, N, H, D), a view


def _four_entries():
    """The four ways into the dense kernels, each on a (B, H, N, D) q, k, v: (name, its module, the call)."""
    import embedattn.flash_attn_interface as fa
    import embedattn.integrations.transformers as ea_hf

    hf = ea_hf.make_attention_forward("triton")
    return [
        ("attention", "embedattn.attention",
         lambda q, k, v: embedattn.attention(q, k, v, causal=True, backend="triton")),
        ("sdpa", "embedattn.attention",
         lambda q, k, v: embedattn.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)),
        ("flash_attn_func", "embedattn.flash_attn_interface",
         lambda q, k, v: fa.flash_attn_func(_fa_layout(q), _fa_layout(k), _fa_layout(v), causal=True,
                                            backend="triton")),
        ("transformers", "embedattn.integrations.transformers",
         lambda q, k, v: hf(torch.nn.Module(), q, k, v, None, scaling=0.5, is_causal=True)[0]),
    ]


@needs_triton
@pytest.mark.parametrize("entry", ["attention", "sdpa", "flash_attn_func", "transformers"])
def test_each_entry_reaches_the_kernel_passing_each_module_once_resolving_once(entry, monkeypatch):
    """From each public entry (embedattn.attention, the SDPA drop-in, flash_attn_func, the transformers integration)
    to the kernel launcher, the embedattn modules on the stack appear once each, in order: entry -> embedattn.attention
    (checks, the one decision, Function, op) -> kernels; and the backend is resolved exactly once per call."""
    import sys

    if entry == "transformers":
        pytest.importorskip("transformers")
    from embedattn import _backend

    K = importlib.import_module("embedattn.kernels.attention")
    stacks, resolved = [], []
    orig = K._forward

    def spy(*a, **kw):
        mods = [f.frame.f_globals.get("__name__", "") for f in reversed(inspect.stack())]
        mods = [m for m in mods if m.startswith("embedattn")]
        stacks.append([m for i, m in enumerate(mods) if i == 0 or mods[i - 1] != m])
        return orig(*a, **kw)

    real = _backend.resolve

    def counted(*a, **kw):
        resolved.append(a[0] if a else kw.get("backend"))
        return real(*a, **kw)

    monkeypatch.setattr(K, "_forward", spy)
    for name, mod in list(sys.modules.items()):  # every module that bound resolve, the entries' included
        if name.startswith("embedattn") and getattr(mod, "resolve", None) is real:
            monkeypatch.setattr(mod, "resolve", counted)
    if entry == "sdpa":  # the drop-in runs the kernels where auto picks them: here, the interpreter's
        monkeypatch.setenv("EMBEDATTN_BACKEND", "triton")
    name, module, call = next(e for e in _four_entries() if e[0] == entry)
    q, k, v = _qkv()
    out = call(q, k, v)
    assert torch.isfinite(out).all()
    assert stacks == [list(dict.fromkeys([module, "embedattn.attention", "embedattn.kernels.attention"]))], stacks
    assert len(resolved) == 1, resolved


_FAKE_CUDA_TRACE = r"""
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
import embedattn
from embedattn.attention import AttnSpec
import embedattn.kernels.attention as KA, embedattn.kernels.embedding as KE, embedattn.kernels.negative_sampling as KN

hits = []
for K in (KA, KE, KN):
    K.wrap_triton = lambda k, orig=K.wrap_triton: hits.append(getattr(k, "fn", k).__name__) or orig(k)
mode = FakeTensorMode()
fc = lambda *s, dtype=torch.float16: FakeTensor(mode, torch.empty(*s, dtype=dtype, device="meta"), torch.device("cuda"))
E = torch.ops.embedattn
with mode:
    q, k, v = fc(2, 4, 37, 24), fc(2, 2, 45, 24), fc(2, 2, 45, 24)
    mask = fc(2, 1, 37, 45, dtype=torch.bool)
    sc = AttnSpec(mask=mask, causal=True, causal_offset=8, scale=0.2).op_args()
    o, lse2 = E.attention_fwd(q, k, v, "default", *sc)
    E.attention_bwd(o, q, k, v, o, lse2, None, "default", *sc)
    w, ids, y = fc(50, 24, dtype=torch.float32), fc(39, dtype=torch.int64), fc(39, 24, dtype=torch.float32)
    E.embedding_fwd(ids, w, fc(40, 24, dtype=torch.float32), None, 13, 1, 1.0, 0)
    E.embedding_bwd(y, ids, ids, 50, 40, 13, 1.0, 0, 3, True, True, True)
    c, n = fc(9, dtype=torch.int64), fc(9, 4, dtype=torch.int64)
    loss, coef = E.negative_sampling_fwd(c, c, n, w, w)
    E.negative_sampling_bwd(c, c, n, w, w, coef, loss, None, None, 50, 50, True, True)
    al, seed = fc(2, 4, dtype=torch.float32), fc(1, dtype=torch.int64)
    feats = AttnSpec(alibi=al, seed=seed, causal=True, causal_offset=8, scale=0.2, window_left=3, softcap=2.5,
                     dropout_p=0.1).op_args()  # window, softcap, dropout, ALiBi
    o, lse2 = E.attention_fwd(q, k, v, "default", *feats)
    E.attention_bwd(o, q, k, v, o, lse2, lse2, "default", *feats)
print(",".join(hits))
"""


@pytest.mark.skipif(not HAS_TRITON or ON_CUDA, reason="CPU-side check of the CUDA path")
def test_cuda_launchers_trace_with_fake_tensors():
    """The ops' CUDA path (triton_op bodies: the launchers, autotuned, every launch through wrap_triton)
    runs on fake CUDA tensors, as torch.compile traces it: every kernel launch reaches wrap_triton and
    nothing reads device memory, also with every attention feature on. A fresh process without the
    interpreter, so the ops register as triton_op."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["EMBEDATTN_AUTOTUNE"] = "1"
    res = subprocess.run([sys.executable, "-c", _FAKE_CUDA_TRACE], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    hits = res.stdout.strip().splitlines()[-1].split(",")
    attn = ["_attn_fwd", "_bwd_preprocess", "_attn_bwd_dkdv", "_attn_bwd_dq"]
    assert hits == attn + ["_fwd_kernel", "_bwd_sorted_kernel", "_bwd_sorted_kernel", "_fwd_kernel",
                           "_bwd_kernel"] + attn, hits


# --------------------------------------------------------------------------------------------------
# CUDA: the Triton kernels inside the ops, under Inductor
# --------------------------------------------------------------------------------------------------
@cuda_only
def test_cuda_inductor_compiles_kernels():
    """Inductor compiles TinyGPT (fullgraph) with our Triton kernels; values and gradients match eager."""
    from embedattn.nn import TinyGPT

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyGPT(100, 64, dim=64, num_layers=2, num_heads=4, num_kv_heads=2).cuda()
    data = torch.randint(0, 100, (4, 49), device="cuda")
    _, loss = torch.compile(model, fullgraph=True)(data[:, :-1], data[:, 1:])
    loss.backward()
    g = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    _, loss_eager = model(data[:, :-1], data[:, 1:])
    loss_eager.backward()
    torch.testing.assert_close(loss, loss_eager, rtol=1e-4, atol=1e-4)
    for n, p in model.named_parameters():
        torch.testing.assert_close(g[n], p.grad, rtol=1e-3, atol=1e-4)
