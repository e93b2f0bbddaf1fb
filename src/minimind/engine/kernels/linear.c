/* Matrix products of the fused decode step: y = x W^T for B activation rows against one weight matrix (fp32,
 * bf16 or int8 + per-row scale, widened in registers; GGUF blocks: qblock.c). B == 1 streams each weight row once (rowdot), a few rows
 * use dot-product tiles, many rows a packed 6 x 16 micro-kernel. */
#include <omp.h>
#include "kernels.h"

/* out[r * RB + b] = W[row r] . x[b]  for an RN x RB tile; all arguments constant after inlining. */
static inline __attribute__((always_inline)) void tile(int type, int RN, int RB, const void *w, int64_t K,
                                                       const float *x, int64_t ldx, float *out) {
    int64_t k = 0;
    float acc_s[2][4] = {{0}};
#ifdef __AVX512F__
    {  /* 16 values per load where the CPU has AVX-512 (half the instructions); the AVX2 loop below takes the tail */
        __m512 a5[2][4];
        for (int r = 0; r < RN; r++)
            for (int b = 0; b < RB; b++) a5[r][b] = _mm512_setzero_ps();
        const int64_t size = type == W_F32 ? 4 : type == W_BF16 ? 2 : 1, line = 64 / size;
        for (; k + 16 <= K; k += 16) {
            if ((k & (line - 1)) == 0)
                for (int r = 0; r < RN; r++)
                    _mm_prefetch((const char *)row_ptr(type, w, r + 2 * RN, K) + k * size, _MM_HINT_T0);
            __m512 xv[4];
            for (int b = 0; b < RB; b++) {
                xv[b] = _mm512_loadu_ps(x + b * ldx + k);
                __asm__("" : "+v"(xv[b]));  /* keep x in a register (as below) */
            }
            for (int r = 0; r < RN; r++) {
                const __m512 wv = load16(type, row_ptr(type, w, r, K), k);
                for (int b = 0; b < RB; b++) a5[r][b] = _mm512_fmadd_ps(wv, xv[b], a5[r][b]);
            }
        }
        for (int r = 0; r < RN; r++)
            for (int b = 0; b < RB; b++) acc_s[r][b] = _mm512_reduce_add_ps(a5[r][b]);
    }
#endif
#ifdef __AVX2__
    __m256 acc[2][4];
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
        for (int b = 0; b < RB; b++) acc_s[r][b] += hsum(acc[r][b]);
#endif
    for (; k < K; k++)
        for (int r = 0; r < RN; r++) {
            float wv = load1(type, row_ptr(type, w, r, K), k);
            for (int b = 0; b < RB; b++) acc_s[r][b] += wv * x[b * ldx + k];
        }
    for (int r = 0; r < RN; r++)
        for (int b = 0; b < RB; b++) out[r * RB + b] = acc_s[r][b];
}

/* W[row] . x for one weight row, read as one sequential stream (B == 1). A single stream is what the hardware
 * prefetcher follows best: interleaving 4 rows measured 25 % less bandwidth on one core. One cache line of
 * fp32 weights, or 32 bf16/int8 weights, per iteration into 4 independent accumulators. */
static inline __attribute__((always_inline)) float rowdot(int type, const void *w, int64_t K, const float *x) {
    int64_t k = 0;
    float s = 0.f;
#ifdef __AVX2__
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    /* bf16/int8 take more work per byte than fp32: prefetching ahead measured 10-20 % faster for them (none for
     * fp32, which the hardware prefetcher alone streams fastest) */
    const int64_t size = type == W_BF16 ? 2 : 1, ahead = type == W_BF16 ? 1024 : 2048;
#ifdef __AVX512F__
    /* 64-byte loads where the CPU has them: half the load and FMA instructions per byte streamed */
    __m512 b0 = _mm512_setzero_ps(), b1 = b0, b2 = b0, b3 = b0;
    for (; k + 64 <= K; k += 64) {
        if (type != W_F32) _mm_prefetch((const char *)w + k * size + ahead, _MM_HINT_T0);
        b0 = _mm512_fmadd_ps(load16(type, w, k), _mm512_loadu_ps(x + k), b0);
        b1 = _mm512_fmadd_ps(load16(type, w, k + 16), _mm512_loadu_ps(x + k + 16), b1);
        b2 = _mm512_fmadd_ps(load16(type, w, k + 32), _mm512_loadu_ps(x + k + 32), b2);
        b3 = _mm512_fmadd_ps(load16(type, w, k + 48), _mm512_loadu_ps(x + k + 48), b3);
    }
    s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(b0, b1), _mm512_add_ps(b2, b3)));
#endif
    for (; k + 32 <= K; k += 32) {
        if (type != W_F32) _mm_prefetch((const char *)w + k * size + ahead, _MM_HINT_T0);
        a0 = _mm256_fmadd_ps(load8(type, w, k), _mm256_loadu_ps(x + k), a0);
        a1 = _mm256_fmadd_ps(load8(type, w, k + 8), _mm256_loadu_ps(x + k + 8), a1);
        a2 = _mm256_fmadd_ps(load8(type, w, k + 16), _mm256_loadu_ps(x + k + 16), a2);
        a3 = _mm256_fmadd_ps(load8(type, w, k + 24), _mm256_loadu_ps(x + k + 24), a3);
    }
    for (; k + 8 <= K; k += 8) a0 = _mm256_fmadd_ps(load8(type, w, k), _mm256_loadu_ps(x + k), a0);
    s += hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
#endif
    for (; k < K; k++) s += load1(type, w, k) * x[k];
    return s;
}

/* y[n] (+)= scale[n] * (W[n] . x) for rows [n0, n1): the B == 1 path */
#define ROWS_TYPE(T)                                                                                       \
    static void rows_##T(const void *w, const float *scale, int64_t K, const float *x, int64_t n0, int64_t n1, \
                         float *y, int accumulate) {                                                       \
        for (int64_t n = n0; n < n1; n++) {                                                                \
            float v = rowdot(T, row_ptr(T, w, n, K), K, x) * (scale ? scale[n] : 1.0f);                    \
            y[n] = accumulate ? y[n] + v : v;                                                              \
        }                                                                                                  \
    }
ROWS_TYPE(W_F32)
ROWS_TYPE(W_BF16)
ROWS_TYPE(W_I8)

#define TILE_CASE(T, RN, RB) case (RN) * 10 + (RB): tile(T, RN, RB, w, K, x, ldx, out); return;
#define TILE_TYPE(T)                                                                            \
    static void tile_##T(int RN, int RB, const void *w, int64_t K, const float *x, int64_t ldx, \
                         float *out) {                                                          \
        switch (RN * 10 + RB) {                                                                 \
            TILE_CASE(T, 1, 1) TILE_CASE(T, 1, 2) TILE_CASE(T, 1, 3) TILE_CASE(T, 1, 4)         \
            TILE_CASE(T, 2, 1) TILE_CASE(T, 2, 2) TILE_CASE(T, 2, 3) TILE_CASE(T, 2, 4)         \
        }                                                                                       \
    }
TILE_TYPE(W_F32)
TILE_TYPE(W_BF16)
TILE_TYPE(W_I8)

/* Many rows (B >= GEMM_MIN_ROWS): the dot-product tiles above reload x for every pair of weight rows. Here x is
 * packed transposed in panels of 16 rows, xp[panel][k][16], and a 6 x 16 register tile broadcasts one weight
 * per k (the classic sgemm micro-kernel): 8 loads feed 12 FMAs. bf16/int8 rows are first widened to fp32. */
void pack_x(const float *x, int64_t ldx, int64_t B, int64_t K, float *xp) {
    for (int64_t p = 0; p * PANEL < B; p++)
        for (int64_t k = 0; k < K; k++)
            for (int64_t j = 0; j < PANEL; j++) {
                int64_t b = p * PANEL + j;
                xp[(p * K + k) * PANEL + j] = b < B ? x[b * ldx + k] : 0.f;
            }
}

/* out[r][16] = w[r] . xp panel for 6 weight rows (ldw apart); named accumulators stay in registers. */
static void gemm_tile6(const float *w, int64_t ldw, const float *xp, int64_t K, float *out, const char *pf,
                       int64_t pf_step) {
#ifdef __AVX512F__
    /* a panel row of 16 is one zmm: 6 FMAs per k; two k per iteration into separate accumulators keep 12 FMA
     * chains in flight (6 alone would wait on the FMA latency) */
    __m512 e0 = _mm512_setzero_ps(), e1 = e0, e2 = e0, e3 = e0, e4 = e0, e5 = e0;
    __m512 o0 = e0, o1 = e0, o2 = e0, o3 = e0, o4 = e0, o5 = e0;
    const float *w0 = w, *w1 = w + ldw, *w2 = w + 2 * ldw, *w3 = w + 3 * ldw, *w4 = w + 4 * ldw, *w5 = w + 5 * ldw;
    int64_t k = 0;
    for (; k + 2 <= K; k += 2) {
        if (pf) _mm_prefetch(pf + k * pf_step, _MM_HINT_T0), _mm_prefetch(pf + (k + 1) * pf_step, _MM_HINT_T0);
        const __m512 x0 = _mm512_loadu_ps(xp + k * PANEL), x1 = _mm512_loadu_ps(xp + (k + 1) * PANEL);
#define ROW(i) e##i = _mm512_fmadd_ps(_mm512_set1_ps(w##i[k]), x0, e##i); \
               o##i = _mm512_fmadd_ps(_mm512_set1_ps(w##i[k + 1]), x1, o##i);
        ROW(0) ROW(1) ROW(2) ROW(3) ROW(4) ROW(5)
#undef ROW
    }
    if (k < K) {
        const __m512 x0 = _mm512_loadu_ps(xp + k * PANEL);
#define ROW(i) e##i = _mm512_fmadd_ps(_mm512_set1_ps(w##i[k]), x0, e##i);
        ROW(0) ROW(1) ROW(2) ROW(3) ROW(4) ROW(5)
#undef ROW
    }
#define STORE(i) _mm512_storeu_ps(out + i * PANEL, _mm512_add_ps(e##i, o##i));
    STORE(0) STORE(1) STORE(2) STORE(3) STORE(4) STORE(5)
#undef STORE
#elif defined(__AVX2__)
    __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00,
           a31 = a00, a40 = a00, a41 = a00, a50 = a00, a51 = a00;
    const float *w0 = w, *w1 = w + ldw, *w2 = w + 2 * ldw, *w3 = w + 3 * ldw, *w4 = w + 4 * ldw, *w5 = w + 5 * ldw;
    for (int64_t k = 0; k < K; k++) {
        if (pf) _mm_prefetch(pf + k * pf_step, _MM_HINT_T0);  /* the next 6 weight rows, while computing these */
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
    (void)pf, (void)pf_step;
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
    if (qf_ok(m)) {
        const Mat blocks = {m->w, m->scale, m->type - W_FP32_ACT, m->rows, K};  /* scale: mixed K-quant rows' table */
        for (int r = 0; r < RN; r++) dequant_row_qb(&blocks, n + r, wf + r * K);
        return;
    }
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

void matmul_packed(const Mat *m, const float *xp, int64_t B, int64_t n0, int64_t n1, float *y, int64_t ldy,
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
        const int64_t size = m->type == W_F32 ? 4 : m->type == W_BF16 ? 2 : 1;
        const char *next = n + GEMM_RN < m->rows && !qf_ok(m) ? (const char *)row_ptr((int)m->type, m->w, n + GEMM_RN, K)
                                                              : NULL;
        for (int64_t p = 0; p * PANEL < B; p++) {
            gemm_tile6(w, K, xp + p * K * PANEL, K, out, p == 0 ? next : NULL, GEMM_RN * size);
            for (int r = 0; r < RN; r++) {
                float s = m->scale && !qf_ok(m) ? m->scale[n + r] : 1.0f;  /* blocks: scale is a K-quant table */
                for (int64_t j = 0; j < PANEL && p * PANEL + j < B; j++) {
                    float *dst = y + (p * PANEL + j) * ldy + n + r;
                    *dst = accumulate ? *dst + s * out[r * PANEL + j] : s * out[r * PANEL + j];
                }
            }
        }
    }
}

/* y[b * ldy + n] (+)= scale[n] * (W[n] . x[b]) for rows n in [n0, n1) and every b < B. */
void matvec(const Mat *m, const float *x, int64_t ldx, int64_t B, int64_t n0, int64_t n1, float *y, int64_t ldy,
            int accumulate) {
    const int64_t K = m->cols;
    float out[16];
    int64_t n = n0;
    if (B == 1) {
        if (m->type == W_F32) rows_W_F32(m->w, m->scale, K, x, n0, n1, y, accumulate);
        else if (m->type == W_BF16) rows_W_BF16(m->w, m->scale, K, x, n0, n1, y, accumulate);
        else rows_W_I8(m->w, m->scale, K, x, n0, n1, y, accumulate);
        return;
    }
    while (n < n1) {
        /* 2 weight rows x 4 batch rows (8 accumulators); 3 x 4 measured slower for bf16/int8 (register spills) */
        int RN = n1 - n >= 2 ? 2 : 1;
        const void *w = row_ptr((int)m->type, m->w, n, K);
        for (int64_t b = 0; b < B;) {
            int RB = B - b >= 4 ? 4 : (int)(B - b);
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


void matvec_widened(const Mat *m, const float *x, int64_t ldx, int64_t B, int64_t n0, int64_t n1, float *y,
                    int64_t ldy, int accumulate, float *wf) {
    if (matvec_qf(m, x, ldx, B, n0, n1, y, ldy, accumulate)) return;
    for (int64_t n = n0; n < n1; n += GEMM_RN) {
        const int RN = n1 - n < GEMM_RN ? (int)(n1 - n) : GEMM_RN;
        widen_rows(m, n, RN, wf);
        const Mat wide = {wf, NULL, W_F32, RN, m->cols};
        matvec(&wide, x, ldx, B, 0, RN, y + n, ldy, accumulate);
    }
}

#define LINEAR_ROWS_PER_CHUNK 64  /* activation rows per pass over the weights: their packed panels stay in L2 */

/* y [M, rows] = x [M, cols] W^T (times the per-row scale for int8): prompt chunks with bf16/int8 weights, widened
 * in registers instead of a whole fp32 copy of W per call. Returns 0, or -1 when scratch cannot be allocated. */
int minimind_linear(const Mat *mat, const float *x, int64_t M, float *y, int nthreads) {
    const Mat mode = act_mode(mat, M >= GEMM_MIN_ROWS), *m = &mode;
    if (q8_ok(m)) return linear_q8(m, x, M, y, nthreads);
    if (qb_ok(m)) return linear_qb(m, x, M, y, nthreads);
    if (qf_ok(m) && M < GEMM_MIN_ROWS) {  /* few rows: as a decode step computes them (qfloat.c, or widened rows) */
        float *wfs = malloc(sizeof(float) * (size_t)nthreads * GEMM_RN * m->cols);
        if (!wfs) return -1;
#pragma omp parallel num_threads(nthreads)
        {
            float *wf = wfs + (size_t)omp_get_thread_num() * GEMM_RN * m->cols;
#pragma omp for schedule(static)
            for (int64_t t = 0; t < cdiv(m->rows, 4 * GEMM_RN); t++) {
                const int64_t n0 = t * 4 * GEMM_RN, n1 = n0 + 4 * GEMM_RN < m->rows ? n0 + 4 * GEMM_RN : m->rows;
                matvec_widened(m, x, m->cols, M, n0, n1, y, m->rows, 0, wf);
            }
        }
        free(wfs);
        return 0;
    }
    if (m->type == W_BF16 && M > LINEAR_ROWS_PER_CHUNK) {
        /* more than one pass over the weights: widen them to fp32 once (each pass would widen every row again,
         * which made bf16 prompts 30 % slower than fp32 ones) and run the fp32 path in place */
        float *wf = malloc(sizeof(float) * (size_t)(m->rows * m->cols));
        if (!wf) return -1;
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t r = 0; r < m->rows; r++) {
            const uint16_t *src = (const uint16_t *)m->w + r * m->cols;
            int64_t k = 0;
#ifdef __AVX2__
            for (; k + 8 <= m->cols; k += 8) _mm256_storeu_ps(wf + r * m->cols + k, load8(W_BF16, src, k));
#endif
            for (; k < m->cols; k++) wf[r * m->cols + k] = load1(W_BF16, src, k);
        }
        const Mat wide = {wf, m->scale, W_F32, m->rows, m->cols};
        int status = minimind_linear(&wide, x, M, y, nthreads);
        free(wf);
        return status;
    }
    const int64_t K = m->cols, N = m->rows, chunk = M < LINEAR_ROWS_PER_CHUNK ? M : LINEAR_ROWS_PER_CHUNK;
    const int64_t xp_size = cdiv(chunk, PANEL) * PANEL * K, wf_size = GEMM_RN * K;
    float *xp = malloc(sizeof(float) * (size_t)xp_size), *wfs = malloc(sizeof(float) * (size_t)nthreads * wf_size);
    int status = xp && wfs ? 0 : -1;
    if (status == 0)
        for (int64_t r0 = 0; r0 < M; r0 += chunk) {
            const int64_t B = M - r0 < chunk ? M - r0 : chunk;
#pragma omp parallel num_threads(nthreads)
            {
                float *wf = wfs + (size_t)omp_get_thread_num() * wf_size;
#pragma omp for schedule(static)
                for (int64_t p = 0; p < cdiv(B, PANEL); p++) {  /* panels of x: one per task */
                    const int64_t b0 = p * PANEL, nb = B - b0 < PANEL ? B - b0 : PANEL;
                    pack_x(x + (r0 + b0) * K, K, nb, K, xp + p * PANEL * K);
                }
#pragma omp for schedule(static)
                for (int64_t t = 0; t < cdiv(N, 4 * GEMM_RN); t++) {
                    const int64_t n0 = t * 4 * GEMM_RN, n1 = n0 + 4 * GEMM_RN < N ? n0 + 4 * GEMM_RN : N;
                    matmul_packed(m, xp, B, n0, n1, y + r0 * N, N, 0, wf);
                }
            }
        }
    free(xp); free(wfs);
    return status;
}
