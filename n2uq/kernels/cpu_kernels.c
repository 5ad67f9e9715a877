/*
 * CPU kernels for the N2UQ activation path (SPEC §1 and §4), loaded by n2uq/kernels/cpu.py.
 *
 * Plain C with OpenMP, no PyTorch headers: the library compiles in about a second the first time
 * it is needed and is then cached. Every entry point exists for float ("_f32") and double ("_f64")
 * and works on a contiguous NCHW tensor seen as `planes` = N*C planes of `hw` elements (channel of
 * plane p = p % C). A plain LTQ uses planes = C = 1.
 *
 * Fidelity: the forward computes exactly the IEEE operations of the unfused PyTorch modules, in
 * their order (LearnableBias add, PReLU `z > 0 ? z : w*z`, add, multiply by scale1, strict `>`
 * against each threshold, table lookup); the library is compiled with -ffp-contract=off so that
 * no multiply-add is fused. Sums accumulate in float over short blocks and in double beyond, in a
 * fixed order: the work is cut into items that depend on the shape only, each item writes its
 * own partial sums, and those are added serially at the end. Results are deterministic and the
 * same for any number of threads.
 *
 * Layout of the code: work partition; generic scalar kernels (macro over the element type, used
 * for double, for unusual bit widths and for float32 LTQ without AVX-512); float32 kernels with
 * GCC vector extensions and AVX-512 intrinsics.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define CHUNK 16384 /* elements per work item */
#define BLK 512     /* elements per block of the generic kernels (kept in L1) */
#define LANES 8     /* independent accumulators per sum in the generic kernels */
#define MAYBE_UNUSED __attribute__((unused))

static int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
/* No more threads than work items: a small tensor runs on one thread, without a barrier. */
static int threads_for(int nthreads, int64_t items) { return (int)min64(nthreads, items > 0 ? items : 1); }
static int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

/* ---------------------------------------------------------------------------------------------
 * Work partition. An item is `nspans` consecutive spans of `len` elements starting at `first`;
 * span k has channel (c0 + k) % C and is span number span0 + k overall (per-channel partial sums
 * are kept per span). Small planes are grouped (whole consecutive planes, so memory is read in one
 * stream); a large plane is cut into pieces of CHUNK elements.
 * ------------------------------------------------------------------------------------------- */
typedef struct {
    int64_t first, len, nspans, span0, c0;
} item_t;

static int64_t group_of(int64_t hw) { return hw >= CHUNK ? 1 : CHUNK / hw; }

static int64_t item_count(int64_t planes, int64_t hw) {
    return hw >= CHUNK ? planes * cdiv(hw, CHUNK) : cdiv(planes, group_of(hw));
}

/* Number of spans (slots of per-channel sums). */
static int64_t span_count(int64_t planes, int64_t hw) { return hw >= CHUNK ? item_count(planes, hw) : planes; }

static item_t item_of(int64_t it, int64_t planes, int64_t hw, int64_t C) {
    item_t r;
    if (hw >= CHUNK) {
        int64_t per_plane = cdiv(hw, CHUNK), plane = it / per_plane, off = (it % per_plane) * CHUNK;
        r.first = plane * hw + off;
        r.len = min64(CHUNK, hw - off);
        r.nspans = 1;
        r.span0 = it;
        r.c0 = plane % C;
    } else {
        int64_t g = group_of(hw), p0 = it * g;
        r.first = p0 * hw;
        r.len = hw;
        r.nspans = min64(g, planes - p0);
        r.span0 = p0;
        r.c0 = p0 % C;
    }
    return r;
}

static int64_t span_channel(int64_t span, int64_t hw, int64_t C) {
    return (hw >= CHUNK ? span / cdiv(hw, CHUNK) : span) % C;
}

/* out[L + j*C + c] += per-span sums chsum[span*3 + j] (j = 0..2), in span order. */
static void reduce_channels(const double *chsum, int64_t planes, int64_t hw, int64_t C, double *out) {
    memset(out, 0, sizeof(double) * (size_t)(3 * C));
    int64_t spans = span_count(planes, hw);
    for (int64_t s = 0; s < spans; ++s) {
        int64_t c = span_channel(s, hw, C);
        for (int j = 0; j < 3; ++j) out[j * C + c] += chsum[s * 3 + j];
    }
}

/* ---------------------------------------------------------------------------------------------
 * Generic kernels.
 * ------------------------------------------------------------------------------------------- */
#define DEFINE_KERNELS(T, SFX)                                                                        \
                                                                                                      \
    /* y = table[m], m = #{j : xs > thr[j]}, xs = scale1 * (rprelu(x) or x); optional uint8 codes. */ \
    static MAYBE_UNUSED void ltq_forward_generic_##SFX(                                               \
        const T *x, T *y, uint8_t *codes, int64_t planes, int64_t hw, int64_t C, const T *b1,          \
        const T *w, const T *b2, T s1, const T *thr, int n, const T *table, int nthreads) {            \
        int64_t items = item_count(planes, hw);                                                       \
        _Pragma("omp parallel for schedule(static) num_threads(threads_for(nthreads, items))") \
        for (int64_t it = 0; it < items; ++it) {                                                      \
            item_t r = item_of(it, planes, hw, C);                                                    \
            for (int64_t k = 0; k < r.nspans; ++k) {                                                  \
                int64_t c = (r.c0 + k) % C, base = r.first + k * r.len;                               \
                T bb1 = b1 ? b1[c] : (T)0, ww = b1 ? w[c] : (T)0, bb2 = b1 ? b2[c] : (T)0;            \
                for (int64_t i = base; i < base + r.len; ++i) {                                       \
                    T v = x[i];                                                                       \
                    if (b1) {                                                                         \
                        T z1 = v + bb1;                                                               \
                        v = (z1 > (T)0 ? z1 : ww * z1) + bb2;                                         \
                    }                                                                                 \
                    T xs = v * s1;                                                                    \
                    int m = 0;                                                                        \
                    for (int j = 0; j < n; ++j) m += xs > thr[j];                                     \
                    y[i] = table[m];                                                                  \
                    if (codes) codes[i] = (uint8_t)m;                                                 \
                }                                                                                     \
            }                                                                                         \
        }                                                                                             \
    }                                                                                                 \
                                                                                                      \
    /* G-STE backward (SPEC §1), optionally through the RPReLU chain (SPEC §4). out (double):        \
     * G[n], R[n]: per inner interval k = 1..n (d[k-1] < xs <= d[k]) the sums of g and of            \
     * g*(xs - d[k-1]); S1 = sum of grad_xs * z2 (z2 = LTQ input); S2 = sum of g * lev[m]; then,      \
     * with the chain, per channel: grad b2 [C], grad w [C], grad b1 [C]. gx: input gradient. */      \
    static MAYBE_UNUSED void ltq_backward_generic_##SFX(                                              \
        const T *x, const T *gy, T *gx, int64_t planes, int64_t hw, int64_t C, const T *b1,            \
        const T *w, const T *b2, T s1, T s2, const T *thr, const T *lev, const T *d, const T *slope,  \
        int n, double *out, int nthreads) {                                                           \
        int64_t items = item_count(planes, hw);                                                       \
        int L = 2 * n + 2;                                                                            \
        double *part = (double *)calloc((size_t)(items * L), sizeof(double));                         \
        double *chsum = (double *)calloc((size_t)(span_count(planes, hw) * 3), sizeof(double));       \
        _Pragma("omp parallel for schedule(static) num_threads(threads_for(nthreads, items))") \
        for (int64_t it = 0; it < items; ++it) {                                                      \
            item_t r = item_of(it, planes, hw, C);                                                    \
            double *acc = part + it * L;                                                              \
            for (int64_t k = 0; k < r.nspans; ++k) {                                                  \
                int64_t c = (r.c0 + k) % C, base = r.first + k * r.len;                               \
                T bb1 = b1 ? b1[c] : (T)0, ww = b1 ? w[c] : (T)0, bb2 = b1 ? b2[c] : (T)0;            \
                double cs[3] = {0, 0, 0};                                                             \
                for (int64_t i = base; i < base + r.len; ++i) {                                       \
                    T g = gy[i], v = x[i], z1 = (T)0;                                                 \
                    if (b1) {                                                                         \
                        z1 = v + bb1;                                                                 \
                        v = (z1 > (T)0 ? z1 : ww * z1) + bb2;                                         \
                    }                                                                                 \
                    T xs = v * s1;                                                                    \
                    int seg = 0, m = 0;                                                               \
                    for (int j = 0; j <= n; ++j) seg += xs > d[j];                                    \
                    for (int j = 0; j < n; ++j) m += xs > thr[j];                                     \
                    int inside = seg >= 1 && seg <= n;                                                \
                    T gxs = inside ? (g * s2) * slope[seg - 1] : (T)0;                                \
                    if (inside) {                                                                     \
                        acc[seg - 1] += (double)g;                                                    \
                        acc[n + seg - 1] += (double)(g * (xs - d[seg - 1]));                          \
                    }                                                                                 \
                    acc[2 * n] += (double)(gxs * v);                                                  \
                    acc[2 * n + 1] += (double)(g * lev[m]);                                           \
                    T g2 = gxs * s1;                                                                  \
                    if (b1) {                                                                         \
                        T g1 = z1 > (T)0 ? g2 : ww * g2;                                              \
                        cs[0] += (double)g2;                                                          \
                        cs[1] += z1 > (T)0 ? 0.0 : (double)(z1 * g2);                                 \
                        cs[2] += (double)g1;                                                          \
                        gx[i] = g1;                                                                   \
                    } else {                                                                          \
                        gx[i] = g2;                                                                   \
                    }                                                                                 \
                }                                                                                     \
                memcpy(chsum + (r.span0 + k) * 3, cs, sizeof cs);                                     \
            }                                                                                         \
        }                                                                                             \
        memset(out, 0, sizeof(double) * (size_t)L);                                                   \
        for (int64_t it = 0; it < items; ++it)                                                        \
            for (int j = 0; j < L; ++j) out[j] += part[it * L + j];                                   \
        if (b1) reduce_channels(chsum, planes, hw, C, out + L);                                       \
        free(part);                                                                                   \
        free(chsum);                                                                                  \
    }                                                                                                 \
                                                                                                      \
    /* Block-output RPReLU (SPEC §4) with the residual add: z = (a + r) + b1 (saved),                 \
     * y = (z > 0 ? z : w*z) + b2. `r` may be NULL (no residual). */                                 \
    static MAYBE_UNUSED void rprelu_forward_generic_##SFX(                                            \
        const T *a, const T *r, T *y, T *z, int64_t planes, int64_t hw, int64_t C, const T *b1,        \
        const T *w, const T *b2, int nthreads) {                                                      \
        int64_t items = item_count(planes, hw);                                                       \
        _Pragma("omp parallel for schedule(static) num_threads(threads_for(nthreads, items))") \
        for (int64_t it = 0; it < items; ++it) {                                                      \
            item_t q = item_of(it, planes, hw, C);                                                    \
            for (int64_t k = 0; k < q.nspans; ++k) {                                                  \
                int64_t c = (q.c0 + k) % C, base = q.first + k * q.len;                               \
                for (int64_t i = base; i < base + q.len; ++i) {                                       \
                    T v = r ? a[i] + r[i] : a[i];                                                     \
                    v = v + b1[c];                                                                    \
                    z[i] = v;                                                                         \
                    y[i] = (v > (T)0 ? v : w[c] * v) + b2[c];                                         \
                }                                                                                     \
            }                                                                                         \
        }                                                                                             \
    }                                                                                                 \
                                                                                                      \
    /* Backward of rprelu_forward from the saved z: gx = z > 0 ? gy : w*gy;                          \
     * out = [grad b2 (C), grad w (C), grad b1 (C)] in double. */                                     \
    static MAYBE_UNUSED void rprelu_backward_generic_##SFX(const T *gy, const T *z, T *gx,            \
                                                           int64_t planes, int64_t hw, int64_t C,     \
                                                           const T *w, double *out, int nthreads) {   \
        int64_t items = item_count(planes, hw);                                                       \
        double *chsum = (double *)calloc((size_t)(span_count(planes, hw) * 3), sizeof(double));       \
        _Pragma("omp parallel for schedule(static) num_threads(threads_for(nthreads, items))") \
        for (int64_t it = 0; it < items; ++it) {                                                      \
            item_t q = item_of(it, planes, hw, C);                                                    \
            for (int64_t k = 0; k < q.nspans; ++k) {                                                  \
                int64_t c = (q.c0 + k) % C, base = q.first + k * q.len;                               \
                double cs[3] = {0, 0, 0};                                                             \
                for (int64_t i = base; i < base + q.len; ++i) {                                       \
                    T g = gy[i], v = z[i];                                                            \
                    T g1 = v > (T)0 ? g : w[c] * g;                                                   \
                    gx[i] = g1;                                                                       \
                    cs[0] += (double)g;                                                               \
                    cs[1] += v > (T)0 ? 0.0 : (double)(v * g);                                        \
                    cs[2] += (double)g1;                                                              \
                }                                                                                     \
                memcpy(chsum + (q.span0 + k) * 3, cs, sizeof cs);                                     \
            }                                                                                         \
        }                                                                                             \
        reduce_channels(chsum, planes, hw, C, out);                                                   \
        free(chsum);                                                                                  \
    }                                                                                                 \
                                                                                                      \
    /* y = table[codes]: the exact LTQ output rebuilt from its uint8 codes. */                        \
    void decode_##SFX(const uint8_t *codes, T *y, int64_t numel, const T *table, int nthreads) {      \
        int64_t items = cdiv(numel, CHUNK);                                                           \
        _Pragma("omp parallel for schedule(static) num_threads(threads_for(nthreads, items))") \
        for (int64_t b = 0; b < numel; b += CHUNK) {                                                  \
            int64_t e = min64(numel, b + CHUNK);                                                      \
            for (int64_t i = b; i < e; ++i) y[i] = table[codes[i]];                                   \
        }                                                                                             \
    }

DEFINE_KERNELS(float, f32)
DEFINE_KERNELS(double, f64)

/* ---------------------------------------------------------------------------------------------
 * float32 kernels. RPReLU: GCC vector extensions (16 lanes, mapped to whatever the target has).
 * LTQ on AVX-512 for the usual bit widths (n = 1, 3, 7, 15): a branch-free binary search over a
 * 16-lane table of the sorted thresholds (padded with +inf) gives m = #{j : xs > t[j]} exactly.
 * ------------------------------------------------------------------------------------------- */
#define VL 16
#define VBLK 32 /* vectors per block: float lane sums over a block, then added into double */
typedef float vf __attribute__((vector_size(4 * VL)));
typedef int32_t vi __attribute__((vector_size(4 * VL)));
typedef double vd __attribute__((vector_size(8 * VL)));

#define INLINE static inline __attribute__((always_inline))
INLINE vf vload(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
INLINE void vstore(float *p, vf v) { memcpy(p, &v, sizeof v); }
INLINE vf vsel(vi m, vf a, vf b) { return (vf)((m & (vi)a) | (~m & (vi)b)); }
INLINE double vsum(vd v) {
    double s = 0;
    for (int l = 0; l < VL; ++l) s += v[l];
    return s;
}

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

void ltq_forward_f32(const float *x, float *y, uint8_t *codes, int64_t planes, int64_t hw, int64_t C,
                     const float *b1, const float *w, const float *b2, float s1, const float *thr, int n,
                     const float *table, int nthreads) {
    if (!vector_form(n)) {
        ltq_forward_generic_f32(x, y, codes, planes, hw, C, b1, w, b2, s1, thr, n, table, nthreads);
        return;
    }
    int chain = b1 != 0;
    int64_t items = item_count(planes, hw);
    _Pragma("omp parallel for schedule(static) num_threads(threads_for(nthreads, items))")
    for (int64_t it = 0; it < items; ++it) {
        item_t r = item_of(it, planes, hw, C);
#define FWD(N, CHAIN) ltq_forward_vec(x, y, codes, r, C, b1, w, b2, s1, thr, N, table, CHAIN)
        DISPATCH(FWD)
#undef FWD
    }
}

void ltq_backward_f32(const float *x, const float *gy, float *gx, int64_t planes, int64_t hw, int64_t C,
                      const float *b1, const float *w, const float *b2, float s1, float s2, const float *thr,
                      const float *lev, const float *d, const float *slope, int n, double *out,
                      int nthreads) {
    if (!vector_form(n) || !thresholds_inside(thr, d, n)) {
        ltq_backward_generic_f32(x, gy, gx, planes, hw, C, b1, w, b2, s1, s2, thr, lev, d, slope, n, out,
                                 nthreads);
        return;
    }
    int chain = b1 != 0;
    int64_t items = item_count(planes, hw);
    int L = 2 * n + 2;
    double *part = (double *)calloc((size_t)(items * L), sizeof(double));
    double *chsum = (double *)calloc((size_t)(span_count(planes, hw) * 3), sizeof(double));
    _Pragma("omp parallel for schedule(static) num_threads(threads_for(nthreads, items))")
    for (int64_t it = 0; it < items; ++it) {
        item_t r = item_of(it, planes, hw, C);
#define BWD(N, CHAIN) \
    ltq_backward_item(x, gy, gx, r, C, b1, w, b2, s1, s2, thr, lev, d, slope, N, CHAIN, part + it * L, chsum)
        DISPATCH(BWD)
#undef BWD
    }
    memset(out, 0, sizeof(double) * (size_t)L);
    for (int64_t it = 0; it < items; ++it)
        for (int j = 0; j < L; ++j) out[j] += part[it * L + j];
    if (chain) reduce_channels(chsum, planes, hw, C, out + L);
    free(part);
    free(chsum);
}

#else /* without AVX-512 the generic kernels serve float32 too */

void ltq_forward_f32(const float *x, float *y, uint8_t *codes, int64_t planes, int64_t hw, int64_t C,
                     const float *b1, const float *w, const float *b2, float s1, const float *thr, int n,
                     const float *table, int nthreads) {
    ltq_forward_generic_f32(x, y, codes, planes, hw, C, b1, w, b2, s1, thr, n, table, nthreads);
}

void ltq_backward_f32(const float *x, const float *gy, float *gx, int64_t planes, int64_t hw, int64_t C,
                      const float *b1, const float *w, const float *b2, float s1, float s2, const float *thr,
                      const float *lev, const float *d, const float *slope, int n, double *out,
                      int nthreads) {
    ltq_backward_generic_f32(x, gy, gx, planes, hw, C, b1, w, b2, s1, s2, thr, lev, d, slope, n, out,
                             nthreads);
}
#endif

void rprelu_forward_f32(const float *a, const float *r, float *y, float *z, int64_t planes, int64_t hw,
                        int64_t C, const float *b1, const float *w, const float *b2, int nthreads) {
    int64_t items = item_count(planes, hw);
    _Pragma("omp parallel for schedule(static) num_threads(threads_for(nthreads, items))")
    for (int64_t it = 0; it < items; ++it) {
        item_t q = item_of(it, planes, hw, C);
        int64_t full = q.len / VL * VL;
        for (int64_t k = 0; k < q.nspans; ++k) {
            int64_t c = (q.c0 + k) % C, base = q.first + k * q.len;
            float bb1 = b1[c], ww = w[c], bb2 = b2[c];
            const float *ap = a + base, *rp = r ? r + base : 0;
            float *yp = y + base, *zp = z + base;
            for (int64_t i = 0; i < full; i += VL) {
                vf v = vload(ap + i);
                if (rp) v = v + vload(rp + i);
                v = v + bb1;
                vstore(zp + i, v);
                vstore(yp + i, vsel(v > 0.0f, v, ww * v) + bb2);
            }
            for (int64_t i = full; i < q.len; ++i) {
                float v = rp ? ap[i] + rp[i] : ap[i];
                v = v + bb1;
                zp[i] = v;
                yp[i] = (v > 0.0f ? v : ww * v) + bb2;
            }
        }
    }
}

void rprelu_backward_f32(const float *gy, const float *z, float *gx, int64_t planes, int64_t hw, int64_t C,
                         const float *w, double *out, int nthreads) {
    int64_t items = item_count(planes, hw);
    double *chsum = (double *)calloc((size_t)(span_count(planes, hw) * 3), sizeof(double));
    _Pragma("omp parallel for schedule(static) num_threads(threads_for(nthreads, items))")
    for (int64_t it = 0; it < items; ++it) {
        item_t q = item_of(it, planes, hw, C);
        const vf zero = {0};
        int64_t full = q.len / VL * VL;
        for (int64_t k = 0; k < q.nspans; ++k) {
            int64_t c = (q.c0 + k) % C, base = q.first + k * q.len;
            float ww = w[c];
            const float *gp = gy + base, *zp = z + base;
            float *gxp = gx + base;
            vd dB2 = {0}, dW = {0}, dB1 = {0};
            for (int64_t o = 0; o < full; o += VBLK * VL) {
                vf aB2 = zero, aW = zero, aB1 = zero;
                int64_t end = o + VBLK * VL < full ? o + VBLK * VL : full;
                for (int64_t i = o; i < end; i += VL) {
                    vf g = vload(gp + i), v = vload(zp + i);
                    vi pos = v > 0.0f;
                    vf g1 = vsel(pos, g, ww * g);
                    vstore(gxp + i, g1);
                    aB2 += g;
                    aW += vsel(pos, zero, v * g);
                    aB1 += g1;
                }
                dB2 += __builtin_convertvector(aB2, vd);
                dW += __builtin_convertvector(aW, vd);
                dB1 += __builtin_convertvector(aB1, vd);
            }
            double cs[3] = {vsum(dB2), vsum(dW), vsum(dB1)};
            for (int64_t i = full; i < q.len; ++i) {
                float g = gp[i], v = zp[i];
                float g1 = v > 0.0f ? g : ww * g;
                gxp[i] = g1;
                cs[0] += g;
                cs[1] += v > 0.0f ? 0.0 : (double)(v * g);
                cs[2] += g1;
            }
            memcpy(chsum + (q.span0 + k) * 3, cs, sizeof cs);
        }
    }
    reduce_channels(chsum, planes, hw, C, out);
    free(chsum);
}

/* double: the generic kernels. */
void ltq_forward_f64(const double *x, double *y, uint8_t *codes, int64_t planes, int64_t hw, int64_t C,
                     const double *b1, const double *w, const double *b2, double s1, const double *thr,
                     int n, const double *table, int nthreads) {
    ltq_forward_generic_f64(x, y, codes, planes, hw, C, b1, w, b2, s1, thr, n, table, nthreads);
}

void ltq_backward_f64(const double *x, const double *gy, double *gx, int64_t planes, int64_t hw, int64_t C,
                      const double *b1, const double *w, const double *b2, double s1, double s2,
                      const double *thr, const double *lev, const double *d, const double *slope, int n,
                      double *out, int nthreads) {
    ltq_backward_generic_f64(x, gy, gx, planes, hw, C, b1, w, b2, s1, s2, thr, lev, d, slope, n, out,
                             nthreads);
}

void rprelu_forward_f64(const double *a, const double *r, double *y, double *z, int64_t planes, int64_t hw,
                        int64_t C, const double *b1, const double *w, const double *b2, int nthreads) {
    rprelu_forward_generic_f64(a, r, y, z, planes, hw, C, b1, w, b2, nthreads);
}

void rprelu_backward_f64(const double *gy, const double *z, double *gx, int64_t planes, int64_t hw, int64_t C,
                         const double *w, double *out, int nthreads) {
    rprelu_backward_generic_f64(gy, z, gx, planes, hw, C, w, out, nthreads);
}

/* HardQuantizeConv's weight (SPEC §2) in one pass, per output channel o of `per` elements:
 * ws = w / s[o]; wc = clamp(ws, -half, half) (as two selects); q = s[o] * (round((wc + half) * steps)
 * / steps - half); out = (q - ws) + ws. The operations of the PyTorch expression, in its order;
 * round is round-half-to-even (nearbyint in the default rounding mode, like torch.round). */
#include <math.h>
void weight_ste_f32(const float *w, const float *s, float *out, int64_t out_ch, int64_t per, float half,
                    float steps, int nthreads) {
    int64_t items = out_ch;
    _Pragma("omp parallel for schedule(static) num_threads(threads_for(nthreads, items))")
    for (int64_t o = 0; o < out_ch; ++o) {
        const float sc = s[o], lo = -half;
        const float *wp = w + o * per;
        float *op = out + o * per;
        for (int64_t i = 0; i < per; ++i) {
            float ws = wp[i] / sc;
            float wc = ws < half ? ws : half;
            wc = wc > lo ? wc : lo;
            float q = sc * (nearbyintf((wc + half) * steps) / steps - half);
            op[i] = (q - ws) + ws;
        }
    }
}
