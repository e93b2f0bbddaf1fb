/* One decode step of a dense decoder (MiniMind2, minimind-3, Llama, Qwen3) for B one-token rows, in one call.
 *
 * Why C: a torch decode step is ~250 small ops per token (half the step is dispatch) and torch's GEMV kernels
 * stream weights at a third of DRAM speed on CPUs without AVX-512. Here every matrix-vector product reads
 * each weight row once for all B rows, dequantizes bf16/int8 in registers, and the whole step runs inside
 * one OpenMP parallel region. Activations, norms, RoPE, softmax and the KV cache are fp32.
 *
 * Built at first use by minimind/engine/fused.py (gcc/cc -O3 -march=native -fopenmp) and called via ctypes.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

enum { W_F32 = 0, W_BF16 = 1, W_I8 = 2 };

typedef struct {
    const void *w;       /* [rows, cols] row-major, element type `type` */
    const float *scale;  /* [rows] per-row scale for W_I8, else NULL */
    int64_t type, rows, cols;
} Mat;

typedef struct {
    const float *ln1, *ln2;        /* [hidden] */
    const float *q_norm, *k_norm;  /* [head_dim] per-head norms (minimind-3, Qwen3) or NULL */
    Mat qkv;                       /* [(Hq + 2 Hkv) D, hidden]: q | k | v */
    Mat o;                         /* [hidden, Hq D] */
    Mat gate_up;                   /* [2 I, hidden]: gate | up */
    Mat down;                      /* [hidden, I] */
    float *k_cache, *v_cache;      /* [slots, Hkv, max_len, D] */
} Layer;

typedef struct {
    int64_t n_layers, hidden, n_heads, n_kv_heads, head_dim, inter, vocab, max_len;
    double eps;
    const Layer *layers;
    Mat embed;          /* [vocab, hidden], W_F32 or W_BF16 */
    const float *norm;  /* [hidden] */
    Mat lm_head;        /* [vocab, hidden] */
} Model;

#define ROWS_PER_TASK 16

static inline float load1(int type, const void *w, int64_t i) {
    if (type == W_F32) return ((const float *)w)[i];
    if (type == W_BF16) {
        uint32_t bits = (uint32_t)((const uint16_t *)w)[i] << 16;
        float f;
        memcpy(&f, &bits, 4);
        return f;
    }
    return (float)((const int8_t *)w)[i];
}

static inline const void *row_ptr(int type, const void *w, int64_t row, int64_t cols) {
    int64_t size = type == W_F32 ? 4 : type == W_BF16 ? 2 : 1;
    return (const char *)w + row * cols * size;
}

#ifdef __AVX2__
static inline __m256 load8(int type, const void *w, int64_t k) {
    if (type == W_F32) return _mm256_loadu_ps((const float *)w + k);
    if (type == W_BF16)
        return _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)w + k))), 16));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)w + k))));
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

/* out[r * RB + b] = W[row r] . x[b]  for an RN x RB tile; all arguments constant after inlining. */
static inline __attribute__((always_inline)) void tile(int type, int RN, int RB, const void *w, int64_t K,
                                                       const float *x, int64_t ldx, float *out) {
    int64_t k = 0;
    float acc_s[4][4] = {{0}};
#ifdef __AVX2__
    __m256 acc[4][4];
    for (int r = 0; r < RN; r++)
        for (int b = 0; b < RB; b++) acc[r][b] = _mm256_setzero_ps();
    /* A single core keeps too few weight loads in flight to reach DRAM speed (bf16/int8 loads are 16/8 bytes):
     * prefetch the next tile's rows, one cache line per row every 64 bytes of progress. */
    const int64_t size = type == W_F32 ? 4 : type == W_BF16 ? 2 : 1, line = 64 / size;
    for (; k + 8 <= K; k += 8) {
        if ((k & (line - 1)) == 0)
            for (int r = 0; r < RN; r++)
                _mm_prefetch((const char *)row_ptr(type, w, r + 2 * RN, K) + k * size, _MM_HINT_T0);
        __m256 xv[4];
        for (int b = 0; b < RB; b++) {
            xv[b] = _mm256_loadu_ps(x + b * ldx + k);
            __asm__("" : "+x"(xv[b]));  /* keep x in a register: gcc would reload it for every weight row */
        }
        for (int r = 0; r < RN; r++) {
            __m256 wv = load8(type, row_ptr(type, w, r, K), k);
            for (int b = 0; b < RB; b++) acc[r][b] = _mm256_fmadd_ps(wv, xv[b], acc[r][b]);
        }
    }
    for (int r = 0; r < RN; r++)
        for (int b = 0; b < RB; b++) acc_s[r][b] = hsum(acc[r][b]);
#endif
    for (; k < K; k++)
        for (int r = 0; r < RN; r++) {
            float wv = load1(type, row_ptr(type, w, r, K), k);
            for (int b = 0; b < RB; b++) acc_s[r][b] += wv * x[b * ldx + k];
        }
    for (int r = 0; r < RN; r++)
        for (int b = 0; b < RB; b++) out[r * RB + b] = acc_s[r][b];
}

#define TILE_CASE(T, RN, RB) case (RN) * 10 + (RB): tile(T, RN, RB, w, K, x, ldx, out); return;
#define TILE_TYPE(T)                                                                            \
    static void tile_##T(int RN, int RB, const void *w, int64_t K, const float *x, int64_t ldx, \
                         float *out) {                                                          \
        switch (RN * 10 + RB) {                                                                 \
            TILE_CASE(T, 1, 1) TILE_CASE(T, 1, 2) TILE_CASE(T, 1, 3) TILE_CASE(T, 1, 4)         \
            TILE_CASE(T, 2, 1) TILE_CASE(T, 2, 2) TILE_CASE(T, 2, 3) TILE_CASE(T, 2, 4)         \
            TILE_CASE(T, 4, 1) TILE_CASE(T, 4, 2)                                               \
        }                                                                                       \
    }
TILE_TYPE(W_F32)
TILE_TYPE(W_BF16)
TILE_TYPE(W_I8)

/* Many rows (B >= GEMM_MIN_ROWS): the dot-product tiles above reload x for every pair of weight rows. Here x is
 * packed transposed in panels of 16 rows, xp[panel][k][16], and a 6 x 16 register tile broadcasts one weight
 * per k (the classic sgemm micro-kernel): 8 loads feed 12 FMAs. bf16/int8 rows are first widened to fp32. */
#define GEMM_MIN_ROWS 12
#define PANEL 16
#define GEMM_RN 6

static void pack_x(const float *x, int64_t ldx, int64_t B, int64_t K, float *xp) {
    for (int64_t p = 0; p * PANEL < B; p++)
        for (int64_t k = 0; k < K; k++)
            for (int64_t j = 0; j < PANEL; j++) {
                int64_t b = p * PANEL + j;
                xp[(p * K + k) * PANEL + j] = b < B ? x[b * ldx + k] : 0.f;
            }
}

/* out[r][16] = w[r] . xp panel for 6 weight rows (ldw apart); named accumulators stay in registers. */
static void gemm_tile6(const float *w, int64_t ldw, const float *xp, int64_t K, float *out) {
#ifdef __AVX2__
    __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00,
           a31 = a00, a40 = a00, a41 = a00, a50 = a00, a51 = a00;
    const float *w0 = w, *w1 = w + ldw, *w2 = w + 2 * ldw, *w3 = w + 3 * ldw, *w4 = w + 4 * ldw, *w5 = w + 5 * ldw;
    for (int64_t k = 0; k < K; k++) {
        const __m256 x0 = _mm256_loadu_ps(xp + k * PANEL), x1 = _mm256_loadu_ps(xp + k * PANEL + 8);
        __m256 b;
#define ROW(i) b = _mm256_broadcast_ss(w##i + k); a##i##0 = _mm256_fmadd_ps(b, x0, a##i##0); \
               a##i##1 = _mm256_fmadd_ps(b, x1, a##i##1);
        ROW(0) ROW(1) ROW(2) ROW(3) ROW(4) ROW(5)
#undef ROW
    }
#define STORE(i) _mm256_storeu_ps(out + i * PANEL, a##i##0); _mm256_storeu_ps(out + i * PANEL + 8, a##i##1);
    STORE(0) STORE(1) STORE(2) STORE(3) STORE(4) STORE(5)
#undef STORE
#else
    for (int r = 0; r < GEMM_RN; r++)
        for (int j = 0; j < PANEL; j++) {
            float acc = 0.f;
            for (int64_t k = 0; k < K; k++) acc += w[r * ldw + k] * xp[k * PANEL + j];
            out[r * PANEL + j] = acc;
        }
#endif
}

/* rows [n, n + RN) of m as fp32 into wf [GEMM_RN, K], zero rows after RN */
static void widen_rows(const Mat *m, int64_t n, int RN, float *wf) {
    const int64_t K = m->cols;
    memset(wf + RN * K, 0, sizeof(float) * (GEMM_RN - RN) * K);
    for (int r = 0; r < RN; r++) {
        const void *w = row_ptr((int)m->type, m->w, n + r, K);
        int64_t k = 0;
#ifdef __AVX2__
        if (m->type == W_F32)
            for (; k + 8 <= K; k += 8) _mm256_storeu_ps(wf + r * K + k, load8(W_F32, w, k));
        else if (m->type == W_BF16)
            for (; k + 8 <= K; k += 8) _mm256_storeu_ps(wf + r * K + k, load8(W_BF16, w, k));
        else
            for (; k + 8 <= K; k += 8) _mm256_storeu_ps(wf + r * K + k, load8(W_I8, w, k));
#endif
        for (; k < K; k++) wf[r * K + k] = load1((int)m->type, w, k);
    }
}

static void matmul_packed(const Mat *m, const float *xp, int64_t B, int64_t n0, int64_t n1, float *y, int64_t ldy,
                          int accumulate, float *wf) {
    const int64_t K = m->cols;
    float out[GEMM_RN * PANEL];
    for (int64_t n = n0; n < n1; n += GEMM_RN) {
        int RN = n1 - n < GEMM_RN ? (int)(n1 - n) : GEMM_RN;
        const float *w = (const float *)m->w + n * K;
        if (m->type != W_F32 || RN < GEMM_RN) {  /* fp32 rows are read in place; a tail is zero-padded */
            widen_rows(m, n, RN, wf);
            w = wf;
        }
        for (int64_t p = 0; p * PANEL < B; p++) {
            gemm_tile6(w, K, xp + p * K * PANEL, K, out);
            for (int r = 0; r < RN; r++) {
                float s = m->scale ? m->scale[n + r] : 1.0f;
                for (int64_t j = 0; j < PANEL && p * PANEL + j < B; j++) {
                    float *dst = y + (p * PANEL + j) * ldy + n + r;
                    *dst = accumulate ? *dst + s * out[r * PANEL + j] : s * out[r * PANEL + j];
                }
            }
        }
    }
}

/* y[b * ldy + n] (+)= scale[n] * (W[n] . x[b]) for rows n in [n0, n1) and every b < B. */
static void matvec(const Mat *m, const float *x, int64_t ldx, int64_t B, int64_t n0, int64_t n1, float *y,
                   int64_t ldy, int accumulate) {
    const int64_t K = m->cols;
    float out[16];
    int64_t n = n0;
    while (n < n1) {
        /* B == 1 is pure streaming: 4 rows in flight. Otherwise 2 rows x 4 batch rows (8 accumulators). */
        int RN = B == 1 ? (n1 - n >= 4 ? 4 : 1) : (n1 - n >= 2 ? 2 : 1);
        const void *w = row_ptr((int)m->type, m->w, n, K);
        for (int64_t b = 0; b < B;) {
            int RB = B - b >= 4 ? 4 : (int)(B - b);
            if (RN == 4 && RB > 2) RB = 2;
            const float *xb = x + b * ldx;
            if (m->type == W_F32) tile_W_F32(RN, RB, w, K, xb, ldx, out);
            else if (m->type == W_BF16) tile_W_BF16(RN, RB, w, K, xb, ldx, out);
            else tile_W_I8(RN, RB, w, K, xb, ldx, out);
            for (int r = 0; r < RN; r++) {
                float s = m->scale ? m->scale[n + r] : 1.0f;
                for (int j = 0; j < RB; j++) {
                    float *dst = y + (b + j) * ldy + n + r;
                    *dst = accumulate ? *dst + s * out[r * RB + j] : s * out[r * RB + j];
                }
            }
            b += RB;
        }
        n += RN;
    }
}

static inline float dot(const float *a, const float *b, int64_t n) {
    int64_t i = 0;
    float s = 0.f;
#ifdef __AVX2__
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    s = hsum(acc);
#endif
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* softmax(q . keys[j] * scale) over j < len, then the weighted sum of values[j] into o [D]. sc: len floats. */
static void attend(const float *q, const float *keys, const float *vals, int64_t len, int64_t D, float scale,
                   float *sc, float *o) {
    float mx = -INFINITY, sum = 0.f;
    int64_t j = 0;
#ifdef __AVX2__
    if (D % 8 == 0)  /* four keys at a time: independent FMA chains instead of one long one */
        for (; j + 4 <= len; j += 4) {
            const float *k0 = keys + j * D;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int64_t i = 0; i < D; i += 8) {
                __m256 qv = _mm256_loadu_ps(q + i);
                a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + i), a0);
                a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + D + i), a1);
                a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + 2 * D + i), a2);
                a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + 3 * D + i), a3);
            }
            sc[j] = hsum(a0) * scale, sc[j + 1] = hsum(a1) * scale;
            sc[j + 2] = hsum(a2) * scale, sc[j + 3] = hsum(a3) * scale;
        }
#endif
    for (; j < len; j++) sc[j] = dot(q, keys + j * D, D) * scale;
    for (j = 0; j < len; j++) mx = sc[j] > mx ? sc[j] : mx;
    for (j = 0; j < len; j++) sum += (sc[j] = expf(sc[j] - mx));
    const float inv = 1.f / sum;
    int64_t i = 0;
#ifdef __AVX2__
    for (; i + 32 <= D; i += 32) {  /* 32 output lanes in registers across all positions */
        __m256 o0 = _mm256_setzero_ps(), o1 = o0, o2 = o0, o3 = o0;
        for (j = 0; j < len; j++) {
            const __m256 p = _mm256_set1_ps(sc[j]);
            const float *v = vals + j * D + i;
            o0 = _mm256_fmadd_ps(p, _mm256_loadu_ps(v), o0);
            o1 = _mm256_fmadd_ps(p, _mm256_loadu_ps(v + 8), o1);
            o2 = _mm256_fmadd_ps(p, _mm256_loadu_ps(v + 16), o2);
            o3 = _mm256_fmadd_ps(p, _mm256_loadu_ps(v + 24), o3);
        }
        const __m256 s = _mm256_set1_ps(inv);
        _mm256_storeu_ps(o + i, _mm256_mul_ps(o0, s));
        _mm256_storeu_ps(o + i + 8, _mm256_mul_ps(o1, s));
        _mm256_storeu_ps(o + i + 16, _mm256_mul_ps(o2, s));
        _mm256_storeu_ps(o + i + 24, _mm256_mul_ps(o3, s));
    }
#endif
    for (; i < D; i++) {
        float acc = 0.f;
        for (j = 0; j < len; j++) acc += sc[j] * vals[j * D + i];
        o[i] = acc * inv;
    }
}

static void rms_norm(const float *x, const float *w, int64_t n, double eps, float *out) {
    double ss = 0.0;
    for (int64_t i = 0; i < n; i++) ss += (double)x[i] * x[i];
    float inv = (float)(1.0 / sqrt(ss / (double)n + eps));
    for (int64_t i = 0; i < n; i++) out[i] = x[i] * inv * w[i];
}

/* HF rotate-half RoPE on one head, in place: cos/sin [D] for this row's position. */
static void rope(float *x, const float *cos, const float *sin, int64_t D) {
    int64_t half = D / 2;
    for (int64_t i = 0; i < half; i++) {
        float a = x[i], b = x[i + half];
        x[i] = a * cos[i] - b * sin[i];
        x[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

static inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

/* logits [B, vocab] for rows with token ids[b] at position pos[b] of KV slot slots[b]; cos/sin [B, D].
 * Returns 0, or -1 when scratch memory cannot be allocated. */
int minimind_decode(const Model *m, int64_t B, const int64_t *ids, const int64_t *slots, const int64_t *pos,
                    const float *cos, const float *sin, float *logits, int nthreads) {
    const int64_t H = m->hidden, D = m->head_dim, Hq = m->n_heads, Hkv = m->n_kv_heads, I = m->inter;
    const int64_t QKV = (Hq + 2 * Hkv) * D, T = m->max_len, group = Hq / Hkv;
    const float scale = 1.0f / sqrtf((float)D);
    float *h = malloc(sizeof(float) * B * H), *xn = malloc(sizeof(float) * B * H);
    float *qkv = malloc(sizeof(float) * B * QKV), *att = malloc(sizeof(float) * B * Hq * D);
    float *act = malloc(sizeof(float) * B * I);
    float *scores = malloc(sizeof(float) * (size_t)nthreads * T);
    float *gu = malloc(sizeof(float) * (size_t)nthreads * 2 * B * ROWS_PER_TASK);
    const int gemm = B >= GEMM_MIN_ROWS;
    int64_t kmax = H > Hq * D ? H : Hq * D;
    kmax = kmax > I ? kmax : I;
    const int64_t xp_size = gemm ? cdiv(B, PANEL) * PANEL * kmax : 1, wf_size = gemm ? GEMM_RN * kmax : 1;
    float *xps = malloc(sizeof(float) * (size_t)nthreads * (xp_size + wf_size));
    int status = 0;
    if (!h || !xn || !qkv || !att || !act || !scores || !gu || !xps) { status = -1; goto done; }

#pragma omp parallel num_threads(nthreads)
    {
        const int tid = omp_get_thread_num();
        float *sc = scores + (size_t)tid * T;
        float *gate = gu + (size_t)tid * 2 * B * ROWS_PER_TASK, *up = gate + B * ROWS_PER_TASK;
        /* each thread packs x for itself: no extra barrier, and the copy is small next to the product */
        float *xp = xps + (size_t)tid * (xp_size + wf_size), *wf = xp + xp_size;
#define PACK(x, ldx, K) if (gemm) pack_x(x, ldx, B, K, xp)
#define LINEAR(mat, x, ldx, n0, n1, y, ldy, acc) \
    (gemm ? matmul_packed(mat, xp, B, n0, n1, y, ldy, acc, wf) : matvec(mat, x, ldx, B, n0, n1, y, ldy, acc))
#pragma omp for schedule(static)
        for (int64_t b = 0; b < B; b++)
            for (int64_t i = 0; i < H; i++)
                h[b * H + i] = load1((int)m->embed.type, m->embed.w, ids[b] * H + i);

        for (int64_t l = 0; l < m->n_layers; l++) {
            const Layer *L = &m->layers[l];
#pragma omp for schedule(static)
            for (int64_t b = 0; b < B; b++) rms_norm(h + b * H, L->ln1, H, m->eps, xn + b * H);
            PACK(xn, H, H);
#pragma omp for schedule(static)
            for (int64_t t = 0; t < cdiv(QKV, ROWS_PER_TASK); t++) {
                int64_t n0 = t * ROWS_PER_TASK, n1 = n0 + ROWS_PER_TASK < QKV ? n0 + ROWS_PER_TASK : QKV;
                LINEAR(&L->qkv, xn, H, n0, n1, qkv, QKV, 0);
            }
            /* per (row, q/k/v head): per-head norm, RoPE, and the new k/v into the slot's cache */
#pragma omp for schedule(static)
            for (int64_t t = 0; t < B * (Hq + 2 * Hkv); t++) {
                int64_t b = t / (Hq + 2 * Hkv), head = t % (Hq + 2 * Hkv);
                float *x = qkv + b * QKV + head * D;
                const float *c = cos + b * D, *s = sin + b * D;
                if (head < Hq) {
                    if (L->q_norm) rms_norm(x, L->q_norm, D, m->eps, x);
                    rope(x, c, s, D);
                } else if (head < Hq + Hkv) {
                    if (L->k_norm) rms_norm(x, L->k_norm, D, m->eps, x);
                    rope(x, c, s, D);
                    memcpy(L->k_cache + ((slots[b] * Hkv + head - Hq) * T + pos[b]) * D, x, sizeof(float) * D);
                } else {
                    memcpy(L->v_cache + ((slots[b] * Hkv + head - Hq - Hkv) * T + pos[b]) * D, x,
                           sizeof(float) * D);
                }
            }
#pragma omp for schedule(dynamic, 1)
            for (int64_t t = 0; t < B * Hq; t++) {
                int64_t b = t / Hq, head = t % Hq, g = head / group;
                attend(qkv + b * QKV + head * D, L->k_cache + (slots[b] * Hkv + g) * T * D,
                       L->v_cache + (slots[b] * Hkv + g) * T * D, pos[b] + 1, D, scale, sc,
                       att + b * Hq * D + head * D);
            }
            PACK(att, Hq * D, Hq * D);
#pragma omp for schedule(static)
            for (int64_t t = 0; t < cdiv(H, ROWS_PER_TASK); t++) {
                int64_t n0 = t * ROWS_PER_TASK, n1 = n0 + ROWS_PER_TASK < H ? n0 + ROWS_PER_TASK : H;
                LINEAR(&L->o, att, Hq * D, n0, n1, h, H, 1);
            }
#pragma omp for schedule(static)
            for (int64_t b = 0; b < B; b++) rms_norm(h + b * H, L->ln2, H, m->eps, xn + b * H);
            PACK(xn, H, H);
#pragma omp for schedule(static)
            for (int64_t t = 0; t < cdiv(I, ROWS_PER_TASK); t++) {
                int64_t n0 = t * ROWS_PER_TASK, n1 = n0 + ROWS_PER_TASK < I ? n0 + ROWS_PER_TASK : I, w = n1 - n0;
                LINEAR(&L->gate_up, xn, H, n0, n1, gate - n0, ROWS_PER_TASK, 0);
                LINEAR(&L->gate_up, xn, H, I + n0, I + n1, up - I - n0, ROWS_PER_TASK, 0);
                for (int64_t b = 0; b < B; b++)
                    for (int64_t i = 0; i < w; i++) {
                        float g = gate[b * ROWS_PER_TASK + i];
                        act[b * I + n0 + i] = g / (1.f + expf(-g)) * up[b * ROWS_PER_TASK + i];
                    }
            }
            PACK(act, I, I);
#pragma omp for schedule(static)
            for (int64_t t = 0; t < cdiv(H, ROWS_PER_TASK); t++) {
                int64_t n0 = t * ROWS_PER_TASK, n1 = n0 + ROWS_PER_TASK < H ? n0 + ROWS_PER_TASK : H;
                LINEAR(&L->down, act, I, n0, n1, h, H, 1);
            }
        }
#pragma omp for schedule(static)
        for (int64_t b = 0; b < B; b++) rms_norm(h + b * H, m->norm, H, m->eps, xn + b * H);
        PACK(xn, H, H);
#pragma omp for schedule(static)
        for (int64_t t = 0; t < cdiv(m->vocab, ROWS_PER_TASK); t++) {
            int64_t n0 = t * ROWS_PER_TASK, n1 = n0 + ROWS_PER_TASK < m->vocab ? n0 + ROWS_PER_TASK : m->vocab;
            LINEAR(&m->lm_head, xn, H, n0, n1, logits, m->vocab, 0);
        }
    }
done:
    free(h); free(xn); free(qkv); free(att); free(act); free(scores); free(gu); free(xps);
    return status;
}
