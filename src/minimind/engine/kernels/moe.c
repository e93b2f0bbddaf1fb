/* The mixture-of-experts feed-forward of one decode step (called by every thread of decode.c's parallel region).
 *
 * Routing as MiniMind's MoE computes it: per row softmax over the router's logits, the top_k experts, their
 * weights renormalized to sum 1 (w / (sum + 1e-20)) when `renorm`. The (row, expert) pairs are then grouped by
 * expert, so each selected expert's gate|up and down are read once per step for all of its rows, in the
 * weight's own format (fp32, bf16, int8, GGUF blocks); shared experts run on every row. The result is added
 * to the residual h: h += shared(x) + sum_k w_k expert_k(x).
 *
 * Each thread routes all B rows itself (B * E * H flops: less than one barrier) and gathers its own copy of the
 * rows of each expert; a barrier follows each product, as in the dense step.
 */
#include <omp.h>
#include "kernels.h"

/* probs [E] <- softmax(W x); sel [k], w [k] <- the top_k experts (the lower index on ties) and their weights */
static void route_row(const Moe *moe, const float *x, int64_t H, float *probs, int64_t *sel, float *w) {
    const int64_t E = moe->n_experts, k = moe->top_k;
    float mx = -INFINITY, sum = 0.f;
    for (int64_t e = 0; e < E; e++) {
        const float *r = moe->router + e * H;
        float acc = 0.f;
        for (int64_t i = 0; i < H; i++) acc += r[i] * x[i];
        probs[e] = acc;
        mx = fmaxf(mx, acc);
    }
    for (int64_t e = 0; e < E; e++) sum += probs[e] = expf(probs[e] - mx);
    for (int64_t e = 0; e < E; e++) probs[e] /= sum;
    float total = 0.f;
    for (int64_t j = 0; j < k; j++) {
        int64_t best = -1;
        for (int64_t e = 0; e < E; e++) {
            int taken = 0;
            for (int64_t i = 0; i < j; i++) taken |= sel[i] == e;
            if (!taken && (best < 0 || probs[e] > probs[best])) best = e;
        }
        sel[j] = best;
        w[j] = probs[best];
        total += w[j];
    }
    if (moe->renorm)
        for (int64_t j = 0; j < k; j++) w[j] = w[j] / (total + 1e-20f);
}

/* one SwiGLU expert on n rows: x [n, H] (this thread's copy) -> out [n, H] (+)= down(silu(gate x) * up x) */
static void expert(const Mat *gu, const Mat *dn, const MoeStep *st, const float *x, int64_t n, float *out, int acc) {
    const int64_t H = st->H, I = gu->rows / 2, rpt = st->rpt;
    const int gemm_gu = st->gemm && n >= (gu->type == W_F32 ? GEMM_MIN_ROWS_F32 : GEMM_MIN_ROWS);
    const int gemm_dn = st->gemm && n >= (dn->type == W_F32 ? GEMM_MIN_ROWS_F32 : GEMM_MIN_ROWS);
    act_prepare(gu, &st->a, x, H, n, H, gemm_gu);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < cdiv(I, rpt); t++) {
        int64_t n0 = t * rpt, n1 = n0 + rpt < I ? n0 + rpt : I, w = n1 - n0;
        act_linear(gu, &st->a, x, H, n, n0, n1, st->gate - n0, rpt, 0, gemm_gu);
        act_linear(gu, &st->a, x, H, n, I + n0, I + n1, st->up - I - n0, rpt, 0, gemm_gu);
        for (int64_t b = 0; b < n; b++) silu_mul(st->gate + b * rpt, st->up + b * rpt, w, st->act + b * I + n0);
    }
    act_prepare(dn, &st->a, st->act, I, n, I, gemm_dn);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < cdiv(H, rpt); t++) {
        int64_t n0 = t * rpt, n1 = n0 + rpt < H ? n0 + rpt : H;
        act_linear(dn, &st->a, st->act, I, n, n0, n1, out, H, acc, gemm_dn);
    }
}

void moe_ffn(const Moe *moe, const MoeStep *st, float *h) {
    const int64_t B = st->B, H = st->H, E = moe->n_experts, k = moe->top_k, P = B * k;
    int64_t *sel = st->route, *order = sel + P, *slot = order + P, *start = slot + P, *next = start + E + 1;
    float *w = st->probs, *probs = w + P;
    for (int64_t b = 0; b < B; b++) route_row(moe, st->xn + b * H, H, probs, sel + b * k, w + b * k);
    /* pairs p = b * k + j in expert order (a counting sort); slot[p]: where p's output lands in y */
    for (int64_t e = 0; e <= E; e++) start[e] = 0;
    for (int64_t p = 0; p < P; p++) start[sel[p] + 1]++;
    for (int64_t e = 0; e < E; e++) start[e + 1] += start[e];
    for (int64_t e = 0; e < E; e++) next[e] = start[e];
    for (int64_t p = 0; p < P; p++) order[next[sel[p]]++] = p;
    for (int64_t i = 0; i < P; i++) {
        slot[order[i]] = i;
        memcpy(st->xg + i * H, st->xn + (order[i] / k) * H, sizeof(float) * H);
    }
    for (int64_t e = 0; e < E; e++)
        if (start[e + 1] > start[e])
            expert(&moe->gate_up[e], &moe->down[e], st, st->xg + start[e] * H, start[e + 1] - start[e],
                   st->y + start[e] * H, 0);
    for (int64_t s = 0; s < moe->n_shared; s++)  /* ungated, on every row, straight into the residual */
        expert(&moe->gate_up[E + s], &moe->down[E + s], st, st->xn, B, h, 1);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; b++)
        for (int64_t j = 0; j < k; j++) {
            const float wj = w[b * k + j], *yj = st->y + slot[b * k + j] * H;
            for (int64_t i = 0; i < H; i++) h[b * H + i] += wj * yj[i];
        }
}
