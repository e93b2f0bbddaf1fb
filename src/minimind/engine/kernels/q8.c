/* int8 weights times int8 activations (the scheme of llama.cpp's Q8_0 x Q8_0 dot products, with per-row weight
 * scales). Why: with fp32 activations an int8 weight costs a widen + convert + FMA per 8 products, and batched
 * steps are compute-bound; AVX2's maddubs does 32 byte products per instruction, about 2x the fp32 FMA rate here.
 *
 * Activation format (one row of K values, K a multiple of 32; the tests re-derive it in torch, keep them in step):
 *   rmax = max |x|;  unit = rmax / (127 * Q8_SMAX)
 *   block j (32 values, max |x| = bmax_j):  s_j = clamp(ceil(bmax_j * Q8_SMAX / rmax), 1, Q8_SMAX)
 *   q_k = clamp(rint(x_k * (1 / (unit * s_j))), -127, 127)        so x_k ~ unit * s_j * q_k
 * A scale per 32 values keeps small blocks precise next to an outlier (one scale per row measured 5x the KL
 * divergence to fp32 on the default model); storing it as a small integer s_j lets the block scale ride in the
 * maddwd that widens the products, so a row's dot product is one exact int32 sum:
 *   y[b, n] = wscale[n] * unit[b] * sum_j s_j * sum_{k in j} q[b, k] W[n, k]
 * Bound: |W|, |q| <= 127 and s_j <= 128 keep every int32 lane below 2^31 for K <= Q8_MAX_COLS. */
#include <omp.h>
#include "kernels.h"

/* x [B, K] (row stride ldx) -> q [B, K] int8, s [B, K / Q8_BLOCK] int16, unit [B] */
void quantize_q8(const float *x, int64_t ldx, int64_t B, int64_t K, int8_t *q, int16_t *s, float *unit) {
    const int64_t nb = K / Q8_BLOCK;
    float bmax[Q8_MAX_COLS / Q8_BLOCK];
    for (int64_t b = 0; b < B; b++) {
        const float *xr = x + b * ldx;
        int8_t *qr = q + b * K;
        int16_t *sr = s + b * nb;
        float rmax = 0.f;
        for (int64_t j = 0; j < nb; j++) {
            float m = 0.f;
            int64_t k = 0;
#ifdef __AVX2__
            const __m256 sign = _mm256_set1_ps(-0.0f);
            __m256 mv = _mm256_setzero_ps();
            for (; k < Q8_BLOCK; k += 8) mv = _mm256_max_ps(mv, _mm256_andnot_ps(sign, _mm256_loadu_ps(xr + j * Q8_BLOCK + k)));
            __m128 h = _mm_max_ps(_mm256_castps256_ps128(mv), _mm256_extractf128_ps(mv, 1));
            h = _mm_max_ps(h, _mm_movehl_ps(h, h));
            m = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
#endif
            for (; k < Q8_BLOCK; k++) m = fmaxf(m, fabsf(xr[j * Q8_BLOCK + k]));
            bmax[j] = m;
            rmax = fmaxf(rmax, m);
        }
        if (rmax == 0.f) {  /* an all-zero row: any scale works, the sum is 0 */
            unit[b] = 0.f;
            memset(qr, 0, (size_t)K);
            for (int64_t j = 0; j < nb; j++) sr[j] = 1;
            continue;
        }
        const float u = rmax / (127.0f * Q8_SMAX);
        unit[b] = u;
        for (int64_t j = 0; j < nb; j++) {
            float sj = fminf(fmaxf(ceilf(bmax[j] * (float)Q8_SMAX / rmax), 1.f), (float)Q8_SMAX);
            sr[j] = (int16_t)sj;
            const float inv = 1.0f / (u * sj);
            const float *xb = xr + j * Q8_BLOCK;
            int8_t *qb = qr + j * Q8_BLOCK;
            int64_t k = 0;
#ifdef __AVX2__
            const __m256 iv = _mm256_set1_ps(inv), lo = _mm256_set1_ps(-127.f), hi = _mm256_set1_ps(127.f);
            for (; k < Q8_BLOCK; k += 8) {
                __m256 v = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(_mm256_loadu_ps(xb + k), iv), lo), hi);
                __m256i i32 = _mm256_cvtps_epi32(v);  /* round to nearest even, like rintf */
                __m128i i16 = _mm_packs_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
                _mm_storel_epi64((__m128i *)(qb + k), _mm_packs_epi16(i16, i16));
            }
#endif
            for (; k < Q8_BLOCK; k++) qb[k] = (int8_t)fminf(fmaxf(rintf(xb[k] * inv), -127.f), 127.f);
        }
    }
}

/* out[r * RB + b] = sum_j s[b, j] * (W[r] . q[b]) over the blocks j, as a float (exact int32 lanes, summed in
 * float: 8 lanes near 2^31 would overflow an int32 total). RN x RB constant after inlining. */
static inline __attribute__((always_inline)) void tile_q8(int RN, int RB, const int8_t *w, int64_t K,
                                                          const int8_t *q, const int16_t *s, float *out) {
    const int64_t nb = K / Q8_BLOCK;
#ifdef __AVX2__
    __m256i acc[4][4];
    for (int r = 0; r < RN; r++)
        for (int b = 0; b < RB; b++) acc[r][b] = _mm256_setzero_si256();
    for (int64_t j = 0; j < nb; j++) {
        const int64_t k = j * Q8_BLOCK;
        if ((k & 63) == 0)  /* the next tile's weight rows, one cache line ahead per row (see linear.c's tile) */
            for (int r = 0; r < RN; r++) _mm_prefetch((const char *)(w + (r + 2 * RN) * K + k), _MM_HINT_T0);
        __m256i wv[4];
        for (int r = 0; r < RN; r++) wv[r] = _mm256_loadu_si256((const __m256i *)(w + r * K + k));
        for (int b = 0; b < RB; b++) {
            const __m256i xq = _mm256_loadu_si256((const __m256i *)(q + b * K + k));
            const __m256i xa = _mm256_abs_epi8(xq), sv = _mm256_set1_epi16(s[b * nb + j]);
            /* maddubs wants one unsigned operand: |q| times W with q's sign moved onto it */
            for (int r = 0; r < RN; r++)
                acc[r][b] = _mm256_add_epi32(
                    acc[r][b], _mm256_madd_epi16(_mm256_maddubs_epi16(xa, _mm256_sign_epi8(wv[r], xq)), sv));
        }
    }
    for (int r = 0; r < RN; r++)
        for (int b = 0; b < RB; b++) out[r * RB + b] = hsum(_mm256_cvtepi32_ps(acc[r][b]));
#else
    for (int r = 0; r < RN; r++)
        for (int b = 0; b < RB; b++) {
            float total = 0.f;
            for (int64_t j = 0; j < nb; j++) {
                int32_t d = 0;
                for (int64_t k = j * Q8_BLOCK; k < (j + 1) * Q8_BLOCK; k++) d += (int32_t)w[r * K + k] * q[b * K + k];
                total += (float)(d * s[b * nb + j]);
            }
            out[r * RB + b] = total;
        }
#endif
}

/* one weight row against one activation row, read as one sequential stream with prefetch (B == 1) */
static float rowdot_q8(const int8_t *w, int64_t K, const int8_t *q, const int16_t *s) {
#ifdef __AVX2__
    __m256i a0 = _mm256_setzero_si256(), a1 = a0;
    int64_t j = 0;
    const int64_t nb = K / Q8_BLOCK;
    for (; j + 2 <= nb; j += 2) {
        const int64_t k = j * Q8_BLOCK;
        _mm_prefetch((const char *)(w + k + 2048), _MM_HINT_T0);
        const __m256i x0 = _mm256_loadu_si256((const __m256i *)(q + k)), x1 = _mm256_loadu_si256((const __m256i *)(q + k + 32));
        const __m256i w0 = _mm256_loadu_si256((const __m256i *)(w + k)), w1 = _mm256_loadu_si256((const __m256i *)(w + k + 32));
        a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(x0), _mm256_sign_epi8(w0, x0)),
                                                    _mm256_set1_epi16(s[j])));
        a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(x1), _mm256_sign_epi8(w1, x1)),
                                                    _mm256_set1_epi16(s[j + 1])));
    }
    if (j < nb) {
        const __m256i x0 = _mm256_loadu_si256((const __m256i *)(q + j * Q8_BLOCK));
        const __m256i w0 = _mm256_loadu_si256((const __m256i *)(w + j * Q8_BLOCK));
        a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(x0), _mm256_sign_epi8(w0, x0)),
                                                    _mm256_set1_epi16(s[j])));
    }
    return hsum(_mm256_add_ps(_mm256_cvtepi32_ps(a0), _mm256_cvtepi32_ps(a1)));
#else
    float out;
    tile_q8(1, 1, w, K, q, s, &out);
    return out;
#endif
}

#ifdef __AVX512BW__
#define Q8_RN 8  /* weight rows per pass with one activation row (B == 1): independent sums in flight */

/* out[r] = W[r] . q for RN weight rows (RN constant after inlining), each row's int32 lanes and their final sums
 * exactly as rowdot_q8 forms them (lanes 0-7 of each 512-bit sum: even blocks, 8-15: odd blocks) */
static inline __attribute__((always_inline)) void rows_q8(int RN, const int8_t *w, int64_t K, const int8_t *q,
                                                          const int16_t *s, float *out) {
    const int64_t nb = K / Q8_BLOCK;
    __m512i acc[Q8_RN];
    for (int r = 0; r < RN; r++) acc[r] = _mm512_setzero_si512();
    int64_t j = 0;
    for (; j + 2 <= nb; j += 2) {
        const int64_t k = j * Q8_BLOCK;
        const __m512i x = _mm512_loadu_si512((const void *)(q + k)), xa = _mm512_abs_epi8(x);
        const __mmask64 neg = _mm512_movepi8_mask(x);
        const __m512i sv = _mm512_inserti64x4(_mm512_set1_epi16(s[j]), _mm256_set1_epi16(s[j + 1]), 1);
        for (int r = 0; r < RN; r++) {
            /* the next pass's rows come in behind this one (RN interleaved streams defeat sequential prefetch) */
            _mm_prefetch((const char *)(w + (r + RN) * K + k), _MM_HINT_T0);
            __m512i wv = _mm512_loadu_si512((const void *)(w + r * K + k));
            wv = _mm512_mask_sub_epi8(wv, neg, _mm512_setzero_si512(), wv);  /* maddubs: |q| times W signed by q */
            acc[r] = _mm512_add_epi32(acc[r], _mm512_madd_epi16(_mm512_maddubs_epi16(xa, wv), sv));
        }
    }
    for (int r = 0; r < RN; r++) {
        __m256i a0 = _mm512_castsi512_si256(acc[r]), a1 = _mm512_extracti64x4_epi64(acc[r], 1);
        if (j < nb) {  /* an odd last block joins the even blocks' lanes */
            const __m256i x0 = _mm256_loadu_si256((const __m256i *)(q + j * Q8_BLOCK));
            const __m256i w0 = _mm256_loadu_si256((const __m256i *)(w + r * K + j * Q8_BLOCK));
            a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(x0), _mm256_sign_epi8(w0, x0)),
                                                        _mm256_set1_epi16(s[j])));
        }
        out[r] = hsum(_mm256_add_ps(_mm256_cvtepi32_ps(a0), _mm256_cvtepi32_ps(a1)));
    }
}

static void rows_q8_any(int RN, const int8_t *w, int64_t K, const int8_t *q, const int16_t *s, float *out) {
    switch (RN) {
#define Q8_RN_CASE(n) case n: rows_q8(n, w, K, q, s, out); return;
        Q8_RN_CASE(1) Q8_RN_CASE(2) Q8_RN_CASE(3) Q8_RN_CASE(4) Q8_RN_CASE(5) Q8_RN_CASE(6) Q8_RN_CASE(7) Q8_RN_CASE(8)
#undef Q8_RN_CASE
    }
}
#endif

/* The main tile, 2 weight rows x 4 activation rows. gcc's register allocation of the intrinsics version spilled
 * two of the 8 accumulators and copied registers around (~60 instructions per block for 36 useful ones), so on
 * x86-64 each activation row's step is written as one asm block with fixed scratch registers ymm10-14: 8
 * accumulators + 2 weight vectors + 5 scratch = 15 of the 16 AVX2 registers; 15-25 % faster per matrix, same
 * instructions, so the same exact int32 sums. The intrinsics version stays for other compilers/targets. */
#if defined(__AVX2__) && defined(__GNUC__) && defined(__x86_64__)
/* a0 += s * maddubs(|q|, sign(w0, q)) and a1 the same with w1, for one activation block q at qp, scale at sp */
#define Q8_ROW_ASM(qp, sp, A0, A1)                                                                             \
    __asm__("vmovdqu (%[q]), %%ymm10\n\t"                                                                      \
            "vpabsb %%ymm10, %%ymm11\n\t"                                                                      \
            "vpbroadcastw (%[s]), %%ymm12\n\t"                                                                 \
            "vpsignb %%ymm10, %[w0], %%ymm13\n\t"                                                              \
            "vpmaddubsw %%ymm13, %%ymm11, %%ymm13\n\t"                                                         \
            "vpmaddwd %%ymm12, %%ymm13, %%ymm13\n\t"                                                           \
            "vpaddd %%ymm13, %[a0], %[a0]\n\t"                                                                 \
            "vpsignb %%ymm10, %[w1], %%ymm14\n\t"                                                              \
            "vpmaddubsw %%ymm14, %%ymm11, %%ymm14\n\t"                                                         \
            "vpmaddwd %%ymm12, %%ymm14, %%ymm14\n\t"                                                           \
            "vpaddd %%ymm14, %[a1], %[a1]"                                                                     \
            : [a0] "+x"(A0), [a1] "+x"(A1)                                                                     \
            : [q] "r"(qp), [s] "r"(sp), [w0] "x"(v0), [w1] "x"(v1), "m"(*(const char(*)[Q8_BLOCK])(qp)),      \
              "m"(*(const int16_t *)(sp))                                                                      \
            : "xmm10", "xmm11", "xmm12", "xmm13", "xmm14")
#endif

static void tile_q8_24(const int8_t *w, int64_t K, const int8_t *q, const int16_t *s, float *out) {
#ifdef __AVX2__
    const int64_t nb = K / Q8_BLOCK;
    const int8_t *w0 = w, *w1 = w + K, *q0 = q, *q1 = q + K, *q2 = q + 2 * K, *q3 = q + 3 * K;
    const int16_t *s0 = s, *s1 = s + nb, *s2 = s + 2 * nb, *s3 = s + 3 * nb;
    __m256i a00 = _mm256_setzero_si256(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00,
            a13 = a00;
    for (int64_t j = 0; j < nb; j++) {
        const int64_t k = j * Q8_BLOCK;
        if ((k & 63) == 0) {  /* the next tile's weight rows, a cache line ahead (see linear.c's tile) */
            _mm_prefetch((const char *)(w0 + 4 * K + k), _MM_HINT_T0);
            _mm_prefetch((const char *)(w1 + 4 * K + k), _MM_HINT_T0);
        }
        const __m256i v0 = _mm256_loadu_si256((const __m256i *)(w0 + k)), v1 = _mm256_loadu_si256((const __m256i *)(w1 + k));
#ifdef Q8_ROW_ASM
        Q8_ROW_ASM(q0 + k, s0 + j, a00, a10);
        Q8_ROW_ASM(q1 + k, s1 + j, a01, a11);
        Q8_ROW_ASM(q2 + k, s2 + j, a02, a12);
        Q8_ROW_ASM(q3 + k, s3 + j, a03, a13);
#else
#define Q8_COL(b)                                                                                                  \
    {                                                                                                              \
        const __m256i x = _mm256_loadu_si256((const __m256i *)(q##b + k)), xa = _mm256_abs_epi8(x),                 \
                      sv = _mm256_set1_epi16(s##b[j]);                                                              \
        a0##b = _mm256_add_epi32(a0##b, _mm256_madd_epi16(_mm256_maddubs_epi16(xa, _mm256_sign_epi8(v0, x)), sv)); \
        a1##b = _mm256_add_epi32(a1##b, _mm256_madd_epi16(_mm256_maddubs_epi16(xa, _mm256_sign_epi8(v1, x)), sv)); \
    }
        Q8_COL(0) Q8_COL(1) Q8_COL(2) Q8_COL(3)
#undef Q8_COL
#endif
    }
    out[0] = hsum(_mm256_cvtepi32_ps(a00)); out[1] = hsum(_mm256_cvtepi32_ps(a01));
    out[2] = hsum(_mm256_cvtepi32_ps(a02)); out[3] = hsum(_mm256_cvtepi32_ps(a03));
    out[4] = hsum(_mm256_cvtepi32_ps(a10)); out[5] = hsum(_mm256_cvtepi32_ps(a11));
    out[6] = hsum(_mm256_cvtepi32_ps(a12)); out[7] = hsum(_mm256_cvtepi32_ps(a13));
#else
    tile_q8(2, 4, w, K, q, s, out);
#endif
}

#ifdef __AVX512BW__
/* 4 weight rows x 4 activation rows with 64-byte loads (two blocks at a time): half the instructions of the
 * 256-bit tiles per product. Each sum's int32 lanes fold to exactly tile_q8's (lanes 8-15, the odd blocks, added
 * onto 0-7), so the results are the same bits. */
static void tile_q8_44(const int8_t *w, int64_t K, const int8_t *q, const int16_t *s, float *out) {
    const int64_t nb = K / Q8_BLOCK;
    __m512i acc[4][4];
    for (int r = 0; r < 4; r++)
        for (int b = 0; b < 4; b++) acc[r][b] = _mm512_setzero_si512();
    int64_t j = 0;
    for (; j + 2 <= nb; j += 2) {
        const int64_t k = j * Q8_BLOCK;
        __m512i wv[4];
        for (int r = 0; r < 4; r++) {
            _mm_prefetch((const char *)(w + (r + 4) * K + k), _MM_HINT_T0);  /* the next tile's rows */
            wv[r] = _mm512_loadu_si512((const void *)(w + r * K + k));
        }
        for (int b = 0; b < 4; b++) {
            const __m512i x = _mm512_loadu_si512((const void *)(q + b * K + k)), xa = _mm512_abs_epi8(x);
            const __mmask64 neg = _mm512_movepi8_mask(x);
            const __m512i sv = _mm512_inserti64x4(_mm512_set1_epi16(s[b * nb + j]), _mm256_set1_epi16(s[b * nb + j + 1]), 1);
            for (int r = 0; r < 4; r++) {  /* maddubs: |q| times W signed by q */
                const __m512i ws = _mm512_mask_sub_epi8(wv[r], neg, _mm512_setzero_si512(), wv[r]);
                acc[r][b] = _mm512_add_epi32(acc[r][b], _mm512_madd_epi16(_mm512_maddubs_epi16(xa, ws), sv));
            }
        }
    }
    for (int r = 0; r < 4; r++)
        for (int b = 0; b < 4; b++) {
            __m256i a = _mm256_add_epi32(_mm512_castsi512_si256(acc[r][b]), _mm512_extracti64x4_epi64(acc[r][b], 1));
            if (j < nb) {  /* an odd last block */
                const __m256i x0 = _mm256_loadu_si256((const __m256i *)(q + b * K + j * Q8_BLOCK));
                const __m256i w0 = _mm256_loadu_si256((const __m256i *)(w + r * K + j * Q8_BLOCK));
                a = _mm256_add_epi32(a, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(x0), _mm256_sign_epi8(w0, x0)),
                                                          _mm256_set1_epi16(s[b * nb + j])));
            }
            out[r * 4 + b] = hsum(_mm256_cvtepi32_ps(a));
        }
}
#endif

/* y[b * ldy + n] (+)= wscale[n] * unit[b] * (W[n] . x[b]) for rows n in [n0, n1), x given by quantize_q8 */
void matvec_q8(const Mat *m, const int8_t *q, const int16_t *s, const float *unit, int64_t B, int64_t n0,
               int64_t n1, float *y, int64_t ldy, int accumulate) {
    const int64_t K = m->cols, nb = K / Q8_BLOCK;
    const int8_t *W = (const int8_t *)m->w;
    float out[16];
#ifdef Q8_RN
    if (B == 1) {
        for (int64_t n = n0; n < n1; n += Q8_RN) {
            const int RN = n1 - n < Q8_RN ? (int)(n1 - n) : Q8_RN;
            rows_q8_any(RN, W + n * K, K, q, s, out);
            for (int r = 0; r < RN; r++) {
                float v = out[r] * unit[0] * m->scale[n + r], *dst = y + n + r;
                *dst = accumulate ? *dst + v : v;
            }
        }
        return;
    }
#endif
    for (int64_t n = n0; n < n1;) {
#ifdef __AVX512BW__
        const int RN = B >= 4 && n1 - n >= 4 ? 4 : B > 1 && n1 - n >= 2 ? 2 : 1;
#else
        const int RN = B > 1 && n1 - n >= 2 ? 2 : 1;
#endif
        for (int64_t b = 0; b < B;) {
            const int RB = B == 1 ? 1 : B - b >= 4 ? 4 : B - b >= 2 ? 2 : 1;
            if (B == 1) out[0] = rowdot_q8(W + n * K, K, q, s);
#ifdef __AVX512BW__
            else if (RN == 4 && RB == 4) tile_q8_44(W + n * K, K, q + b * K, s + b * nb, out);
            else if (RN == 4 && RB == 2) tile_q8(4, 2, W + n * K, K, q + b * K, s + b * nb, out);
            else if (RN == 4) tile_q8(4, 1, W + n * K, K, q + b * K, s + b * nb, out);
#endif
            else if (RN == 2 && RB == 4) tile_q8_24(W + n * K, K, q + b * K, s + b * nb, out);
            else if (RN == 2 && RB == 2) tile_q8(2, 2, W + n * K, K, q + b * K, s + b * nb, out);
            else if (RN == 2) tile_q8(2, 1, W + n * K, K, q + b * K, s + b * nb, out);
            else if (RB == 4) tile_q8(1, 4, W + n * K, K, q + b * K, s + b * nb, out);
            else if (RB == 2) tile_q8(1, 2, W + n * K, K, q + b * K, s + b * nb, out);
            else tile_q8(1, 1, W + n * K, K, q + b * K, s + b * nb, out);
            for (int r = 0; r < RN; r++)
                for (int i = 0; i < RB; i++) {
                    float v = out[r * RB + i] * unit[b + i] * m->scale[n + r], *dst = y + (b + i) * ldy + n + r;
                    *dst = accumulate ? *dst + v : v;
                }
            b += RB;
        }
        n += RN;
    }
}

#define Q8_ROWS_PER_CHUNK 64  /* activation rows per pass over the weights: their int8 copy stays in L2 */

/* y [M, N] = x [M, K] W^T for int8 W through int8 activations (prompt chunks; minimind_linear dispatches here).
 * Returns 0, or -1 when scratch cannot be allocated. */
int linear_q8(const Mat *m, const float *x, int64_t M, float *y, int nthreads) {
    const int64_t K = m->cols, N = m->rows, nb = K / Q8_BLOCK;
    int8_t *q = malloc((size_t)(M * K));
    int16_t *s = malloc(sizeof(int16_t) * (size_t)(M * nb));
    float *unit = malloc(sizeof(float) * (size_t)M);
    int status = q && s && unit ? 0 : -1;
    if (status == 0) {
#pragma omp parallel num_threads(nthreads)
        {
#pragma omp for schedule(static)
            for (int64_t b = 0; b < M; b++) quantize_q8(x + b * K, K, 1, K, q + b * K, s + b * nb, unit + b);
            for (int64_t r0 = 0; r0 < M; r0 += Q8_ROWS_PER_CHUNK) {
                const int64_t B = M - r0 < Q8_ROWS_PER_CHUNK ? M - r0 : Q8_ROWS_PER_CHUNK;
#pragma omp for schedule(static) nowait
                for (int64_t t = 0; t < cdiv(N, 16); t++) {
                    const int64_t n0 = t * 16, n1 = n0 + 16 < N ? n0 + 16 : N;
                    matvec_q8(m, q + r0 * K, s + r0 * nb, unit + r0, B, n0, n1, y + r0 * N, N, 0);
                }
            }
        }
    }
    free(q); free(s); free(unit);
    return status;
}
