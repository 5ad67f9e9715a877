/*
 * Shared by the CPU kernels (cpu_kernels.c): includes, the work partition and the 16-lane vector
 * types. See cpu_kernels.c for the conventions (layout, fidelity, determinism).
 */
#ifndef N2UQ_CPU_KERNELS_COMMON_H
#define N2UQ_CPU_KERNELS_COMMON_H

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

static int64_t group_of(int64_t hw) { return hw >= CHUNK ? 1 : CHUNK / (hw > 0 ? hw : 1); }

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

#endif /* N2UQ_CPU_KERNELS_COMMON_H */
