"""word2vec training kernel: one launch trains on a slice of the corpus (FULL-W2V / cusim's design).

The corpus lives on the device as int32 token ids cut into chunks (sentences, or pieces of a long one).
Program p walks chunks p, p + grid, ... of the slice; within a chunk it walks the words in order, so
updates are sequential SGD as in word2vec.c, while programs run Hogwild like word2vec.c's threads. The
algorithm, random draws included, is ``embedattn.word2vec._train.train_chunks_reference``:

1. subsampling: the chunk's tokens are tested BLOCK_P at a time against the keep-probability table
   with Philox draws (``tl.randint4x``, counter = corpus position), and the kept ones are compacted
   (``tl.cumsum``) into ``kept_ptr[lo:lo + n]``, the chunk's own region of a corpus-sized scratch;
2. the window: the input rows of the kept words from ``window`` behind the centre to ``window`` ahead
   live in a register tile ``ring`` [BLOCK_W, BLOCK_D] (slot = kept index mod BLOCK_W). Per centre, one
   row enters (loaded once) and one leaves (its accumulated change added back once: FULL-W2V's
   lifetime reuse); a second tile ``ring0`` keeps the rows as loaded, so the write-back is a delta
   (``write_back="add"``, relaxed atomics: concurrent programs' updates to the row are kept) or the
   value (``"store"``, plain stores, cusim's way: concurrent updates to the row in between are lost);
3. the centre: its dynamic window b and all its negatives (2 * window sets, or one: a [BLOCK_T,
   BLOCK_K] tile) from one Philox call, the negatives through the alias table (two loads per draw);
   its output row and the negatives in a register tile ``U`` [BLOCK_K, BLOCK_D] (row 0 the centre's
   output row, rows 1..K negatives). Skip-gram trains ``U`` against each context row of the window in order, the
   centre's row (and the negatives with ``SHARED``) held across the window and written back once;
   without ``SHARED`` each pair draws fresh negatives, written back at once (word2vec.c). CBOW trains
   ``U`` once against the mean (or sum) of the window's rows, masked out of the ring tile in one step.
   The learning rate decays linearly with the corpus position (gensim's schedule). ``NEG=False``
   (``negative=0``) leaves negative sampling out;
4. hierarchical softmax (``HS``): the centre word's Huffman path (``hs_off``/``hs_pts``/``hs_codes``,
   device arrays as word2vec.c's ``point``/``code``) gives the rows of the inner-node table ``w_hs``
   (syn1) it trains, a tile ``UH`` [BLOCK_L, BLOCK_D] loaded once per centre, walked against each context
   row (skip-gram) or the window's mean (CBOW) with label 1 - code, held over the window and written back
   once (a path's nodes are distinct rows). With negatives too, both gradients of the input row add up
   before it is updated (word2vec.c). ``LOCK``: each input row's update is scaled by its
   ``vectors_lockf`` factor (gensim's; 0 freezes a row), kept per ring slot.

Per program, the summed loss, the pairs trained and the kept words land in ``stats`` (fp64, grid x 3).
Table rows are read through L2 (".cg": other programs' atomics land there); a CTA barrier separates a
write-back from the next read of the tables by this program's other threads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._utils import empty, interpreting, next_pow2

BLOCK_P = 256  # tokens per subsampling step
# tl.sum's combine function: tl.reduce(x, axis, _ADD) is tl.sum on fp32/int32 without its jitted wrapper,
# a device-function call that costs as much as a dozen ops under the interpreter (it runs np.sum then)
_ADD = tl.standard._sum_combine
_INV_2_24 = tl.constexpr(1.0 / 16777216.0)  # uint32 >> 8 -> [0, 1)
HS_MAX_EXP = tl.constexpr(6.0)  # hierarchical softmax skips a node with a saturated score (word2vec.c's MAX_EXP)


@triton.jit
def _write_rows(w_ptr, ids, vals, rows_ok, cols, dd, D, ADD: tl.constexpr, IN_ORDER: tl.constexpr,
                BLOCK_K: tl.constexpr):
    """Table rows ``ids`` (where ``rows_ok``) += ``vals`` (ADD, relaxed atomics) or = ``vals``. One tile
    op, in which the lanes of an id drawn twice land in any order; or (IN_ORDER) one row per op, in row
    order, the same thread per element: bitwise reproducible."""
    if IN_ORDER:
        for k in tl.static_range(BLOCK_K):
            sel = cols == k
            row = tl.reduce(tl.where(sel, ids, 0), 0, _ADD).to(tl.int64)
            ok = tl.reduce(tl.where(sel & rows_ok, 1, 0), 0, _ADD) > 0
            val = tl.reduce(tl.where(sel[:, None], vals, 0.0), 0, _ADD)
            if ADD:
                tl.atomic_add(w_ptr + row * D + dd, val, mask=dd < tl.where(ok, D, 0), sem="relaxed")
            else:
                tl.store(w_ptr + row * D + dd, val, mask=dd < tl.where(ok, D, 0))
    else:
        ptr = w_ptr + ids[:, None].to(tl.int64) * D + dd[None, :]
        mask = rows_ok[:, None] & (dd < D)[None, :]
        if ADD:
            tl.atomic_add(ptr, vals, mask=mask, sem="relaxed")
        else:
            tl.store(ptr, vals, mask=mask)


@triton.jit
def _logistic(X, x, lab, live, lr, SKIP_SATURATED: tl.constexpr):
    """One logistic step of rows ``X`` [R, BLOCK_D] against ``x`` [BLOCK_D] with labels ``lab``: the SGD
    coefficients ``g = (lab - sigmoid(X x)) * lr`` of the ``live`` rows (0 elsewhere) and their summed loss
    ``-log sigmoid(+-X x)``, in the stable form. ``SKIP_SATURATED``: a row with a saturated score (|s| >= 6) is
    not live (hierarchical softmax, as word2vec.c). Called once per pair, so kept small: under the interpreter a
    jitted call costs about a dozen tensor ops."""
    s = tl.reduce(X * x[None, :], 1, _ADD)
    if SKIP_SATURATED:
        live = live & (tl.abs(s) < HS_MAX_EXP)
    e = tl.exp(-tl.abs(s))
    g = tl.where(live, (lab - tl.where(s >= 0, 1.0 / (1.0 + e), e / (1.0 + e))) * lr, 0.0)
    z = tl.where(lab > 0, s, -s)
    return g, tl.reduce(tl.where(live, tl.maximum(-z, 0.0) + tl.log(1.0 + e), 0.0), 0, _ADD)


@triton.jit(do_not_specialize=["c0", "n_chunks", "V", "D", "K", "W", "seed", "pos_base"])
def _word2vec_kernel(tok_ptr, bounds_ptr, kept_ptr, keep_ptr, aprob_ptr, alias_ptr, w_in_ptr, w_out_ptr, stats_ptr,
                     w_hs_ptr, lock_ptr, hs_off_ptr, hs_pts_ptr, hs_codes_ptr,
                     c0, n_chunks, V, D, K, W, seed, pos_base, lr_start, lr_end, total,
                     SG: tl.constexpr, CBOW_MEAN: tl.constexpr, SHARED: tl.constexpr, SHRINK: tl.constexpr,
                     ADD: tl.constexpr, DETERMINISTIC: tl.constexpr, NEG: tl.constexpr, HS: tl.constexpr,
                     LOCK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_T: tl.constexpr,
                     BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    # The per-word loops are written out flat but for the logistic step (_logistic, one call per pair): under
    # the interpreter every call of a jitted helper costs more than a dozen tensor ops.
    pid = tl.program_id(0)
    stride = (2 + 2 * W * K).to(tl.int64)  # Philox counters per corpus position
    base = pos_base.to(tl.int64)
    dd = tl.arange(0, BLOCK_D)
    dmask = dd < D
    cols = tl.arange(0, BLOCK_K)
    is_neg = (cols >= 1) & (cols <= K)
    label = (cols == 0).to(tl.float32)
    slots = tl.arange(0, BLOCK_W)
    tt = tl.arange(0, BLOCK_T)
    ll = tl.arange(0, BLOCK_L)
    s64 = seed.to(tl.int64)  # Philox key, as tl.randint4x splits it
    seed_lo = (s64 & 0xFFFFFFFF).to(tl.uint32)
    seed_hi = ((s64 >> 32) & 0xFFFFFFFF).to(tl.uint32)
    # counter offsets of a centre's draws: (0, 0) its window, (t, k) the k-th negative of its t-th pair
    draw_offs = 2 + tt[:, None] * K + cols[None, :] - 1
    loss = tl.zeros((), dtype=tl.float32)
    pairs = tl.zeros((), dtype=tl.int32)
    kept = tl.zeros((), dtype=tl.int32)
    for c in range(c0 + pid, c0 + n_chunks, tl.num_programs(0)):
        lo = tl.load(bounds_ptr + c).to(tl.int64)
        hi = tl.load(bounds_ptr + c + 1).to(tl.int64)
        # ---- 1. subsampling: the kept tokens, compacted into kept_ptr[lo:lo + n]
        n = tl.zeros((), dtype=tl.int32)
        for p0 in range(lo, hi, BLOCK_P):
            pp = p0 + tl.arange(0, BLOCK_P)
            pm = pp < hi
            tok = tl.load(tok_ptr + pp, mask=pm, other=0)
            pc = (base + pp) * stride
            zp = pc.to(tl.uint32) * 0  # = tl.randint4x(seed, pc), one device-function call instead of three
            r, _, _, _ = tl.random.philox_impl(pc.to(tl.uint32), (pc >> 32).to(tl.uint32), zp, zp, seed_lo, seed_hi)
            keep = pm & ((r >> 8).to(tl.float32) * _INV_2_24 < tl.load(keep_ptr + tok, mask=pm, other=0.0))
            k32 = keep.to(tl.int32)
            tl.store(kept_ptr + lo + n + tl.cumsum(k32, axis=0) - 1, tok, mask=keep)
            n += tl.reduce(k32, 0, _ADD)
        kept += n
        tl.debug_barrier()  # the compacted words are read back by other threads of this program
        words = kept_ptr + lo
        # ---- 2. the window's input rows, in the ring tile: the first `window` loaded ahead; with LOCK
        # each slot's vectors_lockf factor beside it
        ring = tl.zeros((BLOCK_W, BLOCK_D), dtype=tl.float32)
        lring = tl.zeros((BLOCK_W,), dtype=tl.float32) + 1.0
        for j in range(0, tl.minimum(W, n)):
            wj = tl.load(words + j)
            row = tl.load(w_in_ptr + wj.to(tl.int64) * D + dd, mask=dmask, other=0.0, cache_modifier=".cg")
            ring = tl.where((slots == j)[:, None], row[None, :], ring)
            if LOCK:
                lring = tl.where(slots == j, tl.load(lock_ptr + wj), lring)
        ring0 = ring
        for m in range(0, n):
            # the row leaving the window goes back (its slot is reused later), the row entering is loaded
            jo = m - W - 1
            out_ok = jo >= 0
            sel = (slots == (jo & (BLOCK_W - 1)))[:, None]
            rptr = w_in_ptr + tl.load(words + tl.maximum(jo, 0)).to(tl.int64) * D + dd
            # (masks combine vectors only: the interpreter cannot load under vector & scalar masks)
            if ADD:
                tl.atomic_add(rptr, tl.reduce(tl.where(sel, ring - ring0, 0.0), 0, _ADD),
                              mask=dd < tl.where(out_ok, D, 0), sem="relaxed")
            else:
                tl.store(rptr, tl.reduce(tl.where(sel, ring, 0.0), 0, _ADD), mask=dd < tl.where(out_ok, D, 0))
            tl.debug_barrier()
            ji = m + W
            in_ok = ji < n
            wi = tl.load(words + tl.where(in_ok, ji, m))
            row = tl.load(w_in_ptr + wi.to(tl.int64) * D + dd, mask=dd < tl.where(in_ok, D, 0), other=0.0,
                          cache_modifier=".cg")
            slot_in = tl.where(in_ok, ji & (BLOCK_W - 1), -1)
            sel = (slots == slot_in)[:, None]
            ring = tl.where(sel, row[None, :], ring)
            ring0 = tl.where(sel, row[None, :], ring0)
            if LOCK:
                lring = tl.where(slots == slot_in, tl.load(lock_ptr + wi), lring)
            # ---- 3. the centre m: all its draws at once (window, negatives), its learning rate
            ctr = (base + lo + m) * stride
            dc = ctr + draw_offs
            zd = dc.to(tl.uint32) * 0
            r0, r1, _, _ = tl.random.philox_impl(dc.to(tl.uint32), (dc >> 32).to(tl.uint32), zd, zd, seed_lo, seed_hi)
            if SHRINK:  # b = 1 + (r * window) >> 32
                rb = tl.reduce(tl.where((tt[:, None] == 0) & (cols[None, :] == 0), r0, 0), None, _ADD)
                b = ((rb.to(tl.uint64) * W.to(tl.uint64)) >> 32).to(tl.int32) + 1
            else:
                b = W + 0 * m
            lr = tl.maximum(lr_end, lr_start - (lr_start - lr_end) * ((base + lo + m).to(tl.float32) / total))
            cw = tl.load(words + m)
            if NEG:
                # negatives: bucket (r0 * V) >> 32, kept with probability aprob[bucket], else its alias
                bucket = ((r0.to(tl.uint64) * V.to(tl.uint64)) >> 32).to(tl.int32)
                coin = (r1 >> 8).to(tl.float32) * _INV_2_24 < tl.load(aprob_ptr + bucket)
                negs = tl.where(coin, bucket, tl.load(alias_ptr + bucket))
                ids = tl.where(is_neg, tl.reduce(tl.where(tt[:, None] == 0, negs, 0), 0, _ADD), cw)
                live = (cols == 0) | (is_neg & (ids != cw))  # word2vec.c skips a negative equal to the centre
            if HS:  # the centre's Huffman path: its node rows, held over the window, and their labels 1 - code
                hoff = tl.load(hs_off_ptr + cw)
                lmask = ll < (tl.load(hs_off_ptr + cw + 1) - hoff).to(tl.int32)
                pts = tl.load(hs_pts_ptr + hoff + ll, mask=lmask, other=0)
                hlabel = 1.0 - tl.load(hs_codes_ptr + hoff + ll, mask=lmask, other=0).to(tl.float32)
                hptr = w_hs_ptr + pts[:, None].to(tl.int64) * D + dd[None, :]
                UH = tl.load(hptr, mask=lmask[:, None] & dmask[None, :], other=0.0, cache_modifier=".cg")
                UH0 = UH
            if SG:
                if NEG:
                    if SHARED:  # the rows held across the window
                        held = live
                    else:
                        held = cols == 0
                    optr = w_out_ptr + ids[:, None].to(tl.int64) * D + dd[None, :]
                    U = tl.load(optr, mask=held[:, None] & dmask[None, :], other=0.0, cache_modifier=".cg")
                    U0 = U
                # contexts j = m - b .. m + b but m, within the chunk: t = 0 .. 2b - 1 indexes them
                for t in range(tl.maximum(0, b - m), tl.minimum(2 * b, n - 1 - m + b)):
                    j = m - b + t + (t >= b).to(tl.int32)
                    sel1 = slots == (j & (BLOCK_W - 1))
                    sel = sel1[:, None]
                    v = tl.reduce(tl.where(sel, ring, 0.0), 0, _ADD)
                    neu1e = tl.zeros((BLOCK_D,), dtype=tl.float32)
                    if NEG:
                        if not SHARED:  # the pair's own negatives (counter block W - b + t)
                            ids = tl.where(is_neg, tl.reduce(tl.where(tt[:, None] == W - b + t, negs, 0), 0, _ADD),
                                           cw)
                            live = (cols == 0) | (is_neg & (ids != cw))
                            nptr = w_out_ptr + ids[:, None].to(tl.int64) * D + dd[None, :]
                            nmask = (live & is_neg)[:, None] & dmask[None, :]
                            U = tl.where((cols == 0)[:, None], U, tl.load(nptr, mask=nmask, other=0.0,
                                                                          cache_modifier=".cg"))
                        g, dloss = _logistic(U, v, label, live, lr, False)
                        loss += dloss
                        neu1e += tl.reduce(g[:, None] * U, 0, _ADD)
                        U = U + g[:, None] * v[None, :]
                        if not SHARED:  # the pair's negatives go back at once
                            if ADD:
                                nval = g[:, None] * v[None, :]
                            else:
                                nval = U
                            _write_rows(w_out_ptr, ids, nval, live & is_neg, cols, dd, D, ADD, DETERMINISTIC,
                                        BLOCK_K)
                            tl.debug_barrier()
                    if HS:  # a node with a saturated score (|f| >= 6) is skipped, as word2vec.c
                        g, dloss = _logistic(UH, v, hlabel, lmask, lr, True)
                        loss += dloss
                        neu1e += tl.reduce(g[:, None] * UH, 0, _ADD)
                        UH = UH + g[:, None] * v[None, :]
                    pairs += 1
                    if LOCK:
                        neu1e = neu1e * tl.reduce(tl.where(sel1, lring, 0.0), 0, _ADD)
                    ring = ring + tl.where(sel, neu1e[None, :], 0.0)
                if NEG:
                    if ADD:
                        oval = U - U0
                    else:
                        oval = U
                    _write_rows(w_out_ptr, ids, oval, held, cols, dd, D, ADD, DETERMINISTIC, BLOCK_K)
            else:
                # the kept word each slot holds, and which of them are the centre's context
                jj = m - W + ((slots - (m - W)) & (BLOCK_W - 1))
                ctx = (jj >= m - b) & (jj <= m + b) & (jj != m) & (jj >= 0) & (jj < n)
                cnt = tl.reduce(ctx.to(tl.int32), 0, _ADD)
                h = tl.reduce(tl.where(ctx[:, None], ring, 0.0), 0, _ADD)
                if CBOW_MEAN:
                    h = h / tl.maximum(cnt, 1).to(tl.float32)
                neu1e = tl.zeros((BLOCK_D,), dtype=tl.float32)
                if NEG:
                    live = live & ((cols * 0 + cnt) > 0)
                    optr = w_out_ptr + ids[:, None].to(tl.int64) * D + dd[None, :]
                    omask = live[:, None] & dmask[None, :]
                    U = tl.load(optr, mask=omask, other=0.0, cache_modifier=".cg")
                    g, dloss = _logistic(U, h, label, live, lr, False)
                    loss += dloss
                    neu1e += tl.reduce(g[:, None] * U, 0, _ADD)
                    if ADD:
                        oval = g[:, None] * h[None, :]
                    else:
                        oval = U + g[:, None] * h[None, :]
                    _write_rows(w_out_ptr, ids, oval, live, cols, dd, D, ADD, DETERMINISTIC, BLOCK_K)
                if HS:
                    lmask = lmask & ((ll * 0 + cnt) > 0)
                    g, dloss = _logistic(UH, h, hlabel, lmask, lr, True)
                    loss += dloss
                    neu1e += tl.reduce(g[:, None] * UH, 0, _ADD)
                    UH = UH + g[:, None] * h[None, :]
                pairs += (cnt > 0).to(tl.int32)
                if not CBOW_MEAN:
                    neu1e = neu1e / tl.maximum(cnt, 1).to(tl.float32)
                if LOCK:
                    ring = ring + tl.where(ctx[:, None], neu1e[None, :] * lring[:, None], 0.0)
                else:
                    ring = ring + tl.where(ctx[:, None], neu1e[None, :], 0.0)
            if HS:  # the path's node rows go back (distinct rows: one tile op is deterministic)
                if ADD:
                    hval = UH - UH0
                else:
                    hval = UH
                _write_rows(w_hs_ptr, pts, hval, lmask, ll, dd, D, ADD, False, BLOCK_L)
                tl.debug_barrier()
        # ---- the rows still held go back
        for j in range(tl.maximum(n - 1 - W, 0), n):
            sel = (slots == (j & (BLOCK_W - 1)))[:, None]
            rptr = w_in_ptr + tl.load(words + j).to(tl.int64) * D + dd
            if ADD:
                tl.atomic_add(rptr, tl.reduce(tl.where(sel, ring - ring0, 0.0), 0, _ADD), mask=dmask, sem="relaxed")
            else:
                tl.store(rptr, tl.reduce(tl.where(sel, ring, 0.0), 0, _ADD), mask=dmask)
        tl.debug_barrier()
    tl.store(stats_ptr + pid * 3, loss.to(tl.float64))
    tl.store(stats_ptr + pid * 3 + 1, pairs.to(tl.float64))
    tl.store(stats_ptr + pid * 3 + 2, kept.to(tl.float64))


def word2vec_config(window: int, negative: int, dim: int, per_pair: bool, max_code: int = 0) -> dict:
    """Tile sizes: the ring holds 2 * window + 2 rows, the output tile 1 + negative, the Huffman-path tile
    ``max_code`` nodes (hierarchical softmax), a row all of D; a centre's draws are 2 * window sets of
    negatives (``per_pair``: skip-gram without shared negatives) or one."""
    block_d = next_pow2(dim)
    cfg = {"BLOCK_P": BLOCK_P, "BLOCK_W": next_pow2(2 * window + 2), "BLOCK_K": next_pow2(negative + 1),
           "BLOCK_T": next_pow2(2 * window) if per_pair and negative else 1, "BLOCK_D": block_d,
           "BLOCK_L": next_pow2(max(max_code, 1))}
    if not interpreting():
        # registers (sm_90, window 5, 5 negatives, ptxas): D=100 at 4 warps 128-148, at 2 warps 220, at 1
        # warp it spills; D=300 at 4 warps 255, at 8 warps 192. The Huffman tile adds BLOCK_L rows.
        rows = cfg["BLOCK_W"] + (cfg["BLOCK_L"] if max_code else 0)
        cfg["num_warps"] = 4 if block_d * rows < 8192 else 8
    return cfg


def word2vec_train(tokens, bounds, kept, keep_prob, alias_prob, alias, w_in, w_out, *, c0: int, n_chunks: int,
                   grid: int, seed: int, pos_base: int, lr_start: float, lr_end: float, total_words: float,
                   window: int, negative: int, sg: bool = True, cbow_mean: bool = True,
                   shared_negatives: bool = False, shrink_windows: bool = True, write_back: str = "add",
                   deterministic: bool = False, num_warps: int | None = None, w_hs=None, hs_off=None,
                   hs_points=None, hs_codes=None, max_code: int = 0, lockf=None) -> torch.Tensor:
    """Train on chunks ``c0 .. c0 + n_chunks - 1`` (``bounds``: int64 chunk starts, then the end, into
    the int32 ``tokens``) with ``grid`` programs, in place on the contiguous fp32 tables; ``kept`` is
    int32 scratch as long as ``tokens``. ``pos_base``: the corpus position of ``tokens[0]`` over all
    epochs (epoch x corpus words), which keys the random draws and the learning rate. ``negative=0``:
    no negative sampling (``w_out`` unused). ``w_hs`` (syn1) with ``hs_off`` (int64 [V + 1]),
    ``hs_points`` (int32) and ``hs_codes`` (uint8), the words' Huffman paths, and ``max_code`` (the
    longest): hierarchical softmax. ``lockf`` (fp32 [V], or None): vectors_lockf per word.
    ``write_back``: "add" (the rows' changes, relaxed atomics) or "store" (their values).
    ``deterministic``: one program (``grid`` is ignored) writing rows back one at a time, bitwise
    reproducible. ``num_warps``: the config's unless given. Returns the per-program [loss, pairs, kept
    words] (grid, 3), fp64."""
    V, D = w_in.shape
    grid = 1 if deterministic else grid
    stats = empty(grid, 3, dtype=torch.float64, device=w_in.device)
    hs = w_hs is not None
    cfg = word2vec_config(window, negative, D, bool(sg) and not shared_negatives, max_code if hs else 0)
    if num_warps is not None and "num_warps" in cfg:
        cfg["num_warps"] = int(num_warps)
    dummy = w_in  # never read: the pointers of the objectives that are off
    wrap_triton(_word2vec_kernel)[(grid,)](
        tokens, bounds, kept, keep_prob, alias_prob, alias, w_in, w_out if negative else dummy, stats,
        w_hs if hs else dummy, lockf if lockf is not None else dummy, hs_off if hs else bounds,
        hs_points if hs else tokens, hs_codes if hs else tokens,
        c0, n_chunks, V, D, negative, window, seed, pos_base, float(lr_start), float(lr_end), float(total_words),
        SG=bool(sg), CBOW_MEAN=bool(cbow_mean), SHARED=bool(shared_negatives), SHRINK=bool(shrink_windows),
        ADD=write_back == "add", DETERMINISTIC=bool(deterministic), NEG=negative > 0, HS=hs,
        LOCK=lockf is not None, **cfg)
    return stats
