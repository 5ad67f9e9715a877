/*
 * float32 LTQ on AVX-512 for the usual bit widths (n = 1, 3, 7, 15), the building blocks of the
 * entry points in cpu_kernels.c: a branch-free binary search over a 16-lane table of the sorted
 * thresholds (padded with +inf) gives m = #{j : xs > t[j]} exactly.
 */
#ifndef N2UQ_CPU_KERNELS_AVX512_H
#define N2UQ_CPU_KERNELS_AVX512_H

#include "cpu_kernels_common.h"

#ifdef __AVX512F__
#include <immintrin.h>

/* n and the chain flag are compile-time constants in each instance. UNR vectors are processed side
 * by side, one step at a time, so that the dependent steps of their binary searches overlap.
 *
 * Cost of the backward on one core (Zen 5, 32x128x28x28, data in cache): about 0.12, 0.19, 0.31
 * and 0.54 ns per element at n = 1, 3, 7, 15. At n = 15 half of it is the per-interval sums: per
 * 16 elements and interval one compare and two masked adds (the vector units sustain about 2.5 of
 * these per cycle, whether as masked adds or as one-hot FMAs); scalar per-lane histograms measured
 * 1.3 to 1.6 cycles per element on their own, slower than the whole vector pass. */
#define UNR 4
#define BGROUP 8 /* intervals per sweep of the per-interval sums: 16 accumulators in registers */

/* A 16-lane table: v[0..count-1], then `pad`. */
INLINE __m512 ztable(const float *v, int count, float pad) {
    __m512 t = _mm512_set1_ps(pad);
    return count > 0 ? _mm512_mask_loadu_ps(t, (__mmask16)((1u << count) - 1u), v) : t;
}

/* m = #{j : xs > tab[j]} for a sorted tab padded with +inf: log2(n+1) probes, for u vectors.
 * The first probe is one broadcast entry and the second one of two (a blend), later ones permutes. */
INLINE void zsearch(__m512i *m, const __m512 *xs, __m512 tab, const int n, const int u) {
    const int s1 = (n + 1) / 2, s2 = s1 / 2;
    const __m512 p1 = _mm512_permutexvar_ps(_mm512_set1_epi32(s1 - 1), tab);
    const __m512 p2lo = _mm512_permutexvar_ps(_mm512_set1_epi32(s2 - 1), tab);
    const __m512 p2hi = _mm512_permutexvar_ps(_mm512_set1_epi32(s1 + s2 - 1), tab);
    for (int k = 0; k < u; ++k) {
        __mmask16 gt = _mm512_cmp_ps_mask(xs[k], p1, _CMP_GT_OQ);
        m[k] = _mm512_maskz_mov_epi32(gt, _mm512_set1_epi32(s1));
        if (s2 >= 1) {
            __m512 probe = _mm512_mask_blend_ps(gt, p2lo, p2hi);
            __mmask16 gt2 = _mm512_cmp_ps_mask(xs[k], probe, _CMP_GT_OQ);
            m[k] = _mm512_mask_add_epi32(m[k], gt2, m[k], _mm512_set1_epi32(s2));
        }
    }
    for (int step = s2 / 2; step >= 1; step /= 2)
        for (int k = 0; k < u; ++k) {
            __m512 probe = _mm512_permutexvar_ps(_mm512_add_epi32(m[k], _mm512_set1_epi32(step - 1)), tab);
            __mmask16 gt = _mm512_cmp_ps_mask(xs[k], probe, _CMP_GT_OQ);
            m[k] = _mm512_mask_add_epi32(m[k], gt, m[k], _mm512_set1_epi32(step));
        }
}

INLINE void zfold(__m512d *dst, __m512 v) {
    dst[0] = _mm512_add_pd(dst[0], _mm512_cvtps_pd(_mm512_castps512_ps256(v)));
    dst[1] = _mm512_add_pd(dst[1], _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))));
}

INLINE double zsum(const __m512d *v) { return _mm512_reduce_add_pd(v[0]) + _mm512_reduce_add_pd(v[1]); }

/* Per-channel chain parameters broadcast to lanes. */
typedef struct {
    __m512 b1, w, b2;
} zchain_t;

/* The LTQ input z2 = b2 + prelu(x + b1) (or x), and z1 = x + b1 with its sign mask. */
INLINE __m512 zchain(__m512 x, zchain_t p, const int chain, __m512 *z1, __mmask16 *pos) {
    if (!chain) return x;
    *z1 = _mm512_add_ps(x, p.b1);
    *pos = _mm512_cmp_ps_mask(*z1, _mm512_setzero_ps(), _CMP_GT_OQ);
    return _mm512_add_ps(_mm512_mask_mov_ps(_mm512_mul_ps(p.w, *z1), *pos, *z1), p.b2);
}

INLINE float chain_scalar(float v, float b1, float w, float b2) {
    float z1 = v + b1;
    return (z1 > 0.0f ? z1 : w * z1) + b2;
}

/* Forward for u vectors at xp, yp (codes optional): y = table[m], m = #{j : s1*z2 > thr[j]}. */
INLINE void ltq_forward_vecs(const float *xp, float *yp, uint8_t *cp, zchain_t p, __m512 vs1, __m512 tv,
                             __m512 tab, const int n, const int chain, const int u) {
    __m512 xs[UNR];
    __m512i m[UNR];
    for (int k = 0; k < u; ++k) {
        __m512 z1;
        __mmask16 pos;
        xs[k] = _mm512_mul_ps(zchain(_mm512_loadu_ps(xp + k * VL), p, chain, &z1, &pos), vs1);
    }
    zsearch(m, xs, tv, n, u);
    for (int k = 0; k < u; ++k) {
        _mm512_storeu_ps(yp + k * VL, _mm512_permutexvar_ps(m[k], tab));
        if (cp) _mm_storeu_si128((__m128i *)(cp + k * VL), _mm512_cvtepi32_epi8(m[k]));
    }
}

INLINE void ltq_forward_vec(const float *x, float *y, uint8_t *codes, item_t r, int64_t C, const float *b1,
                            const float *w, const float *b2, float s1, const float *thr, const int n,
                            const float *table, const int chain) {
    const __m512 tv = ztable(thr, n, __builtin_inff()), tab = ztable(table, n + 1, 0.0f);
    const __m512 vs1 = _mm512_set1_ps(s1);
    int64_t full = r.len / VL * VL, wide = r.len / (UNR * VL) * (UNR * VL);
    for (int64_t k = 0; k < r.nspans; ++k) {
        int64_t c = (r.c0 + k) % C, base = r.first + k * r.len;
        float bb1 = chain ? b1[c] : 0.0f, ww = chain ? w[c] : 0.0f, bb2 = chain ? b2[c] : 0.0f;
        zchain_t p = {_mm512_set1_ps(bb1), _mm512_set1_ps(ww), _mm512_set1_ps(bb2)};
        const float *xp = x + base;
        float *yp = y + base;
        uint8_t *cp = codes ? codes + base : 0;
        int64_t i = 0;
        for (; i < wide; i += UNR * VL)
            ltq_forward_vecs(xp + i, yp + i, cp ? cp + i : 0, p, vs1, tv, tab, n, chain, UNR);
        for (; i < full; i += VL) ltq_forward_vecs(xp + i, yp + i, cp ? cp + i : 0, p, vs1, tv, tab, n, chain, 1);
        for (; i < r.len; ++i) {
            float xs = (chain ? chain_scalar(xp[i], bb1, ww, bb2) : xp[i]) * s1;
            int m = 0;
            for (int j = 0; j < n; ++j) m += xs > thr[j];
            yp[i] = table[m];
            if (cp) cp[i] = (uint8_t)m;
        }
    }
}

/* Scalar elements [from, to) of one span for ltq_backward (same operations as the vector code). */
INLINE void ltq_backward_scalar(const float *x, const float *gy, float *gx, int64_t from, int64_t to,
                                const int chain, float b1, float w, float b2, float s1, float s2,
                                const float *thr, const float *lev, const float *d, const float *slope,
                                const int n, double *acc, double *cs) {
    for (int64_t i = from; i < to; ++i) {
        float g = gy[i], v = x[i], z1 = 0.0f;
        if (chain) {
            z1 = v + b1;
            v = (z1 > 0.0f ? z1 : w * z1) + b2;
        }
        float xs = v * s1;
        int seg = 0, m = 0;
        for (int j = 0; j <= n; ++j) seg += xs > d[j];
        for (int j = 0; j < n; ++j) m += xs > thr[j];
        int inside = seg >= 1 && seg <= n;
        float gxs = inside ? (g * s2) * slope[seg - 1] : 0.0f;
        if (inside) acc[seg - 1] += g, acc[n + seg - 1] += (double)(g * (xs - d[seg - 1]));
        acc[2 * n] += (double)(gxs * v);
        acc[2 * n + 1] += (double)(g * lev[m]);
        float g2 = gxs * s1;
        if (chain) {
            float g1 = z1 > 0.0f ? g2 : w * g2;
            cs[0] += g2;
            cs[1] += z1 > 0.0f ? 0.0 : (double)(z1 * g2);
            cs[2] += g1;
            gx[i] = g1;
        } else {
            gx[i] = g2;
        }
    }
}

/* Constants of one LTQ backward call, as lane tables. */
typedef struct {
    __m512 tv, inner, sv, dv, lv, d0, dn, s1, s2;
} zltq_t;

/* Float lane sums of one block: S1, S2, the chain's three, and (n <= 3) the interval sums. */
typedef struct {
    __m512 s1, s2, b2, w, b1, G[3], R[3];
} zblock_t;

/* Backward for u vectors at offset i of a span. Input gradient (exactly the float operations of the
 * plain PyTorch path), lane sums of S1 = sum grad_xs*z2 and S2 = sum g*lev[m], the chain sums, and
 * for each element its interval index s (inner interval s+1; -1 outside) and g*(xs - d[s]): into
 * the block sums directly for n <= 3, else into the scratch sseg/sgo for bin_group. The forward
 * code m of an element in interval s+1 is s + (xs > thr[s]) (thresholds_inside). */
INLINE void ltq_backward_vecs(const float *xp, const float *gp, float *gxp, zchain_t p, const zltq_t *t,
                              zblock_t *a, int32_t *sseg, float *sgo, const int n, const int chain, const int u) {
    __m512 g[UNR], v[UNR], z1[UNR], xs[UNR];
    __mmask16 pos[UNR];
    __m512i seg[UNR];
    for (int k = 0; k < u; ++k) {
        g[k] = _mm512_loadu_ps(gp + k * VL);
        z1[k] = _mm512_setzero_ps(), pos[k] = 0;
        v[k] = zchain(_mm512_loadu_ps(xp + k * VL), p, chain, &z1[k], &pos[k]);
        xs[k] = _mm512_mul_ps(v[k], t->s1);
    }
    zsearch(seg, xs, t->inner, n, u); /* #{inner breakpoints d[1..n-1] below xs} */
    for (int k = 0; k < u; ++k) {
        __mmask16 inside = _mm512_cmp_ps_mask(xs[k], t->d0, _CMP_GT_OQ) & ~_mm512_cmp_ps_mask(xs[k], t->dn, _CMP_GT_OQ);
        __m512 gxs = _mm512_maskz_mul_ps(inside, _mm512_mul_ps(g[k], t->s2), _mm512_permutexvar_ps(seg[k], t->sv));
        __m512 go = _mm512_mul_ps(g[k], _mm512_sub_ps(xs[k], _mm512_permutexvar_ps(seg[k], t->dv)));
        __mmask16 up = _mm512_cmp_ps_mask(xs[k], _mm512_permutexvar_ps(seg[k], t->tv), _CMP_GT_OQ);
        __m512i m = _mm512_mask_add_epi32(seg[k], up, seg[k], _mm512_set1_epi32(1));
        if (n <= 3) {
            for (int j = 0; j < n; ++j) {
                __mmask16 in_j = _mm512_mask_cmpeq_epi32_mask(inside, seg[k], _mm512_set1_epi32(j));
                a->G[j] = _mm512_mask_add_ps(a->G[j], in_j, a->G[j], g[k]);
                a->R[j] = _mm512_mask_add_ps(a->R[j], in_j, a->R[j], go);
            }
        } else {
            _mm512_store_si512(sseg + k * VL, _mm512_mask_mov_epi32(_mm512_set1_epi32(-1), inside, seg[k]));
            _mm512_store_ps(sgo + k * VL, go);
        }
        a->s1 = _mm512_fmadd_ps(gxs, v[k], a->s1);
        a->s2 = _mm512_fmadd_ps(g[k], _mm512_permutexvar_ps(m, t->lv), a->s2);
        __m512 g2 = _mm512_mul_ps(gxs, t->s1);
        if (chain) {
            __m512 g1 = _mm512_mask_mov_ps(_mm512_mul_ps(p.w, g2), pos[k], g2);
            a->b2 = _mm512_add_ps(a->b2, g2);
            a->w = _mm512_mask_add_ps(a->w, (__mmask16)~pos[k], a->w, _mm512_mul_ps(z1[k], g2));
            a->b1 = _mm512_add_ps(a->b1, g1);
            _mm512_storeu_ps(gxp + k * VL, g1);
        } else {
            _mm512_storeu_ps(gxp + k * VL, g2);
        }
    }
}

/* Per-interval sums for intervals j0..j0+nb-1 over `count` scratch elements of one block (see
 * ltq_backward_vecs), g the upstream gradient. Float lane sums are folded into dG, dR (double). */
INLINE void bin_group(const int32_t *sseg, const float *sgo, const float *g, int64_t count, const int j0,
                      const int nb, __m512d *dG, __m512d *dR) {
    __m512 aG[BGROUP], aR[BGROUP];
    for (int j = 0; j < nb; ++j) aG[j] = aR[j] = _mm512_setzero_ps();
    for (int64_t i = 0; i < count; i += VL) {
        __m512i seg = _mm512_load_si512(sseg + i);
        __m512 gv = _mm512_loadu_ps(g + i), go = _mm512_load_ps(sgo + i);
        for (int j = 0; j < nb; ++j) {
            __mmask16 in_j = _mm512_cmpeq_epi32_mask(seg, _mm512_set1_epi32(j0 + j));
            aG[j] = _mm512_mask_add_ps(aG[j], in_j, aG[j], gv);
            aR[j] = _mm512_mask_add_ps(aR[j], in_j, aR[j], go);
        }
    }
    for (int j = 0; j < nb; ++j) zfold(dG + 2 * j, aG[j]), zfold(dR + 2 * j, aR[j]);
}

/* One work item of the float32 LTQ backward: adds [G, R, S1, S2] to acc and writes the per-span
 * chain sums. Each block of VBLK vectors is swept once for everything per element; for n >= 7 the
 * per-interval sums then come from the block's scratch in sweeps of BGROUP intervals, which keeps
 * every accumulator in a register (one compare and two masked adds per interval and vector). */
INLINE void ltq_backward_item(const float *x, const float *gy, float *gx, item_t r, int64_t C,
                              const float *b1, const float *w, const float *b2, float s1, float s2,
                              const float *thr, const float *lev, const float *d, const float *slope,
                              const int n, const int chain, double *acc, double *chsum) {
    const float inf = __builtin_inff();
    const zltq_t t = {ztable(thr, n, inf), ztable(d + 1, n - 1, inf), ztable(slope, n, 0.0f), ztable(d, n, 0.0f),
                      ztable(lev, n + 1, 0.0f), _mm512_set1_ps(d[0]), _mm512_set1_ps(d[n]), _mm512_set1_ps(s1),
                      _mm512_set1_ps(s2)};
    int32_t sseg[VBLK * VL] __attribute__((aligned(64)));
    float sgo[VBLK * VL] __attribute__((aligned(64)));
    __m512d dacc[2 * (2 * 15 + 2)];
    for (int j = 0; j < 2 * (2 * n + 2); ++j) dacc[j] = _mm512_setzero_pd();
    int64_t full = r.len / VL * VL;
    for (int64_t k = 0; k < r.nspans; ++k) {
        int64_t c = (r.c0 + k) % C, base = r.first + k * r.len;
        float bb1 = chain ? b1[c] : 0.0f, ww = chain ? w[c] : 0.0f, bb2 = chain ? b2[c] : 0.0f;
        zchain_t p = {_mm512_set1_ps(bb1), _mm512_set1_ps(ww), _mm512_set1_ps(bb2)};
        const float *xp = x + base, *gp = gy + base;
        float *gxp = gx + base;
        __m512d cacc[6];
        for (int j = 0; j < 6; ++j) cacc[j] = _mm512_setzero_pd();
        for (int64_t o = 0; o < full; o += VBLK * VL) {
            const __m512 zero = _mm512_setzero_ps();
            zblock_t a = {zero, zero, zero, zero, zero, {zero, zero, zero}, {zero, zero, zero}};
            int64_t end = o + VBLK * VL < full ? o + VBLK * VL : full, i = o;
            for (; i + UNR * VL <= end; i += UNR * VL)
                ltq_backward_vecs(xp + i, gp + i, gxp + i, p, &t, &a, sseg + (i - o), sgo + (i - o), n, chain, UNR);
            for (; i < end; i += VL)
                ltq_backward_vecs(xp + i, gp + i, gxp + i, p, &t, &a, sseg + (i - o), sgo + (i - o), n, chain, 1);
            if (n <= 3) {
                for (int j = 0; j < n; ++j) zfold(dacc + 2 * j, a.G[j]), zfold(dacc + 2 * (n + j), a.R[j]);
            } else {
                /* The sweeps below touch only L1: ask for the next block's input and gradient now, so
                 * that memory streams while they run (3 bits: 2.7 -> 2.3 ms, 32x128x28x28, 2 threads). */
                for (int64_t l = end; n <= BGROUP && l < end + VBLK * VL && l < full; l += VL) {
                    _mm_prefetch((const char *)(xp + l), _MM_HINT_T0);
                    _mm_prefetch((const char *)(gp + l), _MM_HINT_T0);
                }
                bin_group(sseg, sgo, gp + o, end - o, 0, n < BGROUP ? n : BGROUP, dacc, dacc + 2 * n);
                if (n > BGROUP)
                    bin_group(sseg, sgo, gp + o, end - o, BGROUP, n - BGROUP, dacc + 2 * BGROUP,
                              dacc + 2 * (n + BGROUP));
            }
            zfold(dacc + 4 * n, a.s1);
            zfold(dacc + 4 * n + 2, a.s2);
            if (chain) zfold(cacc, a.b2), zfold(cacc + 2, a.w), zfold(cacc + 4, a.b1);
        }
        double cs[3] = {zsum(cacc), zsum(cacc + 2), zsum(cacc + 4)};
        ltq_backward_scalar(xp, gp, gxp, full, r.len, chain, bb1, ww, bb2, s1, s2, thr, lev, d, slope, n, acc,
                            cs);
        if (chain) memcpy(chsum + (r.span0 + k) * 3, cs, sizeof cs);
    }
    for (int j = 0; j < 2 * n + 2; ++j) acc[j] += zsum(dacc + 2 * j);
}

/* Whether every forward threshold lies in its own interval, d[j] <= t[j] <= d[j+1]; then the code
 * of an element in interval s+1 is s or s+1, as ltq_backward_vecs assumes. It holds unless the
 * parameters are so large (|start| of order 1e3 and more) that float rounding moves a threshold out
 * of its interval; the generic kernel serves that case. */
static int thresholds_inside(const float *thr, const float *d, int n) {
    for (int j = 0; j < n; ++j)
        if (!(d[j] <= thr[j] && thr[j] <= d[j + 1])) return 0;
    return 1;
}

/* Calls BODY(N, CHAIN) with compile-time constants. */
#define DISPATCH(BODY)                                                                              \
    switch (n) {                                                                                    \
    case 1: if (chain) BODY(1, 1); else BODY(1, 0); break;                                          \
    case 3: if (chain) BODY(3, 1); else BODY(3, 0); break;                                          \
    case 7: if (chain) BODY(7, 1); else BODY(7, 0); break;                                          \
    case 15: if (chain) BODY(15, 1); else BODY(15, 0); break;                                       \
    }

static int vector_form(int n) { return n == 1 || n == 3 || n == 7 || n == 15; }

#endif /* __AVX512F__ */

#endif /* N2UQ_CPU_KERNELS_AVX512_H */
