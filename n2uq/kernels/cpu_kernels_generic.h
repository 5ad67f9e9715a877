/*
 * Generic scalar kernels of cpu_kernels.c, one instance per element type: used for double, for
 * unusual bit widths and for float32 LTQ without AVX-512.
 */
#ifndef N2UQ_CPU_KERNELS_GENERIC_H
#define N2UQ_CPU_KERNELS_GENERIC_H

#include "cpu_kernels_common.h"

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

#endif /* N2UQ_CPU_KERNELS_GENERIC_H */
