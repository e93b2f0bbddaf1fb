/* One engine step of a decoder (MiniMind2, minimind-3, Llama, Qwen3; MoE feed-forwards in moe.c) for B one-token
 * rows, in one call: decode rows, and prompt chunks as rows of one slot at consecutive positions.
 *
 * Why C: a torch decode step is ~250 small ops per token (half the step is dispatch) and torch's GEMV kernels
 * stream weights at a third of DRAM speed on CPUs without AVX-512. Here every matrix-vector product reads
 * each weight row once for all B rows, widens bf16 in registers, multiplies int8 weights with int8-quantized
 * activations (q8.c), and the whole step runs inside one OpenMP parallel region. Activations, norms, RoPE,
 * softmax are fp32; the KV cache is fp32 or fp16.
 *
 * Built at first use by minimind/engine/fused.py (gcc/cc -O3 -march=native -fopenmp) and called via ctypes.
 */
#include <omp.h>
#include "kernels.h"

typedef struct {
    const float *ln1, *ln2;        /* [hidden] */
    const float *q_norm, *k_norm;  /* [head_dim] per-head norms (minimind-3, Qwen3) or NULL */
    Mat qkv;                       /* [(Hq + 2 Hkv) D, hidden]: q | k | v */
    Mat o;                         /* [hidden, Hq D] */
    Mat gate_up;                   /* [2 I, hidden]: gate | up */
    Mat down;                      /* [hidden, I] */
    void *k_cache, *v_cache;       /* [slots, Hkv, max_len, D], fp32 or fp16 (Model.kv_f16) */
    const Moe *moe;                /* a mixture-of-experts feed-forward (moe.c) instead of gate_up/down, or NULL */
} Layer;

typedef struct {
    int64_t n_layers, hidden, n_heads, n_kv_heads, head_dim, inter, vocab, max_len;
    double eps;
    const Layer *layers;
    Mat embed;          /* [vocab, hidden], W_F32, W_BF16 or GGUF blocks */
    const float *norm;  /* [hidden] */
    Mat lm_head;        /* [vocab, hidden] */
    int64_t kv_f16;     /* the KV cache holds fp16 values (attention widens them; new keys/values are rounded) */
} Model;

#define ROWS_PER_TASK 16  /* output rows per OpenMP task; the packed path takes 4 of its 6-row blocks */
#define GEMM_ROWS_PER_TASK (4 * GEMM_RN)


/* logits [n_out, vocab] of rows out_rows (NULL: every row, n_out = B) for rows with token ids[b] at position pos[b]
 * of KV slot slots[b]; cos/sin: the [max_len, D] RoPE tables. Rows of one slot may share a call (a prompt chunk):
 * row b attends to the slot's positions <= pos[b], including those the call's other rows write. Returns 0, -1
 * when scratch memory cannot be allocated, -2 for a position outside the cache or an output row outside [0, B). */
int minimind_decode(const Model *m, int64_t B, const int64_t *ids, const int64_t *slots, const int64_t *pos,
                    const float *cos, const float *sin, const int64_t *out_rows, int64_t n_out, float *logits,
                    int nthreads) {
    const int64_t H = m->hidden, D = m->head_dim, Hq = m->n_heads, Hkv = m->n_kv_heads, I = m->inter;
    const int64_t QKV = (Hq + 2 * Hkv) * D, T = m->max_len, group = Hq / Hkv;
    const float scale = 1.0f / sqrtf((float)D);
    float *h = malloc(sizeof(float) * B * H), *xns = malloc(sizeof(float) * (size_t)nthreads * B * H);
    float *qkv = malloc(sizeof(float) * B * QKV), *att = malloc(sizeof(float) * B * Hq * D);
    /* MoE layers: (row, expert) pairs and the widest expert set the sizes of the FFN buffers */
    int64_t pairs = B, inter = I, max_e = 0, max_k = 0;
    for (int64_t l = 0; l < m->n_layers; l++) {
        const Moe *e = m->layers[l].moe;
        if (!e) continue;
        pairs = B * e->top_k > pairs ? B * e->top_k : pairs;
        max_e = e->n_experts > max_e ? e->n_experts : max_e;
        max_k = e->top_k > max_k ? e->top_k : max_k;
        for (int64_t j = 0; j < e->n_experts + e->n_shared; j++)
            inter = e->gate_up[j].rows / 2 > inter ? e->gate_up[j].rows / 2 : inter;
    }
    float *act = malloc(sizeof(float) * pairs * inter);
    const int64_t route_n = moe_route_ints(B, max_k, max_e), moe_f = max_e ? pairs * H + B * max_k + max_e : 1;
    float *ys = malloc(sizeof(float) * (max_e ? pairs * H : 1));
    int64_t *routes = malloc(sizeof(int64_t) * (size_t)nthreads * route_n);
    float *moes = malloc(sizeof(float) * (size_t)nthreads * moe_f);
    float *scores = malloc(sizeof(float) * (size_t)nthreads * group * T);
    /* fp32 rows feed the packed kernel in place; bf16/int8 rows are widened first, which pays from more rows */
    const int64_t gemm_min = m->n_layers && m->layers[0].qkv.type == W_F32 ? GEMM_MIN_ROWS_F32 : GEMM_MIN_ROWS;
    const int gemm = B >= gemm_min;
    const int64_t rpt = gemm ? GEMM_ROWS_PER_TASK : ROWS_PER_TASK;
    float *gu = malloc(sizeof(float) * (size_t)nthreads * 2 * B * rpt);
    int64_t kmax = H > Hq * D ? H : Hq * D;
    kmax = kmax > inter ? kmax : inter;
    const int64_t xp_size = gemm ? cdiv(B, PANEL) * PANEL * kmax : 1, wf_size = GEMM_RN * kmax;
    float *xps = malloc(sizeof(float) * (size_t)nthreads * (xp_size + wf_size));
    /* int8 weights: each thread quantizes the B rows feeding a product itself (q8.c), like the norms above */
    /* GGUF block weights (qblock.c) take the same int8 buffer with a float scale and sum per block */
    const int64_t q_size = B * kmax, s_size = B * (kmax / Q8_BLOCK + 1);
    const size_t q8_bytes = q_size + sizeof(int16_t) * s_size + sizeof(float) * B + 2 * sizeof(float) * s_size;
    char *q8s = malloc((size_t)nthreads * q8_bytes);
    int status = 0;
    for (int64_t b = 0; b < B; b++)
        if (pos[b] < 0 || pos[b] >= T || slots[b] < 0) { status = -2; goto done; }
    for (int64_t j = 0; out_rows && j < n_out; j++)
        if (out_rows[j] < 0 || out_rows[j] >= B) { status = -2; goto done; }
    if (!out_rows) n_out = B;
    /* rows that share a KV slot: a prompt chunk (consecutive positions) */
    int64_t slot_max = 0;
    for (int64_t b = 0; b < B; b++) slot_max = slots[b] > slot_max ? slots[b] : slot_max;
    char *seen = calloc(slot_max + 1, 1);
    if (!seen) { status = -1; goto done; }
    int shared = 0;
    for (int64_t b = 0; b < B; b++) {
        shared |= seen[slots[b]];
        seen[slots[b]] = 1;
    }
    free(seen);
    const int f16 = (int)m->kv_f16;
    /* W_AUTO_ACT blocks: the step's row count decides for the logits too (a prompt's last row as its others) */
    const Mat embed = act_mode(&m->embed, 0), head = act_mode(&m->lm_head, gemm);
    const int64_t esize = f16 ? 2 : 4;
    /* lm_head over the output rows only: a prompt chunk needs the logits of its last row at most */
    const int gemm_out = n_out >= gemm_min;
    const int64_t rpt_out = gemm_out ? GEMM_ROWS_PER_TASK : ROWS_PER_TASK;
    if (!h || !xns || !qkv || !att || !act || !scores || !gu || !xps || !q8s || !ys || !routes || !moes) {
        status = -1;
        goto done;
    }

#pragma omp parallel num_threads(nthreads)
    {
        const int tid = omp_get_thread_num();
        float *sc = scores + (size_t)tid * group * T;
        float *gate = gu + (size_t)tid * 2 * B * rpt, *up = gate + B * rpt;
        /* each thread packs x for itself: no extra barrier, and the copy is small next to the product */
        float *xp = xps + (size_t)tid * (xp_size + wf_size), *wf = xp + xp_size;
        /* every thread normalizes all B rows into its own xn: a few thousand flops instead of a barrier */
        float *xn = xns + (size_t)tid * B * H;
        char *q8 = q8s + (size_t)tid * q8_bytes;
        int8_t *xq = (int8_t *)q8;
        int16_t *xs = (int16_t *)(q8 + q_size);
        float *xu = (float *)(q8 + q_size + sizeof(int16_t) * s_size), *xd = xu + B, *xsum = xd + s_size;
        float *moe_f32 = moes + (size_t)tid * moe_f;
        /* the MoE layers' buffers; its ActBuf (this thread's product inputs) serves the dense products too */
        const MoeStep moe_step = {B, H, rpt, gemm, act, ys, xn, moe_f32, routes + (size_t)tid * route_n,
                                  moe_f32 + pairs * H, gate, up, {xq, xs, xu, xd, xsum, xp, wf}};
#define NORM(w) for (int64_t b = 0; b < B; b++) rms_norm(h + b * H, w, H, m->eps, xn + b * H)
#define PACK(mat, x, ldx, K) act_prepare(mat, &moe_step.a, x, ldx, B, K, gemm)
#define LINEAR(mat, x, ldx, n0, n1, y, ldy, acc) act_linear(mat, &moe_step.a, x, ldx, B, n0, n1, y, ldy, acc, gemm)
#pragma omp for schedule(static)
        for (int64_t b = 0; b < B; b++)
            if (qb_ok(&embed) || qf_ok(&embed)) dequant_row_qb(&embed, ids[b], h + b * H);
            else for (int64_t i = 0; i < H; i++) h[b * H + i] = load1((int)m->embed.type, m->embed.w, ids[b] * H + i);

        for (int64_t l = 0; l < m->n_layers; l++) {
            const Layer *L = &m->layers[l];
            NORM(L->ln1);
            PACK(&L->qkv, xn, H, H);
#pragma omp for schedule(static)
            for (int64_t t = 0; t < cdiv(QKV, rpt); t++) {
                int64_t n0 = t * rpt, n1 = n0 + rpt < QKV ? n0 + rpt : QKV;
                LINEAR(&L->qkv, xn, H, n0, n1, qkv, QKV, 0);
            }
            /* one task per (row, kv head): per-head norms and RoPE of its query heads and key, the new key/value
             * into the slot's cache, then attention of its group of query heads over positions 0..pos[b]. Rows that
             * share a slot (a prompt chunk) attend to keys the others store: there attention waits for a barrier */
#define ROPE_STORE(b, g) do { \
                float *q = qkv + (b) * QKV + (g) * group * D, *k = qkv + (b) * QKV + (Hq + (g)) * D; \
                float *v = k + Hkv * D; \
                const float *c = cos + pos[b] * D, *s = sin + pos[b] * D; \
                const int64_t at = ((slots[b] * Hkv + (g)) * T + pos[b]) * D; \
                for (int64_t j = 0; j < group; j++) { \
                    if (L->q_norm) rms_norm(q + j * D, L->q_norm, D, m->eps, q + j * D); \
                    rope(q + j * D, c, s, D); \
                } \
                if (L->k_norm) rms_norm(k, L->k_norm, D, m->eps, k); \
                rope(k, c, s, D); \
                kv_store((char *)L->k_cache + at * esize, k, D, f16); \
                kv_store((char *)L->v_cache + at * esize, v, D, f16); \
            } while (0)
#define ATTEND(b, g) do { \
                const int64_t at = (slots[b] * Hkv + (g)) * T * D; \
                attend_group(qkv + (b) * QKV + (g) * group * D, (int)group, (char *)L->k_cache + at * esize, \
                             (char *)L->v_cache + at * esize, pos[b] + 1, D, scale, sc, \
                             att + (b) * Hq * D + (g) * group * D, f16); \
            } while (0)
#pragma omp for schedule(dynamic, 1)
            for (int64_t t = 0; t < B * Hkv; t++) {
                const int64_t b = t / Hkv, g = t % Hkv;
                ROPE_STORE(b, g);
                if (!shared) ATTEND(b, g);
            }
            if (shared) {
#pragma omp for schedule(dynamic, 1)
                for (int64_t t = 0; t < B * Hkv; t++) {
                    const int64_t b = t / Hkv, g = t % Hkv;
                    ATTEND(b, g);
                }
            }
            PACK(&L->o, att, Hq * D, Hq * D);
#pragma omp for schedule(static)
            for (int64_t t = 0; t < cdiv(H, rpt); t++) {
                int64_t n0 = t * rpt, n1 = n0 + rpt < H ? n0 + rpt : H;
                LINEAR(&L->o, att, Hq * D, n0, n1, h, H, 1);
            }
            NORM(L->ln2);
            if (L->moe) {
                moe_ffn(L->moe, &moe_step, h);
                continue;
            }
            PACK(&L->gate_up, xn, H, H);
#pragma omp for schedule(static)
            for (int64_t t = 0; t < cdiv(I, rpt); t++) {
                int64_t n0 = t * rpt, n1 = n0 + rpt < I ? n0 + rpt : I, w = n1 - n0;
                LINEAR(&L->gate_up, xn, H, n0, n1, gate - n0, rpt, 0);
                LINEAR(&L->gate_up, xn, H, I + n0, I + n1, up - I - n0, rpt, 0);
                for (int64_t b = 0; b < B; b++)
                    silu_mul(gate + b * rpt, up + b * rpt, w, act + b * I + n0);
            }
            PACK(&L->down, act, I, I);
#pragma omp for schedule(static)
            for (int64_t t = 0; t < cdiv(H, rpt); t++) {
                int64_t n0 = t * rpt, n1 = n0 + rpt < H ? n0 + rpt : H;
                LINEAR(&L->down, act, I, n0, n1, h, H, 1);
            }
        }
        for (int64_t j = 0; j < n_out; j++)
            rms_norm(h + (out_rows ? out_rows[j] : j) * H, m->norm, H, m->eps, xn + j * H);
        act_prepare(&head, &moe_step.a, xn, H, n_out, H, gemm_out);
#pragma omp for schedule(static)
        for (int64_t t = 0; t < cdiv(m->vocab, rpt_out); t++) {
            int64_t n0 = t * rpt_out, n1 = n0 + rpt_out < m->vocab ? n0 + rpt_out : m->vocab;
            act_linear(&head, &moe_step.a, xn, H, n_out, n0, n1, logits, m->vocab, 0, gemm_out);
        }
    }
done:
    free(h); free(xns); free(qkv); free(att); free(act); free(scores); free(gu); free(xps); free(q8s);
    free(ys); free(routes); free(moes);
    return status;
}

/* Up to n decode steps of one sequence in one call, each step's token picked here as the engine's sampler picks it
 * (sample.c minimind_sample: argmax for temperature 0, else a Gumbel-max draw after top-k / top-p / min-p, with
 * step numbers step0, step0 + 1, ...). Feeds first_id at position pos0, then each token it picks; stops after a
 * token in stop_ids. out[i]: the tokens picked; returns how many (every one was fed but the last), or
 * minimind_decode's error status. What the engine's Python step loop would do per token, without the loop. */
int minimind_decode_steps(const Model *m, int64_t n, int64_t first_id, int64_t slot, int64_t pos0, const float *cos,
                          const float *sin, float *logits, float temperature, int64_t top_k, float top_p, float min_p,
                          int64_t seed, int64_t step0, const int64_t *stop_ids, int64_t n_stop, int64_t *out,
                          int nthreads) {
    int64_t id = first_id;
    for (int64_t i = 0; i < n; i++) {
        const int64_t pos = pos0 + i, step = step0 + i;
        int status = minimind_decode(m, 1, &id, &slot, &pos, cos, sin, NULL, 1, logits, nthreads);
        if (!status)
            status = minimind_sample(logits, 1, m->vocab, &temperature, &top_k, &top_p, &min_p, &seed, &step, &id, 1);
        if (status) return status;
        out[i] = id;
        for (int64_t s = 0; s < n_stop; s++)
            if (stop_ids[s] == id) return (int)(i + 1);
    }
    return (int)n;
}
