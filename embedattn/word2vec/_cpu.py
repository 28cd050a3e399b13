"""The CPU path of the sentence-walking trainer: the algorithm of ``train_chunks_reference`` (``_train.py``)
in C, built once per machine with the system C compiler and called through ctypes, which releases the
GIL, so ``workers`` Python threads train their chunks concurrently (Hogwild, like gensim's and
word2vec.c's threads). Same Philox draws as the reference and the Triton kernel. ``load()`` returns
None (the trainer falls back to the PyTorch minibatch step) when no compiler works.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings

import numpy as np

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Philox4x32-10 as Triton's tl.randint4x: counter (lo, hi, 0, 0), key (seed lo, seed hi); words 0, 1 */
static inline void philox(uint64_t seed, int64_t counter, uint32_t *r0, uint32_t *r1) {
    uint32_t c0 = (uint32_t)counter, c1 = (uint32_t)((uint64_t)counter >> 32), c2 = 0, c3 = 0;
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    for (int i = 0; i < 10; i++) {
        uint64_t pb = (uint64_t)0xCD9E8D57u * c2, pa = (uint64_t)0xD2511F53u * c0;
        uint32_t n0 = (uint32_t)(pb >> 32) ^ c1 ^ k0, n2 = (uint32_t)(pa >> 32) ^ c3 ^ k1;
        c1 = (uint32_t)pb;
        c3 = (uint32_t)pa;
        c0 = n0;
        c2 = n2;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    *r0 = c0;
    *r1 = c1;
}

static inline float unit_float(uint32_t r) { return (float)(r >> 8) * (1.0f / 16777216.0f); }
static inline int64_t below(uint32_t r, int64_t n) { return (int64_t)(((uint64_t)r * (uint64_t)n) >> 32); }

/* n negatives from counters ctr .. ctr + n - 1 through the alias table (the Philox loop vectorizes) */
static inline void draw(uint64_t seed, int64_t ctr, int64_t n, const float *aprob, const int32_t *alias, int64_t V,
                        uint32_t *r0, uint32_t *r1, int32_t *ids) {
    for (int64_t k = 0; k < n; k++) philox(seed, ctr + k, r0 + k, r1 + k);
    for (int64_t k = 0; k < n; k++) {
        int64_t i = below(r0[k], V);
        ids[k] = unit_float(r1[k]) < aprob[i] ? (int32_t)i : alias[i];
    }
}

/* g = (label - sigmoid(s)) * lr; returns -log sigmoid(+-s), the pair's loss term, when want_loss
   (it costs a fifth of a pair; logf, as log1pf would cost as much as the rest of the pair) */
static inline float grad(float s, float label, float lr, int want_loss, float *g) {
    float e = expf(-fabsf(s));
    float sig = s >= 0 ? 1.0f / (1.0f + e) : e / (1.0f + e);
    *g = (label - sig) * lr;
    if (!want_loss) return 0.0f;
    float z = label > 0 ? s : -s;
    return fmaxf(-z, 0.0f) + logf(1.0f + e);
}

static inline float dot(const float *a, const float *b, int64_t D) {
    float s = 0;
    for (int64_t d = 0; d < D; d++) s += a[d] * b[d];
    return s;
}

static inline void axpy(float a, const float *x, float *y, int64_t D) {
    for (int64_t d = 0; d < D; d++) y[d] += a * x[d];
}

int w2v_train(const int32_t *tokens, const int64_t *bounds, int64_t c_begin, int64_t c_end, int64_t c_step,
              const float *keep, const float *aprob, const int32_t *alias, float *w_in, float *w_out,
              int64_t V, int64_t D, int64_t K, int64_t W, uint64_t seed, int64_t pos_base, double lr_start,
              double lr_end, double total, int sg, int cbow_mean, int shared, int shrink, int want_loss,
              int64_t max_chunk, double *stats) {
    const int64_t stride = 2 + 2 * W * K, S = 2 * W + 2, K1 = K + 1;
    int32_t *words = malloc(sizeof(int32_t) * (max_chunk > 0 ? max_chunk : 1));
    int32_t *ids = malloc(sizeof(int32_t) * K1);
    uint32_t *r0s = malloc(sizeof(uint32_t) * K1), *r1s = malloc(sizeof(uint32_t) * K1);
    float *held = malloc(sizeof(float) * S * D), *loaded = malloc(sizeof(float) * S * D);
    float *u = malloc(sizeof(float) * K1 * D), *u0 = malloc(sizeof(float) * K1 * D);
    float *neu1e = malloc(sizeof(float) * D), *h = malloc(sizeof(float) * D), *g = malloc(sizeof(float) * K1);
    if (!words || !ids || !r0s || !r1s || !held || !loaded || !u || !u0 || !neu1e || !h || !g) return 1;
    double loss = 0, pairs = 0, kept = 0;
    for (int64_t c = c_begin; c < c_end; c += c_step) {
        const int64_t lo = bounds[c], hi = bounds[c + 1];
        int64_t n = 0;
        for (int64_t p = lo; p < hi; p++) { /* subsampling */
            uint32_t r0, r1;
            philox(seed, (pos_base + p) * stride, &r0, &r1);
            if (unit_float(r0) < keep[tokens[p]]) words[n++] = tokens[p];
        }
        kept += n;
        for (int64_t j = 0; j < (W < n ? W : n); j++) {
            memcpy(held + (j % S) * D, w_in + (int64_t)words[j] * D, sizeof(float) * D);
            memcpy(loaded + (j % S) * D, w_in + (int64_t)words[j] * D, sizeof(float) * D);
        }
        for (int64_t m = 0; m < n; m++) {
            if (m - W - 1 >= 0) { /* the row leaving the window goes back */
                int64_t j = m - W - 1;
                float *row = w_in + (int64_t)words[j] * D, *hj = held + (j % S) * D, *lj = loaded + (j % S) * D;
                for (int64_t d = 0; d < D; d++) row[d] += hj[d] - lj[d];
            }
            if (m + W < n) { /* the row entering it is loaded */
                int64_t j = m + W;
                memcpy(held + (j % S) * D, w_in + (int64_t)words[j] * D, sizeof(float) * D);
                memcpy(loaded + (j % S) * D, w_in + (int64_t)words[j] * D, sizeof(float) * D);
            }
            const int64_t ctr = (pos_base + lo + m) * stride;
            int64_t b = W;
            if (shrink) {
                uint32_t r0, r1;
                philox(seed, ctr + 1, &r0, &r1);
                b = below(r0, W) + 1;
            }
            const float lr = (float)fmax(lr_end, lr_start - (lr_start - lr_end) * (double)(pos_base + lo + m) / total);
            const int64_t jlo = m - b > 0 ? m - b : 0, jhi = m + b + 1 < n ? m + b + 1 : n;
            if (jhi - jlo <= 1) continue;
            const int32_t cw = words[m];
            ids[0] = cw;
            if (sg) {
                memcpy(u, w_out + (int64_t)cw * D, sizeof(float) * D);
                memcpy(u0, u, sizeof(float) * D);
                if (shared) {
                    draw(seed, ctr + 2, K, aprob, alias, V, r0s, r1s, ids + 1);
                    for (int64_t k = 1; k < K1; k++) {
                        memcpy(u + k * D, w_out + (int64_t)ids[k] * D, sizeof(float) * D);
                        memcpy(u0 + k * D, u + k * D, sizeof(float) * D);
                    }
                }
                for (int64_t j = jlo; j < jhi; j++) {
                    if (j == m) continue;
                    const int64_t t = j - m + W - (j > m);
                    if (!shared) {
                        draw(seed, ctr + 2 + t * K, K, aprob, alias, V, r0s, r1s, ids + 1);
                        for (int64_t k = 1; k < K1; k++)
                            memcpy(u + k * D, w_out + (int64_t)ids[k] * D, sizeof(float) * D);
                    }
                    float *v = held + (j % S) * D;
                    for (int64_t k = 0; k < K1; k++) {
                        g[k] = 0;
                        if (k > 0 && ids[k] == cw) continue; /* word2vec.c skips a negative equal to the centre */
                        loss += grad(dot(u + k * D, v, D), k == 0, lr, want_loss, g + k);
                    }
                    pairs += 1;
                    memset(neu1e, 0, sizeof(float) * D);
                    for (int64_t k = 0; k < K1; k++) axpy(g[k], u + k * D, neu1e, D);
                    for (int64_t k = 0; k < K1; k++) {
                        if (shared || k == 0) axpy(g[k], v, u + k * D, D);
                        else axpy(g[k], v, w_out + (int64_t)ids[k] * D, D);
                    }
                    axpy(1.0f, neu1e, v, D);
                }
                for (int64_t k = 0; k < (shared ? K1 : 1); k++) { /* the held output rows go back */
                    float *row = w_out + (int64_t)ids[k] * D, *uk = u + k * D, *u0k = u0 + k * D;
                    for (int64_t d = 0; d < D; d++) row[d] += uk[d] - u0k[d];
                }
            } else {
                memset(h, 0, sizeof(float) * D);
                int64_t cnt = 0;
                for (int64_t j = jlo; j < jhi; j++)
                    if (j != m) { axpy(1.0f, held + (j % S) * D, h, D); cnt++; }
                if (cbow_mean) for (int64_t d = 0; d < D; d++) h[d] /= (float)cnt;
                draw(seed, ctr + 2, K, aprob, alias, V, r0s, r1s, ids + 1);
                for (int64_t k = 0; k < K1; k++) memcpy(u + k * D, w_out + (int64_t)ids[k] * D, sizeof(float) * D);
                for (int64_t k = 0; k < K1; k++) {
                    g[k] = 0;
                    if (k > 0 && ids[k] == cw) continue;
                    loss += grad(dot(u + k * D, h, D), k == 0, lr, want_loss, g + k);
                }
                pairs += 1;
                memset(neu1e, 0, sizeof(float) * D);
                for (int64_t k = 0; k < K1; k++) axpy(g[k], u + k * D, neu1e, D);
                for (int64_t k = 0; k < K1; k++) axpy(g[k], h, w_out + (int64_t)ids[k] * D, D);
                const float scale = cbow_mean ? 1.0f : 1.0f / (float)cnt;
                for (int64_t j = jlo; j < jhi; j++)
                    if (j != m) axpy(scale, neu1e, held + (j % S) * D, D);
            }
        }
        for (int64_t j = n - 1 - W > 0 ? n - 1 - W : 0; j < n; j++) { /* the rows still held go back */
            float *row = w_in + (int64_t)words[j] * D, *hj = held + (j % S) * D, *lj = loaded + (j % S) * D;
            for (int64_t d = 0; d < D; d++) row[d] += hj[d] - lj[d];
        }
    }
    stats[0] += loss;
    stats[1] += pairs;
    stats[2] += kept;
    free(words); free(ids); free(r0s); free(r1s); free(held); free(loaded);
    free(u); free(u0); free(neu1e); free(h); free(g);
    return 0;
}
"""

# -ffast-math is avoided on purpose: linked into a shared library it sets flush-to-zero for the whole
# process. The reassociation flags alone let the compiler vectorize the dot products.
_FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-fno-math-errno", "-fno-trapping-math", "-fno-signed-zeros",
          "-fassociative-math", "-ffp-contract=fast"]

_lib = None
_tried = False


def _cache_dir() -> str:
    d = os.environ.get("EMBEDATTN_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "embedattn")
    os.makedirs(d, exist_ok=True)
    return d


def _build() -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise RuntimeError("no C compiler (cc, gcc or clang) on PATH")
    key = hashlib.sha256("\0".join([_SOURCE, *_FLAGS, cc, platform.machine(), platform.node()]).encode()).hexdigest()
    path = os.path.join(_cache_dir(), f"w2v_{key[:16]}.so")
    if os.path.exists(path):
        return path
    with tempfile.TemporaryDirectory() as tmp:
        src, out = os.path.join(tmp, "w2v.c"), os.path.join(tmp, "w2v.so")
        with open(src, "w") as f:
            f.write(_SOURCE)
        r = subprocess.run([cc, *_FLAGS, "-o", out, src, "-lm"], capture_output=True, text=True, timeout=120)
        if r.returncode:
            raise RuntimeError(f"{cc} failed: {r.stderr.strip()[-2000:]}")
        tmp_final = f"{path}.{os.getpid()}.tmp"
        shutil.copyfile(out, tmp_final)
        os.replace(tmp_final, path)  # atomic: concurrent builders never load a half-written file
    return path


def load():
    """The compiled kernel (a ctypes function), or None with a warning when it cannot be built."""
    global _lib, _tried
    if not _tried:
        _tried = True
        try:
            lib = ctypes.CDLL(_build())
            fn = lib.w2v_train
            p, i64 = ctypes.c_void_p, ctypes.c_int64
            fn.argtypes = [p, p, i64, i64, i64, p, p, p, p, p, i64, i64, i64, i64, ctypes.c_uint64, i64,
                           ctypes.c_double, ctypes.c_double, ctypes.c_double, ctypes.c_int, ctypes.c_int,
                           ctypes.c_int, ctypes.c_int, ctypes.c_int, i64, p]
            fn.restype = ctypes.c_int
            _lib = fn
        except Exception as e:  # noqa: BLE001 (no compiler, a failed build: the PyTorch path runs)
            warnings.warn(f"word2vec: the C kernel of the CPU path could not be built ({e}); "
                          "training falls back to the PyTorch minibatch step", stacklevel=3)
    return _lib


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


def train_chunks(fn, tokens: np.ndarray, bounds: np.ndarray, c_begin: int, c_end: int, c_step: int,
                 keep_prob: np.ndarray, alias_prob: np.ndarray, alias: np.ndarray, w_in: np.ndarray,
                 w_out: np.ndarray, *, seed: int, pos_base: int, lr_start: float, lr_end: float, total_words: float,
                 window: int, negative: int, sg: bool, cbow_mean: bool, shared_negatives: bool,
                 shrink_windows: bool, max_chunk: int, want_loss: bool = True) -> np.ndarray:
    """Chunks ``c_begin, c_begin + c_step, ... < c_end`` through the C kernel, in place on the float32
    tables (C-contiguous numpy arrays; int32 tokens/alias, int64 bounds, float32 probabilities).
    Returns [summed loss (0 unless ``want_loss``), pairs, kept words]."""
    stats = np.zeros(3)
    V, D = w_in.shape
    rc = fn(_ptr(tokens), _ptr(bounds), c_begin, c_end, c_step, _ptr(keep_prob), _ptr(alias_prob), _ptr(alias),
            _ptr(w_in), _ptr(w_out), V, D, negative, window, seed, pos_base, lr_start, lr_end, total_words,
            int(sg), int(cbow_mean), int(shared_negatives), int(shrink_windows), int(want_loss), max_chunk,
            _ptr(stats))
    if rc:
        raise MemoryError("word2vec C kernel: out of memory")
    return stats
