/* Shared by the fused decode kernels (decode.c, linear.c, attention.c): weight descriptions and AVX2 helpers.
 * Built at first use by minimind/engine/fused.py: cc -O3 -march=native -fopenmp, the .c files into one library. */
#ifndef MINIMIND_KERNELS_H
#define MINIMIND_KERNELS_H
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define HIDDEN __attribute__((visibility("hidden")))

/* 3-5, 9: GGUF blocks of 32 (qblock.c); 6-8: GGUF K-quant super-blocks of 256 (qkblock.c), 8: rows of both */
enum { W_F32 = 0, W_BF16 = 1, W_I8 = 2, W_Q8_0 = 3, W_Q4_0 = 4, W_Q4_1 = 5, W_Q4_K = 6, W_Q6_K = 7, W_QK_MIX = 8,
       W_Q5_0 = 9 };
/* added to a GGUF block type (3-9): W_FP32_ACT, its products take the fp32 activations as they are, the blocks
 * widened to fp32 in registers (qfloat.c) or for the packed GEMM (linear.c), instead of activations rounded to
 * 8 bits per block (qblock.c); W_AUTO_ACT, the first for products of GEMM_MIN_ROWS rows or more (prompts, large
 * batches: widened blocks make the faster GEMM there), the second for fewer (decode) */
#define W_FP32_ACT 16
#define W_AUTO_ACT 32

typedef struct {
    const void *w;       /* [rows, cols] row-major, element type `type` (3-5: rows of cols / 32 blocks) */
    const float *scale;  /* [rows] per-row scale for W_I8, else NULL */
    int64_t type, rows, cols;
} Mat;

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

#ifdef __AVX512F__
/* 16 weights widened to fp32 (AVX-512 CPUs: one 64-byte fp32 line, 32 bytes of bf16 or 16 of int8 per load) */
static inline __m512 load16(int type, const void *w, int64_t k) {
    if (type == W_F32) return _mm512_loadu_ps((const float *)w + k);
    if (type == W_BF16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)w + k))), 16));
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)((const int8_t *)w + k))));
}
#endif

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif


#ifdef __AVX2__
/* e^x for 8 lanes (Cephes expf: range reduction by ln 2, degree-5 polynomial; relative error < 1e-7 on the
 * clamped range [-87.3, 88]: e^-87.3 is the smallest normal float, and 2^n must not overflow) */
static inline __m256 exp8(__m256 x) {
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.0f)), _mm256_set1_ps(-87.3365447505531f));
    __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(x, x), x), _mm256_set1_ps(1.f));
    __m256i n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(n));
}
#endif
/* fp16 <-> fp32 for the KV cache (fp16 storage halves what attention streams): F16C where the CPU has it, else
 * the compiler's _Float16 (both round to nearest even, as torch's .half()) */
static inline float half_to_float(uint16_t h) {
#ifdef __F16C__
    return _cvtsh_ss(h);
#else
    _Float16 f;
    memcpy(&f, &h, 2);
    return (float)f;
#endif
}

static inline uint16_t float_to_half(float x) {
#ifdef __F16C__
    return _cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT);
#else
    _Float16 f = (_Float16)x;
    uint16_t h;
    memcpy(&h, &f, 2);
    return h;
#endif
}

static inline float f16_at(const uint8_t *p) {  /* an fp16 field of a GGUF block */
    uint16_t h;
    memcpy(&h, p, 2);
    return half_to_float(h);
}

static inline int64_t qb_bytes(int type) {  /* bytes per 32-value block: Q8_0, Q4_0, Q5_0, Q4_1 */
    return type == W_Q8_0 ? 34 : type == W_Q4_0 ? 18 : type == W_Q5_0 ? 22 : 20;
}

static inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

/* Many rows (B >= GEMM_MIN_ROWS) go through the packed micro-kernel (linear.c); fewer through dot-product tiles. */
#ifndef GEMM_MIN_ROWS
#define GEMM_MIN_ROWS 12
#endif
#ifdef __AVX512F__
#define GEMM_MIN_ROWS_F32 12  /* AVX-512 dot-product tiles beat a half-empty 16-row panel at 8 rows (6.5 vs 6.9 ms) */
#else
#define GEMM_MIN_ROWS_F32 8
#endif
#define PANEL 16
#define GEMM_RN 6

/* linear.c: y[b * ldy + n] (+)= scale[n] * (W[n] . x[b]) for rows n in [n0, n1) and every b < B */
HIDDEN void matvec(const Mat *m, const float *x, int64_t ldx, int64_t B, int64_t n0, int64_t n1, float *y,
                   int64_t ldy, int accumulate);
/* the same from x packed by pack_x (B >= GEMM_MIN_ROWS); wf: GEMM_RN * cols floats of scratch */
HIDDEN void pack_x(const float *x, int64_t ldx, int64_t B, int64_t K, float *xp);
HIDDEN void matmul_packed(const Mat *m, const float *xp, int64_t B, int64_t n0, int64_t n1, float *y, int64_t ldy,
                          int accumulate, float *wf);
/* the same for W_FP32_ACT blocks and few rows: qfloat.c's kernel, else GEMM_RN weight rows at a time widened
 * into wf for matvec */
HIDDEN void matvec_widened(const Mat *m, const float *x, int64_t ldx, int64_t B, int64_t n0, int64_t n1, float *y,
                           int64_t ldy, int accumulate, float *wf);

/* q8.c: int8 weights times int8-quantized activations (format in q8.c) */
#define Q8_BLOCK 32
#define Q8_SMAX 128
#define Q8_MAX_COLS 8192
static inline int q8_ok(const Mat *m) { return m->type == W_I8 && m->cols % Q8_BLOCK == 0 && m->cols <= Q8_MAX_COLS; }
HIDDEN void quantize_q8(const float *x, int64_t ldx, int64_t B, int64_t K, int8_t *q, int16_t *s, float *unit);
HIDDEN void matvec_q8(const Mat *m, const int8_t *q, const int16_t *s, const float *unit, int64_t B, int64_t n0,
                      int64_t n1, float *y, int64_t ldy, int accumulate);
HIDDEN int linear_q8(const Mat *m, const float *x, int64_t M, float *y, int nthreads);

/* qblock.c: GGUF Q8_0 / Q4_0 / Q4_1 / Q5_0 weights times activations quantized per 32 values (format in qblock.c), and
 * the K-quants of qkblock.c (activations per 256 values); quantize_qb takes the weight's type for the format */
#define QB_BLOCK 32
#define QK_BLOCK 256
static inline int qb_ok(const Mat *m) { return m->type >= W_Q8_0 && m->type <= W_Q5_0; }
static inline int qk_type(int64_t type) { return type >= W_Q4_K && type <= W_QK_MIX; }
static inline int qf_ok(const Mat *m) {
    const int64_t t = m->type - W_FP32_ACT;
    return (m->type & W_FP32_ACT) && t >= W_Q8_0 && t <= W_Q5_0;
}
HIDDEN void quantize_qb(int type, const float *x, int64_t ldx, int64_t B, int64_t K, int8_t *q, float *d, float *s);
HIDDEN int64_t qk_row_bytes(int type, int64_t K);
HIDDEN void quantize_qk(const float *x, int64_t ldx, int64_t B, int64_t K, int8_t *q, float *d, float *s);
HIDDEN void matvec_qk(const Mat *m, const int8_t *q, const float *d, const float *s, int64_t B, int64_t n0,
                      int64_t n1, float *y, int64_t ldy, int accumulate);
HIDDEN void dequant_row_qk(const Mat *m, int64_t row, float *dst);
HIDDEN void matvec_qb(const Mat *m, const int8_t *q, const float *d, const float *s, int64_t B, int64_t n0,
                      int64_t n1, float *y, int64_t ldy, int accumulate);
HIDDEN void dequant_row_qb(const Mat *m, int64_t row, float *dst);
HIDDEN int linear_qb(const Mat *m, const float *x, int64_t M, float *y, int nthreads);
/* qfloat.c: W_FP32_ACT blocks of 32 values times up to QF_MAX_B fp32 rows; returns 0 where it has no kernel (no
 * AVX-512, K-quants: linear.c widens their rows instead) */
#define QF_MAX_B 4
HIDDEN int matvec_qf(const Mat *m, const float *x, int64_t ldx, int64_t B, int64_t n0, int64_t n1, float *y,
                     int64_t ldy, int accumulate);

/* One thread's copy of a product's input in the weight's format: int8 rows for W_I8 (q8.c), int8 with float block
 * scales and sums for GGUF blocks (qblock.c, qkblock.c), packed panels for the fp32/bf16 GEMM (gemm), else x itself */
typedef struct {
    int8_t *q;
    int16_t *s;
    float *u, *d, *sum, *xp, *wf;
} ActBuf;

/* the Mat as a product of this many rows reads it: W_AUTO_ACT resolved */
static inline Mat act_mode(const Mat *m, int gemm) {
    Mat r = *m;
    if (r.type & W_AUTO_ACT) r.type = r.type - W_AUTO_ACT + (gemm ? W_FP32_ACT : 0);
    return r;
}

static inline void act_prepare(const Mat *mat, const ActBuf *a, const float *x, int64_t ldx, int64_t B, int64_t K,
                               int gemm) {
    const Mat mode = act_mode(mat, gemm), *m = &mode;
    if (q8_ok(m)) quantize_q8(x, ldx, B, K, a->q, a->s, a->u);
    else if (qb_ok(m)) quantize_qb((int)m->type, x, ldx, B, K, a->q, a->d, a->sum);
    else if (gemm) pack_x(x, ldx, B, K, a->xp);
}

/* y[b * ldy + n] (+)= (W x[b])[n] for n in [n0, n1), from the input act_prepare made of the same x */
static inline void act_linear(const Mat *mat, const ActBuf *a, const float *x, int64_t ldx, int64_t B, int64_t n0,
                              int64_t n1, float *y, int64_t ldy, int acc, int gemm) {
    const Mat mode = act_mode(mat, gemm), *m = &mode;
    if (q8_ok(m)) matvec_q8(m, a->q, a->s, a->u, B, n0, n1, y, ldy, acc);
    else if (qb_ok(m)) matvec_qb(m, a->q, a->d, a->sum, B, n0, n1, y, ldy, acc);
    else if (gemm) matmul_packed(m, a->xp, B, n0, n1, y, ldy, acc, a->wf);
    else if (qf_ok(m)) matvec_widened(m, x, ldx, B, n0, n1, y, ldy, acc, a->wf);
    else matvec(m, x, ldx, B, n0, n1, y, ldy, acc);
}

/* sample.c: one token per row, as engine/sampling.py picks it (argmax, or temperature + filters + Gumbel-max) */
int minimind_sample(const float *logits, int64_t B, int64_t V, const float *temperature, const int64_t *top_k,
                    const float *top_p, const float *min_p, const int64_t *seeds, const int64_t *steps, int64_t *out,
                    int nthreads);
/* moe.c: the feed-forward of a mixture-of-experts layer (MiniMind2: top-2 of 4 + shared experts; minimind-3 /
 * Qwen3-MoE: top-1), for B rows inside the decode step's parallel region */
typedef struct {
    int64_t n_experts, top_k, renorm, n_shared;
    const float *router;        /* [n_experts, hidden] fp32: logits = W x */
    const Mat *gate_up, *down;  /* [n_experts + n_shared]: routed experts, then shared; gate_up [2 I, hidden] */
} Moe;

typedef struct {
    int64_t B, H, rpt;  /* rows, hidden size, output rows per task */
    int gemm;           /* the step packs inputs for the GEMM (xp holds B rows) */
    float *act;         /* shared [B * top_k, I]: SiLU(gate) * up of each (row, expert) pair */
    float *y;           /* shared [B * top_k, H]: each pair's expert output */
    /* per thread */
    const float *xn;    /* [B, H] the normalized rows */
    float *xg;          /* [B * top_k, H] rows gathered by expert */
    int64_t *route;     /* [moe_route_ints] */
    float *probs;       /* [B * top_k + n_experts] */
    float *gate, *up;   /* [B, rpt] */
    ActBuf a;
} MoeStep;

HIDDEN void moe_ffn(const Moe *moe, const MoeStep *st, float *h);
static inline int64_t moe_route_ints(int64_t B, int64_t k, int64_t E) { return 3 * B * k + 2 * (E + 1); }

/* attention.c */
HIDDEN void attend_group(const float *q, int group, const void *keys, const void *vals, int64_t len, int64_t D,
                         float scale, float *sc, float *o, int f16);
HIDDEN void kv_store(void *dst, const float *x, int64_t n, int f16);
HIDDEN void rms_norm(const float *x, const float *w, int64_t n, double eps, float *out);
HIDDEN void rope(float *x, const float *cos, const float *sin, int64_t D);
HIDDEN void silu_mul(const float *gate, const float *up, int64_t n, float *out);
#endif
