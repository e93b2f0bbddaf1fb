/* Attention, norms, RoPE and SiLU of the fused decode step (fp32). */
#include "kernels.h"

/* out = silu(gate) * up over n values */
void silu_mul(const float *gate, const float *up, int64_t n, float *out) {
    int64_t i = 0;
#ifdef __AVX2__
    for (; i + 8 <= n; i += 8) {
        __m256 g = _mm256_loadu_ps(gate + i);
        __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.f), e)),
                                                _mm256_loadu_ps(up + i)));
    }
#endif
    for (; i < n; i++) out[i] = gate[i] / (1.f + expf(-gate[i])) * up[i];
}

/* sc[j] = exp(sc[j] - max) over j < len; returns 1 / sum */
static float softmax_exp(float *sc, int64_t len) {
    float mx = -INFINITY, sum = 0.f;
    int64_t j = 0;
    j = 0;
#ifdef __AVX2__
    __m256 mv = _mm256_set1_ps(-INFINITY);
    for (; j + 8 <= len; j += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(sc + j));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mv), _mm256_extractf128_ps(mv, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    mx = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
#endif
    for (; j < len; j++) mx = sc[j] > mx ? sc[j] : mx;
    j = 0;
#ifdef __AVX2__
    __m256 acc = _mm256_setzero_ps();
    for (; j + 8 <= len; j += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(sc + j), _mm256_set1_ps(mx)));
        _mm256_storeu_ps(sc + j, e);
        acc = _mm256_add_ps(acc, e);
    }
    sum = hsum(acc);
#endif
    for (; j < len; j++) sum += (sc[j] = expf(sc[j] - mx));
    return 1.f / sum;
}

#define VCHUNK 64  /* keys per pass over the values: 64 x D floats stay in L1 for every head of the group */

#ifdef __AVX2__
/* 8 cached values from fp32 or fp16 storage (F16C widens in one instruction) */
static inline __attribute__((always_inline)) __m256 kv8(const void *p, int64_t i, const int f16) {
    return f16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i)))
               : _mm256_loadu_ps((const float *)p + i);
}
#endif

static inline __attribute__((always_inline)) float kv1(const void *p, int64_t i, const int f16) {
    return f16 ? half_to_float(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* The `group` query heads q [group, D] that share one kv head: softmax(q . keys[j] * scale) over j < len, then
 * the weighted sum of values[j] into o [group, D]. Keys and values ([len, D], fp32 or fp16 when f16) are read
 * from memory once for the whole group (GQA), not once per query head. sc: group * len floats. Inlined twice
 * with a constant f16, so neither copy tests the storage type inside its loops. */
static inline __attribute__((always_inline)) void attend(const float *q, int group, const void *keys,
                                                         const void *vals, int64_t len, int64_t D, float scale,
                                                         float *sc, float *o, const int f16) {
    int64_t j = 0;
#ifdef __AVX2__
    if (D % 8 == 0)  /* eight keys at a time: independent FMA chains, then one transposing reduction (hadd) */
        for (; j + 8 <= len; j += 8) {
            const int64_t k0 = j * D;
            for (int h = 0; h < group; h++) {
                const float *qh = q + h * D;
                __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
                for (int64_t i = 0; i < D; i += 8) {
                    const __m256 qv = _mm256_loadu_ps(qh + i);
                    a0 = _mm256_fmadd_ps(qv, kv8(keys, k0 + i, f16), a0);
                    a1 = _mm256_fmadd_ps(qv, kv8(keys, k0 + D + i, f16), a1);
                    a2 = _mm256_fmadd_ps(qv, kv8(keys, k0 + 2 * D + i, f16), a2);
                    a3 = _mm256_fmadd_ps(qv, kv8(keys, k0 + 3 * D + i, f16), a3);
                    a4 = _mm256_fmadd_ps(qv, kv8(keys, k0 + 4 * D + i, f16), a4);
                    a5 = _mm256_fmadd_ps(qv, kv8(keys, k0 + 5 * D + i, f16), a5);
                    a6 = _mm256_fmadd_ps(qv, kv8(keys, k0 + 6 * D + i, f16), a6);
                    a7 = _mm256_fmadd_ps(qv, kv8(keys, k0 + 7 * D + i, f16), a7);
                }
                /* [a0..a7] -> the 8 sums: pairwise hadds leave each 128-bit half with partial sums of 4 keys */
                const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
                const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
                const __m256 sums = _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
                _mm256_storeu_ps(sc + h * len + j, _mm256_mul_ps(sums, _mm256_set1_ps(scale)));
            }
        }
#endif
    for (; j < len; j++)
        for (int h = 0; h < group; h++) {
            float s = 0.f;
            for (int64_t i = 0; i < D; i++) s += q[h * D + i] * kv1(keys, j * D + i, f16);
            sc[h * len + j] = s * scale;
        }
    float inv[group];
    for (int h = 0; h < group; h++) inv[h] = softmax_exp(sc + h * len, len);
    memset(o, 0, sizeof(float) * group * D);
    for (int64_t j0 = 0; j0 < len; j0 += VCHUNK) {
        const int64_t j1 = j0 + VCHUNK < len ? j0 + VCHUNK : len;
        for (int h = 0; h < group; h++) {
            const float *p = sc + h * len;
            float *oh = o + h * D;
            int64_t i = 0;
#ifdef __AVX2__
            for (; i + 32 <= D; i += 32) {  /* 32 output lanes in registers across the chunk's positions */
                __m256 o0 = _mm256_loadu_ps(oh + i), o1 = _mm256_loadu_ps(oh + i + 8);
                __m256 o2 = _mm256_loadu_ps(oh + i + 16), o3 = _mm256_loadu_ps(oh + i + 24);
                for (j = j0; j < j1; j++) {
                    const __m256 pj = _mm256_set1_ps(p[j]);
                    const int64_t v = j * D + i;
                    o0 = _mm256_fmadd_ps(pj, kv8(vals, v, f16), o0);
                    o1 = _mm256_fmadd_ps(pj, kv8(vals, v + 8, f16), o1);
                    o2 = _mm256_fmadd_ps(pj, kv8(vals, v + 16, f16), o2);
                    o3 = _mm256_fmadd_ps(pj, kv8(vals, v + 24, f16), o3);
                }
                _mm256_storeu_ps(oh + i, o0), _mm256_storeu_ps(oh + i + 8, o1);
                _mm256_storeu_ps(oh + i + 16, o2), _mm256_storeu_ps(oh + i + 24, o3);
            }
#endif
            for (; i < D; i++) {
                float acc = oh[i];
                for (j = j0; j < j1; j++) acc += p[j] * kv1(vals, j * D + i, f16);
                oh[i] = acc;
            }
        }
    }
    for (int h = 0; h < group; h++)
        for (int64_t i = 0; i < D; i++) o[h * D + i] *= inv[h];
}

void attend_group(const float *q, int group, const void *keys, const void *vals, int64_t len, int64_t D,
                  float scale, float *sc, float *o, int f16) {
    if (f16) attend(q, group, keys, vals, len, D, scale, sc, o, 1);
    else attend(q, group, keys, vals, len, D, scale, sc, o, 0);
}

/* dst[i] = x[i] for i < n into fp32 or (rounded to nearest even, as torch's .half()) fp16 storage */
void kv_store(void *dst, const float *x, int64_t n, int f16) {
    if (!f16) { memcpy(dst, x, sizeof(float) * n); return; }
    uint16_t *d = dst;
    int64_t i = 0;
#ifdef __AVX2__
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(d + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
#endif
    for (; i < n; i++) d[i] = float_to_half(x[i]);
}

void rms_norm(const float *x, const float *w, int64_t n, double eps, float *out) {
    float ss = 0.f;
    int64_t i = 0;
#ifdef __AVX2__
    __m256 a0 = _mm256_setzero_ps(), a1 = a0;  /* vectorized: every thread normalizes all B rows (no barrier) */
    for (; i + 16 <= n; i += 16) {
        const __m256 x0 = _mm256_loadu_ps(x + i), x1 = _mm256_loadu_ps(x + i + 8);
        a0 = _mm256_fmadd_ps(x0, x0, a0), a1 = _mm256_fmadd_ps(x1, x1, a1);
    }
    ss = hsum(_mm256_add_ps(a0, a1));
#endif
    for (; i < n; i++) ss += x[i] * x[i];
    const float inv = (float)(1.0 / sqrt((double)ss / (double)n + eps));
    for (i = 0; i < n; i++) out[i] = x[i] * inv * w[i];
}

/* HF rotate-half RoPE on one head, in place: cos/sin [D] for this row's position. */
void rope(float *x, const float *cos, const float *sin, int64_t D) {
    int64_t half = D / 2;
    for (int64_t i = 0; i < half; i++) {
        float a = x[i], b = x[i + half];
        x[i] = a * cos[i] - b * sin[i];
        x[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

