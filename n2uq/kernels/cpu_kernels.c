/*
 * CPU kernels for the N2UQ activation path (SPEC §1 and §4), loaded by n2uq/kernels/cpu.py.
 *
 * Plain C with OpenMP, no PyTorch headers: the library compiles in well under a second the
 * first time it is needed and is then cached. Every entry point exists for float ("_f32") and
 * double ("_f64") and works on a contiguous NCHW tensor seen as `planes` = N*C planes of `hw`
 * elements (channel of a plane = plane % C). A plain LTQ uses C = 1.
 *
 * Fidelity: the forward computes exactly the sequence of IEEE operations that the unfused
 * PyTorch modules compute (LearnableBias add, PReLU `z > 0 ? z : w*z`, add, multiply by
 * scale1, strict `>` against each threshold, table lookup). It must be compiled with
 * -ffp-contract=off so that no multiply-add is fused. Reductions accumulate in double, in a
 * fixed order: work is cut into fixed chunks (independent of the thread count), each chunk
 * writes its partial sums to its own slot, and the slots are summed serially at the end. So
 * results are deterministic and the same for any number of threads.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define CHUNK 16384 /* elements per work item (a partial-sum slot) */
#define BLK 512     /* elements per inner block, kept in L1 */
#define LANES 8     /* independent accumulators per sum (vectorised) */

static int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* Work item `it` covers elements [begin, begin + len) of plane `plane`. */
typedef struct {
    int64_t plane, begin, len;
} item_t;

static item_t item_of(int64_t it, int64_t hw) {
    int64_t per_plane = (hw + CHUNK - 1) / CHUNK;
    item_t r;
    r.plane = it / per_plane;
    int64_t off = (it % per_plane) * CHUNK;
    r.begin = r.plane * hw + off;
    r.len = min64(CHUNK, hw - off);
    return r;
}

static int64_t item_count(int64_t planes, int64_t hw) { return planes * ((hw + CHUNK - 1) / CHUNK); }

#define DEFINE_KERNELS(T, SFX)                                                                        \
                                                                                                      \
    /* y = table[m], m = #{j : xs > thr[j]}, xs = scale1 * (rprelu(x) or x); optional uint8 codes. */ \
    static __attribute__((unused)) void ltq_forward_generic_##SFX(const T *x, T *y, uint8_t *codes, int64_t planes, int64_t hw, int64_t C,   \
                           const T *b1, const T *w, const T *b2, T s1, const T *thr, int n,            \
                           const T *table, int nthreads) {                                            \
        int64_t items = item_count(planes, hw);                                                       \
        _Pragma("omp parallel for schedule(static) num_threads(nthreads)")                            \
        for (int64_t it = 0; it < items; ++it) {                                                      \
            item_t r = item_of(it, hw);                                                               \
            int64_t c = r.plane % C;                                                                  \
            T bb1 = b1 ? b1[c] : (T)0, ww = w ? w[c] : (T)0, bb2 = b2 ? b2[c] : (T)0;                 \
            T xs[BLK];                                                                                \
            int32_t m[BLK];                                                                           \
            for (int64_t o = 0; o < r.len; o += BLK) {                                                \
                int cnt = (int)min64(BLK, r.len - o);                                                 \
                const T *xp = x + r.begin + o;                                                        \
                if (b1) {                                                                             \
                    for (int i = 0; i < cnt; ++i) {                                                   \
                        T z1 = xp[i] + bb1;                                                           \
                        T p = z1 > (T)0 ? z1 : ww * z1;                                               \
                        T z2 = p + bb2;                                                               \
                        xs[i] = z2 * s1;                                                              \
                    }                                                                                 \
                } else {                                                                              \
                    for (int i = 0; i < cnt; ++i) xs[i] = xp[i] * s1;                                 \
                }                                                                                     \
                for (int i = 0; i < cnt; ++i) m[i] = 0;                                               \
                for (int j = 0; j < n; ++j) {                                                         \
                    T t = thr[j];                                                                     \
                    for (int i = 0; i < cnt; ++i) m[i] += xs[i] > t;                                  \
                }                                                                                     \
                T *yp = y + r.begin + o;                                                              \
                for (int i = 0; i < cnt; ++i) yp[i] = table[m[i]];                                    \
                if (codes) {                                                                          \
                    uint8_t *cp = codes + r.begin + o;                                                \
                    for (int i = 0; i < cnt; ++i) cp[i] = (uint8_t)m[i];                              \
                }                                                                                     \
            }                                                                                         \
        }                                                                                             \
    }                                                                                                 \
                                                                                                      \
    /* G-STE backward (SPEC §1), optionally through the RPReLU chain (SPEC §4).                       \
     * out (double): G[n], R[n] (per inner interval k = 1..n: sums of g and of g*(xs - d[k-1])),      \
     * S1 = sum of                                                                                    \
     * grad_xs * z2, S2 = sum of g * lev[m]; then, with RPReLU, per channel: grad b2[C], w[C], b1[C]. \
     * gx receives the input gradient. */                                                            \
    static __attribute__((unused)) void ltq_backward_generic_##SFX(const T *x, const T *gy, T *gx, int64_t planes, int64_t hw, int64_t C,    \
                            const T *b1, const T *w, const T *b2, T s1, T s2, const T *thr,           \
                            const T *lev, const T *d, const T *slope, int n, double *out,             \
                            int nthreads) {                                                           \
        int64_t items = item_count(planes, hw);                                                       \
        int has_chain = b1 != 0;                                                                      \
        int K = 2 * n + 2 + (has_chain ? 3 : 0);                                                      \
        double *part = (double *)calloc((size_t)(items * K), sizeof(double));                         \
        _Pragma("omp parallel for schedule(static) num_threads(nthreads)")                            \
        for (int64_t it = 0; it < items; ++it) {                                                      \
            item_t r = item_of(it, hw);                                                               \
            int64_t c = r.plane % C;                                                                  \
            T bb1 = has_chain ? b1[c] : (T)0, ww = has_chain ? w[c] : (T)0;                           \
            T bb2 = has_chain ? b2[c] : (T)0;                                                         \
            T z1[BLK], z2[BLK], xs[BLK], g[BLK], gxs[BLK];                                            \
            int32_t k[BLK], m[BLK];                                                                   \
            double segG[4][256 + 2], segX[4][256 + 2];                                                \
            double aS1[LANES], aS2[LANES], aB2[LANES], aW[LANES], aB1[LANES];                         \
            memset(segG, 0, sizeof(segG));                                                            \
            memset(segX, 0, sizeof(segX));                                                            \
            for (int l = 0; l < LANES; ++l) aS1[l] = aS2[l] = aB2[l] = aW[l] = aB1[l] = 0.0;          \
            for (int64_t o = 0; o < r.len; o += BLK) {                                                \
                int cnt = (int)min64(BLK, r.len - o);                                                 \
                int padded = (cnt + LANES - 1) / LANES * LANES;                                       \
                const T *xp = x + r.begin + o;                                                        \
                const T *gp = gy + r.begin + o;                                                       \
                for (int i = 0; i < cnt; ++i) g[i] = gp[i];                                           \
                for (int i = cnt; i < padded; ++i) g[i] = (T)0;                                       \
                if (has_chain) {                                                                      \
                    for (int i = 0; i < cnt; ++i) {                                                   \
                        T a = xp[i] + bb1;                                                            \
                        T p = a > (T)0 ? a : ww * a;                                                  \
                        z1[i] = a;                                                                    \
                        z2[i] = p + bb2;                                                              \
                    }                                                                                 \
                } else {                                                                              \
                    for (int i = 0; i < cnt; ++i) z2[i] = xp[i];                                      \
                }                                                                                     \
                for (int i = cnt; i < padded; ++i) z1[i] = z2[i] = (T)0;                              \
                for (int i = 0; i < padded; ++i) xs[i] = z2[i] * s1;                                  \
                for (int i = 0; i < padded; ++i) k[i] = m[i] = 0;                                     \
                for (int j = 0; j <= n; ++j) {                                                        \
                    T t = d[j];                                                                       \
                    for (int i = 0; i < padded; ++i) k[i] += xs[i] > t;                               \
                }                                                                                     \
                for (int j = 0; j < n; ++j) {                                                         \
                    T t = thr[j];                                                                     \
                    for (int i = 0; i < padded; ++i) m[i] += xs[i] > t;                               \
                }                                                                                     \
                /* grad of xs: (g * scale2) * slope[k-1] inside (d[0], d[n]], else 0. */              \
                for (int i = 0; i < padded; ++i) {                                                    \
                    int kk = k[i] - 1;                                                                \
                    int inside = kk >= 0 && kk < n;                                                   \
                    T sl = slope[inside ? kk : 0];                                                    \
                    gxs[i] = inside ? (g[i] * s2) * sl : (T)0;                                        \
                }                                                                                     \
                for (int i = 0; i < padded; i += LANES)                                               \
                    for (int l = 0; l < LANES; ++l) {                                                 \
                        aS1[l] += (double)gxs[i + l] * (double)z2[i + l];                             \
                        aS2[l] += (double)g[i + l] * (double)lev[m[i + l]];                           \
                    }                                                                                 \
                for (int i = 0; i < padded; ++i) {                                                    \
                    segG[i & 3][k[i]] += (double)g[i];                                                \
                    T off = xs[i] - d[k[i] > 0 ? k[i] - 1 : 0];                                       \
                    segX[i & 3][k[i]] += (double)(g[i] * off);                                        \
                }                                                                                     \
                T *gxp = gx + r.begin + o;                                                            \
                if (has_chain) {                                                                      \
                    for (int i = 0; i < padded; i += LANES)                                           \
                        for (int l = 0; l < LANES; ++l) {                                             \
                            T g2 = gxs[i + l] * s1;                                                   \
                            T a = z1[i + l];                                                          \
                            T g1 = a > (T)0 ? g2 : ww * g2;                                           \
                            aB2[l] += (double)g2;                                                     \
                            aW[l] += a > (T)0 ? 0.0 : (double)(a * g2);                               \
                            aB1[l] += (double)g1;                                                     \
                            gxs[i + l] = g1;                                                          \
                        }                                                                             \
                    for (int i = 0; i < cnt; ++i) gxp[i] = gxs[i];                                    \
                } else {                                                                              \
                    for (int i = 0; i < cnt; ++i) gxp[i] = gxs[i] * s1;                               \
                }                                                                                     \
            }                                                                                         \
            double *pp = part + it * K;                                                               \
            for (int j = 0; j < n; ++j) {                                                             \
                pp[j] = segG[0][j + 1] + segG[1][j + 1] + segG[2][j + 1] + segG[3][j + 1];            \
                pp[n + j] = segX[0][j + 1] + segX[1][j + 1] + segX[2][j + 1] + segX[3][j + 1];        \
            }                                                                                         \
            double s1acc = 0, s2acc = 0, b2acc = 0, wacc = 0, b1acc = 0;                              \
            for (int l = 0; l < LANES; ++l) {                                                         \
                s1acc += aS1[l];                                                                      \
                s2acc += aS2[l];                                                                      \
                b2acc += aB2[l];                                                                      \
                wacc += aW[l];                                                                        \
                b1acc += aB1[l];                                                                      \
            }                                                                                         \
            pp[2 * n] = s1acc;                                                                        \
            pp[2 * n + 1] = s2acc;                                                                    \
            if (has_chain) {                                                                          \
                pp[2 * n + 2] = b2acc;                                                                \
                pp[2 * n + 3] = wacc;                                                                 \
                pp[2 * n + 4] = b1acc;                                                                \
            }                                                                                         \
        }                                                                                             \
        /* Second stage, serial and in item order: deterministic for any thread count. */            \
        int L = 2 * n + 2;                                                                            \
        memset(out, 0, sizeof(double) * (size_t)(L + (has_chain ? 3 * C : 0)));                       \
        for (int64_t it = 0; it < items; ++it) {                                                      \
            const double *pp = part + it * K;                                                         \
            for (int j = 0; j < L; ++j) out[j] += pp[j];                                              \
            if (has_chain) {                                                                          \
                int64_t c = item_of(it, hw).plane % C;                                                \
                out[L + c] += pp[L];                                                                  \
                out[L + C + c] += pp[L + 1];                                                          \
                out[L + 2 * C + c] += pp[L + 2];                                                      \
            }                                                                                         \
        }                                                                                             \
        free(part);                                                                                   \
    }                                                                                                 \
                                                                                                      \
    /* Block-output RPReLU (SPEC §4) with the residual add: z = (a + r) + b1 (saved),                 \
     * y = (z > 0 ? z : w*z) + b2. `r` may be NULL (no residual). */                                 \
    static __attribute__((unused)) void rprelu_forward_generic_##SFX(const T *a, const T *r, T *y, T *z, int64_t planes, int64_t hw,         \
                              int64_t C, const T *b1, const T *w, const T *b2, int nthreads) {        \
        int64_t items = item_count(planes, hw);                                                       \
        _Pragma("omp parallel for schedule(static) num_threads(nthreads)")                            \
        for (int64_t it = 0; it < items; ++it) {                                                      \
            item_t q = item_of(it, hw);                                                               \
            int64_t c = q.plane % C;                                                                  \
            T bb1 = b1[c], ww = w[c], bb2 = b2[c];                                                    \
            const T *ap = a + q.begin;                                                                \
            const T *rp = r ? r + q.begin : 0;                                                        \
            T *yp = y + q.begin, *zp = z + q.begin;                                                   \
            if (rp) {                                                                                 \
                for (int64_t i = 0; i < q.len; ++i) {                                                 \
                    T s = ap[i] + rp[i];                                                              \
                    T v = s + bb1;                                                                    \
                    zp[i] = v;                                                                        \
                    yp[i] = (v > (T)0 ? v : ww * v) + bb2;                                            \
                }                                                                                     \
            } else {                                                                                  \
                for (int64_t i = 0; i < q.len; ++i) {                                                 \
                    T v = ap[i] + bb1;                                                                \
                    zp[i] = v;                                                                        \
                    yp[i] = (v > (T)0 ? v : ww * v) + bb2;                                            \
                }                                                                                     \
            }                                                                                         \
        }                                                                                             \
    }                                                                                                 \
                                                                                                      \
    /* Backward of rprelu_forward from the saved z: gx = z > 0 ? gy : w*gy; per channel           \
     * out = [grad b2 (C), grad w (C), grad b1 (C)] in double. */                                     \
    static __attribute__((unused)) void rprelu_backward_generic_##SFX(const T *gy, const T *z, T *gx, int64_t planes, int64_t hw, int64_t C, \
                               const T *w, double *out, int nthreads) {                               \
        int64_t items = item_count(planes, hw);                                                       \
        double *part = (double *)calloc((size_t)(items * 3), sizeof(double));                         \
        _Pragma("omp parallel for schedule(static) num_threads(nthreads)")                            \
        for (int64_t it = 0; it < items; ++it) {                                                      \
            item_t q = item_of(it, hw);                                                               \
            int64_t c = q.plane % C;                                                                  \
            T ww = w[c];                                                                              \
            double aB2[LANES], aW[LANES], aB1[LANES];                                                 \
            for (int l = 0; l < LANES; ++l) aB2[l] = aW[l] = aB1[l] = 0.0;                            \
            const T *gp = gy + q.begin, *zp = z + q.begin;                                            \
            T *gxp = gx + q.begin;                                                                    \
            int64_t full = q.len / LANES * LANES;                                                     \
            for (int64_t i = 0; i < full; i += LANES)                                                 \
                for (int l = 0; l < LANES; ++l) {                                                     \
                    T gg = gp[i + l], v = zp[i + l];                                                  \
                    T g1 = v > (T)0 ? gg : ww * gg;                                                   \
                    gxp[i + l] = g1;                                                                  \
                    aB2[l] += (double)gg;                                                             \
                    aW[l] += v > (T)0 ? 0.0 : (double)(v * gg);                                       \
                    aB1[l] += (double)g1;                                                             \
                }                                                                                     \
            for (int64_t i = full; i < q.len; ++i) {                                                  \
                T gg = gp[i], v = zp[i];                                                              \
                T g1 = v > (T)0 ? gg : ww * gg;                                                       \
                gxp[i] = g1;                                                                          \
                aB2[0] += (double)gg;                                                                 \
                aW[0] += v > (T)0 ? 0.0 : (double)(v * gg);                                           \
                aB1[0] += (double)g1;                                                                 \
            }                                                                                         \
            double *pp = part + it * 3;                                                               \
            for (int l = 0; l < LANES; ++l) {                                                         \
                pp[0] += aB2[l];                                                                      \
                pp[1] += aW[l];                                                                       \
                pp[2] += aB1[l];                                                                      \
            }                                                                                         \
        }                                                                                             \
        memset(out, 0, sizeof(double) * (size_t)(3 * C));                                             \
        for (int64_t it = 0; it < items; ++it) {                                                      \
            int64_t c = item_of(it, hw).plane % C;                                                    \
            for (int j = 0; j < 3; ++j) out[j * C + c] += part[it * 3 + j];                           \
        }                                                                                             \
        free(part);                                                                                   \
    }                                                                                                 \
                                                                                                      \
    /* y = table[codes]: the exact LTQ output rebuilt from its uint8 codes. */                        \
    void decode_##SFX(const uint8_t *codes, T *y, int64_t numel, const T *table, int nthreads) {      \
        _Pragma("omp parallel for schedule(static) num_threads(nthreads)")                            \
        for (int64_t b = 0; b < numel; b += CHUNK) {                                                  \
            int64_t e = min64(numel, b + CHUNK);                                                      \
            for (int64_t i = b; i < e; ++i) y[i] = table[codes[i]];                                   \
        }                                                                                             \
    }

DEFINE_KERNELS(float, f32)
DEFINE_KERNELS(double, f64)

/* ---------------------------------------------------------------------------------------------
 * float32 LTQ kernels for the usual bit widths (n = 1, 3, 7, 15), written with GCC vector
 * extensions (16 lanes; the compiler maps them to AVX-512, AVX2 or SSE). The threshold loops run
 * over a compile-time n, so they unroll into compare/select chains. Because the thresholds are
 * non-decreasing, "select table[j+1] where xs > t[j]" for j = 0..n-1 in order leaves exactly
 * table[m] with m = #{j : xs > t[j]}.
 * ------------------------------------------------------------------------------------------- */

#define VL 16
typedef float vf __attribute__((vector_size(4 * VL)));
typedef int32_t vi __attribute__((vector_size(4 * VL)));
typedef uint8_t vu8 __attribute__((vector_size(VL)));
typedef double vd __attribute__((vector_size(8 * VL)));

#define INLINE static inline __attribute__((always_inline))
INLINE vf vload(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
INLINE void vstore(float *p, vf v) { memcpy(p, &v, sizeof v); }
INLINE vf vsplat(float s) { return (vf){0} + s; }
INLINE vf vsel(vi m, vf a, vf b) { return (vf)((m & (vi)a) | (~m & (vi)b)); }

/* m = #{j : xs > tab[j]} for a sorted 16-entry table whose entries from `n` on are +inf:
 * a branch-free binary search of log2(n+1) steps, each a lane permute and a compare. */
INLINE vi vsearch(vf xs, vf tab, const int n) {
    vi m = {0};
    for (int step = (n + 1) / 2; step >= 1; step /= 2) {
        vf probe = __builtin_shuffle(tab, m + (step - 1));
        m += (xs > probe) & step;
    }
    return m;
}

/* A 16-entry lane table: v[0..count-1] then `pad`. */
INLINE vf vtable(const float *v, int count, float pad) {
    vf t;
    for (int j = 0; j < VL; ++j) t[j] = j < count ? v[j] : pad;
    return t;
}

INLINE void ltq_forward_vec(const float *x, float *y, uint8_t *codes, int64_t len, int chain, float b1,
                            float w, float b2, float s1, const float *thr, const int n, const float *table) {
    const vf tv = vtable(thr, n, __builtin_inff()), tab = vtable(table, n + 1, 0.0f);
    int64_t full = len / VL * VL;
    for (int64_t i = 0; i < full; i += VL) {
        vf v = vload(x + i);
        if (chain) {
            vf z1 = v + b1;
            v = vsel(z1 > 0.0f, z1, w * z1) + b2;
        }
        vi m = vsearch(v * s1, tv, n);
        vstore(y + i, __builtin_shuffle(tab, m));
        if (codes) {
            vu8 c = __builtin_convertvector(m, vu8);
            memcpy(codes + i, &c, VL);
        }
    }
    for (int64_t i = full; i < len; ++i) {
        float v = x[i];
        if (chain) {
            float z1 = v + b1;
            v = (z1 > 0.0f ? z1 : w * z1) + b2;
        }
        float xs = v * s1;
        int m = 0;
        for (int j = 0; j < n; ++j) m += xs > thr[j];
        y[i] = table[m];
        if (codes) codes[i] = (uint8_t)m;
    }
}

#define VBLK 32 /* vectors per block: float lane sums over a block, folded into double after it */

/* Adds the sums of one work item to acc, see ltq_backward_generic: G[n], R[n], S1, S2, (B2, W, B1).
 * Per block: a vector pass computes the interval index, input gradient and the scalar sums; a
 * second pass over the block (in L1) takes the per-interval sums, one interval at a time. */
INLINE void ltq_backward_vec(const float *x, const float *gy, float *gx, int64_t len, int chain, float b1,
                             float w, float b2, float s1, float s2, const float *thr, const float *lev,
                             const float *d, const float *slope, const int n, double *acc) {
    const vf tv = vtable(thr, n, __builtin_inff()), inner = vtable(d + 1, n - 1, __builtin_inff());
    const vf sv = vtable(slope, n, 0.0f), dv = vtable(d, n, 0.0f), lv = vtable(lev, n + 1, 0.0f);
    const float d0 = d[0], dn = d[n];
    const vf zero = {0};
    int64_t full = len / VL * VL;
    vi segb[VBLK];
    vf gb[VBLK], gob[VBLK];
    /* double lane accumulators: [G(n), R(n), S1, S2, B2, W, B1] */
    vd dacc[2 * 15 + 5];
    for (int j = 0; j < 2 * n + 5; ++j) dacc[j] = (vd){0};
    for (int64_t o = 0; o < full; o += VBLK * VL) {
        vf aS1 = zero, aS2 = zero, aB2 = zero, aW = zero, aB1 = zero;
        int nv = (int)((full - o) / VL < VBLK ? (full - o) / VL : VBLK);
        for (int b = 0; b < nv; ++b) {
            int64_t i = o + (int64_t)b * VL;
            vf g = vload(gy + i), v = vload(x + i), z1 = zero;
            vi pos = {0};
            if (chain) {
                z1 = v + b1;
                pos = z1 > 0.0f;
                v = vsel(pos, z1, w * z1) + b2;
            }
            vf xs = v * s1;
            vi inside = (xs > d0) & ~(xs > dn);
            vi seg = vsearch(xs, inner, n);
            vf gxs = vsel(inside, (g * s2) * __builtin_shuffle(sv, seg), zero);
            segb[b] = seg;
            gb[b] = vsel(inside, g, zero);
            gob[b] = vsel(inside, g * (xs - __builtin_shuffle(dv, seg)), zero);
            aS1 += gxs * v;
            aS2 += g * __builtin_shuffle(lv, vsearch(xs, tv, n));
            vf g2 = gxs * s1;
            if (chain) {
                vf g1 = vsel(pos, g2, w * g2);
                aB2 += g2;
                aW += vsel(pos, zero, z1 * g2);
                aB1 += g1;
                vstore(gx + i, g1);
            } else {
                vstore(gx + i, g2);
            }
        }
        for (int k = 0; k < n; ++k) {
            vf aG = zero, aR = zero;
            for (int b = 0; b < nv; ++b) {
                vi in_k = segb[b] == k;
                aG += vsel(in_k, gb[b], zero);
                aR += vsel(in_k, gob[b], zero);
            }
            dacc[k] += __builtin_convertvector(aG, vd);
            dacc[n + k] += __builtin_convertvector(aR, vd);
        }
        dacc[2 * n] += __builtin_convertvector(aS1, vd);
        dacc[2 * n + 1] += __builtin_convertvector(aS2, vd);
        if (chain) {
            dacc[2 * n + 2] += __builtin_convertvector(aB2, vd);
            dacc[2 * n + 3] += __builtin_convertvector(aW, vd);
            dacc[2 * n + 4] += __builtin_convertvector(aB1, vd);
        }
    }
    for (int j = 0; j < 2 * n + (chain ? 5 : 2); ++j)
        for (int l = 0; l < VL; ++l) acc[j] += dacc[j][l];
    for (int64_t i = full; i < len; ++i) {
        float g = gy[i], v = x[i], z1 = 0.0f;
        if (chain) {
            z1 = v + b1;
            v = (z1 > 0.0f ? z1 : w * z1) + b2;
        }
        float xs = v * s1;
        int k = 0, m = 0;
        for (int j = 0; j <= n; ++j) k += xs > d[j];
        for (int j = 0; j < n; ++j) m += xs > thr[j];
        int inside = k >= 1 && k <= n;
        float gxs = inside ? (g * s2) * slope[k - 1] : 0.0f;
        if (inside) acc[k - 1] += g, acc[n + k - 1] += (double)(g * (xs - d[k - 1]));
        acc[2 * n] += (double)(gxs * v);
        acc[2 * n + 1] += (double)(g * lev[m]);
        float g2 = gxs * s1;
        if (chain) {
            float g1 = z1 > 0.0f ? g2 : w * g2;
            acc[2 * n + 2] += g2;
            acc[2 * n + 3] += z1 > 0.0f ? 0.0 : (double)(z1 * g2);
            acc[2 * n + 4] += g1;
            gx[i] = g1;
        } else {
            gx[i] = g2;
        }
    }
}

#define DISPATCH_N(CALL)                                                                            \
    switch (n) {                                                                                    \
    case 1: CALL(1); break;                                                                         \
    case 3: CALL(3); break;                                                                         \
    case 7: CALL(7); break;                                                                         \
    case 15: CALL(15); break;                                                                       \
    }

void ltq_forward_f32(const float *x, float *y, uint8_t *codes, int64_t planes, int64_t hw, int64_t C,
                     const float *b1, const float *w, const float *b2, float s1, const float *thr, int n,
                     const float *table, int nthreads) {
    if (n != 1 && n != 3 && n != 7 && n != 15) {
        ltq_forward_generic_f32(x, y, codes, planes, hw, C, b1, w, b2, s1, thr, n, table, nthreads);
        return;
    }
    int64_t items = item_count(planes, hw);
    _Pragma("omp parallel for schedule(static) num_threads(nthreads)")
    for (int64_t it = 0; it < items; ++it) {
        item_t r = item_of(it, hw);
        int64_t c = r.plane % C;
        int chain = b1 != 0;
        float bb1 = chain ? b1[c] : 0.0f, ww = chain ? w[c] : 0.0f, bb2 = chain ? b2[c] : 0.0f;
        uint8_t *cp = codes ? codes + r.begin : 0;
#define FWD(N) ltq_forward_vec(x + r.begin, y + r.begin, cp, r.len, chain, bb1, ww, bb2, s1, thr, N, table)
        DISPATCH_N(FWD)
#undef FWD
    }
}

void ltq_backward_f32(const float *x, const float *gy, float *gx, int64_t planes, int64_t hw, int64_t C,
                      const float *b1, const float *w, const float *b2, float s1, float s2, const float *thr,
                      const float *lev, const float *d, const float *slope, int n, double *out,
                      int nthreads) {
    if (n != 1 && n != 3 && n != 7 && n != 15) {
        ltq_backward_generic_f32(x, gy, gx, planes, hw, C, b1, w, b2, s1, s2, thr, lev, d, slope, n, out,
                                 nthreads);
        return;
    }
    int64_t items = item_count(planes, hw);
    int chain = b1 != 0;
    int K = 2 * n + 2 + (chain ? 3 : 0);
    double *part = (double *)calloc((size_t)(items * K), sizeof(double));
    _Pragma("omp parallel for schedule(static) num_threads(nthreads)")
    for (int64_t it = 0; it < items; ++it) {
        item_t r = item_of(it, hw);
        int64_t c = r.plane % C;
        float bb1 = chain ? b1[c] : 0.0f, ww = chain ? w[c] : 0.0f, bb2 = chain ? b2[c] : 0.0f;
        double *pp = part + it * K;
#define BWD(N)                                                                                      \
    ltq_backward_vec(x + r.begin, gy + r.begin, gx + r.begin, r.len, chain, bb1, ww, bb2, s1, s2, thr, \
                     lev, d, slope, N, pp)
        DISPATCH_N(BWD)
#undef BWD
    }
    int L = 2 * n + 2;
    memset(out, 0, sizeof(double) * (size_t)(L + (chain ? 3 * C : 0)));
    for (int64_t it = 0; it < items; ++it) {
        const double *pp = part + it * K;
        for (int j = 0; j < L; ++j) out[j] += pp[j];
        if (chain) {
            int64_t c = item_of(it, hw).plane % C;
            out[L + c] += pp[L];
            out[L + C + c] += pp[L + 1];
            out[L + 2 * C + c] += pp[L + 2];
        }
    }
    free(part);
}

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

/* float32 block-output RPReLU with vector extensions (same operations as the generic code). */
void rprelu_forward_f32(const float *a, const float *r, float *y, float *z, int64_t planes, int64_t hw,
                        int64_t C, const float *b1, const float *w, const float *b2, int nthreads) {
    int64_t items = item_count(planes, hw);
    _Pragma("omp parallel for schedule(static) num_threads(nthreads)")
    for (int64_t it = 0; it < items; ++it) {
        item_t q = item_of(it, hw);
        int64_t c = q.plane % C;
        float bb1 = b1[c], ww = w[c], bb2 = b2[c];
        const float *ap = a + q.begin, *rp = r ? r + q.begin : 0;
        float *yp = y + q.begin, *zp = z + q.begin;
        int64_t full = q.len / VL * VL;
        for (int64_t i = 0; i < full; i += VL) {
            vf v = vload(ap + i);
            if (rp) v = v + vload(rp + i);
            v = v + bb1;
            vstore(zp + i, v);
            vstore(yp + i, vsel(v > 0.0f, v, ww * v) + bb2);
        }
        for (int64_t i = full; i < q.len; ++i) {
            float v = ap[i];
            if (rp) v = v + rp[i];
            v = v + bb1;
            zp[i] = v;
            yp[i] = (v > 0.0f ? v : ww * v) + bb2;
        }
    }
}

void rprelu_backward_f32(const float *gy, const float *z, float *gx, int64_t planes, int64_t hw, int64_t C,
                         const float *w, double *out, int nthreads) {
    int64_t items = item_count(planes, hw);
    double *part = (double *)calloc((size_t)(items * 3), sizeof(double));
    _Pragma("omp parallel for schedule(static) num_threads(nthreads)")
    for (int64_t it = 0; it < items; ++it) {
        item_t q = item_of(it, hw);
        float ww = w[q.plane % C];
        const float *gp = gy + q.begin, *zp = z + q.begin;
        float *gxp = gx + q.begin;
        const vf zero = {0};
        vd dB2 = {0}, dW = {0}, dB1 = {0};
        int64_t full = q.len / VL * VL;
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
        double s[3] = {0, 0, 0};
        for (int l = 0; l < VL; ++l) s[0] += dB2[l], s[1] += dW[l], s[2] += dB1[l];
        for (int64_t i = full; i < q.len; ++i) {
            float g = gp[i], v = zp[i];
            float g1 = v > 0.0f ? g : ww * g;
            gxp[i] = g1;
            s[0] += g;
            s[1] += v > 0.0f ? 0.0 : (double)(v * g);
            s[2] += g1;
        }
        memcpy(part + it * 3, s, sizeof s);
    }
    memset(out, 0, sizeof(double) * (size_t)(3 * C));
    for (int64_t it = 0; it < items; ++it) {
        int64_t c = item_of(it, hw).plane % C;
        for (int j = 0; j < 3; ++j) out[j * C + c] += part[it * 3 + j];
    }
    free(part);
}

void rprelu_forward_f64(const double *a, const double *r, double *y, double *z, int64_t planes, int64_t hw,
                        int64_t C, const double *b1, const double *w, const double *b2, int nthreads) {
    rprelu_forward_generic_f64(a, r, y, z, planes, hw, C, b1, w, b2, nthreads);
}

void rprelu_backward_f64(const double *gy, const double *z, double *gx, int64_t planes, int64_t hw, int64_t C,
                         const double *w, double *out, int nthreads) {
    rprelu_backward_generic_f64(gy, z, gx, planes, hw, C, w, out, nthreads);
}
