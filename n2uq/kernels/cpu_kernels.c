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
 * Layout of the code: cpu_kernels_common.h (includes, work partition, vector types),
 * cpu_kernels_generic.h (scalar kernels, a macro over the element type, used for double, for
 * unusual bit widths and for float32 LTQ without AVX-512), cpu_kernels_avx512.h (the float32 LTQ
 * building blocks with AVX-512 intrinsics), and here the exported entry points (float32 RPReLU
 * with GCC vector extensions, the weight kernel).
 */
#include "cpu_kernels_common.h"
#include "cpu_kernels_generic.h"
#include "cpu_kernels_avx512.h"

#ifdef __AVX512F__

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
