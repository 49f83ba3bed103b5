/* specframe's few-row kernels for CPU fp32: passes over 1-16 tokens (rows).
 *
 * specframe_few_rows_linear: y[T, N] = x[T, K] @ w[N, K]^T, reading each weight row once for all rows.
 * specframe_layers: whole Llama decoder layers (RMSNorm, q/k/v, RoPE, KV-cache write, attention,
 *   o-proj, residual, RMSNorm, gate/up, SiLU, down, residual) in one call per run of layers.
 *
 * Every output element is computed by the same code in the same order of sums whatever the
 * number of rows (and of threads), so row i of a pass over T rows is bitwise the row a one-token
 * pass gives. Built by specframe/kernels/build.py with -O3 -march=native.
 */
#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__)
#define VL 16
#define TB 4
#else
#define VL 8
#define TB 2
#endif
#define NB 4
#define PF 2 /* prefetch the weight block this many tiles ahead */
typedef float vec __attribute__((vector_size(VL * 4)));
typedef float half __attribute__((vector_size(VL * 2)));

static inline vec loadu(const float *p) { vec v; __builtin_memcpy(&v, p, sizeof v); return v; }

static inline float hsum(vec v) { /* a tree of adds, not a chain of VL dependent ones */
    half lo, hi; __builtin_memcpy(&lo, &v, sizeof lo); __builtin_memcpy(&hi, (char *)&v + sizeof lo, sizeof hi);
    half s = lo + hi;
    float r[VL / 2]; __builtin_memcpy(r, &s, sizeof r);
    for (int width = VL / 4; width > 0; width /= 2)
        for (int i = 0; i < width; i++) r[i] += r[i + width];
    return r[0];
}

/* ---- linear ------------------------------------------------------------------------------ */

/* tb (<= TB) input rows against NB weight rows; TB and VL follow the registers of the target ISA. */
static inline __attribute__((always_inline)) void tile(const float *x, const float *w, float *y,
                                                         const int tb, int K, int N, const float *pf) {
    vec acc[TB][NB];
    for (int i = 0; i < tb; i++) for (int j = 0; j < NB; j++) acc[i][j] = (vec){0};
    int k = 0;
    for (; k + VL <= K; k += VL) {
        if (pf) for (int line = 0; line < NB * VL; line += 16) __builtin_prefetch(pf + NB * (size_t)k + line, 0, 3);
        vec w0 = loadu(w + k), w1 = loadu(w + K + k), w2 = loadu(w + 2 * (size_t)K + k), w3 = loadu(w + 3 * (size_t)K + k);
        for (int i = 0; i < tb; i++) {
            vec xv = loadu(x + (size_t)i * K + k);
            acc[i][0] += xv * w0; acc[i][1] += xv * w1; acc[i][2] += xv * w2; acc[i][3] += xv * w3;
        }
    }
    for (int i = 0; i < tb; i++)
        for (int j = 0; j < NB; j++) {
            float s = hsum(acc[i][j]);
            for (int kk = k; kk < K; kk++) s += x[(size_t)i * K + kk] * w[(size_t)j * K + kk];
            y[(size_t)i * N + j] = s;
        }
}

static void tiles(const float *x, const float *w, float *y, int T, int K, int N, const float *pf) {
    int t = 0;
    for (; t + TB <= T; t += TB, pf = NULL) tile(x + (size_t)t * K, w, y + (size_t)t * N, TB, K, N, pf);
    switch (T - t) { /* constant tb, so the accumulators stay in registers */
#if TB > 3
        case 3: tile(x + (size_t)t * K, w, y + (size_t)t * N, 3, K, N, pf); break;
        case 2: tile(x + (size_t)t * K, w, y + (size_t)t * N, 2, K, N, pf); break;
#endif
        case 1: tile(x + (size_t)t * K, w, y + (size_t)t * N, 1, K, N, pf); break;
    }
}

static void last_rows(const float *x, const float *w, float *y, int T, int K, int N, int rows) {
    for (int t = 0; t < T; t++)
        for (int j = 0; j < rows; j++) { /* the same order of sums as tile() */
            vec acc = (vec){0};
            int k = 0;
            for (; k + VL <= K; k += VL) acc += loadu(x + (size_t)t * K + k) * loadu(w + (size_t)j * K + k);
            float s = hsum(acc);
            for (; k < K; k++) s += x[(size_t)t * K + k] * w[(size_t)j * K + k];
            y[(size_t)t * N + j] = s;
        }
}

/* Output columns [n0, n1) of y; n0 a multiple of NB, n1 too unless it is N. Any split of [0, N)
 * at multiples of NB computes every element as the whole call does. */
static void linear_columns(const float *x, const float *w, float *y, int T, int K, int N, int n0, int n1) {
    int n = n0;
    for (; n + NB <= n1; n += NB) {
        const float *ahead = n + (PF + 1) * NB <= n1 ? w + (size_t)(n + PF * NB) * K : NULL;
        tiles(x, w + (size_t)n * K, y + n, T, K, N, ahead);
    }
    if (n < n1) last_rows(x, w + (size_t)n * K, y + n, T, K, N, n1 - n);
}

int specframe_few_rows_linear(const float *x, const float *w, float *y, int T, int K, int N) {
    linear_columns(x, w, y, T, K, N, 0, N);
    return 0;
}

/* ---- decoder layers ---------------------------------------------------------------------- */

typedef struct { /* one Llama decoder layer: PyTorch's weights and the KV cache, read in place */
    const float *input_norm, *q, *k, *v, *o, *post_norm, *gate, *up, *down;
    float *keys, *values; /* (Hkv, capacity, D) */
    long capacity;
} specframe_layer;

typedef struct { int C, H, Hkv, D, I; float eps, scale; } specframe_dims;

static float dot(const float *a, const float *b, int n) {
    vec acc = (vec){0};
    int k = 0;
    for (; k + VL <= n; k += VL) acc += loadu(a + k) * loadu(b + k);
    float s = hsum(acc);
    for (; k < n; k++) s += a[k] * b[k];
    return s;
}

/* transformers' LlamaRMSNorm: w * (x * rsqrt(mean(x^2) + eps)), row by row */
static void rms_norm(const float *x, const float *w, float *out, int T, int C, float eps) {
    for (int t = 0; t < T; t++) {
        const float *row = x + (size_t)t * C;
        float r = 1.0f / sqrtf(dot(row, row, C) / (float)C + eps);
        for (int c = 0; c < C; c++) out[(size_t)t * C + c] = w[c] * (row[c] * r);
    }
}

/* q * cos + rotate_half(q) * sin on each of `heads` heads of one row, in place */
static void rope(float *x, const float *cos, const float *sin, int heads, int D) {
    int half_d = D / 2;
    for (int h = 0; h < heads; h++) {
        float *v = x + (size_t)h * D, first[512];
        memcpy(first, v, sizeof(float) * half_d);
        for (int d = 0; d < half_d; d++) v[d] = v[d] * cos[d] + (-v[d + half_d]) * sin[d];
        for (int d = half_d; d < D; d++) v[d] = v[d] * cos[d] + first[d - half_d] * sin[d];
    }
}

/* One query head of one row over the keys it sees: all positions < n_keys, or those `seen` marks. */
static void attend(const float *q, const float *keys, const float *values, const unsigned char *seen, int n_keys,
                   int D, float scale, float *scores, float *out) {
    float top = -INFINITY;
    for (int s = 0; s < n_keys; s++) {
        if (seen && !seen[s]) continue;
        scores[s] = dot(q, keys + (size_t)s * D, D) * scale;
        if (scores[s] > top) top = scores[s];
    }
    float total = 0.0f;
    for (int d = 0; d < D; d++) out[d] = 0.0f;
    for (int s = 0; s < n_keys; s++) {
        if (seen && !seen[s]) continue;
        float p = expf(scores[s] - top);
        total += p;
        const float *v = values + (size_t)s * D;
        for (int d = 0; d < D; d++) out[d] += p * v[d];
    }
    float inverse = 1.0f / total;
    for (int d = 0; d < D; d++) out[d] *= inverse;
}

typedef struct { /* the scratch rows of a pass */
    float *h, *q, *k, *v, *a, *g, *u, *scores;
} scratch;

static void attention_block(const specframe_dims *d, const specframe_layer *l, float *x, int T, int start,
                            const float *cos, const float *sin, const unsigned char *mask, scratch *s) {
    int C = d->C, H = d->H, Hkv = d->Hkv, D = d->D, group = H / Hkv, S = start + T;
    rms_norm(x, l->input_norm, s->h, T, C, d->eps);
    linear_columns(s->h, l->q, s->q, T, C, H * D, 0, H * D);
    linear_columns(s->h, l->k, s->k, T, C, Hkv * D, 0, Hkv * D);
    linear_columns(s->h, l->v, s->v, T, C, Hkv * D, 0, Hkv * D);
    for (int t = 0; t < T; t++) {
        rope(s->q + (size_t)t * H * D, cos + (size_t)t * D, sin + (size_t)t * D, H, D);
        rope(s->k + (size_t)t * Hkv * D, cos + (size_t)t * D, sin + (size_t)t * D, Hkv, D);
        for (int g = 0; g < Hkv; g++) {
            size_t at = ((size_t)g * l->capacity + start + t) * D;
            memcpy(l->keys + at, s->k + ((size_t)t * Hkv + g) * D, sizeof(float) * D);
            memcpy(l->values + at, s->v + ((size_t)t * Hkv + g) * D, sizeof(float) * D);
        }
    }
    for (int t = 0; t < T; t++)
        for (int h = 0; h < H; h++) {
            size_t cache = (size_t)(h / group) * l->capacity * D;
            attend(s->q + ((size_t)t * H + h) * D, l->keys + cache, l->values + cache,
                   mask ? mask + (size_t)t * S : NULL, mask ? S : start + t + 1, D, d->scale, s->scores,
                   s->a + ((size_t)t * H + h) * D);
        }
    linear_columns(s->a, l->o, s->h, T, H * D, C, 0, C);
    for (size_t i = 0; i < (size_t)T * C; i++) x[i] = x[i] + s->h[i];
}

static void mlp_block(const specframe_dims *d, const specframe_layer *l, float *x, int T, scratch *s) {
    int C = d->C, I = d->I;
    rms_norm(x, l->post_norm, s->h, T, C, d->eps);
    linear_columns(s->h, l->gate, s->g, T, C, I, 0, I);
    linear_columns(s->h, l->up, s->u, T, C, I, 0, I);
    for (size_t i = 0; i < (size_t)T * I; i++) {
        float g = s->g[i];
        s->g[i] = g / (1.0f + expf(-g)) * s->u[i];
    }
    linear_columns(s->g, l->down, s->h, T, I, C, 0, C);
    for (size_t i = 0; i < (size_t)T * C; i++) x[i] = x[i] + s->h[i];
}

/* x (T, C): the residual stream of T new tokens at positions start.., updated in place through
 * n_layers layers. cos, sin (T, D): the rotary embedding of each row. mask: NULL (causal: row t
 * sees cached positions and new rows <= t) or (T, start + T) bytes, row t seeing the keys it
 * marks (a token tree). Keys and values of the new rows are written at start.. of each cache.
 * Returns 0, or -1 when scratch memory cannot be had (nothing is changed then). */
int specframe_layers(const specframe_dims *d, const specframe_layer *layers, int n_layers, float *x, int T,
                     int start, const float *cos, const float *sin, const unsigned char *mask) {
    int C = d->C, H = d->H, Hkv = d->Hkv, D = d->D, I = d->I;
    if (D > 1024) return -2;
    size_t sizes[8] = {(size_t)T * (C > H * D ? C : H * D), (size_t)T * H * D, (size_t)T * Hkv * D,
                       (size_t)T * Hkv * D, (size_t)T * H * D, (size_t)T * I, (size_t)T * I, (size_t)start + T};
    size_t total = 0;
    for (int i = 0; i < 8; i++) total += (sizes[i] + 15) & ~(size_t)15; /* 64-byte aligned pieces */
    float *memory = aligned_alloc(64, total * sizeof(float));
    if (!memory) return -1;
    float *pieces[8], *at = memory;
    for (int i = 0; i < 8; i++) { pieces[i] = at; at += (sizes[i] + 15) & ~(size_t)15; }
    scratch s = {pieces[0], pieces[1], pieces[2], pieces[3], pieces[4], pieces[5], pieces[6], pieces[7]};
    for (int i = 0; i < n_layers; i++) {
        attention_block(d, layers + i, x, T, start, cos, sin, mask, &s);
        mlp_block(d, layers + i, x, T, &s);
    }
    free(memory);
    return 0;
}
