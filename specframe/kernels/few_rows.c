/* specframe's few-row kernels for CPU passes over 1-16 tokens (rows), fp32 or bf16 weights.
 *
 * specframe_few_rows_linear: y[T, N] = x[T, K] @ w[N, K]^T, reading each weight row once for all rows.
 * specframe_layers: whole Llama decoder layers (RMSNorm, q/k/v, RoPE, KV-cache write, attention,
 *   o-proj, residual, RMSNorm, gate/up, SiLU, down, residual) in one call per run of layers.
 *
 * Every output element is computed by the same code in the same order of sums whatever the
 * number of rows (and of threads), so row i of a pass over T rows is bitwise the row a one-token
 * pass gives. Built by specframe/kernels/build.py with -O3 -march=native.
 *
 * Built with -DSPECFRAME_BF16, the weights and the KV cache are bf16 (`weight_t`): each is
 * widened to fp32 as it is loaded (bf16 is the top half of an fp32, so a 16-bit shift: no bf16
 * units needed), and everything is computed and accumulated in fp32 by the same tiles, folds and
 * threads, so rows stay bitwise independent of the row and thread counts. Keys and values are
 * rounded to bf16 (to nearest even, as torch rounds) as they are written into the cache, and the
 * residual stream at the end of each layer, so a stack of layers run in one call or split into
 * runs (EESD's lower and upper layers) gives bitwise the same states. Activations stay fp32.
 */
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__)
#define VL 16
#define TB 8 /* input rows in a tile at most: 8 x 3 accumulators, 3 weights and an input in 32 registers */
#else
#define VL 8
#define TB 2 /* 16 registers: 2 x 4 accumulators, 4 weights, an input */
#endif
#define NB 4 /* weight rows in a tile at most (fewer for tiles of many rows: `block_rows`) */
#define PF_ROWS 24 /* prefetch the weight this many rows ahead, into L2 (docs/benchmarks.md) */
typedef float vec __attribute__((vector_size(VL * 4)));
typedef float half __attribute__((vector_size(VL * 2)));
typedef int ivec __attribute__((vector_size(VL * 4)));

#if defined(__x86_64__) || defined(__i386__)
#define IN_REGISTER(v) __asm__("" : "+v"(v)) /* keep v in a vector register from here on */
#else
#define IN_REGISTER(v) ((void)0)
#endif

static inline vec loadu(const float *p) { vec v; __builtin_memcpy(&v, p, sizeof v); return v; }

/* ---- weights and the KV cache: fp32, or bf16 widened to fp32 as loaded ----------------------- */
#if defined(SPECFRAME_BF16)
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
typedef uint16_t weight_t; /* bf16: the top 16 bits of an fp32 */
#define BF16_SHIFT 16 /* where a bf16's bits sit in an fp32's */
typedef uint16_t bf16_lanes __attribute__((vector_size(VL * 2)));
typedef uint32_t uvec __attribute__((vector_size(VL * 4)));
static inline vec loadw(const weight_t *p) { /* VL bf16 values -> fp32 lanes: zero-extend, shift */
#if defined(__AVX512F__)
    /* one vpmovzxwd and one vpslld (GCC 12 lowers the generic form below to two 8-lane halves) */
    return (vec)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), BF16_SHIFT);
#elif defined(__AVX2__)
    return (vec)_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), BF16_SHIFT);
#else
    bf16_lanes h; __builtin_memcpy(&h, p, sizeof h);
    return (vec)(__builtin_convertvector(h, uvec) << BF16_SHIFT);
#endif
}
static inline float getw(const weight_t *p) { uint32_t u = (uint32_t)*p << BF16_SHIFT; float f; memcpy(&f, &u, 4); return f; }
static inline weight_t to_weight(float f) { /* round to nearest even, as torch's float -> bfloat16 */
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0; /* NaN */
    return (weight_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
static inline float rounded(float f) { weight_t b = to_weight(f); return getw(&b); } /* f to bf16's precision */
#else
typedef float weight_t;
static inline vec loadw(const weight_t *p) { return loadu(p); }
static inline float getw(const weight_t *p) { return *p; }
static inline weight_t to_weight(float f) { return f; }
static inline float rounded(float f) { return f; }
#endif
#define LINE_ELEMENTS (64 / (int)sizeof(weight_t)) /* weights in a cache line */

/* the element size of the weights and KV cache this library was built for (4: fp32, 2: bf16) */
int specframe_weight_bytes(void) { return (int)sizeof(weight_t); }

/* out[i] = x[i] in the weights' dtype, as the KV cache is written (the tests compare it with torch) */
void specframe_to_weights(const float *x, weight_t *out, long n) {
    for (long i = 0; i < n; i++) out[i] = to_weight(x[i]);
}

static inline float hsum(vec v) { /* a tree of adds, not a chain of VL dependent ones */
    half lo, hi; __builtin_memcpy(&lo, &v, sizeof lo); __builtin_memcpy(&hi, (char *)&v + sizeof lo, sizeof hi);
    half s = lo + hi;
    float r[VL / 2]; __builtin_memcpy(r, &s, sizeof r);
    for (int width = VL / 4; width > 0; width /= 2)
        for (int i = 0; i < width; i++) r[i] += r[i + width];
    return r[0];
}

/* ---- many horizontal sums at once --------------------------------------------------------- */
/* hsums(acc, m, out): out[i] = hsum(acc[i]) for i < m, bitwise: the same adds of the same lanes,
 * with each level of hsum's tree done for two accumulators by one vector add after two shuffles
 * (a tile's sums cost about a third of m separate hsums). Without __builtin_shufflevector
 * (GCC < 12), or built with -DSPECFRAME_SERIAL_SUMS (the tests' reference), m separate hsums. */
#if (defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)) && !defined(SPECFRAME_SERIAL_SUMS)
#define SHUFFLE2(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#if VL == 16
/* level l: lanes i and i + 2^(4-l) of each accumulator (16 lanes of a, then b, at each step) */
#define FOLD1_LO 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23
#define FOLD1_HI 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31
#define FOLD2_LO 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27
#define FOLD2_HI 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31
#define FOLD3_LO 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29
#define FOLD3_HI 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31
#define FOLD4_LO 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30
#define FOLD4_HI 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31
#else
#define FOLD1_LO 0, 1, 2, 3, 8, 9, 10, 11
#define FOLD1_HI 4, 5, 6, 7, 12, 13, 14, 15
#define FOLD2_LO 0, 1, 4, 5, 8, 9, 12, 13
#define FOLD2_HI 2, 3, 6, 7, 10, 11, 14, 15
#define FOLD3_LO 0, 2, 4, 6, 8, 10, 12, 14
#define FOLD3_HI 1, 3, 5, 7, 9, 11, 13, 15
#endif

static inline __attribute__((always_inline)) vec fold1(vec a, vec b) { return SHUFFLE2(a, b, FOLD1_LO) + SHUFFLE2(a, b, FOLD1_HI); }
static inline __attribute__((always_inline)) vec fold2(vec a, vec b) { return SHUFFLE2(a, b, FOLD2_LO) + SHUFFLE2(a, b, FOLD2_HI); }
static inline __attribute__((always_inline)) vec fold3(vec a, vec b) { return SHUFFLE2(a, b, FOLD3_LO) + SHUFFLE2(a, b, FOLD3_HI); }
#if VL == 16
static inline __attribute__((always_inline)) vec fold4(vec a, vec b) { return SHUFFLE2(a, b, FOLD4_LO) + SHUFFLE2(a, b, FOLD4_HI); }
#endif

/* up to VL accumulators (m a constant once inlined; the missing ones are zeros, which the
 * compiler folds away): accumulator i's sum ends in lane i */
static inline __attribute__((always_inline)) vec hsums_group(const vec *acc, const int m) {
#define ACC(i) ((i) < m ? acc[(i) < m ? (i) : 0] : (vec){0})
    vec a0 = fold1(ACC(0), ACC(1)), a1 = fold1(ACC(2), ACC(3)), a2 = fold1(ACC(4), ACC(5)), a3 = fold1(ACC(6), ACC(7));
#if VL == 16
    vec a4 = fold1(ACC(8), ACC(9)), a5 = fold1(ACC(10), ACC(11)), a6 = fold1(ACC(12), ACC(13));
    vec a7 = fold1(ACC(14), ACC(15));
    return fold4(fold3(fold2(a0, a1), fold2(a2, a3)), fold3(fold2(a4, a5), fold2(a6, a7)));
#else
    return fold3(fold2(a0, a1), fold2(a2, a3));
#endif
#undef ACC
}

#else
static inline vec hsums_group(const vec *acc, const int m) {
    float r[VL] = {0};
    for (int i = 0; i < m; i++) r[i] = hsum(acc[i]);
    return loadu(r);
}
#endif

static inline __attribute__((always_inline)) void hsums(const vec *acc, const int m, float *out) {
    for (int i = 0; i < m; i += VL) {
        vec s = hsums_group(acc + i, m - i < VL ? m - i : VL);
        __builtin_memcpy(out + i, &s, sizeof(float) * (m - i < VL ? m - i : VL));
    }
}

/* ---- linear ------------------------------------------------------------------------------ */

/* tb input rows against nb weight rows, both constants once inlined; every output element is
 * summed in the same order (VL-lane partial sums over k, hsum, then the tail), so which tile an
 * element falls in changes nothing. pf: a weight block to prefetch alongside, or NULL. */
static inline __attribute__((always_inline)) void tile(const float *x, const weight_t *w, float *y,
                                                         const int tb, const int nb, int K, int N, const weight_t *pf) {
    vec acc[TB * NB];
    for (int m = 0; m < tb * nb; m++) acc[m] = (vec){0};
    int k = 0;
    for (; k + VL <= K; k += VL) {
        if (pf)
            for (int line = 0; line < nb * VL; line += LINE_ELEMENTS) __builtin_prefetch(pf + nb * (size_t)k + line, 0, 2);
        vec wv[NB];
        for (int j = 0; j < nb; j++) wv[j] = loadw(w + (size_t)j * K + k);
        for (int i = 0; i < tb; i++) {
            vec xv = loadu(x + (size_t)i * K + k);
            IN_REGISTER(xv); /* one load: GCC would fold it into each of the nb FMAs */
            for (int j = 0; j < nb; j++) acc[i * nb + j] += xv * wv[j];
        }
    }
    float sums[TB * NB];
    hsums(acc, tb * nb, sums);
    for (int i = 0; i < tb; i++)
        for (int j = 0; j < nb; j++) {
            float s = sums[i * nb + j];
            for (int kk = k; kk < K; kk++) s += x[(size_t)i * K + kk] * getw(w + (size_t)j * K + kk);
            y[(size_t)i * N + j] = s;
        }
}

/* Tiles of up to TB rows, as even as can be: T = 12 is two tiles of 6, T = 16 two of 8. */
static int row_tiles(int T) { return (T + TB - 1) / TB; }
static int tile_rows(int T) { return (T + row_tiles(T) - 1) / row_tiles(T); } /* the largest tile's rows */

/* Weight rows per tile against tiles of up to tb rows: tb * nb accumulators, nb weights and an
 * input must fit in the registers (32 with AVX-512, 16 with AVX2). */
static int block_rows(int tb) { return TB == 8 && tb > 6 ? 3 : NB; }

#define TILE(tb, nb) case (tb) * 8 + (nb): tile(x, w, y, tb, nb, K, N, pf); return;
#define TILES(tb) TILE(tb, 1) TILE(tb, 2) TILE(tb, 3)

/* one tile with tb and nb made constants, so the accumulators stay in registers; only the
 * shapes block_rows allows are compiled */
static void any_tile(const float *x, const weight_t *w, float *y, int tb, int nb, int K, int N, const weight_t *pf) {
    switch (tb * 8 + nb) {
        TILES(1) TILE(1, 4) TILES(2) TILE(2, 4)
#if TB == 8
        TILES(3) TILE(3, 4) TILES(4) TILE(4, 4) TILES(5) TILE(5, 4) TILES(6) TILE(6, 4) TILES(7) TILES(8)
#endif
    }
}

/* all T rows against nb weight rows (nb <= block_rows(tile_rows(T))) */
static void block(const float *x, const weight_t *w, float *y, int T, int K, int N, int nb, const weight_t *pf) {
    for (int t = 0, done = 0, tiles = row_tiles(T); t < tiles; t++, pf = NULL) {
        int tb = (T - done + (tiles - t) - 1) / (tiles - t);
        any_tile(x + (size_t)done * K, w, y + (size_t)done * N, tb, nb, K, N, pf);
        done += tb;
    }
}

/* Output columns [n0, n1) of y. Every element is computed as the whole call computes it, so any
 * split of [0, N) gives the same result. then: the weights the caller reads next (or NULL),
 * prefetched while the last PF_ROWS rows of these run, so the next stream starts warm. */
static void linear_columns(const float *x, const weight_t *w, float *y, int T, int K, int N, int n0, int n1,
                           const weight_t *then) {
    int nb = block_rows(tile_rows(T)), n = n0;
    for (; n + nb <= n1; n += nb) {
        int beyond = n + PF_ROWS - n1; /* the block to prefetch, from n1 on: in `then` once past n1 */
        const weight_t *ahead = beyond + nb <= 0 ? w + (size_t)(n + PF_ROWS) * K
                             : then ? then + (size_t)(beyond > 0 ? beyond : 0) * K : NULL;
        block(x, w + (size_t)n * K, y + n, T, K, N, nb, ahead);
    }
    if (n < n1) block(x, w + (size_t)n * K, y + n, T, K, N, n1 - n, NULL);
}

/* ---- threads ---------------------------------------------------------------------------- */
/* A pool of worker threads that sleep between calls. A call splits its work into `threads`
 * shares: output columns (in blocks of SHARE_COLUMNS), heads, or (row, head) pairs. Each output element is
 * computed by the same code whatever the share it falls in, so results are bitwise the same
 * for every thread count. Inside a call the threads meet at spinning barriers (a decoder layer
 * has five), so a thread the scheduler parks holds up the others: callers choose the count. */

#define MAX_THREADS 64
typedef void (*task)(void *job, int id, int n);

static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER; /* one parallel call at a time */
static pthread_mutex_t wake_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;
static int workers; /* started so far (ids 1..workers) */
static long generation; /* bumped for each call, under wake_lock */
static task job_task;
static void *job_data;
static int job_threads;
static atomic_int finished;

static void relax(int *spins) {
#if defined(__x86_64__) || defined(__i386__)
    if (++*spins < 4000) { __builtin_ia32_pause(); return; }
#else
    if (++*spins < 4000) return;
#endif
    sched_yield();
}

static void *worker(void *arg) {
    int id = (int)(intptr_t)arg;
    long seen = 0;
    for (;;) {
        pthread_mutex_lock(&wake_lock);
        while (generation == seen) pthread_cond_wait(&wake, &wake_lock);
        seen = generation;
        task fn = job_task; void *data = job_data; int n = job_threads;
        pthread_mutex_unlock(&wake_lock);
        if (id < n) { fn(data, id, n); atomic_fetch_add(&finished, 1); }
    }
    return NULL;
}

static void after_fork_in_child(void) { /* the workers did not survive the fork */
    workers = 0; generation = 0;
    pthread_mutex_init(&pool_lock, NULL); pthread_mutex_init(&wake_lock, NULL); pthread_cond_init(&wake, NULL);
}

static void run_parallel(task fn, void *data, int n) {
    if (n > MAX_THREADS) n = MAX_THREADS;
    if (n <= 1) { fn(data, 0, 1); return; }
    pthread_mutex_lock(&pool_lock);
    static int registered;
    if (!registered) registered = !pthread_atfork(NULL, NULL, after_fork_in_child);
    while (workers < n - 1) {
        pthread_t thread;
        if (pthread_create(&thread, NULL, worker, (void *)(intptr_t)(workers + 1))) break;
        pthread_detach(thread);
        workers++;
    }
    if (n > workers + 1) n = workers + 1;
    pthread_mutex_lock(&wake_lock);
    job_task = fn; job_data = data; job_threads = n;
    atomic_store(&finished, 0);
    generation++;
    pthread_cond_broadcast(&wake);
    pthread_mutex_unlock(&wake_lock);
    fn(data, 0, n);
    for (int spins = 0; atomic_load(&finished) < n - 1;) relax(&spins);
    pthread_mutex_unlock(&pool_lock);
}

typedef struct { atomic_int arrived, phase; } barrier;

static void meet(barrier *b, int n) {
    if (n == 1) return;
    int phase = atomic_load(&b->phase);
    if (atomic_fetch_add(&b->arrived, 1) == n - 1) {
        atomic_store(&b->arrived, 0);
        atomic_fetch_add(&b->phase, 1);
        return;
    }
    for (int spins = 0; atomic_load(&b->phase) == phase;) relax(&spins);
}

/* thread id's share [*lo, *hi) of `units` units */
static void share(int units, int id, int n, int *lo, int *hi) {
    *lo = (int)((long)units * id / n);
    *hi = (int)((long)units * (id + 1) / n);
}

/* thread id's share of the output columns [0, N): whole blocks of SHARE_COLUMNS, the tail with the last */
#define SHARE_COLUMNS 12 /* a multiple of every tile's weight rows (3, 4), so no share ends in a narrow tile */
static void column_share(int N, int id, int n, int *n0, int *n1) {
    share((N + SHARE_COLUMNS - 1) / SHARE_COLUMNS, id, n, n0, n1);
    *n0 *= SHARE_COLUMNS;
    *n1 = *n1 * SHARE_COLUMNS < N ? *n1 * SHARE_COLUMNS : N;
}

typedef struct { const float *x; const weight_t *w; float *y; int T, K, N; } linear_job;

static void linear_task(void *data, int id, int n) {
    linear_job *j = data;
    int n0, n1;
    column_share(j->N, id, n, &n0, &n1);
    linear_columns(j->x, j->w, j->y, j->T, j->K, j->N, n0, n1, NULL);
}

int specframe_few_rows_linear(const float *x, const weight_t *w, float *y, int T, int K, int N, int threads) {
    linear_job job = {x, w, y, T, K, N};
    run_parallel(linear_task, &job, threads);
    return 0;
}

/* ---- decoder layers ---------------------------------------------------------------------- */

typedef struct { /* one Llama decoder layer: PyTorch's weights and the KV cache, read in place */
    const weight_t *input_norm, *q, *k, *v, *o, *post_norm, *gate, *up, *down;
    weight_t *keys, *values; /* (Hkv, capacity, D) */
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

/* dot with b in the weights' dtype: the same sums in the same order */
static float dot_w(const float *a, const weight_t *b, int n) {
    vec acc = (vec){0};
    int k = 0;
    for (; k + VL <= n; k += VL) acc += loadu(a + k) * loadw(b + k);
    float s = hsum(acc);
    for (; k < n; k++) s += a[k] * getw(b + k);
    return s;
}

/* transformers' LlamaRMSNorm: w * (x * rsqrt(mean(x^2) + eps)), row by row */
static void rms_norm(const float *x, const weight_t *w, float *out, int T, int C, float eps) {
    for (int t = 0; t < T; t++) {
        const float *row = x + (size_t)t * C;
        float r = 1.0f / sqrtf(dot(row, row, C) / (float)C + eps);
        for (int c = 0; c < C; c++) out[(size_t)t * C + c] = getw(w + c) * (row[c] * r);
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

static inline vec splat(float f) { return (vec){0} + f; }

/* e^x in each lane, within about 2 ulp of expf; 0 below -87.3 (and for -inf), and x above 88
 * taken as 88. Lanes are independent. Cephes' expf: x = n ln 2 + r, e^r by a degree-7
 * polynomial, times 2^n. */
static inline vec exp_lanes(vec x) {
    ivec tiny = x < splat(-87.33654f), huge = x > splat(88.0f);
    x = (vec)(((ivec)x & ~tiny) | ((ivec)splat(-87.33654f) & tiny));
    x = (vec)(((ivec)x & ~huge) | ((ivec)splat(88.0f) & huge));
    vec n = (x * splat(1.44269504f) + splat(12582912.0f)) - splat(12582912.0f); /* round to nearest */
    vec r = x - n * splat(0.693359375f) + n * splat(2.12194440e-4f);
    vec p = splat(1.9875691500e-4f);
    p = p * r + splat(1.3981999507e-3f);
    p = p * r + splat(8.3334519073e-3f);
    p = p * r + splat(4.1665795894e-2f);
    p = p * r + splat(1.6666665459e-1f);
    p = p * r + splat(5.0000001201e-1f);
    p = p * (r * r) + r + splat(1.0f);
    ivec scale = (__builtin_convertvector(n, ivec) + 127) << 23;
    return (vec)((ivec)(p * (vec)scale) & ~tiny);
}

/* row[i] = e^(row[i] - top) for i < n; returns their sum (in an order fixed by n alone) */
static float softmax_weights(float *row, int n, float top) {
    vec sum = (vec){0};
    int i = 0;
    for (; i + VL <= n; i += VL) {
        vec e = exp_lanes(loadu(row + i) - splat(top));
        __builtin_memcpy(row + i, &e, sizeof e);
        sum += e;
    }
    if (i < n) { /* the tail, padded with -inf (weight 0) */
        float tail[VL];
        for (int k = 0; k < VL; k++) tail[k] = i + k < n ? row[i + k] : -INFINITY;
        vec e = exp_lanes(loadu(tail) - splat(top));
        __builtin_memcpy(tail, &e, sizeof e);
        for (int k = 0; i + k < n; k++) row[i + k] = tail[k];
        sum += e;
    }
    return hsum(sum);
}

/* Attention of `heads` query heads (rows of q, D apart) that share one key/value head, for one
 * row: over the keys at positions 0..n_keys-1, or at order[0..n_keys-1] (a token tree's row:
 * the cached positions, its ancestors and itself, in order, as a chain pass over its path sees
 * them). Each value is loaded once for all heads. scores: heads * n_keys floats. Every
 * (head, key) score and every output is computed by the same code whatever `heads` is. */
#define HEAD_CHUNK 4

/* scores of n <= VL keys from `first` for one query head (qv: DV vectors): a vector of n lanes
 * (the rest 0), each dot product summed in the same order as `dot` */
static inline __attribute__((always_inline)) vec key_scores(const vec *qv, const weight_t *keys, const int *order,
                                                             int first, const int n, int D, const int DV) {
    vec dots[VL];
    for (int i = 0; i < VL; i++) {
        vec dot = (vec){0};
        if (i < n) {
            const weight_t *k = keys + (size_t)(order ? order[first + i] : first + i) * D;
            for (int c = 0; c < DV; c++) dot += qv[c] * loadw(k + c * VL);
        }
        dots[i] = dot;
    }
    return hsums_group(dots, VL);
}

static inline __attribute__((always_inline)) void attend_chunk(
        const float *q, const weight_t *keys, const weight_t *values, const int *order, int n_keys, int D, int heads,
        float scale, float *scores, float *out, const int DV) {
    vec acc[HEAD_CHUNK][8]; /* fixed sizes (DV <= 8): arrays sized by DV or HC would live on the stack */
    float tops[HEAD_CHUNK];
    for (int h = 0; h < heads; h++) { /* VL keys at a time, their sums folded together */
        vec qv[8], top = splat(-INFINITY);
        for (int c = 0; c < DV; c++) qv[c] = loadu(q + (size_t)h * D + c * VL);
        float *row = scores + (size_t)h * n_keys;
        int i = 0;
        for (; i + VL <= n_keys; i += VL) {
            vec s = key_scores(qv, keys, order, i, VL, D, DV) * splat(scale);
            __builtin_memcpy(row + i, &s, sizeof s);
            ivec above = s > top; /* lanes where s is larger (NaN never is) */
            top = (vec)(((ivec)s & above) | ((ivec)top & ~above));
        }
        float t = -INFINITY, lanes[VL];
        __builtin_memcpy(lanes, &top, sizeof lanes);
        for (int l = 0; l < VL; l++) t = lanes[l] > t ? lanes[l] : t;
        if (i < n_keys) {
            vec s = key_scores(qv, keys, order, i, n_keys - i, D, DV) * splat(scale);
            __builtin_memcpy(lanes, &s, sizeof lanes);
            for (int l = 0; i + l < n_keys; l++) { row[i + l] = lanes[l]; t = lanes[l] > t ? lanes[l] : t; }
        }
        tops[h] = t;
    }
    float inverse[HEAD_CHUNK];
    for (int h = 0; h < heads; h++) {
        inverse[h] = 1.0f / softmax_weights(scores + (size_t)h * n_keys, n_keys, tops[h]);
        for (int c = 0; c < DV; c++) acc[h][c] = (vec){0};
    }
    for (int i = 0; i < n_keys; i++) {
        const weight_t *v = values + (size_t)(order ? order[i] : i) * D;
        vec vv[8];
        for (int c = 0; c < DV; c++) vv[c] = loadw(v + c * VL);
        for (int h = 0; h < heads; h++) {
            float p = scores[(size_t)h * n_keys + i];
            for (int c = 0; c < DV; c++) acc[h][c] += p * vv[c];
        }
    }
    for (int h = 0; h < heads; h++)
        for (int c = 0; c < DV; c++) {
            vec o = acc[h][c] * inverse[h];
            __builtin_memcpy(out + (size_t)h * D + c * VL, &o, sizeof o);
        }
}

/* The same for any D, without vectors kept in registers (the order of sums is the same per head). */
static void attend_any(const float *q, const weight_t *keys, const weight_t *values, const int *order, int n_keys, int D,
                       int heads, float scale, float *scores, float *out) {
    for (int h = 0; h < heads; h++) {
        float *row = scores + (size_t)h * n_keys, top = -INFINITY;
        for (int i = 0; i < n_keys; i++) {
            row[i] = dot_w(q + (size_t)h * D, keys + (size_t)(order ? order[i] : i) * D, D) * scale;
            top = row[i] > top ? row[i] : top;
        }
        float *o = out + (size_t)h * D, total = softmax_weights(row, n_keys, top);
        for (int d = 0; d < D; d++) o[d] = 0.0f;
        for (int i = 0; i < n_keys; i++) {
            const weight_t *v = values + (size_t)(order ? order[i] : i) * D;
            for (int d = 0; d < D; d++) o[d] += row[i] * getw(v + d);
        }
        for (int d = 0; d < D; d++) o[d] *= 1.0f / total;
    }
}

/* hc (<= HEAD_CHUNK, <= 2 for DV = 8) heads made a constant, so their accumulators stay in registers */
#define ATTEND_HEADS(DV)                                                                                    \
    switch (hc) {                                                                                           \
        case 1: attend_chunk(qh, keys, values, order, n_keys, D, 1, scale, scores, oh, DV); break;          \
        case 2: attend_chunk(qh, keys, values, order, n_keys, D, 2, scale, scores, oh, DV); break;          \
        case 3: attend_chunk(qh, keys, values, order, n_keys, D, 3, scale, scores, oh, DV); break;          \
        default: attend_chunk(qh, keys, values, order, n_keys, D, 4, scale, scores, oh, DV);               \
    }

static void attend(const float *q, const weight_t *keys, const weight_t *values, const int *order, int n_keys, int D,
                   int heads, float scale, float *scores, float *out) {
    int chunk = D == 8 * VL ? HEAD_CHUNK / 2 : HEAD_CHUNK; /* the accumulators fit in registers */
    for (int h0 = 0; h0 < heads; h0 += chunk) {
        int hc = heads - h0 < chunk ? heads - h0 : chunk;
        const float *qh = q + (size_t)h0 * D;
        float *oh = out + (size_t)h0 * D;
        if (D == 4 * VL) ATTEND_HEADS(4)
        else if (D == VL) ATTEND_HEADS(1)
        else if (D == 2 * VL) ATTEND_HEADS(2)
        else if (D == 8 * VL) ATTEND_HEADS(8)
        else attend_any(qh, keys, values, order, n_keys, D, hc, scale, scores, oh);
    }
}

typedef struct { /* one call of specframe_layers; h and scores: one slice per thread */
    const specframe_dims *d;
    const specframe_layer *layers;
    int n_layers, T, start;
    float *x;
    const float *cos, *sin;
    const int *order, *seen; /* a tree pass: row t sees keys order[t * S ..], seen[t] of them */
    float *q, *k, *v, *a, *g, *u, *y, *h, *scores;
    size_t h_stride, scores_stride;
    barrier meeting;
} layers_job;

/* the rotary embedding of heads [h0, h1) of every row of x (T, heads * D), in place */
static void rope_heads(const layers_job *j, float *x, int heads, int h0, int h1) {
    int D = j->d->D;
    for (int t = 0; t < j->T; t++)
        rope(x + ((size_t)t * heads + h0) * D, j->cos + (size_t)t * D, j->sin + (size_t)t * D, h1 - h0, D);
}

/* keys or values of heads [g0, g1) of the new rows (T, Hkv * D) into a (Hkv, capacity, D) cache */
static void to_cache(const layers_job *j, const specframe_layer *l, const float *rows, weight_t *cache, int g0,
                     int g1) {
    int Hkv = j->d->Hkv, D = j->d->D;
    for (int t = 0; t < j->T; t++)
        for (int g = g0; g < g1; g++) {
            weight_t *to = cache + ((size_t)g * l->capacity + j->start + t) * D;
            const float *from = rows + ((size_t)t * Hkv + g) * D;
#if defined(SPECFRAME_BF16)
            for (int c = 0; c < D; c++) to[c] = to_weight(from[c]);
#else
            memcpy(to, from, sizeof(float) * D);
#endif
        }
}

/* A layer's weights in the order a thread reads them */
enum weight { W_Q, W_K, W_V, W_O, W_GATE, W_UP, W_DOWN };

/* where thread id's share of weight `part` of layer l begins */
static const weight_t *share_begins(const layers_job *j, const specframe_layer *l, int part, int id, int n) {
    const specframe_dims *d = j->d;
    int lo, hi;
    switch (part) {
        case W_Q: share(d->H, id, n, &lo, &hi); return l->q + (size_t)lo * d->D * d->C;
        case W_K: share(d->Hkv, id, n, &lo, &hi); return l->k + (size_t)lo * d->D * d->C;
        case W_V: share(d->Hkv, id, n, &lo, &hi); return l->v + (size_t)lo * d->D * d->C;
        case W_O: column_share(d->C, id, n, &lo, &hi); return l->o + (size_t)lo * d->H * d->D;
        case W_GATE: column_share(d->I, id, n, &lo, &hi); return l->gate + (size_t)lo * d->C;
        case W_UP: column_share(d->I, id, n, &lo, &hi); return l->up + (size_t)lo * d->C;
        default: column_share(d->C, id, n, &lo, &hi); return l->down + (size_t)lo * d->I;
    }
}

/* the weights thread id reads after `part` of layer l: the next part, or the next layer's q */
static const weight_t *after(const layers_job *j, const specframe_layer *l, int part, int id, int n) {
    if (part != W_DOWN) return share_begins(j, l, part + 1, id, n);
    return l + 1 < j->layers + j->n_layers ? share_begins(j, l + 1, W_Q, id, n) : NULL;
}

static void projections(layers_job *j, const specframe_layer *l, const float *h, int id, int n) {
    const specframe_dims *d = j->d;
    int C = d->C, H = d->H, Hkv = d->Hkv, D = d->D, T = j->T, lo, hi;
    share(H, id, n, &lo, &hi);
    linear_columns(h, l->q, j->q, T, C, H * D, lo * D, hi * D, after(j, l, W_Q, id, n));
    rope_heads(j, j->q, H, lo, hi);
    share(Hkv, id, n, &lo, &hi);
    linear_columns(h, l->k, j->k, T, C, Hkv * D, lo * D, hi * D, after(j, l, W_K, id, n));
    rope_heads(j, j->k, Hkv, lo, hi);
    to_cache(j, l, j->k, l->keys, lo, hi);
    linear_columns(h, l->v, j->v, T, C, Hkv * D, lo * D, hi * D, after(j, l, W_V, id, n));
    to_cache(j, l, j->v, l->values, lo, hi);
}

static void attention(layers_job *j, const specframe_layer *l, int id, int n) {
    const specframe_dims *d = j->d;
    int H = d->H, Hkv = d->Hkv, D = d->D, group = H / Hkv, S = j->start + j->T, lo, hi;
    share(j->T * Hkv, id, n, &lo, &hi);
    for (int item = lo; item < hi; item++) {
        int t = item / Hkv, g = item % Hkv;
        size_t cache = (size_t)g * l->capacity * D, heads = (size_t)t * H + (size_t)g * group;
        attend(j->q + heads * D, l->keys + cache, l->values + cache, j->order ? j->order + (size_t)t * S : NULL,
               j->order ? j->seen[t] : j->start + t + 1, D, group, d->scale, j->scores + id * j->scores_stride,
               j->a + heads * D);
    }
}

/* x[:, n0:n1] += in[:, n0:n1] @ w[n0:n1]^T: a residual branch's output columns; `layer_end`: the
 * sum is the layer's output, rounded to the weights' precision (a no-op in fp32) */
static void add_columns(layers_job *j, const float *in, const weight_t *w, int K, const weight_t *then, int layer_end,
                        int id, int n) {
    int C = j->d->C, n0, n1;
    column_share(C, id, n, &n0, &n1);
    linear_columns(in, w, j->y, j->T, K, C, n0, n1, then);
    for (int t = 0; t < j->T; t++)
        for (int c = n0; c < n1; c++) {
            float sum = j->x[(size_t)t * C + c] + j->y[(size_t)t * C + c];
            j->x[(size_t)t * C + c] = layer_end ? rounded(sum) : sum;
        }
}

/* g[i] = silu(g[i]) * u[i] = g[i] / (1 + e^-g[i]) * u[i], lane by lane (the tail padded) */
static void silu_times(float *g, const float *u, int n) {
    for (int i = 0; i < n; i += VL) {
        float gs[VL], us[VL];
        int lanes = n - i < VL ? n - i : VL;
        for (int k = 0; k < VL; k++) { gs[k] = k < lanes ? g[i + k] : 0.0f; us[k] = k < lanes ? u[i + k] : 0.0f; }
        vec gv = loadu(gs), out = gv / (splat(1.0f) + exp_lanes((vec){0} - gv)) * loadu(us);
        __builtin_memcpy(gs, &out, sizeof out);
        for (int k = 0; k < lanes; k++) g[i + k] = gs[k];
    }
}

static void gate_up(layers_job *j, const specframe_layer *l, const float *h, int id, int n) {
    int C = j->d->C, I = j->d->I, T = j->T, n0, n1;
    column_share(I, id, n, &n0, &n1);
    linear_columns(h, l->gate, j->g, T, C, I, n0, n1, after(j, l, W_GATE, id, n));
    linear_columns(h, l->up, j->u, T, C, I, n0, n1, after(j, l, W_UP, id, n));
    for (int t = 0; t < T; t++) silu_times(j->g + (size_t)t * I + n0, j->u + (size_t)t * I + n0, n1 - n0);
}

static void layers_task(void *data, int id, int n) {
    layers_job *j = data;
    const specframe_dims *d = j->d;
    float *h = j->h + id * j->h_stride; /* each thread normalises the rows itself: no barrier for it */
    for (int i = 0; i < j->n_layers; i++) {
        const specframe_layer *l = j->layers + i;
        rms_norm(j->x, l->input_norm, h, j->T, d->C, d->eps);
        projections(j, l, h, id, n);
        meet(&j->meeting, n);
        attention(j, l, id, n);
        meet(&j->meeting, n);
        add_columns(j, j->a, l->o, d->H * d->D, after(j, l, W_O, id, n), 0, id, n);
        meet(&j->meeting, n);
        rms_norm(j->x, l->post_norm, h, j->T, d->C, d->eps);
        gate_up(j, l, h, id, n);
        meet(&j->meeting, n);
        add_columns(j, j->g, l->down, d->I, after(j, l, W_DOWN, id, n), 1, id, n);
        meet(&j->meeting, n);
    }
}

static size_t padded(size_t floats) { return (floats + 15) & ~(size_t)15; } /* 64-byte pieces */

/* x (T, C): the residual stream of T new tokens at positions start.., fp32 in both builds (in the
 * bf16 build its values are bf16's on return), updated in place through n_layers layers on
 * `threads` threads. cos, sin (T, D), fp32: the rotary embedding of each row. mask:
 * NULL (causal: row t sees cached positions and new rows <= t) or (T, start + T) bytes, row t
 * seeing the keys it marks (a token tree). Keys and values of the new rows are written at
 * start.. of each cache. Returns 0, or < 0 when scratch memory cannot be had or D is too large
 * (nothing is changed then). */
int specframe_layers(const specframe_dims *d, const specframe_layer *layers, int n_layers, float *x, int T,
                     int start, const float *cos, const float *sin, const unsigned char *mask, int threads) {
    int C = d->C, H = d->H, Hkv = d->Hkv, D = d->D, I = d->I, S = start + T;
    if (D > 1024) return -2;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads < 1) threads = 1;
    layers_job j = {.d = d, .layers = layers, .n_layers = n_layers, .T = T, .start = start, .x = x, .cos = cos,
                    .sin = sin, .h_stride = padded((size_t)T * C), .scores_stride = padded((size_t)HEAD_CHUNK * S)};
    size_t sizes[10] = {(size_t)T * H * D, (size_t)T * Hkv * D, (size_t)T * Hkv * D, (size_t)T * H * D,
                        (size_t)T * I, (size_t)T * I, (size_t)T * C, threads * j.h_stride, threads * j.scores_stride,
                        mask ? (size_t)T * S + T : 0};
    size_t total = 0;
    for (int i = 0; i < 10; i++) total += padded(sizes[i]);
    float *memory = aligned_alloc(64, total * sizeof(float)), *at = memory;
    if (!memory) return -1;
    float **pieces[9] = {&j.q, &j.k, &j.v, &j.a, &j.g, &j.u, &j.y, &j.h, &j.scores};
    for (int i = 0; i < 9; i++) { *pieces[i] = at; at += padded(sizes[i]); }
    if (mask) { /* each row's keys, in order */
        int *order = (int *)at, *seen = order + (size_t)T * S;
        for (int t = 0; t < T; t++) {
            seen[t] = 0;
            for (int s = 0; s < S; s++) if (mask[(size_t)t * S + s]) order[(size_t)t * S + seen[t]++] = s;
        }
        j.order = order, j.seen = seen;
    }
    run_parallel(layers_task, &j, threads);
    free(memory);
    return 0;
}
