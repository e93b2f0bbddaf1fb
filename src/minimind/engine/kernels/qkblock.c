/* GGUF K-quant weights (Q4_K, Q6_K: what Q4_K_M files mix) in their file layout. Each row is K / 256 super-blocks:
 *   Q4_K (144 bytes): fp16 d, fp16 dmin, u8 scales[12] (eight 6-bit scales sc_j and mins m_j), u8 qs[128]
 *        w_k = d * sc_j * q_k - dmin * m_j, sub-block j = k / 32; values 64 i .. 64 i + 31 are the low nibbles of
 *        qs[32 i ..], values 64 i + 32 .. 64 i + 63 their high nibbles
 *   Q6_K (210 bytes): u8 ql[128], u8 qh[64], int8 scales[16], fp16 d
 *        w_k = d * scales_g * (q_k - 32), g = k / 16, q_k 6 bits: 4 from ql, 2 from qh (half h = k / 128: ql + 64 h,
 *        qh + 32 h; values l, l + 32, l + 64, l + 96 of a half take qh bits 0-1, 2-3, 4-5, 6-7 of qh[l])
 * Activations are quantized per 256 values as llama.cpp's Q8_K: max = the value of largest magnitude,
 * q = rint(-127 / max * x) (at most 127), dx = max / -127 as fp32, and bsums = the sums of q per 16 values. A
 * super-block's product is then exact integer sums times two scales:
 *   Q4_K: d dx sum_j sc_j dot_j(q4, q) - dmin dx sum_j m_j (bsum_2j + bsum_2j+1)
 *   Q6_K: d dx (sum_g scales_g dot_g(q6, q) - 32 sum_g scales_g bsum_g)
 * Storage of the activations in the buffers qblock.c hands over (nb = K / 32 per row): q [B, K] int8, dx at
 * d[b * nb + i] for super-block i, bsums as int16 at ((int16_t *)(s + b * nb))[16 i ..] (K / 16 of them per row:
 * exactly the nb floats of room a row has). */
#include "kernels.h"

/* activation rows per pass over a weight row: AVX-512's 32 registers hold 8 rows' sums next to the unpacked weights */
#ifdef __AVX512BW__
#define QK_RB 8
#else
#define QK_RB 4
#endif

static inline int64_t qk_bytes(int type) { return type == W_Q4_K ? 144 : 210; }
int64_t qk_row_bytes(int type, int64_t K) { return K / QK_BLOCK * qk_bytes(type); }

/* x [B, K] (row stride ldx) -> Q8_K as above */
void quantize_qk(const float *x, int64_t ldx, int64_t B, int64_t K, int8_t *q, float *d, float *s) {
    const int64_t nb = K / QB_BLOCK;
    for (int64_t b = 0; b < B; b++)
        for (int64_t i = 0; i < K / QK_BLOCK; i++) {
            const float *xb = x + b * ldx + i * QK_BLOCK;
            int8_t *qb = q + b * K + i * QK_BLOCK;
            int16_t *bs = (int16_t *)(s + b * nb) + i * 16;
            float amax = 0.f, max = 0.f;
            for (int k = 0; k < QK_BLOCK; k++)
                if (fabsf(xb[k]) > amax) { amax = fabsf(xb[k]); max = xb[k]; }
            const float iscale = amax ? -127.f / max : 0.f;
            for (int g = 0; g < 16; g++) {
                int sum = 0;
                for (int k = 16 * g; k < 16 * g + 16; k++) {
                    const int v = (int)rintf(iscale * xb[k]);
                    qb[k] = (int8_t)(v < 127 ? v : 127);
                    sum += qb[k];
                }
                bs[g] = (int16_t)sum;
            }
            d[b * nb + i] = amax ? 1.f / iscale : 0.f;
        }
}

static inline void q4k_scales(const uint8_t *s12, int sc[8], int mn[8]) {
    for (int j = 0; j < 4; j++) {
        sc[j] = s12[j] & 63;
        mn[j] = s12[j + 4] & 63;
        sc[j + 4] = (s12[j + 8] & 0x0F) | ((s12[j] >> 6) << 4);
        mn[j + 4] = (s12[j + 8] >> 4) | ((s12[j + 4] >> 6) << 4);
    }
}

/* one super-block as integers: v[256] (Q4_K 0..15, Q6_K q - 32), a scale and a min per 16 values (Q6_K: no min) */
static void qk_unpack(int type, const uint8_t *blk, int8_t *v, int *sc16, int *mn16, float *dw, float *dmin) {
    if (type == W_Q4_K) {
        int sc[8], mn[8];
        q4k_scales(blk + 4, sc, mn);
        for (int g = 0; g < 16; g++) { sc16[g] = sc[g / 2]; mn16[g] = mn[g / 2]; }
        for (int i = 0; i < 4; i++)
            for (int l = 0; l < 32; l++) {
                v[64 * i + l] = (int8_t)(blk[16 + 32 * i + l] & 0x0F);
                v[64 * i + 32 + l] = (int8_t)(blk[16 + 32 * i + l] >> 4);
            }
        *dw = f16_at(blk);
        *dmin = f16_at(blk + 2);
        return;
    }
    for (int g = 0; g < 16; g++) { sc16[g] = (int8_t)blk[192 + g]; mn16[g] = 0; }
    for (int h = 0; h < 2; h++) {
        const uint8_t *ql = blk + 64 * h, *qh = blk + 128 + 32 * h;
        int8_t *y = v + 128 * h;
        for (int l = 0; l < 32; l++) {
            y[l] = (int8_t)(((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) - 32);
            y[l + 32] = (int8_t)(((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) - 32);
            y[l + 64] = (int8_t)(((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32);
            y[l + 96] = (int8_t)(((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32);
        }
    }
    *dw = f16_at(blk + 208);
    *dmin = 0.f;
}

#ifdef __AVX2__
/* 8 int32 lanes whose sum is sum_j sc_j dot_j for one Q4_K super-block and one activation row */
static inline __m256i q4k_isum(const __m256i lo[4], const __m256i hi[4], const __m256i s_lo[4],
                               const __m256i s_hi[4], const int8_t *x) {
    __m256i acc = _mm256_setzero_si256();
    for (int i = 0; i < 4; i++) {
        const __m256i xl = _mm256_loadu_si256((const __m256i *)(x + 64 * i));
        const __m256i xh = _mm256_loadu_si256((const __m256i *)(x + 64 * i + 32));
        acc = _mm256_add_epi32(acc, _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(lo[i], xl), s_lo[i]),
                                                     _mm256_madd_epi16(_mm256_maddubs_epi16(hi[i], xh), s_hi[i])));
    }
    return acc;
}

#ifdef __AVX512BW__
/* 64 activations: 32 from x + a, then 32 from x + c */
static inline __m512i x_pair(const int8_t *x, int a, int c) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(x + a))),
                              _mm256_loadu_si256((const __m256i *)(x + c)), 1);
}

/* a shuffle that puts int16 k_l of each 128-bit lane l's 8 into all 8 of that lane */
static inline __m512i lane_pick(int k0, int k1, int k2, int k3) {
#define PICK(k) _mm_set1_epi16((short)(((2 * (k) + 1) << 8) | (2 * (k))))
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set_m128i(PICK(k1), PICK(k0))),
                              _mm256_set_m128i(PICK(k3), PICK(k2)), 1);
#undef PICK
}

static inline __m256i fold(__m512i v) {
    return _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1));
}
#endif

/* the 256 Q6_K values of a super-block as unsigned 0..63 (q, not q - 32), in 8 vectors of 32 values */
static inline void q6k_load(const uint8_t *blk, __m256i q[8]) {
    const __m256i m4 = _mm256_set1_epi8(0x0F), m2 = _mm256_set1_epi8(3);
    for (int h = 0; h < 2; h++) {
        const __m256i l0 = _mm256_loadu_si256((const __m256i *)(blk + 64 * h));
        const __m256i l1 = _mm256_loadu_si256((const __m256i *)(blk + 64 * h + 32));
        const __m256i qh = _mm256_loadu_si256((const __m256i *)(blk + 128 + 32 * h));
        q[4 * h + 0] = _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_slli_epi16(_mm256_and_si256(qh, m2), 4));
        q[4 * h + 1] = _mm256_or_si256(_mm256_and_si256(l1, m4),
                                       _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), m2), 4));
        q[4 * h + 2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4),
                                       _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 4), m2), 4));
        q[4 * h + 3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                                       _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 6), m2), 4));
    }
}
#endif

/* out[b] = W[row] . x[b] for RB activation rows (RB constant after inlining): each super-block is unpacked once */
static inline __attribute__((always_inline)) void qk_tile(int type, int RB, const uint8_t *w, int64_t ns,
                                                          const int8_t *q, int64_t K, const float *d,
                                                          const float *s, float *out) {
    const int64_t size = qk_bytes(type), nb = K / QB_BLOCK;
#ifdef __AVX2__
    __m256 acc[QK_RB], amin[QK_RB];
    for (int b = 0; b < RB; b++) acc[b] = amin[b] = _mm256_setzero_ps();
    for (int64_t i = 0; i < ns; i++) {
        const uint8_t *blk = w + i * size;
        _mm_prefetch((const char *)(blk + 2 * size), _MM_HINT_T0);
        if (type == W_Q4_K) {
            /* the 6-bit scales and mins as bytes [sc0..sc7, m0..m7], unpacked 32 bits at a time */
            uint32_t u[4];
            memcpy(u, blk + 4, 12);
            u[3] = ((u[2] >> 4) & 0x0f0f0f0f) | (((u[1] >> 6) & 0x03030303) << 4);
            const uint32_t m03 = u[1] & 0x3f3f3f3f;
            u[1] = (u[2] & 0x0f0f0f0f) | (((u[0] >> 6) & 0x03030303) << 4);
            u[2] = m03;
            u[0] &= 0x3f3f3f3f;
            const __m128i sm = _mm_loadu_si128((const __m128i *)u);
            /* each min twice (int16 lanes 2 j, 2 j + 1: it multiplies both 16-value sums of its sub-block) */
            const __m256i mins = _mm256_cvtepu8_epi16(_mm_shuffle_epi8(sm, _mm_setr_epi8(
                8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15)));
#ifdef __AVX512BW__
            /* 64 bytes of qs at a time: low nibbles = sub-blocks 4 jj (first 256 bits) and 4 jj + 2, high nibbles
             * 4 jj + 1 and 4 jj + 3 */
            const __m512i sc5 = _mm512_broadcast_i32x4(_mm_cvtepu8_epi16(sm));
            __m512i lo[2], hi[2], s_lo[2], s_hi[2];
            for (int jj = 0; jj < 2; jj++) {
                const __m512i raw = _mm512_loadu_si512((const void *)(blk + 16 + 64 * jj));
                lo[jj] = _mm512_and_si512(raw, _mm512_set1_epi8(0x0F));
                hi[jj] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), _mm512_set1_epi8(0x0F));
                s_lo[jj] = _mm512_shuffle_epi8(sc5, lane_pick(4 * jj, 4 * jj, 4 * jj + 2, 4 * jj + 2));
                s_hi[jj] = _mm512_shuffle_epi8(sc5, lane_pick(4 * jj + 1, 4 * jj + 1, 4 * jj + 3, 4 * jj + 3));
            }
#else
            const __m256i sc = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(sm));  /* 8 int16 scales, twice */
            __m256i lo[4], hi[4], s_lo[4], s_hi[4];
            for (int j = 0; j < 4; j++) {
                const __m256i raw = _mm256_loadu_si256((const __m256i *)(blk + 16 + 32 * j));
                lo[j] = _mm256_and_si256(raw, _mm256_set1_epi8(0x0F));
                hi[j] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), _mm256_set1_epi8(0x0F));
                s_lo[j] = _mm256_shuffle_epi8(sc, _mm256_set1_epi16((short)(((4 * j + 1) << 8) | (4 * j))));
                s_hi[j] = _mm256_shuffle_epi8(sc, _mm256_set1_epi16((short)(((4 * j + 3) << 8) | (4 * j + 2))));
            }
#endif
            const float dw = f16_at(blk), dmin = f16_at(blk + 2);
            for (int b = 0; b < RB; b++) {
                const float dx = d[b * nb + i];
#ifdef __AVX512BW__
                const int8_t *x = q + b * K + i * QK_BLOCK;
                __m512i acc5 = _mm512_setzero_si512();
                for (int jj = 0; jj < 2; jj++)
                    acc5 = _mm512_add_epi32(acc5, _mm512_add_epi32(
                        _mm512_madd_epi16(_mm512_maddubs_epi16(lo[jj], x_pair(x, 128 * jj, 128 * jj + 64)), s_lo[jj]),
                        _mm512_madd_epi16(_mm512_maddubs_epi16(hi[jj], x_pair(x, 128 * jj + 32, 128 * jj + 96)),
                                          s_hi[jj])));
                const __m256i isum = fold(acc5);
#else
                const __m256i isum = q4k_isum(lo, hi, s_lo, s_hi, q + b * K + i * QK_BLOCK);
#endif
                const __m256i bs = _mm256_loadu_si256((const __m256i *)((const int16_t *)(s + b * nb) + 16 * i));
                acc[b] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(dw * dx), acc[b]);
                amin[b] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(bs, mins)), _mm256_set1_ps(dmin * dx),
                                          amin[b]);
            }
        } else {
            const int8_t *sc = (const int8_t *)blk + 192;
            const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)sc));
#ifdef __AVX512BW__
            /* per half h: qa = values 128 h + 0..63 (ql low nibbles, qh bits 0-1 then 2-3), qb = values 64..127
             * (high nibbles, qh bits 4-5 then 6-7); 128-bit lane l of qa has scale 8 h + l, of qb 8 h + 4 + l */
            const __m512i m4 = _mm512_set1_epi8(0x0F), m2 = _mm512_set1_epi8(3);
            const __m512i sh_a = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(2), 1);
            const __m512i sh_b = _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(6), 1);
            __m512i qa[2], qb[2], sa[2], sb[2];
            for (int h = 0; h < 2; h++) {
                const __m512i l = _mm512_loadu_si512((const void *)(blk + 64 * h));
                const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(blk + 128 + 32 * h)));
                qa[h] = _mm512_or_si512(_mm512_and_si512(l, m4),
                                        _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi16(qh, sh_a), m2), 4));
                qb[h] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(l, 4), m4),
                                        _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi16(qh, sh_b), m2), 4));
                const __m512i s8 = _mm512_broadcast_i32x4(h ? _mm256_extracti128_si256(sc16, 1)
                                                            : _mm256_castsi256_si128(sc16));
                sa[h] = _mm512_shuffle_epi8(s8, lane_pick(0, 1, 2, 3));
                sb[h] = _mm512_shuffle_epi8(s8, lane_pick(4, 5, 6, 7));
            }
#else
            __m256i qv[8], sv[8];
            q6k_load(blk, qv);
            /* qv[4 h + r] holds values 128 h + 32 r .. + 31: scales g, g + 1 (lanes 0-7, 8-15), g = 8 h + 2 r */
            for (int j = 0; j < 8; j++) {
                const int r = j % 4;
                const __m256i half = j < 4 ? _mm256_permute4x64_epi64(sc16, 0x44) : _mm256_permute4x64_epi64(sc16, 0xEE);
                sv[j] = _mm256_shuffle_epi8(half, _mm256_set_m128i(_mm_set1_epi16((short)(((4 * r + 3) << 8) | (4 * r + 2))),
                                                                   _mm_set1_epi16((short)(((4 * r + 1) << 8) | (4 * r)))));
            }
#endif
            const float dw = f16_at(blk + 208);
            for (int b = 0; b < RB; b++) {
                const int8_t *x = q + b * K + i * QK_BLOCK;
#ifdef __AVX512BW__
                __m512i acc5 = _mm512_setzero_si512();
                for (int h = 0; h < 2; h++)
                    acc5 = _mm512_add_epi32(acc5, _mm512_add_epi32(
                        _mm512_madd_epi16(_mm512_maddubs_epi16(qa[h], _mm512_loadu_si512((const void *)(x + 128 * h))),
                                          sa[h]),
                        _mm512_madd_epi16(_mm512_maddubs_epi16(qb[h], _mm512_loadu_si512((const void *)(x + 128 * h + 64))),
                                          sb[h])));
                __m256i isum = fold(acc5);
#else
                __m256i isum = _mm256_setzero_si256();
                for (int j = 0; j < 8; j++)
                    isum = _mm256_add_epi32(isum, _mm256_madd_epi16(_mm256_maddubs_epi16(
                        qv[j], _mm256_loadu_si256((const __m256i *)(x + 32 * j))), sv[j]));
#endif
                const __m256i bs = _mm256_loadu_si256((const __m256i *)((const int16_t *)(s + b * nb) + 16 * i));
                isum = _mm256_sub_epi32(isum, _mm256_slli_epi32(_mm256_madd_epi16(bs, sc16), 5));  /* the -32 */
                acc[b] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(dw * d[b * nb + i]), acc[b]);
            }
        }
    }
    for (int b = 0; b < RB; b++) out[b] = hsum(acc[b]) - hsum(amin[b]);
#else
    int8_t v[QK_BLOCK];
    int sc16[16], mn16[16];
    float dw, dmin;
    for (int b = 0; b < RB; b++) out[b] = 0.f;
    for (int64_t i = 0; i < ns; i++) {
        qk_unpack(type, w + i * size, v, sc16, mn16, &dw, &dmin);
        for (int b = 0; b < RB; b++) {
            const int8_t *x = q + b * K + i * QK_BLOCK;
            const int16_t *bs = (const int16_t *)(s + b * nb) + 16 * i;
            int32_t dot = 0, mins = 0;
            for (int g = 0; g < 16; g++) {
                int32_t part = 0;
                for (int k = 16 * g; k < 16 * g + 16; k++) part += v[k] * x[k];
                dot += sc16[g] * part;
                mins += mn16[g] * bs[g];
            }
            out[b] += dw * d[b * nb + i] * (float)dot - dmin * d[b * nb + i] * (float)mins;
        }
    }
#endif
}

#define QK_CASE(T, RB) case RB: qk_tile(T, RB, w, ns, q, K, d, s, out); return;
#ifdef __AVX512BW__
#define QK_MORE(T) QK_CASE(T, 5) QK_CASE(T, 6) QK_CASE(T, 7) QK_CASE(T, 8)
#else
#define QK_MORE(T)
#endif
#define QK_TYPE(T)                                                                                                 \
    static void qk_tile_##T(int RB, const uint8_t *w, int64_t ns, const int8_t *q, int64_t K, const float *d,     \
                            const float *s, float *out) {                                                          \
        switch (RB) {                                                                                              \
            QK_CASE(T, 1) QK_CASE(T, 2) QK_CASE(T, 3) QK_CASE(T, 4) QK_MORE(T)                                    \
        }                                                                                                          \
    }
QK_TYPE(W_Q4_K)
QK_TYPE(W_Q6_K)

/* row n of a K-quant matrix: its type and bytes. W_QK_MIX (rows of both types, e.g. q|k|v with a Q6_K v):
 * m->scale points to int64 [1 + 3 parts]: the part count, then per part (end row, type, byte offset in m->w) */
static inline const uint8_t *qk_row(const Mat *m, int64_t n, int *type) {
    if (m->type != W_QK_MIX) {
        *type = (int)m->type;
        return (const uint8_t *)m->w + n * qk_row_bytes(*type, m->cols);
    }
    const int64_t *t = (const int64_t *)m->scale;
    int64_t row0 = 0, p = 0;
    while (p < t[0] - 1 && n >= t[1 + 3 * p]) row0 = t[1 + 3 * p++];
    *type = (int)t[2 + 3 * p];
    return (const uint8_t *)m->w + t[3 + 3 * p] + (n - row0) * qk_row_bytes(*type, m->cols);
}

void matvec_qk(const Mat *m, const int8_t *q, const float *d, const float *s, int64_t B, int64_t n0, int64_t n1,
               float *y, int64_t ldy, int accumulate) {
    const int64_t K = m->cols, ns = K / QK_BLOCK, nb = K / QB_BLOCK;
    float out[QK_RB];
    if (B == 1) {  /* decode: the one-row tiles inlined here (a call and a switch per weight row cost ~10 %) */
        for (int64_t n = n0; n < n1; n++) {
            int type;
            const uint8_t *w = qk_row(m, n, &type);
            if (type == W_Q4_K) qk_tile(W_Q4_K, 1, w, ns, q, K, d, s, out);
            else qk_tile(W_Q6_K, 1, w, ns, q, K, d, s, out);
            y[n] = accumulate ? y[n] + out[0] : out[0];
        }
        return;
    }
    for (int64_t n = n0; n < n1; n++) {
        int type;
        const uint8_t *w = qk_row(m, n, &type);
        for (int64_t b = 0; b < B;) {
            const int RB = B - b >= QK_RB ? QK_RB : (int)(B - b);
            if (type == W_Q4_K) qk_tile_W_Q4_K(RB, w, ns, q + b * K, K, d + b * nb, s + b * nb, out);
            else qk_tile_W_Q6_K(RB, w, ns, q + b * K, K, d + b * nb, s + b * nb, out);
            for (int i = 0; i < RB; i++) {
                float *dst = y + (b + i) * ldy + n;
                *dst = accumulate ? *dst + out[i] : out[i];
            }
            b += RB;
        }
    }
}

/* dst [K] = row `row` as fp32, in the order llama.cpp's dequantize_row_q4_K / _q6_K multiply */
void dequant_row_qk(const Mat *m, int64_t row, float *dst) {
    int type;
    const uint8_t *w = qk_row(m, row, &type);
    int8_t v[QK_BLOCK];
    int sc16[16], mn16[16];
    float dw, dmin;
    for (int64_t i = 0; i < m->cols / QK_BLOCK; i++) {
        qk_unpack(type, w + i * qk_bytes(type), v, sc16, mn16, &dw, &dmin);
#ifdef __AVX2__
        for (int g = 0; g < 16; g++) {  /* rounded as the portable loop below: (dw * sc) * v, minus dmin * mn */
            const __m256 s = _mm256_set1_ps(dw * (float)sc16[g]), o = _mm256_set1_ps(dmin * (float)mn16[g]);
            for (int h = 0; h < 16; h += 8) {
                const __m128i raw = _mm_loadl_epi64((const __m128i *)(v + 16 * g + h));
                const __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw));
                _mm256_storeu_ps(dst + i * QK_BLOCK + 16 * g + h, _mm256_sub_ps(_mm256_mul_ps(f, s), o));
            }
        }
#else
        for (int k = 0; k < QK_BLOCK; k++)
            dst[i * QK_BLOCK + k] = type == W_Q4_K ? dw * (float)sc16[k / 16] * (float)v[k] - dmin * (float)mn16[k / 16]
                                                   : dw * (float)sc16[k / 16] * (float)v[k];
#endif
    }
}
