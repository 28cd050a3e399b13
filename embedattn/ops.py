"""torch.library registrations, so that ``torch.compile(model, fullgraph=True)`` sees embedattn's ops.

Ops (namespace ``embedattn``)::

    torch.ops.embedattn.attention_fwd(q, k, v, mask, causal, causal_offset, scale, backend,
        window_left=-1, window_right=-1, softcap=0.0, alibi=None, dropout_p=0.0, seed=0) -> (out, lse2)
    torch.ops.embedattn.attention_bwd(dout, q, k, v, out, lse2, mask, causal, causal_offset, scale, backend,
        dlse2=None, window_left=-1, window_right=-1, softcap=0.0, alibi=None, dropout_p=0.0, seed=0)
        -> (dq, dk, dv)
    torch.ops.embedattn.embedding_fwd(ids, weight, pos_weight, positions, n, pos_mode, scale, offset,
        padding_idx, backend) -> out (T, D)
    torch.ops.embedattn.embedding_bwd(grad, ids, positions, num_rows, num_positions, n, scale, offset,
        padding_idx, deterministic, backend) -> (grad_weight, grad_pos_weight)
    torch.ops.embedattn.negative_sampling_fwd(center, context, negatives, in_weight, out_weight, backend)
        -> (loss, coef)
    torch.ops.embedattn.negative_sampling_bwd(center, context, negatives, in_weight, out_weight, coef,
        grad_loss, backend) -> (grad_in_weight, grad_out_weight)

All are ``torch.library.triton_op``: on CUDA their bodies launch the Triton kernels through
``torch.library.wrap_triton``, so Inductor sees (and can AOT-compile) the kernels themselves; on
every other device, and for what the kernels do not cover (float64, head dim > 256), the same op runs
the PyTorch reference, so a compiled model falls back on CPU without a graph break. The bodies also
serve as the fake (meta) implementations (triton_op traces them with fake tensors).
Each ``*_fwd`` op has its autograd registered (``register_autograd``) with its ``*_bwd`` op. The
kernels' own launchers (``kernels/<op>.py``) are reused as they are: ``_traceable`` re-binds them so
that each launch goes through ``wrap_triton`` (see there).

Under the Triton interpreter (``TRITON_INTERPRET=1``, CPU tensors) the ops run the reference: the
interpreter launches kernels on real memory and cannot be traced with fake tensors. The eager
interpreted path stays ``embedattn.attention(..., backend="triton")``.

Functional entries through the ops: ``attention()`` (``embedattn.attention``'s arguments plus
``causal_offset``), ``embedding()`` and ``negative_sampling_loss()`` (dense gradients; the id bounds
check is skipped while compiling, as it syncs). ``attend()`` is what ``embedattn.nn`` and the
transformers integration call: the op while ``torch.compile`` traces, the eager path otherwise.
"""

from __future__ import annotations

import math
import types

import torch
from torch.library import triton_op

from ._backend import interpreting, resolve, triton_available
from .attention import MAX_HEAD_DIM, _attention, _check_features, _check_mask, _check_qkv, _empty_result

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LN2 = math.log(2.0)


# --------------------------------------------------------------------------------------------------
# the launchers of a kernels module, with every kernel launch routed through wrap_triton
# --------------------------------------------------------------------------------------------------
class _Launch:
    """Stands in for a kernel in a launcher's globals: ``k[grid](...)`` becomes ``wrap_triton(k)[grid](...)``.

    ``wrap_triton`` returns the kernel itself when tracing is off (inside a triton_op's eager
    body), so eager launches pay nothing; while AOTAutograd/Inductor trace, it records the launch as
    a ``triton_kernel_wrapper`` node instead of running it on fake tensors.
    """

    def __init__(self, kernel):
        self._kernel = kernel

    def __getitem__(self, grid):
        from torch.library import wrap_triton

        return wrap_triton(self._kernel)[grid]

    def __getattr__(self, name):  # best_config, fn, ...: read from the real kernel
        return getattr(self._kernel, name)


def _traceable(module) -> types.SimpleNamespace:
    """The module's functions re-bound to a copy of its globals in which every ``@triton.jit`` /
    ``triton.autotune`` object is wrapped by ``_Launch``.

    This reuses the launchers of ``kernels/<op>.py`` verbatim (grid, configs, allocation) instead of
    duplicating them; module-level state (e.g. ``_LAST_CONFIG``) is shared, since the copy holds the
    same objects. Kernels calling other ``@triton.jit`` helpers are unaffected (they resolve names in
    the original module).
    """
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    g = dict(vars(module))
    for name, obj in list(g.items()):
        if isinstance(obj, (JITFunction, Autotuner)):
            g[name] = _Launch(obj)
    for name, obj in list(g.items()):
        if isinstance(obj, types.FunctionType) and obj.__module__ == module.__name__:
            f = types.FunctionType(obj.__code__, g, obj.__name__, obj.__defaults__, obj.__closure__)
            f.__kwdefaults__ = obj.__kwdefaults__
            g[name] = f
    return types.SimpleNamespace(**g)


_TRACEABLE: dict[str, types.SimpleNamespace] = {}


def _kernels(op: str) -> types.SimpleNamespace:
    if op not in _TRACEABLE:
        import importlib

        _TRACEABLE[op] = _traceable(importlib.import_module(f"{__package__}.kernels.{op}"))
    return _TRACEABLE[op]


def _use_kernels(t: torch.Tensor, backend: str, dtype_ok: bool) -> bool:
    # the kernels run on CUDA only inside the ops (the interpreter cannot be traced, see module doc)
    return t.is_cuda and dtype_ok and backend != "reference" and triton_available() and not interpreting()


# --------------------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------------------
def _ref_mask(mask, causal: bool, causal_offset: int, nq: int, nk: int, device) -> torch.Tensor | None:
    """The user mask combined with the causal mask ``j <= i + causal_offset`` (bool or additive)."""
    if not causal:
        return mask
    i = torch.arange(nq, device=device)[:, None]
    j = torch.arange(nk, device=device)[None, :]
    cm = j <= i + causal_offset
    if mask is None:
        return cm
    if mask.dtype == torch.bool:
        return mask & cm
    return mask.masked_fill(~cm, float("-inf"))


def _ref_scores(q, k, mask, causal, causal_offset, scale, window_left, window_right, softcap, alibi):
    """(s, t, k repeated over query groups): the masked scores (in the dtype of the q, k given) and, with ``softcap``,
    t = tanh(q·k·scale / softcap) that the backward's chain rule needs (else None).

    Window and ALiBi distances are measured from the causal diagonal ``i + causal_offset``, as in the
    kernels (``causal_offset = Nk - Nq``, the default, is the reference's bottom-right alignment)."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1) if group > 1 else k
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    t = None
    if softcap:
        t = torch.tanh(s / softcap)
        s = softcap * t
    nq, nk = q.shape[2], k.shape[2]
    rel = (torch.arange(nq, device=q.device)[:, None] + causal_offset
           - torch.arange(nk, device=q.device)[None, :])  # >= 0 at or left of the diagonal
    if alibi is not None:
        slopes = alibi.to(s.dtype)
        slopes = slopes[None, :, None, None] if slopes.dim() == 1 else slopes[:, :, None, None]
        s = s - slopes * rel.abs().to(s.dtype)
    m = _ref_mask(mask, causal, causal_offset, nq, nk, q.device)
    if m is not None:
        s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.to(s.dtype)
    if window_left >= 0:
        s = s.masked_fill(rel > window_left, float("-inf"))
    if window_right >= 0:
        s = s.masked_fill(rel < -window_right, float("-inf"))
    return s, t, k


def _ref_softmax(s):
    """(P, lse): softmax probabilities and natural log-sum-exp; rows with no visible key give P = 0."""
    mx = s.amax(dim=-1, keepdim=True)
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    e = torch.exp(s - mx)
    den = e.sum(dim=-1, keepdim=True)
    return e / torch.where(den == 0, torch.ones_like(den), den), (mx + torch.log(den)).squeeze(-1)


def _ref_keep(shape, dropout_p: float, seed, device) -> torch.Tensor:
    """The reference branch's dropout keep mask (True = kept): a counter-based hash of (seed, element
    index), so the forward and the backward op draw the same mask, also while torch.compile traces
    the op bodies (where a ``torch.Generator`` draw would become an unseeded one) and for a symbolic
    seed. The kernels draw their own (Philox) mask instead."""
    m32 = 0xFFFFFFFF
    if isinstance(seed, int):
        seed &= m32  # any Python int (the kernels' Philox takes 64-bit seeds) without int64 overflow below
    n = math.prod(shape)
    h = (torch.arange(n, device=device, dtype=torch.int64) * 0x9E3779B1 + seed * 0x632BE5AB) & m32
    for shift, mul in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):  # murmur3's 32-bit finalizer
        h = ((h ^ (h >> shift)) * mul) & m32
    h = h ^ (h >> 16)
    return (h.to(torch.float64) * 2.0**-32 >= dropout_p).view(shape)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _kernel_features(window_left, window_right, softcap, alibi, dropout_p, seed) -> dict:
    """The kernel launchers' feature kwargs for the ops' flat feature arguments (off ones left out)."""
    feats = {}
    if window_left >= 0 or window_right >= 0:
        feats["window"] = (window_left, window_right)
    if softcap > 0:
        feats["softcap"] = softcap
    if alibi is not None:
        feats["alibi"] = alibi if alibi.dtype == torch.float32 else alibi.float()
    if dropout_p > 0:
        feats["dropout_p"], feats["seed"] = dropout_p, seed
    return feats


@triton_op("embedattn::attention_fwd", mutates_args=())
def _attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    causal: bool,
    causal_offset: int,
    scale: float,
    backend: str,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    alibi: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse2): out like q, lse2 (B, Hq, Nq) base-2 log-sum-exp (float32; float64 for float64 q).
    lse2 is differentiable: its gradient reaches q and k through the backward op's ``dlse2``.

    Features (defaults off): key window ``i + causal_offset - window_left <= j <= i + causal_offset +
    window_right`` (-1: that side unbounded), ``softcap`` > 0, ``alibi`` slopes (H,) or (B, H), dropout
    on the probabilities with ``dropout_p`` > 0 drawn from ``seed`` (the lse is of the undropped scores)."""
    if _use_kernels(q, backend, q.dtype in _KERNEL_DTYPES and q.shape[-1] <= MAX_HEAD_DIM):
        feats = _kernel_features(window_left, window_right, softcap, alibi, dropout_p, seed)
        return _kernels("attention").attention_forward(q, k, v, mask, causal, causal_offset, scale, **feats)
    cd = _compute_dtype(q.dtype)
    s, _, _ = _ref_scores(q.to(cd), k.to(cd), mask, causal, causal_offset, scale, window_left, window_right,
                          softcap, alibi)
    p, lse = _ref_softmax(s)
    if dropout_p > 0:
        p = p * _ref_keep(p.shape, dropout_p, seed, q.device).to(cd) / (1.0 - dropout_p)
    group = q.shape[1] // k.shape[1]
    vr = v.to(cd).repeat_interleave(group, dim=1) if group > 1 else v.to(cd)
    out = torch.matmul(p, vr).to(q.dtype)
    return out, lse / _LN2


@triton_op("embedattn::attention_bwd", mutates_args=())
def _attention_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse2: torch.Tensor,
    mask: torch.Tensor | None,
    causal: bool,
    causal_offset: int,
    scale: float,
    backend: str,
    dlse2: torch.Tensor | None = None,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    alibi: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) in the dtypes of q, k, v. ``dlse2``: gradient of the base-2 lse, or None (zero).
    The features must be those of the forward (the dropout mask is drawn again from ``seed``)."""
    if _use_kernels(q, backend, q.dtype in _KERNEL_DTYPES and q.shape[-1] <= MAX_HEAD_DIM):
        feats = _kernel_features(window_left, window_right, softcap, alibi, dropout_p, seed)
        return _kernels("attention").attention_backward(dout, q, k, v, out, lse2, mask, causal,
                                                         causal_offset, scale, dlse2=dlse2, **feats)
    # the reference backward written out (dS = P * (dP - rowsum(dP * P))), recomputing P
    cd = _compute_dtype(q.dtype)
    qc, kc, vc, doc = q.to(cd), k.to(cd), v.to(cd), dout.to(cd)
    s, t, kr = _ref_scores(qc, kc, mask, causal, causal_offset, scale, window_left, window_right, softcap, alibi)
    p, _ = _ref_softmax(s)
    group = q.shape[1] // k.shape[1]
    vr = vc.repeat_interleave(group, dim=1) if group > 1 else vc
    dp = torch.matmul(doc, vr.transpose(-1, -2))
    if dropout_p > 0:  # out = (P * keep / (1 - p)) V: the same factor scales dV's P and dP
        drop = _ref_keep(p.shape, dropout_p, seed, q.device).to(cd) / (1.0 - dropout_p)
        dv = torch.matmul((p * drop).transpose(-1, -2), doc)
        dp = dp * drop
    else:
        dv = torch.matmul(p.transpose(-1, -2), doc)
    rowdot = (dp * p).sum(dim=-1, keepdim=True)
    if dlse2 is not None:  # d lse / d s = P: the lse's gradient shifts the row term (empty rows: none)
        rowdot = rowdot - torch.where(torch.isinf(lse2), 0.0, dlse2.to(cd) / _LN2).unsqueeze(-1)
    ds = p * (dp - rowdot)
    if t is not None:  # s = softcap · tanh(raw / softcap): d s / d raw = 1 - tanh²
        ds = ds * (1.0 - t * t)
    dq = torch.matmul(ds, kr) * scale
    dk = torch.matmul(ds.transpose(-1, -2), qc) * scale
    b, hkv, nk, d = k.shape
    dk = dk.view(b, hkv, group, nk, d).sum(2)
    dv = dv.view(b, hkv, group, nk, v.shape[-1]).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _attention_setup(ctx, inputs, output):
    q, k, v, mask, causal, causal_offset, scale, backend, *feats = inputs
    out, lse2 = output
    wl, wr, softcap, alibi, dropout_p, seed = list(feats) + [-1, -1, 0.0, None, 0.0, 0][len(feats):]
    ctx.save_for_backward(q, k, v, out, lse2, mask, alibi)
    ctx.meta = (causal, causal_offset, scale, backend, wl, wr, softcap, dropout_p, seed)


def _attention_backward(ctx, dout, dlse2):
    q, k, v, out, lse2, mask, alibi = ctx.saved_tensors
    causal, causal_offset, scale, backend, wl, wr, softcap, dropout_p, seed = ctx.meta
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = torch.ops.embedattn.attention_bwd(dout, q, k, v, out, lse2, mask, causal, causal_offset,
                                                   scale, backend, dlse2, wl, wr, softcap, alibi, dropout_p, seed)
    return (dq, dk, dv) + (None,) * 11


_attention_fwd.register_autograd(_attention_backward, setup_context=_attention_setup)


def _op_features(q, window, softcap, alibi_slopes, dropout_p, seed) -> tuple:
    """Checked (window_left, window_right, softcap, alibi, dropout_p, seed) op arguments.

    ``seed=None`` with dropout draws one from torch's RNG eagerly (``torch.manual_seed`` makes it
    reproducible), also while torch.compile traces (a captured scalar: needs
    ``torch._dynamo.config.capture_scalar_outputs = True``, else Dynamo breaks the graph there)."""
    feats = _check_features(q, window, softcap, alibi_slopes, dropout_p,
                            0 if seed is None and torch.compiler.is_compiling() else seed)
    if "dropout_p" in feats and seed is None and torch.compiler.is_compiling():
        feats["seed"] = torch.randint(0, 2**31 - 1, ()).item()  # an unbacked SymInt (capture_scalar_outputs)
    wl, wr = feats.get("window", (-1, -1))
    alibi = feats.get("alibi")
    if alibi is not None and q.dtype == torch.float64:
        alibi = alibi_slopes.to(torch.float64)  # the float64 reference keeps float64 slopes
    return (max(wl, -1), max(wr, -1), feats.get("softcap", 0.0), alibi, feats.get("dropout_p", 0.0),
            feats.get("seed", 0))


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    attn_mask: torch.Tensor | None = None,
    causal_offset: int | None = None,
    return_lse: bool = False,
    window: tuple[int, int] | None = None,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: int | None = None,
    backend: str | None = None,
):
    """``embedattn.attention`` through ``torch.ops.embedattn.attention_fwd`` (compiles without graph breaks).

    Same arguments and checks as ``embedattn.attention``; ``causal_offset`` (default ``Nk - Nq``,
    bottom-right) sets the causal diagonal: query i sees key j iff ``j <= i + causal_offset``
    (0 is torch SDPA's top-left ``is_causal``); ``window`` and ALiBi distances are measured from that
    diagonal too. Triton on CUDA, the reference elsewhere (also under the interpreter).
    ``backend="reference"`` forces the reference on CUDA too. Dropout: the kernels draw their Philox
    mask from ``seed``, the reference its own (a counter-based hash of (seed, index));
    ``seed=None`` takes one from torch's RNG (see ``attend`` for torch.compile).
    """
    be = resolve(backend, q, k, v)
    _check_qkv(q, k, v, "reference")  # dtype/head-dim limits of the kernels fall back inside the op
    nq, nk = q.shape[2], k.shape[2]
    mask = _check_mask(attn_mask, q, nk)
    feats = _op_features(q, window, softcap, alibi_slopes, dropout_p, seed)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[3]) if q.shape[3] else 1.0
    elif not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float or None, got {scale!r}")
    if causal_offset is None:
        causal_offset = nk - nq
    if q.numel() == 0 or nk == 0 or k.shape[1] == 0:
        return _empty_result(q, k, v, return_lse)
    out, lse2 = torch.ops.embedattn.attention_fwd(q, k, v, mask, bool(causal), int(causal_offset), float(scale),
                                                  be, *feats)
    if return_lse:
        lse = lse2 * _LN2  # multiplied in lse2's dtype (float64 for float64 inputs), then float32
        return out, lse if lse.dtype == torch.float64 else lse.float()
    return out


def _can_capture_seed() -> bool:
    # a seed drawn while tracing is ``.item()`` of a tensor: traceable only as a captured scalar
    import torch._dynamo

    return bool(torch._dynamo.config.capture_scalar_outputs)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    causal_offset: int,
    scale: float | None,
    attn_mask: torch.Tensor | None,
    backend: str | None,
    softcap: float | None = None,
    dropout_p: float = 0.0,
    window: tuple[int, int] | None = None,
    alibi_slopes: torch.Tensor | None = None,
    seed: int | None = None,
) -> torch.Tensor:
    """Attention for modules: the registered op while torch.compile traces (no graph break, every
    feature included), the eager ``embedattn`` path otherwise (which also runs the interpreter on CPU).
    ``window`` and ALiBi distances are measured from the causal diagonal ``i + causal_offset``.

    Dropout without a ``seed`` draws one per call from torch's RNG; under torch.compile that draw is
    traceable only with ``torch._dynamo.config.capture_scalar_outputs = True``, otherwise such a call
    keeps running the eager path (Dynamo traces into it, which breaks the graph)."""
    # the eager reference measures window/ALiBi distances from i + Nk - Nq: other diagonals take the op
    shifted = (window is not None or alibi_slopes is not None) and causal_offset != k.shape[-2] - q.shape[-2]
    if shifted or torch.compiler.is_compiling() and (not dropout_p or seed is not None or _can_capture_seed()):
        return attention(q, k, v, causal=causal, scale=scale, attn_mask=attn_mask, causal_offset=causal_offset,
                         window=window, softcap=softcap or 0.0, alibi_slopes=alibi_slopes, dropout_p=dropout_p,
                         seed=seed, backend=backend)
    return _attention(q, k, v, causal=causal, causal_offset=causal_offset, scale=scale, attn_mask=attn_mask,
                      return_lse=False, backend=backend, window=window, softcap=softcap or 0.0,
                      alibi_slopes=alibi_slopes, dropout_p=dropout_p, seed=seed)


# --------------------------------------------------------------------------------------------------
# embedding
# --------------------------------------------------------------------------------------------------
def _default_check(check_bounds: bool | None) -> bool:
    # the id bounds check syncs the device (a graph break under torch.compile): off while compiling
    return (not torch.compiler.is_compiling()) if check_bounds is None else bool(check_bounds)


@triton_op("embedattn::embedding_fwd", mutates_args=())
def _embedding_fwd(
    ids: torch.Tensor,
    weight: torch.Tensor,
    pos_weight: torch.Tensor | None,
    positions: torch.Tensor | None,
    n: int,
    pos_mode: int,
    scale: float,
    offset: int,
    padding_idx: int,
    backend: str,
) -> torch.Tensor:
    """(T, D) rows ``weight[ids] * scale + P`` for flat ids (T,); pos_mode 0 none, 1 learned, 2 sinusoidal.
    ``padding_idx`` (-1: none) is for the backward: that row of the token gradient stays zero."""
    from .embedding import _KERNEL_DTYPES as _EMB_DTYPES

    if _use_kernels(weight, backend, weight.dtype in _EMB_DTYPES):
        w = weight if weight.stride(1) == 1 else weight.contiguous()
        pw = pos_weight if pos_weight is None or pos_weight.stride(1) == 1 else pos_weight.contiguous()
        return _kernels("embedding").embedding_forward(ids, w, pw, positions, n=n, pos_mode=pos_mode,
                                                       scale=scale, offset=offset)
    from .reference._embedding import embedding as ref_embedding

    if ids.numel() == 0:
        return weight.new_zeros(0, weight.shape[1])
    out = ref_embedding(ids.view(-1, n), weight, pos_weight if pos_mode == 1 else None, sinusoidal=pos_mode == 2,
                        scale=scale, position_offset=offset,
                        positions=None if positions is None else positions.view(-1, n))
    return out.reshape(ids.shape[0], weight.shape[1]).clone()


@triton_op("embedattn::embedding_bwd", mutates_args=())
def _embedding_bwd(
    grad: torch.Tensor,
    ids: torch.Tensor,
    positions: torch.Tensor | None,
    num_rows: int,
    num_positions: int,
    n: int,
    scale: float,
    offset: int,
    padding_idx: int,
    deterministic: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_weight (num_rows, D), grad_pos_weight (num_positions, D)) in grad's dtype; padding_idx < 0: none."""
    from .embedding import _KERNEL_DTYPES as _EMB_DTYPES

    t, d = grad.shape
    pad = None if padding_idx < 0 else padding_idx
    if _use_kernels(grad, backend, grad.dtype in _EMB_DTYPES):
        k = _kernels("embedding")
        grad = grad.contiguous()
        gw = k.scatter_grad(grad, ids, num_rows, scale=scale, padding_idx=pad, deterministic=deterministic)
        if num_positions == 0:  # no learned position table
            gp = grad.new_zeros(0, d)
        elif positions is None:
            gp = k.positional_grad(grad, num_positions, n=n, offset=offset)
        else:
            gp = k.scatter_grad(grad, positions, num_positions, deterministic=deterministic)
        return gw, gp
    cd = _compute_dtype(grad.dtype)
    g = grad.to(cd)
    gw = torch.zeros(num_rows, d, dtype=cd, device=grad.device).index_add_(0, ids.long(), g * scale)
    if pad is not None:
        gw[pad] = 0
    gp = torch.zeros(num_positions, d, dtype=cd, device=grad.device)
    if num_positions:
        pos = positions.long() if positions is not None else torch.arange(t, device=grad.device) % max(n, 1) + offset
        gp.index_add_(0, pos, g)
    return gw.to(grad.dtype), gp.to(grad.dtype)


def _embedding_setup(ctx, inputs, output):
    ids, weight, pos_weight, positions, n, pos_mode, scale, offset, padding_idx, backend = inputs
    ctx.save_for_backward(ids, positions)
    ctx.meta = (weight.shape[0], pos_weight.shape[0] if pos_weight is not None else 0, pos_weight is not None,
                n, scale, offset, padding_idx, backend)


def _embedding_backward(ctx, grad):
    ids, positions = ctx.saved_tensors
    v, p, learned, n, scale, offset, padding_idx, backend = ctx.meta
    deterministic = torch.are_deterministic_algorithms_enabled() or grad.dtype != torch.float32
    gw, gp = torch.ops.embedattn.embedding_bwd(grad, ids, positions if learned else None, v, p, n, scale, offset,
                                               padding_idx, deterministic, backend)
    return None, gw, (gp if learned else None), None, None, None, None, None, None, None


_embedding_fwd.register_autograd(_embedding_backward, setup_context=_embedding_setup)


def embedding(
    ids: torch.Tensor,
    weight: torch.Tensor,
    pos_weight: torch.Tensor | None = None,
    *,
    sinusoidal: bool = False,
    scale: float = 1.0,
    padding_idx: int | None = None,
    position_offset: int = 0,
    positions: torch.Tensor | None = None,
    check_bounds: bool | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``embedattn.embedding`` through ``torch.ops.embedattn.embedding_fwd`` (compiles without graph breaks).

    Same arguments and checks; ``check_bounds=None`` checks ids eagerly and skips the check (a device
    sync) while torch.compile traces. Triton on CUDA, the reference elsewhere.
    """
    from .embedding import _POS_LEARNED, _POS_NONE, _POS_SINUSOIDAL, _check, _check_bounds, _flat_ids

    padding_idx = _check(ids, weight, pos_weight, sinusoidal, scale, padding_idx, position_offset, positions)
    _check_bounds(ids, weight, pos_weight, position_offset, positions, _default_check(check_bounds))
    be = resolve(backend, ids, weight)
    pos_mode = _POS_LEARNED if pos_weight is not None else _POS_SINUSOIDAL if sinusoidal else _POS_NONE
    flat_pos = _flat_ids(positions) if positions is not None and pos_mode != _POS_NONE else None
    args = (_flat_ids(ids), weight, pos_weight, flat_pos, ids.shape[-1], pos_mode, float(scale), position_offset)
    out = torch.ops.embedattn.embedding_fwd(*args, -1 if padding_idx is None else padding_idx, be)
    return out.view(*ids.shape, weight.shape[1])


# --------------------------------------------------------------------------------------------------
# negative sampling
# --------------------------------------------------------------------------------------------------
@triton_op("embedattn::negative_sampling_fwd", mutates_args=())
def _negative_sampling_fwd(
    center: torch.Tensor,
    context: torch.Tensor,
    negatives: torch.Tensor,
    in_weight: torch.Tensor,
    out_weight: torch.Tensor,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss (B,), coef (B, K+1) = d loss / d score, column 0 the positive), float32 (float64 tables: float64)."""
    if _use_kernels(in_weight, backend, in_weight.dtype in _KERNEL_DTYPES):
        return _kernels("negative_sampling").negative_sampling_forward(center, context, negatives, in_weight,
                                                                      out_weight)
    cd = _compute_dtype(in_weight.dtype)
    v = in_weight[center].to(cd)
    u = out_weight[torch.cat([context.unsqueeze(1), negatives], dim=1)].to(cd)  # (B, K+1, D)
    s = (u * v.unsqueeze(1)).sum(-1)
    pos, neg = s[:, 0], s[:, 1:]
    loss = -torch.nn.functional.logsigmoid(pos) - torch.nn.functional.logsigmoid(-neg).sum(-1)
    coef = torch.cat([(torch.sigmoid(pos) - 1).unsqueeze(1), torch.sigmoid(neg)], dim=1)
    return loss, coef


@triton_op("embedattn::negative_sampling_bwd", mutates_args=())
def _negative_sampling_bwd(
    center: torch.Tensor,
    context: torch.Tensor,
    negatives: torch.Tensor,
    in_weight: torch.Tensor,
    out_weight: torch.Tensor,
    coef: torch.Tensor,
    grad_loss: torch.Tensor,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense (grad_in_weight, grad_out_weight) in the table dtypes."""
    grad_loss = grad_loss.to(coef.dtype)
    if _use_kernels(in_weight, backend, in_weight.dtype in _KERNEL_DTYPES):
        gin, gout = _kernels("negative_sampling").negative_sampling_backward(
            center, context, negatives, in_weight, out_weight, coef, grad_loss)
        return gin.to(in_weight.dtype), gout.to(out_weight.dtype)
    cd = coef.dtype
    ids_out = torch.cat([context.unsqueeze(1), negatives], dim=1)
    v = in_weight[center].to(cd)
    u = out_weight[ids_out].to(cd)
    g = coef * grad_loss.unsqueeze(1)  # (B, K+1)
    gin = torch.zeros(in_weight.shape, dtype=cd, device=in_weight.device)
    gin.index_add_(0, center.long(), (g.unsqueeze(-1) * u).sum(1))
    gout = torch.zeros(out_weight.shape, dtype=cd, device=out_weight.device)
    gout.index_add_(0, ids_out.reshape(-1).long(), (g.unsqueeze(-1) * v.unsqueeze(1)).flatten(0, 1))
    return gin.to(in_weight.dtype), gout.to(out_weight.dtype)


def _negative_sampling_setup(ctx, inputs, output):
    center, context, negatives, in_weight, out_weight, backend = inputs
    ctx.save_for_backward(center, context, negatives, in_weight, out_weight, output[1])
    ctx.backend = backend
    ctx.mark_non_differentiable(output[1])


def _negative_sampling_backward(ctx, grad_loss, _dcoef):
    center, context, negatives, in_weight, out_weight, coef = ctx.saved_tensors
    gin, gout = torch.ops.embedattn.negative_sampling_bwd(center, context, negatives, in_weight, out_weight, coef,
                                                          grad_loss, ctx.backend)
    return None, None, None, gin, gout, None


_negative_sampling_fwd.register_autograd(_negative_sampling_backward, setup_context=_negative_sampling_setup)


def negative_sampling_loss(
    center: torch.Tensor,
    context: torch.Tensor,
    negatives: torch.Tensor,
    in_weight: torch.Tensor,
    out_weight: torch.Tensor,
    *,
    reduction: str = "mean",
    check_bounds: bool | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``embedattn.negative_sampling_loss`` through ``torch.ops.embedattn.negative_sampling_fwd``
    (compiles without graph breaks); dense gradients only (``sparse=True`` stays on the eager API).
    ``check_bounds=None`` checks ids eagerly and skips the check while torch.compile traces."""
    from .negative_sampling import _check_inputs

    _check_inputs(center, context, negatives, in_weight, out_weight, reduction, _default_check(check_bounds))
    be = resolve(backend, center, context, negatives, in_weight, out_weight)
    if in_weight.stride(1) != 1:
        in_weight = in_weight.contiguous()
    if out_weight.stride(1) != 1:
        out_weight = out_weight.contiguous()
    loss, _ = torch.ops.embedattn.negative_sampling_fwd(center, context, negatives, in_weight, out_weight, be)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


__all__ = ["attend", "attention", "embedding", "negative_sampling_loss"]
