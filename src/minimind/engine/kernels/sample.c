/* The engine's sampler in C (engine/sampling.py's rules): temperature, top-k / top-p / min-p, then Gumbel-max with
 * the counter-based noise, one pass per row. In torch the noise alone builds ~15 [B, V] int64/float temporaries
 * (3 ms of a 20 ms step at 32 rows x 6400 tokens) and top-p sorts the whole vocabulary. Same hash, same uniform,
 * same -log(-log(u)); the logs are an 8-lane polynomial (Cephes logf, < 2 ulp), so a token can differ from the
 * torch path only where two candidates tie to ~1e-6. */
#include <omp.h>
#include "kernels.h"

static inline uint32_t fmix32(uint32_t h) {
    h ^= h >> 16;
    h *= 0x85EBCA6Bu;
    h ^= h >> 13;
    h *= 0xC2B2AE35u;
    return h ^ (h >> 16);
}

#ifdef __AVX2__
static inline __m256i fmix32_8(__m256i h) {
    h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
    h = _mm256_mullo_epi32(h, _mm256_set1_epi32((int)0x85EBCA6Bu));
    h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 13));
    h = _mm256_mullo_epi32(h, _mm256_set1_epi32((int)0xC2B2AE35u));
    return _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
}

/* natural log of 8 positive normal floats (Cephes logf: mantissa in [sqrt(1/2), sqrt(2)), degree-8 polynomial) */
static inline __m256 log8(__m256 x) {
    __m256i bits = _mm256_castps_si256(x);
    __m256 e = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(127)));
    __m256 m = _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(0x007FFFFF)),
                                                   _mm256_set1_epi32(0x3F800000)));  /* [1, 2) */
    __m256 big = _mm256_cmp_ps(m, _mm256_set1_ps(1.41421356237f), _CMP_GT_OQ);
    m = _mm256_blendv_ps(m, _mm256_mul_ps(m, _mm256_set1_ps(0.5f)), big);
    e = _mm256_add_ps(e, _mm256_and_ps(big, _mm256_set1_ps(1.f)));
    __m256 t = _mm256_sub_ps(m, _mm256_set1_ps(1.f)), z = _mm256_mul_ps(t, t);
    __m256 y = _mm256_set1_ps(7.0376836292e-2f);
    y = _mm256_fmadd_ps(y, t, _mm256_set1_ps(-1.1514610310e-1f));
    y = _mm256_fmadd_ps(y, t, _mm256_set1_ps(1.1676998740e-1f));
    y = _mm256_fmadd_ps(y, t, _mm256_set1_ps(-1.2420140846e-1f));
    y = _mm256_fmadd_ps(y, t, _mm256_set1_ps(1.4249322787e-1f));
    y = _mm256_fmadd_ps(y, t, _mm256_set1_ps(-1.6668057665e-1f));
    y = _mm256_fmadd_ps(y, t, _mm256_set1_ps(2.0000714765e-1f));
    y = _mm256_fmadd_ps(y, t, _mm256_set1_ps(-2.4999993993e-1f));
    y = _mm256_fmadd_ps(y, t, _mm256_set1_ps(3.3333331174e-1f));
    y = _mm256_mul_ps(_mm256_mul_ps(y, t), z);
    y = _mm256_fmadd_ps(e, _mm256_set1_ps(-2.12194440e-4f), y);
    y = _mm256_fnmadd_ps(z, _mm256_set1_ps(0.5f), y);
    return _mm256_fmadd_ps(e, _mm256_set1_ps(0.693359375f), _mm256_add_ps(t, y));
}
#endif

/* argmax_v(row[v] + gumbel(seed, step, v)), the row already divided by the temperature and filtered; first index
 * on ties, like torch.argmax */
static int64_t gumbel_row(const float *row, int64_t V, int64_t seed, int64_t step) {
    const uint32_t key = fmix32((uint32_t)seed ^ fmix32((uint32_t)((uint64_t)step * 0x9E3779B1u + 0x7F4A7C15u)));
    float best = -INFINITY;
    int64_t arg = 0, v = 0;
#ifdef __AVX2__
    __m256 bv = _mm256_set1_ps(-INFINITY);
    __m256i bi = _mm256_setzero_si256(), idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i kv = _mm256_set1_epi32((int)key), eight = _mm256_set1_epi32(8);
    for (; v + 8 <= V; v += 8) {
        __m256i h = _mm256_add_epi32(_mm256_mullo_epi32(idx, _mm256_set1_epi32(0x27D4EB2F)), _mm256_set1_epi32(0x165667B1));
        h = fmix32_8(_mm256_xor_si256(kv, h));
        __m256 u = _mm256_mul_ps(_mm256_add_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(h, 8)), _mm256_set1_ps(0.5f)),
                                 _mm256_set1_ps(1.0f / (1 << 24)));
        __m256 g = _mm256_sub_ps(_mm256_setzero_ps(), log8(_mm256_sub_ps(_mm256_setzero_ps(), log8(u))));
        __m256 val = _mm256_add_ps(_mm256_loadu_ps(row + v), g);
        __m256 gt = _mm256_cmp_ps(val, bv, _CMP_GT_OQ);  /* strictly greater: earlier index wins ties */
        bv = _mm256_blendv_ps(bv, val, gt);
        bi = _mm256_blendv_epi8(bi, idx, _mm256_castps_si256(gt));
        idx = _mm256_add_epi32(idx, eight);
    }
    float vals[8];
    int32_t ids[8];
    _mm256_storeu_ps(vals, bv);
    _mm256_storeu_si256((__m256i *)ids, bi);
    for (int l = 0; l < 8; l++)
        if (vals[l] > best || (vals[l] == best && ids[l] < arg)) best = vals[l], arg = ids[l];
#endif
    for (; v < V; v++) {
        uint32_t h = fmix32(key ^ ((uint32_t)v * 0x27D4EB2Fu + 0x165667B1u));
        float u = ((float)(h >> 8) + 0.5f) * (1.0f / (1 << 24));
        float val = row[v] - logf(-logf(u));
        if (val > best) best = val, arg = v;
    }
    return arg;
}

/* ---- top-k / top-p / min-p (engine/sampling.py filter_logits' rules) without sorting the vocabulary ----
 * Only the tokens near the maximum can survive: candidates within `delta` of it are gathered and sorted, delta
 * doubling until they hold the k-th token (top-k) and the top-p mass; the rest of the row is dropped unseen. */
typedef struct {
    float v;
    int32_t i;
} Cand;

static int by_value_desc(const void *a, const void *b) {
    const Cand *x = a, *y = b;
    return x->v > y->v ? -1 : x->v < y->v ? 1 : x->i - y->i;  /* ties: the lower token id first */
}

/* the probabilities' normalizer sum_v exp(row[v] - m) */
static double exp_sum(const float *row, int64_t V, float m) {
    double z = 0.0;
    int64_t v = 0;
#ifdef __AVX2__
    __m256 acc = _mm256_setzero_ps();
    for (; v + 8 <= V; v += 8) acc = _mm256_add_ps(acc, exp8(_mm256_sub_ps(_mm256_loadu_ps(row + v), _mm256_set1_ps(m))));
    z = hsum(acc);
#endif
    for (; v < V; v++) z += exp((double)row[v] - m);
    return z;
}

/* row (already divided by the temperature) -> -inf where top_k (k > 0), top_p (< 1) or min_p (> 0) drop a token:
 * ranks >= k; a token whose more likely tokens already hold top_p of the mass; probability < min_p times the
 * top one's. The most likely token always stays. c: V candidates of scratch. */
static void filter_row(float *row, int64_t V, int64_t k, float top_p, float min_p, Cand *c) {
    const int use_k = k > 0 && k < V, use_p = top_p < 1.f;
    if (!use_k && !use_p && !(min_p > 0.f)) return;
    float m = -INFINITY;
    for (int64_t v = 0; v < V; v++) m = row[v] > m ? row[v] : m;
    if (m == -INFINITY) return;
    int64_t n = 0;
    double z = use_k ? 0.0 : exp_sum(row, V, m);  /* top-k: the probabilities are over the kept tokens (below) */
    /* min_p keeps tokens down to m + log(min_p): the first round reaches that far */
    for (float delta = min_p > 0.f ? fmaxf(4.f, 1.f - logf(min_p)) : 4.f;; delta *= 2.f) {
        const int all = delta > 512.f;  /* the last round takes every finite logit */
        n = 0;
        for (int64_t v = 0; v < V; v++)
            if (all ? row[v] > -INFINITY : row[v] >= m - delta) c[n++] = (Cand){row[v], (int32_t)v};
        if (use_k && n < k && !all) continue;
        qsort(c, (size_t)n, sizeof(Cand), by_value_desc);
        if (use_k && n > k) n = k;
        double mass = 0.0;
        for (int64_t i = 0; i < n; i++) mass += exp((double)c[i].v - m);
        if (use_k) z = mass;
        if (!use_p || all || mass >= top_p * z || (use_k && n == k)) break;
    }
    int64_t keep = n;
    double before = 0.0;
    for (int64_t i = 0; i < n && use_p; i++) {  /* mass strictly before token i reaches top_p: it and the rest go */
        if (i > 0 && before >= top_p * z) { keep = i; break; }
        before += exp((double)c[i].v - m);
    }
    for (int64_t v = 0; v < V; v++) row[v] = -INFINITY;
    for (int64_t i = 0; i < keep; i++)  /* min_p: p_i < min_p * p_top  <=>  exp(v_i - m) < min_p */
        if (i == 0 || !(exp((double)c[i].v - m) < (double)min_p)) row[c[i].i] = c[i].v;
}

/* One token per row: argmax where temperature[b] == 0, else a Gumbel-max draw from the row divided by its
 * temperature and filtered as above (top_k 0, top_p 1, min_p 0: off). logits stay as they are. Returns 0, or -1
 * without scratch memory. */
int minimind_sample(const float *logits, int64_t B, int64_t V, const float *temperature, const int64_t *top_k,
                    const float *top_p, const float *min_p, const int64_t *seeds, const int64_t *steps, int64_t *out,
                    int nthreads) {
    int status = 0;
#pragma omp parallel num_threads(B > 1 ? nthreads : 1)
    {
        float *row = malloc(sizeof(float) * (size_t)V);
        Cand *c = malloc(sizeof(Cand) * (size_t)V);
        if (!row || !c) {
#pragma omp atomic write
            status = -1;
        }
#pragma omp for schedule(static)
        for (int64_t b = 0; b < B; b++) {
            const float *in = logits + b * V, t = temperature[b];
            if (!row || !c) continue;
            if (t <= 0.f) {
                int64_t arg = 0;
                for (int64_t v = 1; v < V; v++)  /* the first of equal maxima, as torch.argmax */
                    if (in[v] > in[arg]) arg = v;
                out[b] = arg;
                continue;
            }
            for (int64_t v = 0; v < V; v++) row[v] = t != 1.f ? in[v] / t : in[v];  /* a division, as torch's */
            filter_row(row, V, top_k[b], top_p[b], min_p[b], c);
            out[b] = gumbel_row(row, V, seeds[b], steps[b]);
        }
        free(row);
        free(c);
    }
    return status;
}
