/* GGUF blocks (Q8_0, Q4_0, Q4_1, Q5_0) of a W_FP32_ACT matrix times one to QF_MAX_B fp32 activation rows. Each block
 * is widened in registers to the values gguf's dequantize gives (d * q, Q4_1 d * q + m, each rounded once), so the
 * products are those of the dequantized fp32 matrix up to the order of the sums: the numbers of an fp32 import of
 * the file from a quarter (Q4) or half (Q8_0) of its memory traffic. Layouts: qblock.c. */
#include "kernels.h"

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define QF_RN 4  /* weight rows per pass: QF_RN * B independent sums next to one block's 32 widened weights */

/* the 32 weights of one block as fp32: k 0-15 in w[0], 16-31 in w[1] */
static inline __attribute__((always_inline)) void qf_block(int type, const uint8_t *blk, __m512 w[2]) {
    __m512i v0, v1;
    if (type == W_Q8_0) {
        v0 = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(blk + 2)));
        v1 = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(blk + 18)));
    } else {  /* byte i holds value i (low nibble) and value 16 + i (high nibble) */
        const __m512i raw = _mm512_cvtepu8_epi32(_mm_loadu_si128(
            (const __m128i *)(blk + (type == W_Q4_1 ? 4 : type == W_Q5_0 ? 6 : 2))));
        v0 = _mm512_and_si512(raw, _mm512_set1_epi32(15));
        v1 = _mm512_srli_epi32(raw, 4);
        if (type == W_Q5_0) {  /* bit k of qh is the fifth bit of value k */
            uint32_t qh;
            memcpy(&qh, blk + 2, 4);
            v0 = _mm512_mask_or_epi32(v0, (__mmask16)qh, v0, _mm512_set1_epi32(16));
            v1 = _mm512_mask_or_epi32(v1, (__mmask16)(qh >> 16), v1, _mm512_set1_epi32(16));
        }
        if (type != W_Q4_1) {
            const __m512i offset = _mm512_set1_epi32(type == W_Q5_0 ? 16 : 8);
            v0 = _mm512_sub_epi32(v0, offset);
            v1 = _mm512_sub_epi32(v1, offset);
        }
    }
    const __m512 d = _mm512_set1_ps(f16_at(blk));
    w[0] = _mm512_mul_ps(_mm512_cvtepi32_ps(v0), d);
    w[1] = _mm512_mul_ps(_mm512_cvtepi32_ps(v1), d);
    if (type == W_Q4_1) {
        const __m512 m = _mm512_set1_ps(f16_at(blk + 2));
        w[0] = _mm512_add_ps(w[0], m);
        w[1] = _mm512_add_ps(w[1], m);
    }
}

/* out[r * B + b] = W[r] . x[b] for RN weight rows and B activation rows (both constant after inlining) */
static inline __attribute__((always_inline)) void qf_rows(int type, int RN, int B, const uint8_t *w,
                                                          int64_t row_bytes, int64_t nb, const float *x, int64_t ldx,
                                                          float *out) {
    const int64_t size = qb_bytes(type);
    const int NA = B <= 2 ? 2 : 1;  /* sums per (row, x row): two halve the FMA chains' latency where registers allow */
    __m512 acc[QF_RN * QF_MAX_B];
    for (int i = 0; i < RN * B * NA; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t j = 0; j < nb; j++)
        for (int r = 0; r < RN; r++) {
            const uint8_t *blk = w + r * row_bytes + j * size;
            _mm_prefetch((const char *)(blk + RN * row_bytes), _MM_HINT_T0);  /* the next pass's rows */
            __m512 wv[2];
            qf_block(type, blk, wv);
            for (int b = 0; b < B; b++) {
                const float *xb = x + b * ldx + j * QB_BLOCK;
                __m512 *a = acc + (r * B + b) * NA;
                a[0] = _mm512_fmadd_ps(wv[0], _mm512_loadu_ps(xb), a[0]);
                a[NA - 1] = _mm512_fmadd_ps(wv[1], _mm512_loadu_ps(xb + 16), a[NA - 1]);
            }
        }
    for (int i = 0; i < RN * B; i++)
        out[i] = _mm512_reduce_add_ps(NA == 2 ? _mm512_add_ps(acc[2 * i], acc[2 * i + 1]) : acc[i]);
}

#define QF_CASE(T, RN, B) case RN * 8 + B: qf_rows(T, RN, B, w, row_bytes, nb, x, ldx, out); return;
#define QF_TYPE(T)                                                                                                 \
    static void qf_rows_##T(int RN, int B, const uint8_t *w, int64_t row_bytes, int64_t nb, const float *x,       \
                            int64_t ldx, float *out) {                                                             \
        switch (RN * 8 + B) { QF_CASE(T, 4, 1) QF_CASE(T, 4, 2) QF_CASE(T, 4, 3) QF_CASE(T, 4, 4)                  \
                              QF_CASE(T, 1, 1) QF_CASE(T, 1, 2) QF_CASE(T, 1, 3) QF_CASE(T, 1, 4) }                \
    }
QF_TYPE(W_Q8_0)
QF_TYPE(W_Q4_0)
QF_TYPE(W_Q4_1)
QF_TYPE(W_Q5_0)

int matvec_qf(const Mat *m, const float *x, int64_t ldx, int64_t B, int64_t n0, int64_t n1, float *y, int64_t ldy,
              int accumulate) {
    const int type = (int)(m->type - W_FP32_ACT);
    if (B > QF_MAX_B || qk_type(type)) return 0;
    const int64_t nb = m->cols / QB_BLOCK, row_bytes = nb * qb_bytes(type);
    float out[QF_RN * QF_MAX_B];
    for (int64_t n = n0; n < n1;) {
        const int RN = n1 - n >= QF_RN ? QF_RN : 1;
        const uint8_t *w = (const uint8_t *)m->w + n * row_bytes;
        if (type == W_Q8_0) qf_rows_W_Q8_0(RN, (int)B, w, row_bytes, nb, x, ldx, out);
        else if (type == W_Q4_0) qf_rows_W_Q4_0(RN, (int)B, w, row_bytes, nb, x, ldx, out);
        else if (type == W_Q5_0) qf_rows_W_Q5_0(RN, (int)B, w, row_bytes, nb, x, ldx, out);
        else qf_rows_W_Q4_1(RN, (int)B, w, row_bytes, nb, x, ldx, out);
        for (int r = 0; r < RN; r++)
            for (int64_t b = 0; b < B; b++) {
                float *dst = y + b * ldy + n + r;
                *dst = accumulate ? *dst + out[r * B + b] : out[r * B + b];
            }
        n += RN;
    }
    return 1;
}
#else
int matvec_qf(const Mat *m, const float *x, int64_t ldx, int64_t B, int64_t n0, int64_t n1, float *y, int64_t ldy,
              int accumulate) {
    (void)m, (void)x, (void)ldx, (void)B, (void)n0, (void)n1, (void)y, (void)ldy, (void)accumulate;
    return 0;
}
#endif
