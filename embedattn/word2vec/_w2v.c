/* The CPU path of embedattn's word2vec kernel trainer: the algorithm of train_chunks_reference
 * (embedattn/word2vec/_train.py) in C, with the same Philox draws as the reference and the Triton kernel
 * (kernels/word2vec.py). Built once per (source, compiler, flags) by embedattn/word2vec/_cpu.py and called
 * through ctypes with ONE argument, a w2v_args struct whose layout _cpu.py mirrors (w2v_abi() returns its
 * size and version, checked at load, so a mismatch is a clear error instead of a crash).
 *
 * One call trains chunks c_begin, c_begin + c_step, ... < c_end of the corpus in order, each walked word by
 * word (sequential SGD within a chunk, as word2vec.c); concurrent calls on other chunks update the shared
 * tables Hogwild, like word2vec.c's threads. Objectives: negative sampling (K > 0, output table w_out) and
 * hierarchical softmax (hs, output table w_hs, the word's Huffman path in hs_off/hs_points/hs_codes), alone
 * or together (their gradients for the input row add up before it is updated, as word2vec.c does).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define W2V_ABI_VERSION 3

typedef struct {
    const int32_t *tokens;    /* the corpus, vocabulary ids */
    const int64_t *bounds;    /* chunk c is tokens[bounds[c] .. bounds[c + 1]) */
    int64_t c_begin, c_end, c_step;
    const float *keep;        /* P(keep word), subsampling */
    const float *aprob;       /* the alias table of the negative-sampling distribution */
    const int32_t *alias;
    float *w_in;              /* input vectors (wv.vectors), V x D */
    float *w_out;             /* negative sampling's output vectors (syn1neg), V x D; unused when K == 0 */
    float *w_hs;              /* hierarchical softmax's inner-node vectors (syn1), V x D; unused unless hs */
    const float *lockf;       /* per-word factor on the input rows' updates (vectors_lockf); NULL: all 1 */
    const int64_t *hs_off;    /* word w's Huffman path: nodes hs_points[hs_off[w] .. hs_off[w + 1]) */
    const int32_t *hs_points;
    const uint8_t *hs_codes;
    double *stats;            /* += [summed loss, pairs trained, kept words] */
    int64_t V, D, K, W;
    uint64_t seed;
    int64_t pos_base;         /* corpus position of tokens[0] over all epochs: keys the draws and the lr */
    double lr_start, lr_end, total;
    int64_t max_chunk;
    int32_t sg, cbow_mean, shared, shrink, want_loss, hs;
} w2v_args;

int64_t w2v_abi(void) { return ((int64_t)W2V_ABI_VERSION << 32) | (int64_t)sizeof(w2v_args); }

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

/* exp(x) for x <= 0 (below -87 it returns exp(-87)), inline and branch-free: Cephes' expf (x = n ln2 + r,
   |r| <= ln2 / 2, a polynomial in r, 2^n put in the exponent bits): relative error below 9e-8 at every float
   in [-87, 0] (each one checked against double exp, compiled with _cpu.py's flags). libm's expf is as exact
   but a call per node of hierarchical softmax: inline, skip-gram with hs=1 trains about a tenth faster. */
static inline float exp_neg(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float n = nearbyintf(x * 1.44269504088896341f);
    /* r = x - n ln2 in two fused steps (fmaf: one rounding each, and no reassociation can merge them) */
    const float r = fmaf(-n, -2.12194440e-4f, fmaf(-n, 0.693359375f, x));
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { uint32_t i; float f; } scale = {(uint32_t)((int32_t)n + 127) << 23};
    return p * scale.f;
}

/* g = (label - sigmoid(s)) * lr; returns -log sigmoid(+-s), the term's loss, when want_loss
   (it costs a fifth of a pair; logf, as log1pf would cost as much as the rest of the pair) */
static inline float grad(float s, float label, float lr, int want_loss, float *g) {
    float e = exp_neg(-fabsf(s));
    float sig = s >= 0 ? 1.0f / (1.0f + e) : e / (1.0f + e);
    *g = (label - sig) * lr;
    if (!want_loss) return 0.0f;
    float z = label > 0 ? s : -s;
    return (z < 0.0f ? -z : 0.0f) + logf(1.0f + e);
}

static inline float dot(const float *a, const float *b, int64_t D) {
    float s = 0;
    for (int64_t d = 0; d < D; d++) s += a[d] * b[d];
    return s;
}

static inline void axpy(float a, const float *x, float *y, int64_t D) {
    for (int64_t d = 0; d < D; d++) y[d] += a * x[d];
}

static inline void copy_rows(float *dst, const float *table, const int32_t *ids, int64_t n, int64_t D) {
    for (int64_t k = 0; k < n; k++) memcpy(dst + k * D, table + (int64_t)ids[k] * D, sizeof(float) * D);
}

/* rows ids[k] of table += now[k] - before[k]: a held row's change goes back */
static inline void add_back(float *table, const int32_t *ids, int64_t n, const float *now, const float *before,
                            int64_t D) {
    for (int64_t k = 0; k < n; k++) {
        float *row = table + (int64_t)ids[k] * D;
        const float *a = now + k * D, *b = before + k * D;
        for (int64_t d = 0; d < D; d++) row[d] += a[d] - b[d];
    }
}

/* One hierarchical-softmax step of the input h against the n node rows w_hs[pts[l]] (codes c):
   neu1e += g * u, u += g * h, with g = (1 - code - sigmoid(u . h)) * lr per node u. A node whose score is
   saturated (|f| >= HS_MAX_EXP) is skipped, as word2vec.c and gensim do for hierarchical softmax. The loss.
   The rows are updated in place, as gensim does: the reference and the Triton kernel hold the centre's path
   over its window (registers on a GPU), which is the same arithmetic in one thread, but here a held copy
   cost its load and write-back, a fifth of skip-gram's step and as much again as CBOW's. */
#define HS_MAX_EXP 6.0f
static inline double hs_step(float *w_hs, const int32_t *pts, const uint8_t *c, int64_t n, const float *h,
                             float *neu1e, float lr, int want_loss, int64_t D) {
    double loss = 0;
    for (int64_t l = 0; l < n; l++) {
        float g, *u = w_hs + (int64_t)pts[l] * D, f = dot(u, h, D);
        if (f <= -HS_MAX_EXP || f >= HS_MAX_EXP) continue;
        loss += grad(f, 1.0f - (float)c[l], lr, want_loss, &g);
        axpy(g, u, neu1e, D);
        axpy(g, h, u, D);
    }
    return loss;
}

int w2v_train(const w2v_args *a) {
    const int64_t D = a->D, K = a->K, W = a->W, V = a->V, K1 = a->K + 1;
    const int64_t stride = 2 + 2 * W * K, S = 2 * W + 2;
    const uint64_t seed = a->seed;
    const int32_t *tokens = a->tokens;
    float *w_in = a->w_in, *w_out = a->w_out, *w_hs = a->w_hs;
    int32_t *words = malloc(sizeof(int32_t) * (a->max_chunk > 0 ? a->max_chunk : 1));
    int32_t *ids = malloc(sizeof(int32_t) * K1);
    uint32_t *r0s = malloc(sizeof(uint32_t) * K1), *r1s = malloc(sizeof(uint32_t) * K1);
    float *held = malloc(sizeof(float) * S * D), *loaded = malloc(sizeof(float) * S * D), *lock = malloc(sizeof(float) * S);
    float *u = malloc(sizeof(float) * K1 * D), *u0 = malloc(sizeof(float) * K1 * D);
    float *neu1e = malloc(sizeof(float) * D), *h = malloc(sizeof(float) * D), *g = malloc(sizeof(float) * K1);
    int rc = 0;
    if (!words || !ids || !r0s || !r1s || !held || !loaded || !lock || !u || !u0 || !neu1e || !h || !g) {
        rc = 1;
        goto done;
    }
    double loss = 0, pairs = 0, kept = 0;
    for (int64_t c = a->c_begin; c < a->c_end; c += a->c_step) {
        const int64_t lo = a->bounds[c], hi = a->bounds[c + 1];
        int64_t n = 0;
        for (int64_t p = lo; p < hi; p++) { /* subsampling */
            uint32_t r0, r1;
            philox(seed, (a->pos_base + p) * stride, &r0, &r1);
            if (unit_float(r0) < a->keep[tokens[p]]) words[n++] = tokens[p];
        }
        kept += n;
        for (int64_t j = 0; j < (W < n ? W : n); j++) {
            memcpy(held + (j % S) * D, w_in + (int64_t)words[j] * D, sizeof(float) * D);
            memcpy(loaded + (j % S) * D, w_in + (int64_t)words[j] * D, sizeof(float) * D);
            lock[j % S] = a->lockf ? a->lockf[words[j]] : 1.0f;
        }
        for (int64_t m = 0; m < n; m++) {
            if (m - W - 1 >= 0) { /* the row leaving the window goes back */
                int64_t j = m - W - 1;
                add_back(w_in, words + j, 1, held + (j % S) * D, loaded + (j % S) * D, D);
            }
            if (m + W < n) { /* the row entering it is loaded */
                int64_t j = m + W;
                memcpy(held + (j % S) * D, w_in + (int64_t)words[j] * D, sizeof(float) * D);
                memcpy(loaded + (j % S) * D, w_in + (int64_t)words[j] * D, sizeof(float) * D);
                lock[j % S] = a->lockf ? a->lockf[words[j]] : 1.0f;
            }
            const int64_t ctr = (a->pos_base + lo + m) * stride;
            int64_t b = W;
            if (a->shrink) {
                uint32_t r0, r1;
                philox(seed, ctr + 1, &r0, &r1);
                b = below(r0, W) + 1;
            }
            const float lr = (float)fmax(a->lr_end, a->lr_start - (a->lr_start - a->lr_end) *
                                         (double)(a->pos_base + lo + m) / a->total);
            const int64_t jlo = m - b > 0 ? m - b : 0, jhi = m + b + 1 < n ? m + b + 1 : n;
            if (jhi - jlo <= 1) continue;
            const int32_t cw = words[m];
            ids[0] = cw;
            /* the centre's Huffman path */
            const int64_t nl = a->hs ? a->hs_off[cw + 1] - a->hs_off[cw] : 0;
            const int32_t *pts = a->hs ? a->hs_points + a->hs_off[cw] : NULL;
            const uint8_t *cds = a->hs ? a->hs_codes + a->hs_off[cw] : NULL;
            if (a->sg) {
                const int64_t nheld = K == 0 ? 0 : (a->shared ? K1 : 1); /* output rows held over the window */
                if (K > 0) {
                    if (a->shared) draw(seed, ctr + 2, K, a->aprob, a->alias, V, r0s, r1s, ids + 1);
                    copy_rows(u, w_out, ids, nheld, D);
                    memcpy(u0, u, sizeof(float) * nheld * D);
                }
                for (int64_t j = jlo; j < jhi; j++) {
                    if (j == m) continue;
                    const int64_t t = j - m + W - (j > m);
                    float *v = held + (j % S) * D;
                    memset(neu1e, 0, sizeof(float) * D);
                    if (K > 0) {
                        if (!a->shared) {
                            draw(seed, ctr + 2 + t * K, K, a->aprob, a->alias, V, r0s, r1s, ids + 1);
                            copy_rows(u + D, w_out, ids + 1, K, D);
                        }
                        for (int64_t k = 0; k < K1; k++) {
                            g[k] = 0;
                            if (k > 0 && ids[k] == cw) continue; /* word2vec.c skips a negative equal to the centre */
                            loss += grad(dot(u + k * D, v, D), k == 0, lr, a->want_loss, g + k);
                        }
                        for (int64_t k = 0; k < K1; k++) axpy(g[k], u + k * D, neu1e, D);
                        for (int64_t k = 0; k < K1; k++) {
                            if (a->shared || k == 0) axpy(g[k], v, u + k * D, D);
                            else axpy(g[k], v, w_out + (int64_t)ids[k] * D, D);
                        }
                    }
                    if (nl) loss += hs_step(w_hs, pts, cds, nl, v, neu1e, lr, a->want_loss, D);
                    pairs += 1;
                    axpy(lock[j % S], neu1e, v, D);
                }
                if (K > 0) add_back(w_out, ids, nheld, u, u0, D);
            } else {
                memset(h, 0, sizeof(float) * D);
                int64_t cnt = 0;
                for (int64_t j = jlo; j < jhi; j++)
                    if (j != m) { axpy(1.0f, held + (j % S) * D, h, D); cnt++; }
                if (a->cbow_mean) for (int64_t d = 0; d < D; d++) h[d] /= (float)cnt;
                memset(neu1e, 0, sizeof(float) * D);
                if (K > 0) {
                    draw(seed, ctr + 2, K, a->aprob, a->alias, V, r0s, r1s, ids + 1);
                    copy_rows(u, w_out, ids, K1, D);
                    for (int64_t k = 0; k < K1; k++) {
                        g[k] = 0;
                        if (k > 0 && ids[k] == cw) continue;
                        loss += grad(dot(u + k * D, h, D), k == 0, lr, a->want_loss, g + k);
                    }
                    for (int64_t k = 0; k < K1; k++) axpy(g[k], u + k * D, neu1e, D);
                    for (int64_t k = 0; k < K1; k++) axpy(g[k], h, w_out + (int64_t)ids[k] * D, D);
                }
                if (nl) loss += hs_step(w_hs, pts, cds, nl, h, neu1e, lr, a->want_loss, D);
                pairs += 1;
                const float scale = a->cbow_mean ? 1.0f : 1.0f / (float)cnt;
                for (int64_t j = jlo; j < jhi; j++)
                    if (j != m) axpy(scale * lock[j % S], neu1e, held + (j % S) * D, D);
            }
        }
        for (int64_t j = n - 1 - W > 0 ? n - 1 - W : 0; j < n; j++) /* the rows still held go back */
            add_back(w_in, words + j, 1, held + (j % S) * D, loaded + (j % S) * D, D);
    }
    a->stats[0] += loss;
    a->stats[1] += pairs;
    a->stats[2] += kept;
done:
    free(words); free(ids); free(r0s); free(r1s); free(held); free(loaded); free(lock);
    free(u); free(u0); free(neu1e); free(h); free(g);
    return rc;
}
