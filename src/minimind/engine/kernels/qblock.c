/* GGUF block-quantized weights (Q8_0, Q4_0, Q4_1, Q5_0) in their file layout, so a quantized GGUF runs from its own
 * bytes instead of a 4-8x larger fp32 copy (the K-quants: qkblock.c, dispatched from here). Each row is K / 32 blocks:
 *   Q8_0 (34 bytes): fp16 d, int8 q[32]                 w_k = d * q_k
 *   Q4_0 (18 bytes): fp16 d, u8 qs[16]                  w_k = d * (nibble_k - 8)
 *   Q4_1 (20 bytes): fp16 d, fp16 m, u8 qs[16]          w_k = d * nibble_k + m
 *   Q5_0 (22 bytes): fp16 d, u32 qh, u8 qs[16]          w_k = d * (nibble_k + 16 * bit k of qh - 16)
 * (nibble_k: k < 16 the low nibble of qs[k], else the high nibble of qs[k - 16]). Activations are quantized per
 * 32 values as llama.cpp does for these products (Q8_0 / Q8_1): dx = amax / 127 rounded to fp16, q = rint(x / dx),
 * and sx = dx * sum(q), so a block's product is one exact int32 dot times two scales:
 *   Q8_0, Q4_0, Q5_0: dw * dx * dot(w_q, q) (the signed values above);   Q4_1: dw * dx * dot(nibble, q) + m * sx
 * (sx is stored as fp16, as llama.cpp's Q8_1 does; with F32 KV caches the two agree to ~1e-5 in log-probability). */
#include <omp.h>
#include "kernels.h"

/* activation rows per pass over a weight row: AVX-512's 32 registers hold 8 rows' sums next to the weights */
#ifdef __AVX512BW__
#define QB_RB 8
#else
#define QB_RB 4
#endif

/* the value of weight k (0..31) of one block as an integer: Q8_0 q, Q4_0 nibble - 8, Q4_1 nibble, Q5_0 q5 - 16 */
static inline int qb_value(int type, const uint8_t *blk, int k) {
    if (type == W_Q8_0) return (int8_t)blk[2 + k];
    const int at = type == W_Q4_1 ? 4 : type == W_Q5_0 ? 6 : 2;
    const int nib = (blk[at + (k & 15)] >> (k < 16 ? 0 : 4)) & 0x0F;
    if (type == W_Q5_0) {
        uint32_t qh;
        memcpy(&qh, blk + 2, 4);
        return (nib | (int)((qh >> k) & 1) << 4) - 16;
    }
    return nib - (type == W_Q4_0) * 8;
}

/* x [B, K] (row stride ldx) -> q [B, K] int8, d and s [B, K / 32] (block scale, scale times the sum of q), as the
 * products with a weight of this type read them (K-quants: Q8_K, see qkblock.c) */
void quantize_qb(int type, const float *x, int64_t ldx, int64_t B, int64_t K, int8_t *q, float *d, float *s) {
    if (qk_type(type)) {
        quantize_qk(x, ldx, B, K, q, d, s);
        return;
    }
    const int64_t nb = K / QB_BLOCK;
    for (int64_t b = 0; b < B; b++)
        for (int64_t j = 0; j < nb; j++) {
            const float *xb = x + b * ldx + j * QB_BLOCK;
            int8_t *qb = q + b * K + j * QB_BLOCK;
            float amax = 0.f;
            for (int k = 0; k < QB_BLOCK; k++) amax = fmaxf(amax, fabsf(xb[k]));
            const float dx = amax / 127.f, inv = amax ? 127.f / amax : 0.f;  /* llama.cpp's rounding */
            int sum = 0;
            for (int k = 0; k < QB_BLOCK; k++) {
                qb[k] = (int8_t)rintf(xb[k] * inv);
                sum += qb[k];
            }
            d[b * nb + j] = half_to_float(float_to_half(dx));  /* both stored as fp16, as in Q8_0 / Q8_1 */
            s[b * nb + j] = half_to_float(float_to_half(dx * (float)sum));
        }
}

#ifdef __AVX2__
/* the 32 weights of one block as int8 lanes in k order: signed for Q8_0 and Q4_0 (nibble - 8), 0..15 for Q4_1 */
static inline __m256i qb_load(int type, const uint8_t *blk) {
    if (type == W_Q8_0) return _mm256_loadu_si256((const __m256i *)(blk + 2));
    const int at = type == W_Q4_1 ? 4 : type == W_Q5_0 ? 6 : 2;
    const __m128i raw = _mm_loadu_si128((const __m128i *)(blk + at)), low = _mm_set1_epi8(0x0F);
    const __m256i nib = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), low), _mm_and_si128(raw, low));
    if (type == W_Q5_0) {  /* bit k of qh is the fifth bit of value k: spread the 32 bits over the 32 bytes */
        uint32_t qh;
        memcpy(&qh, blk + 2, 4);
        const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32((int)qh), _mm256_set_epi64x(
            0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0x0000000000000000));
        const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
        const __m256i high = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit),
                                              _mm256_set1_epi8(0x10));
        return _mm256_sub_epi8(_mm256_or_si256(nib, high), _mm256_set1_epi8(16));
    }
    return type == W_Q4_0 ? _mm256_sub_epi8(nib, _mm256_set1_epi8(8)) : nib;
}

/* exact int32 dot of one block's weights (as qb_load gives them) with 32 activation values, as 8 fp32 lanes */
static inline __m256 qb_idot(int type, __m256i w, const int8_t *q) {
    const __m256i x = _mm256_loadu_si256((const __m256i *)q);
    /* maddubs wants one unsigned operand: Q4_1's nibbles are; for signed weights move their sign onto x */
    const __m256i p = type == W_Q4_1 ? _mm256_maddubs_epi16(w, x)
                                     : _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(p, _mm256_set1_epi16(1)));
}
#endif

/* out[b] = W[row] . x[b] for RB activation rows (RB constant after inlining): each block is unpacked once */
static inline __attribute__((always_inline)) void qb_tile(int type, int RB, const uint8_t *w, int64_t nb,
                                                          const int8_t *q, int64_t K, const float *d,
                                                          const float *s, float *out) {
    const int64_t size = qb_bytes(type);
    float tail[QB_RB] = {0};  /* Q4_1's m terms, as a scalar sum per row */
#ifdef __AVX2__
    __m256 acc[QB_RB];
    for (int b = 0; b < RB; b++) acc[b] = _mm256_setzero_ps();
    int64_t j = 0;
#ifdef __AVX512BW__
    /* the integer dots of two blocks per instruction; their scaling and sums in the 256-bit loop's order (as
     * llama.cpp's AVX2 dot products add them, so both round alike); an odd last block goes through that loop */
    for (; j + 2 <= nb; j += 2) {
        const uint8_t *blk = w + j * size;
        if ((j & 3) == 0) _mm_prefetch((const char *)(blk + 8 * size), _MM_HINT_T0);
        __m512i wv;
        if (type == W_Q5_0) {  /* the fifth bits of both blocks as one 64-bit mask: bit k <-> byte k */
            uint32_t qh0, qh1;
            memcpy(&qh0, blk + 2, 4);
            memcpy(&qh1, blk + size + 2, 4);
            const __m128i r0 = _mm_loadu_si128((const __m128i *)(blk + 6)), r1 = _mm_loadu_si128((const __m128i *)(blk + size + 6));
            const __m128i low = _mm_set1_epi8(0x0F);
            const __m512i nib = _mm512_inserti64x4(
                _mm512_castsi256_si512(_mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(r0, 4), low), _mm_and_si128(r0, low))),
                _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(r1, 4), low), _mm_and_si128(r1, low)), 1);
            const __m512i high = _mm512_maskz_mov_epi8((__mmask64)qh0 | (__mmask64)qh1 << 32, _mm512_set1_epi8(0x10));
            wv = _mm512_sub_epi8(_mm512_or_si512(nib, high), _mm512_set1_epi8(16));
        } else {
            wv = _mm512_inserti64x4(_mm512_castsi256_si512(qb_load(type, blk)), qb_load(type, blk + size), 1);
        }
        /* maddubs wants one unsigned operand: Q4_1's nibbles are; else |w| and x negated where w < 0 */
        const __m512i wa = type == W_Q4_1 ? wv : _mm512_abs_epi8(wv);
        const __mmask64 neg = type == W_Q4_1 ? 0 : _mm512_movepi8_mask(wv);
        const float dw0 = f16_at(blk), dw1 = f16_at(blk + size);
        const float mw0 = type == W_Q4_1 ? f16_at(blk + 2) : 0.f, mw1 = type == W_Q4_1 ? f16_at(blk + size + 2) : 0.f;
        for (int b = 0; b < RB; b++) {
            __m512i x = _mm512_loadu_si512((const void *)(q + b * K + j * QB_BLOCK));
            if (type != W_Q4_1) x = _mm512_mask_sub_epi8(x, neg, _mm512_setzero_si512(), x);
            const __m512 dot = _mm512_cvtepi32_ps(_mm512_madd_epi16(_mm512_maddubs_epi16(wa, x), _mm512_set1_epi16(1)));
            acc[b] = _mm256_fmadd_ps(_mm512_castps512_ps256(dot), _mm256_set1_ps(dw0 * d[b * nb + j]), acc[b]);
            acc[b] = _mm256_fmadd_ps(_mm512_extractf32x8_ps(dot, 1), _mm256_set1_ps(dw1 * d[b * nb + j + 1]), acc[b]);
            tail[b] += mw0 * s[b * nb + j];
            tail[b] += mw1 * s[b * nb + j + 1];
        }
    }
#endif
    for (; j < nb; j++) {
        const uint8_t *blk = w + j * size;
        if ((j & 3) == 0) _mm_prefetch((const char *)(blk + 8 * size), _MM_HINT_T0);
        const __m256i wv = qb_load(type, blk);
        const float dw = f16_at(blk), mw = type == W_Q4_1 ? f16_at(blk + 2) : 0.f;
        for (int b = 0; b < RB; b++) {
            acc[b] = _mm256_fmadd_ps(qb_idot(type, wv, q + b * K + j * QB_BLOCK), _mm256_set1_ps(dw * d[b * nb + j]),
                                     acc[b]);
            tail[b] += mw * s[b * nb + j];
        }
    }
    for (int b = 0; b < RB; b++) out[b] = hsum(acc[b]) + tail[b];
#else
    for (int b = 0; b < RB; b++) out[b] = 0.f;
    for (int64_t j = 0; j < nb; j++) {
        const uint8_t *blk = w + j * size;
        const float dw = f16_at(blk), mw = type == W_Q4_1 ? f16_at(blk + 2) : 0.f;
        for (int b = 0; b < RB; b++) {
            const int8_t *x = q + b * K + j * QB_BLOCK;
            int32_t dot = 0;
            for (int k = 0; k < QB_BLOCK; k++) {
                dot += qb_value(type, blk, k) * x[k];
            }
            out[b] += dw * d[b * nb + j] * (float)dot;
            tail[b] += mw * s[b * nb + j];
        }
    }
    for (int b = 0; b < RB; b++) out[b] += tail[b];
#endif
}

#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define QB_RN 8  /* weight rows per pass with one activation row: independent sums, so the FMA chain never waits */

/* one activation row against RN weight rows (RN constant after inlining), each row's sums in exactly qb_tile's
 * order (so the results are the same bits). One vpdpbusd per row and block pair: unsigned weight values times the
 * signed activations, the offset (Q4_0: 8, Q5_0: 16) taken off through the activations' sums of four; Q8_0's
 * signed weights meet the activations shifted by 128 instead, the shift taken off through the weights' sums. */
static inline __attribute__((always_inline)) void qb_rows(int type, int RN, const uint8_t *w, int64_t row_bytes,
                                                          int64_t nb, const int8_t *q, const float *d,
                                                          const float *s, float *out) {
    const int64_t size = qb_bytes(type);
    const int at = type == W_Q4_1 ? 4 : type == W_Q5_0 ? 6 : 2;
    const __m512i shifts = _mm512_set_epi64(4, 4, 0, 0, 4, 4, 0, 0), low = _mm512_set1_epi8(0x0F);
    const __m512i zero = _mm512_setzero_si512(), c128 = _mm512_set1_epi8((char)0x80);
    __m256 acc[QB_RN];
    float tail[QB_RN];
    for (int r = 0; r < RN; r++) acc[r] = _mm256_setzero_ps(), tail[r] = 0.f;
    int64_t j = 0;
    for (; j + 2 <= nb; j += 2) {
        const __m512i x = _mm512_loadu_si512((const void *)(q + j * QB_BLOCK));
        const __m512i xu = _mm512_xor_si512(x, c128);  /* Q8_0: x + 128 as unsigned bytes */
        /* minus offset * (sum of each lane's four activations): the start value of every row's dot */
        const __m512i base = type == W_Q4_0 ? _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, _mm512_set1_epi8(8), x))
                             : type == W_Q5_0 ? _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, _mm512_set1_epi8(16), x))
                                              : zero;
        const float dx0 = d[j], dx1 = d[j + 1], sx0 = s[j], sx1 = s[j + 1];
        for (int r = 0; r < RN; r++) {
            const uint8_t *blk = w + r * row_bytes + j * size;
            /* the same bytes of the next pass's rows (RN rows on): RN interleaved streams defeat the hardware's
             * sequential prefetch, the next pass's rows come in behind this one */
            _mm_prefetch((const char *)(blk + RN * row_bytes), _MM_HINT_T0);
            _mm_prefetch((const char *)(blk + RN * row_bytes + 64), _MM_HINT_T0);
            __m512i dot;
            if (type == W_Q8_0) {
                const __m512i wv = _mm512_inserti64x4(_mm512_castsi256_si512(
                    _mm256_loadu_si256((const __m256i *)(blk + 2))), _mm256_loadu_si256((const __m256i *)(blk + size + 2)), 1);
                dot = _mm512_sub_epi32(_mm512_dpbusd_epi32(zero, xu, wv), _mm512_dpbusd_epi32(zero, c128, wv));
            } else {
                /* [qs0, qs0, qs1, qs1] >> [0, 4, 0, 4] & 15: both blocks' values in k order */
                __m512i wv = _mm512_inserti64x4(
                    _mm512_castsi256_si512(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(blk + at)))),
                    _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(blk + size + at))), 1);
                wv = _mm512_and_si512(_mm512_srlv_epi64(wv, shifts), low);
                if (type == W_Q5_0) {
                    uint32_t qh0, qh1;
                    memcpy(&qh0, blk + 2, 4);
                    memcpy(&qh1, blk + size + 2, 4);
                    wv = _mm512_or_si512(wv, _mm512_maskz_mov_epi8((__mmask64)qh0 | (__mmask64)qh1 << 32,
                                                                   _mm512_set1_epi8(0x10)));
                }
                dot = _mm512_dpbusd_epi32(base, wv, x);
            }
            const __m512 f = _mm512_cvtepi32_ps(dot);
            const float dw0 = f16_at(blk), dw1 = f16_at(blk + size);
            acc[r] = _mm256_fmadd_ps(_mm512_castps512_ps256(f), _mm256_set1_ps(dw0 * dx0), acc[r]);
            acc[r] = _mm256_fmadd_ps(_mm512_extractf32x8_ps(f, 1), _mm256_set1_ps(dw1 * dx1), acc[r]);
            if (type == W_Q4_1) {
                tail[r] += f16_at(blk + 2) * sx0;
                tail[r] += f16_at(blk + size + 2) * sx1;
            }
        }
    }
    for (; j < nb; j++)  /* an odd last block */
        for (int r = 0; r < RN; r++) {
            const uint8_t *blk = w + r * row_bytes + j * size;
            acc[r] = _mm256_fmadd_ps(qb_idot(type, qb_load(type, blk), q + j * QB_BLOCK),
                                     _mm256_set1_ps(f16_at(blk) * d[j]), acc[r]);
            if (type == W_Q4_1) tail[r] += f16_at(blk + 2) * s[j];
        }
    for (int r = 0; r < RN; r++) out[r] = hsum(acc[r]) + tail[r];
}

#define QB_ROWS_CASE(T, RN) case RN: qb_rows(T, RN, w, row_bytes, nb, q, d, s, out); return;
#define QB_ROWS(T)                                                                                                 \
    static void qb_rows_##T(int RN, const uint8_t *w, int64_t row_bytes, int64_t nb, const int8_t *q,              \
                            const float *d, const float *s, float *out) {                                          \
        switch (RN) { QB_ROWS_CASE(T, 1) QB_ROWS_CASE(T, 2) QB_ROWS_CASE(T, 3) QB_ROWS_CASE(T, 4) QB_ROWS_CASE(T, 5) QB_ROWS_CASE(T, 6) QB_ROWS_CASE(T, 7) QB_ROWS_CASE(T, 8) }                 \
    }
QB_ROWS(W_Q8_0)
QB_ROWS(W_Q4_0)
QB_ROWS(W_Q4_1)
QB_ROWS(W_Q5_0)
#endif

#define QB_CASE(T, RB) case RB: qb_tile(T, RB, w, nb, q, K, d, s, out); return;
#ifdef __AVX512BW__
#define QB_MORE(T) QB_CASE(T, 5) QB_CASE(T, 6) QB_CASE(T, 7) QB_CASE(T, 8)
#else
#define QB_MORE(T)
#endif
#define QB_TYPE(T)                                                                                                 \
    static void qb_tile_##T(int RB, const uint8_t *w, int64_t nb, const int8_t *q, int64_t K, const float *d,     \
                            const float *s, float *out) {                                                          \
        switch (RB) { QB_CASE(T, 1) QB_CASE(T, 2) QB_CASE(T, 3) QB_CASE(T, 4) QB_MORE(T) }                         \
    }
QB_TYPE(W_Q8_0)
QB_TYPE(W_Q4_0)
QB_TYPE(W_Q4_1)
QB_TYPE(W_Q5_0)

/* y[b * ldy + n] (+)= W[n] . x[b] for rows n in [n0, n1), x given by quantize_qb */
void matvec_qb(const Mat *m, const int8_t *q, const float *d, const float *s, int64_t B, int64_t n0, int64_t n1,
               float *y, int64_t ldy, int accumulate) {
    if (qk_type(m->type)) {
        matvec_qk(m, q, d, s, B, n0, n1, y, ldy, accumulate);
        return;
    }
    const int64_t K = m->cols, nb = K / QB_BLOCK, row_bytes = nb * qb_bytes((int)m->type);
    float out[QB_RB];
#ifdef QB_RN
    if (B <= 2) {  /* decode of one or two sequences: several weight rows per pass instead of several x rows */
        for (int64_t n = n0; n < n1; n += QB_RN) {
            const int RN = n1 - n < QB_RN ? (int)(n1 - n) : QB_RN;
            const uint8_t *w = (const uint8_t *)m->w + n * row_bytes;
            for (int64_t b = 0; b < B; b++) {
                const int8_t *qb = q + b * K;
                const float *db = d + b * nb, *sb = s + b * nb;
                if (m->type == W_Q8_0) qb_rows_W_Q8_0(RN, w, row_bytes, nb, qb, db, sb, out);
                else if (m->type == W_Q4_0) qb_rows_W_Q4_0(RN, w, row_bytes, nb, qb, db, sb, out);
                else if (m->type == W_Q5_0) qb_rows_W_Q5_0(RN, w, row_bytes, nb, qb, db, sb, out);
                else qb_rows_W_Q4_1(RN, w, row_bytes, nb, qb, db, sb, out);
                for (int r = 0; r < RN; r++) {
                    float *dst = y + b * ldy + n + r;
                    *dst = accumulate ? *dst + out[r] : out[r];
                }
            }
        }
        return;
    }
#endif
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *w = (const uint8_t *)m->w + n * row_bytes;
        for (int64_t b = 0; b < B;) {
            const int RB = B - b >= QB_RB ? QB_RB : (int)(B - b);
            const int8_t *qb = q + b * K;
            if (m->type == W_Q8_0) qb_tile_W_Q8_0(RB, w, nb, qb, K, d + b * nb, s + b * nb, out);
            else if (m->type == W_Q4_0) qb_tile_W_Q4_0(RB, w, nb, qb, K, d + b * nb, s + b * nb, out);
            else if (m->type == W_Q5_0) qb_tile_W_Q5_0(RB, w, nb, qb, K, d + b * nb, s + b * nb, out);
            else qb_tile_W_Q4_1(RB, w, nb, qb, K, d + b * nb, s + b * nb, out);
            for (int i = 0; i < RB; i++) {
                float *dst = y + (b + i) * ldy + n;
                *dst = accumulate ? *dst + out[i] : out[i];
            }
            b += RB;
        }
    }
}

/* dst [K] = row `row` of a block-quantized matrix (W_FP32_ACT or not) as fp32, each value d * q (+ m) rounded as
 * gguf's dequantize rounds it: embedding lookups, and the rows linear.c widens for fp32 activations */
void dequant_row_qb(const Mat *m, int64_t row, float *dst) {
    const int type = (int)(m->type & ~(int64_t)(W_FP32_ACT | W_AUTO_ACT));
    if (qk_type(type)) {
        const Mat plain = {m->w, m->scale, type, m->rows, m->cols};
        dequant_row_qk(&plain, row, dst);
        return;
    }
    const int64_t K = m->cols, nb = K / QB_BLOCK, size = qb_bytes(type);
    const uint8_t *w = (const uint8_t *)m->w + row * nb * size;
    for (int64_t j = 0; j < nb; j++) {
        const uint8_t *blk = w + j * size;
        const float dw = f16_at(blk), mw = type == W_Q4_1 ? f16_at(blk + 2) : 0.f;
        float *out = dst + j * QB_BLOCK;
#ifdef __AVX2__
        const __m256i v = qb_load(type, blk);
        const __m128i lo = _mm256_castsi256_si128(v), hi = _mm256_extracti128_si256(v, 1);
        const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
        for (int i = 0; i < 4; i++) {
            const __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(parts[i])), _mm256_set1_ps(dw));
            _mm256_storeu_ps(out + 8 * i, type == W_Q4_1 ? _mm256_add_ps(f, _mm256_set1_ps(mw)) : f);
        }
#else
        for (int k = 0; k < QB_BLOCK; k++) {
            const float v = dw * (float)qb_value(type, blk, k);
            out[k] = type == W_Q4_1 ? v + mw : v;
        }
#endif
    }
}

#define QB_ROWS_PER_CHUNK 64  /* activation rows per pass over the weights */

/* y [M, N] = x [M, K] W^T for a block-quantized W (prompt chunks). Returns 0, or -1 without scratch memory. */
int linear_qb(const Mat *m, const float *x, int64_t M, float *y, int nthreads) {
    const int64_t K = m->cols, N = m->rows, nb = K / QB_BLOCK;
    int8_t *q = malloc((size_t)(M * K));
    float *d = malloc(sizeof(float) * (size_t)(M * nb)), *s = malloc(sizeof(float) * (size_t)(M * nb));
    int status = q && d && s ? 0 : -1;
    if (status == 0) {
#pragma omp parallel num_threads(nthreads)
        {
#pragma omp for schedule(static)
            for (int64_t b = 0; b < M; b++)
                quantize_qb((int)m->type, x + b * K, K, 1, K, q + b * K, d + b * nb, s + b * nb);
            for (int64_t r0 = 0; r0 < M; r0 += QB_ROWS_PER_CHUNK) {
                const int64_t B = M - r0 < QB_ROWS_PER_CHUNK ? M - r0 : QB_ROWS_PER_CHUNK;
#pragma omp for schedule(static) nowait
                for (int64_t t = 0; t < cdiv(N, 16); t++) {
                    const int64_t n0 = t * 16, n1 = n0 + 16 < N ? n0 + 16 : N;
                    matvec_qb(m, q + r0 * K, d + r0 * nb, s + r0 * nb, B, n0, n1, y + r0 * N, N, 0);
                }
            }
        }
    }
    free(q); free(d); free(s);
    return status;
}
