/* The `before` and `after` passes of the fused diagnostic pass in CUDA C (altgrad_lightning/functional/_fused.py),
 * compiled at run time with the NVRTC that ships with torch's CUDA wheels and launched on torch's stream through the
 * driver (_fused_cuda.py): ~10 µs of host time per launch, where Triton's launcher took ~40 µs (session 9).
 *
 * Why not Triton for `after`: the fine ULP histogram (1024 buckets) costs 0.41 ms per step through Triton 3.6's tl.histogram
 * (a ballot per bit of the bucket and a popcount per bucket and element) and 0.013 ms through shared-memory atomics,
 * which Triton does not expose (benchmarks/histogram_gpu.py, benchmarks/NOTES.md, session 7).
 *
 * The same chunk table, the same rows (the columns of _before_columns and _after_columns, float64) and the same
 * histogram (int64, bucket 0 not counted) as the Triton kernels, except that each step adds to the rows here (the
 * Triton kernels write them anew, and the host adds them up after each step): a drain reduces them once
 * (reduce_rows), so a step launches no reduction. Every grid value, index, distance and sum term is the C
 * backend's (_fused_cpu.c), formulated for this machine, where the kernel is bound by its integer and logic (ALU)
 * pipe and by instruction issue (Nsight Compute: ALU 85 % busy; benchmarks/NOTES.md, sessions 8 and 9), so the
 * formulation counts instructions, ALU ones first: saturation as one minimum before
 * rounding, nearest-even rounding by adding a power of two (float adds; on the bits where that constant would
 * overflow), no check per pair where all of a warp's pairs at a step are finite (excluded pairs read as (0, 0)
 * otherwise, instead of a select per format), the histogram bucket from a conversion toward zero without a branch,
 * the stochastic-rounding gap's exponent from the bits of qb (minus one toward zero), and the squares accumulated
 * with fma (one rounding per term where the reference has two, far inside the tests' 1e-12 of the reference sums).
 * Compiled with --fmad=false: no other product is fused into an addition.
 * Each warp draws chunks from a counter and reduces each chunk's sums to its row with shuffles; a block's warps
 * share one shared-memory histogram for all their chunks, added to the global one at the end.
 */
#ifndef CHUNK /* elements per chunk of the chunk table (_fused.CHUNK), defined by _fused_cuda.py */
#define CHUNK 8192
#endif
#define THREADS 256
#define HIST_BINS 1024
/* Compiled once per launch shape, with NF, DO_ULP, DO_HIST, DO_FLIPS and the formats' constants (FORMATS) defined
 * ahead of this source by _fused_cuda.py (as Triton's constexprs): the accumulators of absent formats and families
 * take no registers, and every format constant is an immediate (shifts by constants, no branch on M). */
#ifndef NF
#define NF 1
#endif
#define NFA (NF > 0 ? NF : 1)
static_assert(NF <= 8, "at most eight formats per build (_fused_cuda.MAX_FORMATS)");

struct Fmt {
    int emin, eclamp, m, imax;
    bool magic; /* round_index's constant rounding applies (_fused_cuda._formats_define) */
    unsigned sub_c_bits;
    float p2m, fmax, sub_c; /* sub_c = 2**(EMIN - M + 23), see round_raw */
    double fmax64;
};
#ifndef FORMATS
#define FORMATS {{-6, 8, 3, 126, true, 0x46800000u, 0x1p3f, 0x1.cp8f, 0x1p14f, 0x1.cp8}} /* float8_e4m3fn */
#endif
__device__ constexpr Fmt FMTS[NFA] = FORMATS;
#ifndef STEPS_T /* 32 bits where CHUNK / 32 * 2 * IMAX < 2**32 for every format (set by _fused_cuda.py) */
#define STEPS_T unsigned long long
#endif

__device__ __forceinline__ int floor_log2(float a) { return (int)(__float_as_uint(a) >> 23) - 127; }
__device__ __forceinline__ float pow2_f32(int e) { return __uint_as_float((unsigned)(e + 127) << 23); }

/* Nearest-even grid value of non-negative float32 `a` in F, saturated at F's max, and its order-preserving grid
 * index (_fused_cpu.c: round_raw and round_index; only finite `a` matter). */
__device__ __forceinline__ float round_index(float a, const Fmt &F, int *index) {
    /* Saturation first: max is a grid value and rounding is monotone, so a value past max rounds to max. */
    a = fminf(a, F.fmax);
    float q;
    int idx;
    if (F.magic) {
        /* With e = max(floor(log2 a), EMIN) and c = 2**(e + 23 - M), a + c lies in [c, 2c], where float32's spacing
         * is 2**(e - M), F's grid spacing at a (M <= 22): the addition rounds a to the nearest-even grid value, and
         * t - c is exact. The bits of t minus those of c count the grid steps from 0 in units of 2**(e - M): the
         * index, less 2**M per binade above EMIN's. Two adds and integer ops that issue on the FMA pipe, where the
         * bits below need shifts, masks and selects on the ALU pipe, which bounds this kernel. */
        const int k = max((int)(__float_as_uint(a) >> 23), F.emin + 127); /* e's exponent field */
        const float c = __uint_as_float((unsigned)(k + 23 - F.m) << 23);
        const float t = a + c;
        q = t - c;
        idx = (int)(__float_as_uint(t) - __float_as_uint(c)) + ((k - (F.emin + 127)) << F.m);
    } else if (F.m < 23) { /* c would overflow for max's binade (bfloat16): the bits, both branches, then a select */
        const unsigned bits = __float_as_uint(a);
        /* At or above 2**EMIN: nearest-even rounding of the bits at the M-th significand bit (a carry moves into
         * the exponent field); the rounded bits shifted down are the index plus (EMIN + 126) << M. Below 2**EMIN:
         * a + 2**(EMIN - M + 23) rounds a onto the multiples of 2**(EMIN - M). */
        const bool normal = bits >= (unsigned)((F.emin + 127) << 23);
        const unsigned half = (1u << (22 - F.m)) - 1u, low = (1u << (23 - F.m)) - 1u;
        const unsigned r = (bits + half + ((bits >> (23 - F.m)) & 1u)) & ~low;
        const float t_sub = a + F.sub_c;
        q = normal ? __uint_as_float(r) : t_sub - F.sub_c;
        idx = normal ? (int)(r >> (23 - F.m)) - ((F.emin + 126) << F.m) : (int)(__float_as_uint(t_sub) - F.sub_c_bits);
    } else { /* float32's own significand width: nothing to round above 2**EMIN, below it as for M < 23 */
        const int e = max(floor_log2(a), F.emin);
        const bool big = e > 0;
        const float r = (a * (big ? pow2_f32(1 - e) : F.p2m)) * (big ? F.p2m * 0.5f : pow2_f32(-e));
        const float n = r < 8388608.0f ? (r + 8388608.0f) - 8388608.0f : r;
        q = (n / F.p2m) * pow2_f32(e);
        const float ns = (n >= 0.0f && n < 2147483648.0f) ? n : 0.0f;
        idx = (int)(((unsigned)(e - F.emin) << F.m) + (unsigned)(int)ns);
    }
    *index = idx;
    return q;
}

/* float32 bits to an order-preserving int (-0 and +0 both 0). */
__device__ __forceinline__ int ordered(float x) {
    const int bits = __float_as_int(x), s = bits >> 31; /* 0 or -1 */
    return ((bits & 0x7FFFFFFF) ^ s) - s;
}

/* Warp-wide sum (or max) of one value; lane 0 gets the result. */
template <typename T, bool MAX>
__device__ __forceinline__ T warp_reduce(T v) {
    for (int off = 16; off > 0; off >>= 1) {
        const T o = __shfl_down_sync(0xffffffffu, v, off);
        v = MAX ? (o > v ? o : v) : v + o;
    }
    return v;
}

/* The next chunk for this warp: lane 0 draws a ticket from the counter work[0] and every lane gets it (>= n_chunks
 * when none is left). Chunks differ in size (a parameter's last one) and do not divide evenly among the warps: with
 * a fixed share a third of the SMs sat idle for the last part of the kernel (Nsight Compute: SM active 82 % of the
 * elapsed cycles, benchmarks/NOTES.md, session 8). */
__device__ __forceinline__ long long next_chunk(unsigned int *work, int lane) {
    unsigned int ticket = 0;
    if (lane == 0) ticket = atomicAdd(work, 1u);
    return __shfl_sync(0xffffffffu, ticket, 0);
}

/* Called by every warp once it has drawn its last ticket: the last one out sets the counters back to 0 for the next
 * launch (work[1] counts the warps out). */
__device__ __forceinline__ void release(unsigned int *work, int lane) {
    if (lane == 0 && atomicAdd(work + 1, 1u) == gridDim.x * (THREADS / 32) - 1) work[0] = work[1] = 0;
}

#ifndef DO_STIFF
#define DO_STIFF 0
#endif
#ifndef DO_GRID
#define DO_GRID 0
#endif
#ifndef DO_SNAP
#define DO_SNAP 0
#endif

/* The `before` pass (Triton's _before_kernel, the C backend's before_chunk_n): stiffness and grid sums of the
 * weights w and gradients g (divided by *gscale where it is given: AMP's unapplied scale), one partial row per
 * chunk (the columns of _before_columns), and with DO_SNAP the snapshot of w for the `after` pass. A warp per
 * chunk, as after_kernel; it reads 8 bytes per element and writes 4, at 0.95 of the copy bandwidth on an H100.
 * At least two blocks per SM: with four formats the compiler took 132 registers (one block per SM, 0.73 ms on an
 * H100), capped at 128 it takes 0.58 ms without spilling; one and three formats are unchanged (86 and 125
 * registers; benchmarks/NOTES.md, session 10). */
extern "C" __global__ void __launch_bounds__(THREADS, 2)
before_kernel(const long long *__restrict__ w_tab, const long long *__restrict__ g_tab,
              const long long *__restrict__ snap_off, const int *__restrict__ chunk_t,
              const long long *__restrict__ chunk_start, const long long *__restrict__ numel, float *__restrict__ snap,
              double *__restrict__ part, unsigned int *__restrict__ work, long long n_chunks, int ncols,
              const float *__restrict__ gscale) {
    const int lane = threadIdx.x & 31;
    const bool has_gscale = gscale != nullptr;
    const float gs = has_gscale ? *gscale : 1.0f;
    const float inf = __int_as_float(0x7F800000);
    for (long long c = next_chunk(work, lane); c < n_chunks; c = next_chunk(work, lane)) {
        const int t = chunk_t[c];
        const long long start = chunk_start[c], n = numel[t];
        const int len = (int)((start + CHUNK < n ? start + CHUNK : n) - start);
        const float *Wc = (const float *)w_tab[t] + start, *Gc = (const float *)g_tab[t] + start;
        float *Sc = snap + snap_off[t] + start;
        unsigned int s_valid = 0, s_zero = 0, r_valid = 0;
        double s_x = 0.0, s_xx = 0.0;
        unsigned int below[NFA], on[NFA], over[NFA], under[NFA];
        double ratio_s[NFA], y_s[NFA], yy_s[NFA], xy_s[NFA], err_s[NFA], err2_s[NFA];
        float err_max[NFA];
#pragma unroll
        for (int f = 0; f < NFA; f++) {
            below[f] = on[f] = over[f] = under[f] = 0;
            ratio_s[f] = y_s[f] = yy_s[f] = xy_s[f] = err_s[f] = err2_s[f] = 0.0;
            err_max[f] = 0.0f;
        }
        /* Four elements per lane and group, 16-byte loads and stores (weights, gradients and snapshot slices are
         * 16-byte aligned; a parameter's last group may reach up to three elements past it, inside the same
         * aligned 16 bytes, and its snapshot slice is padded to 64 elements). Two groups per step, both loaded
         * first through the read-only cache: a bound on memory needs bytes in flight (one group per step, loaded as
         * generic loads behind the snapshot's store, ran at 0.78 of copy bandwidth; benchmarks/NOTES.md, session 9). */
        for (int i0 = 4 * lane; i0 < len; i0 += 2 * 4 * 32) {
            float4 wvs[2], gvs[2];
#pragma unroll
            for (int u = 0; u < 2; u++) {
                const int i = i0 + u * 4 * 32;
                wvs[u] = gvs[u] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
                if (i < len) {
                    wvs[u] = __ldg((const float4 *)(Wc + i));
                    if (DO_STIFF) gvs[u] = __ldg((const float4 *)(Gc + i));
                }
            }
#pragma unroll
            for (int u = 0; u < 2; u++) {
                const int i = i0 + u * 4 * 32;
                const float4 wv = wvs[u], gv = gvs[u];
                if (DO_SNAP && i < len) *(float4 *)(Sc + i) = wv;
                const float ww[4] = {wv.x, wv.y, wv.z, wv.w}, gg[4] = {gv.x, gv.y, gv.z, gv.w};
                const int n_here = min(len - i, 4); /* elements j >= n_here are past the chunk's end (all where < 1) */
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    const float a_raw = fabsf(ww[j]);
                    const bool w_fin = (j < n_here) & (a_raw < inf);
                    const float a = w_fin ? a_raw : 0.0f; /* an excluded weight adds 0 below */
                    r_valid += w_fin;
                    double x = 0.0;
                    bool valid = false;
                    if (DO_STIFF) {
                        const float xa = fabsf(has_gscale ? gg[j] / gs : gg[j]);
                        const bool ok = w_fin & (xa < inf);
                        valid = ok & (a != 0.0f);
                        x = valid ? (double)xa : 0.0;
                        s_valid += valid;
                        s_zero += ok & !valid;
                        s_x += x;
                        s_xx = fma(x, x, s_xx); /* exact products: the same sums as unfused */
                    }
                    const int e_raw = (int)(__float_as_uint(a) >> 23) - 127;
#pragma unroll
                    for (int f = 0; f < NF; f++) {
                        const Fmt &F = FMTS[f];
                        if (DO_STIFF) {
                            /* S = 2**(e - M), e the exponent of w clamped to [EMIN, ECLAMP]; |g| / S exactly */
                            const int e = min(max(e_raw, F.emin), F.eclamp);
                            const double y = valid ? __hiloint2double((e - F.m + 1023) << 20, 0) : 0.0;
                            const double ratio = x * __hiloint2double((F.m - e + 1023) << 20, 0);
                            below[f] += x < y;
                            ratio_s[f] += ratio;
                            y_s[f] += y;
                            yy_s[f] = fma(y, y, yy_s[f]);
                            xy_s[f] = fma(x, y, xy_s[f]);
                        }
                        if (DO_GRID) {
                            int ix;
                            const float q = round_index(a, F, &ix), err = fabsf(a - q); /* 0 for an excluded weight */
                            on[f] += w_fin & (err == 0.0f);
                            over[f] += w_fin & (a > F.fmax);
                            under[f] += (q == 0.0f) & (a != 0.0f);
                            const double e64 = (double)err;
                            err_s[f] += e64;
                            err2_s[f] = fma(e64, e64, err2_s[f]);
                            err_max[f] = fmaxf(err_max[f], err);
                        }
                    }
                }
            }
        }
        /* The chunk's row (the columns of _before_columns). */
        double *row = part + c * ncols;
        int col = 0;
        if (DO_STIFF) {
            const unsigned int v = warp_reduce<unsigned int, false>(s_valid);
            const unsigned int z = warp_reduce<unsigned int, false>(s_zero);
            const double sx = warp_reduce<double, false>(s_x), sxx = warp_reduce<double, false>(s_xx);
            if (lane == 0) {
                row[0] += (double)v;
                row[1] += (double)z;
                row[2] += sx;
                row[3] += sxx;
            }
            col = 4;
        }
        if (DO_GRID) {
            const unsigned int v = warp_reduce<unsigned int, false>(r_valid);
            if (lane == 0) row[col] += (double)v;
            col++;
        }
#pragma unroll
        for (int f = 0; f < NF; f++) {
            if (DO_STIFF) {
                const unsigned int b = warp_reduce<unsigned int, false>(below[f]);
                const double r = warp_reduce<double, false>(ratio_s[f]), y = warp_reduce<double, false>(y_s[f]);
                const double yy = warp_reduce<double, false>(yy_s[f]), xy = warp_reduce<double, false>(xy_s[f]);
                if (lane == 0) {
                    row[col] += (double)b;
                    row[col + 1] += r;
                    row[col + 2] += y;
                    row[col + 3] += yy;
                    row[col + 4] += xy;
                }
                col += 5;
            }
            if (DO_GRID) {
                const unsigned int o = warp_reduce<unsigned int, false>(on[f]);
                const unsigned int ov = warp_reduce<unsigned int, false>(over[f]);
                const unsigned int u = warp_reduce<unsigned int, false>(under[f]);
                const double e = warp_reduce<double, false>(err_s[f]), e2 = warp_reduce<double, false>(err2_s[f]);
                const float mx = warp_reduce<float, true>(err_max[f]);
                if (lane == 0) {
                    row[col] += (double)o;
                    row[col + 1] += (double)ov;
                    row[col + 2] += (double)u;
                    row[col + 3] += e;
                    row[col + 4] += e2;
                    row[col + 5] = fmax(row[col + 5], (double)mx);
                }
                col += 6;
            }
        }
    }
    release(work, lane);
}

/* Two blocks per SM from the fifth format on (the compiler would take up to 142 registers for eight formats, one
 * block per SM); up to four formats the compiler's own choice (64 to 103 registers). */
#define AFTER_MIN_BLOCKS (NF > 4 ? 2 : 1)
extern "C" __global__ void __launch_bounds__(THREADS, AFTER_MIN_BLOCKS)
after_kernel(const long long *__restrict__ w_tab, const long long *__restrict__ snap_off,
             const int *__restrict__ chunk_t, const long long *__restrict__ chunk_start,
             const long long *__restrict__ numel, const float *__restrict__ snap, double *__restrict__ part,
             unsigned long long *__restrict__ hist, unsigned int *__restrict__ work, long long n_chunks, int ncols,
             const bool *__restrict__ taken) {
    /* A step the optimizer skipped (*taken false: AMP found inf/NaN gradients) adds nothing: every block returns
     * before drawing a chunk, so the counters stay at 0 for the next launch. */
    if (taken != nullptr && !*taken) return;
    __shared__ unsigned int h[HIST_BINS];
    if (DO_HIST)
        for (int i = threadIdx.x; i < HIST_BINS; i += THREADS) h[i] = 0;
    __syncthreads();
    /* One warp per chunk (its sums need no block barrier), drawn from the counter; the block's warps share the
     * histogram. */
    const int lane = threadIdx.x & 31;
    for (long long c = next_chunk(work, lane); c < n_chunks; c = next_chunk(work, lane)) {
        const int t = chunk_t[c];
        const long long start = chunk_start[c], n = numel[t];
        const long long end = start + CHUNK < n ? start + CHUNK : n;
        const float *W = (const float *)w_tab[t];
        const float *B = snap + snap_off[t];
        /* Counts of one chunk fit 32 bits. n_moved counts w != b: the pairs with a ULP distance (d = 0 exactly where
         * w == b, -0 and +0 alike), the updated pairs of the flips; the rows' n_zero and n_stall are differences. */
        unsigned int n_valid = 0, n_moved = 0, u_max = 0;
        unsigned long long u_sum = 0;
        unsigned int flip[NFA], n_whole[NFA]; /* n_whole: what-if moves of probability 1 */
        STEPS_T steps_s[NFA];
        double f_dd = 0.0, move_s[NFA], near_s[NFA], sr_s[NFA];
#pragma unroll
        for (int f = 0; f < NFA; f++) {
            flip[f] = n_whole[f] = 0;
            steps_s[f] = 0;
            move_s[f] = near_s[f] = sr_s[f] = 0.0;
        }
        /* One pair: its terms added to the accumulators above. An excluded pair comes as (0, 0), which adds 0 to
         * every sum and count (no select per format). */
        auto element = [&](const float b, const float w) {
            const float ab = fabsf(b), aw = fabsf(w);
            n_moved += w != b;
            if (DO_ULP) {
                const int kb = ordered(b), kw = ordered(w);
                const unsigned d = kw >= kb ? (unsigned)kw - (unsigned)kb : (unsigned)kb - (unsigned)kw;
                u_sum += d;
                u_max = d > u_max ? d : u_max;
                if (DO_HIST) {
                    /* Bucket 1 + 16 k + s (k = floor(log2 d), s the four bits below the leading one): the
                     * exponent field and top four significand bits of d converted to float32 toward zero (its
                     * leading bits exact for every d). d = 0 converts to 0 and goes to bucket 0 (the clamp),
                     * which is not added to the global histogram: no branch per element. */
                    const int bucket = (__float_as_int(__uint2float_rz(d)) >> 19) - (16 * 127 - 1);
                    atomicAdd(&h[max(bucket, 0)], 1u);
                }
            }
            if (DO_FLIPS) {
                const double delta = (double)w - (double)b; /* exact */
                f_dd = fma(delta, delta, f_dd);
                const bool b_neg = b < 0.0f, w_neg = w < 0.0f;
                const int toward_sign = (w < b) != b_neg; /* Δ points toward zero from b (0 or 1) */
                const double ad = fabs(delta);
#pragma unroll
                for (int f = 0; f < NF; f++) {
                    const Fmt &F = FMTS[f];
                    int ib, iw;
                    const float qb = round_index(ab, F, &ib), qw = round_index(aw, F, &iw);
                    /* |sw - sb| <= 2 IMAX; a lane's sum over its CHUNK / 32 elements fits 32 bits (STEPS_T) */
                    const STEPS_T steps = F.imax < (1 << 30) ? (STEPS_T)abs((w_neg ? -iw : iw) - (b_neg ? -ib : ib))
                                                             : (STEPS_T)llabs((w_neg ? -(long long)iw : iw) -
                                                                              (b_neg ? -(long long)ib : ib));
                    flip[f] += steps != 0; /* only where w != b: the same value rounds the same */
                    steps_s[f] += steps;
                    /* Stochastic-rounding what-if (flips._survival). The gap toward Δ is 2**(eb - M), half of
                     * it from a power of two above 2**EMIN toward zero; none outward from max (stuck): its
                     * inverse is built as float64 bits (0 when stuck). */
                    const unsigned qb_bits = __float_as_uint(qb);
                    const double vb = (double)__uint_as_float(qb_bits | (__float_as_uint(b) & 0x80000000u));
                    const double vw = (double)__uint_as_float(__float_as_uint(qw) | (__float_as_uint(w) & 0x80000000u));
                    /* The exponent (field) of the spacing toward Δ: that of qb, or of the value just below qb when Δ
                     * points toward zero (one binade lower from a power of two: half the spacing), not below
                     * EMIN's; from qb = 0 toward zero the bits - 1 = -1 shift to -1, which EMIN's replaces. */
                    const int eg = max(((int)qb_bits - toward_sign) >> 23, F.emin + 127);
                    const bool stuck = qb >= F.fmax && !toward_sign; /* no neighbour outward from max */
                    const double p = ad * __hiloint2double(stuck ? 0 : (F.m + 127 + 1023 - eg) << 20, 0);
                    if (p < 1.0)
                        move_s[f] += p;
                    else
                        n_whole[f]++;
                    /* E[SR(vb + Δ)] - vb: Δ inside the range, else the clipped value minus vb */
                    const double s = vb + delta;
                    double e_sr = delta;
                    if (fabs(s) > F.fmax64) e_sr = copysign(F.fmax64, s) - vb;
                    const double m_near = vw - vb;
                    near_s[f] = fma(m_near, m_near, near_s[f]);
                    sr_s[f] = fma(e_sr, e_sr, sr_s[f]);
                }
            }
        };
        /* Four elements per lane and step: one 16-byte load per tensor (snapshot slices and weights are 16-byte
         * aligned; the group holding a parameter's last element may reach up to three elements past it, inside the
         * same aligned 16 bytes; those lanes are masked out). Offsets from the chunk's start fit 32 bits. */
        const float *Bc = B + start, *Wc = W + start;
        const int len = (int)(end - start), full_to = len - 4 * 32 + 4 * lane; /* i <= full_to: every lane has 4 */
        for (int i = 4 * lane; i < len; i += 4 * 32) {
            const float4 bv = *(const float4 *)(Bc + i), wv = *(const float4 *)(Wc + i);
            const float bb[4] = {bv.x, bv.y, bv.z, bv.w}, ww[4] = {wv.x, wv.y, wv.z, wv.w};
            /* Where every lane of the warp holds four finite pairs, no pair is checked: a sum of finite floats is
             * finite or overflows (then the checks below run), an inf or NaN makes it inf or NaN. The comparisons
             * and selects of the checks were ~10 % of this kernel's ALU instructions. */
            const float sum = ((bv.x + bv.y) + (bv.z + bv.w)) + ((wv.x + wv.y) + (wv.z + wv.w));
            if (i <= full_to && __all_sync(0xffffffffu, fabsf(sum) < __int_as_float(0x7F800000))) {
                n_valid += 4;
#pragma unroll
                for (int j = 0; j < 4; j++) element(bb[j], ww[j]);
            } else {
                const int n_here = min(len - i, 4); /* >= 1; elements j >= n_here are past the chunk's end */
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    const bool valid = (j < n_here) & (fabsf(bb[j]) < __int_as_float(0x7F800000)) &
                                       (fabsf(ww[j]) < __int_as_float(0x7F800000));
                    n_valid += valid;
                    element(valid ? bb[j] : 0.0f, valid ? ww[j] : 0.0f);
                }
            }
        }
        /* The chunk's row (the columns of _after_columns). */
        double *row = part + c * ncols;
        const unsigned int v = warp_reduce<unsigned int, false>(n_valid);
        const unsigned int u = warp_reduce<unsigned int, false>(n_moved);
        if (lane == 0) row[0] += (double)v;
        int col = 1;
        if (DO_ULP) {
            const unsigned long long s = warp_reduce<unsigned long long, false>(u_sum);
            const unsigned int mx = warp_reduce<unsigned int, true>(u_max);
            if (lane == 0) {
                row[1] += (double)(v - u); /* n_zero */
                row[2] += (double)s;
                row[3] = fmax(row[3], (double)mx);
            }
            col = 4;
        }
        if (DO_FLIPS) {
            const double dd = warp_reduce<double, false>(f_dd);
            if (lane == 0) {
                row[col] += (double)u;
                row[col + 1] += dd;
            }
            col += 2;
#pragma unroll
            for (int f = 0; f < NF; f++) {
                const unsigned int fl = warp_reduce<unsigned int, false>(flip[f]);
                const unsigned long long sp =
                    warp_reduce<unsigned long long, false>((unsigned long long)steps_s[f]);
                const double mv = warp_reduce<double, false>(move_s[f] + (double)n_whole[f]);
                const double nr = warp_reduce<double, false>(near_s[f]);
                const double sr = warp_reduce<double, false>(sr_s[f]);
                if (lane == 0) {
                    row[col] += (double)fl;
                    row[col + 1] += (double)(u - fl); /* n_stall: updated, no grid step */
                    row[col + 2] += (double)sp;
                    row[col + 3] += mv;
                    row[col + 4] += nr;
                    row[col + 5] += sr;
                }
                col += 6;
            }
        }
    }
    release(work, lane);
    if (DO_HIST) {
        __syncthreads();
        for (int i = threadIdx.x; i < HIST_BINS; i += THREADS)
            if (i != 0 && h[i]) atomicAdd(&hist[i], (unsigned long long)h[i]);
    }
}

/* The running rows of one launch (part: n_rows x ncols, row-major; the kernels above add each step's sums of a chunk
 * to its row, and keep the maximum in the max columns) reduced to `acc` when the pass is drained: column sums, or
 * maxima for the columns whose bit is set in max_mask (non-negative values). One block per column; each thread adds
 * a fixed stride of rows and the block's threads combine in a fixed tree, so the sums are the same on every run. */
extern "C" __global__ void __launch_bounds__(THREADS)
reduce_rows(const double *__restrict__ part, long long n_rows, int ncols, unsigned long long max_mask,
            double *__restrict__ acc) {
    __shared__ double s[THREADS];
    const int j = blockIdx.x;
    const bool is_max = (max_mask >> j) & 1ull;
    double v = 0.0;
    for (long long r = threadIdx.x; r < n_rows; r += THREADS) {
        const double x = part[r * ncols + j];
        v = is_max ? fmax(v, x) : v + x;
    }
    s[threadIdx.x] = v;
    __syncthreads();
    for (int half = THREADS / 2; half > 0; half >>= 1) {
        if (threadIdx.x < half) {
            const double o = s[threadIdx.x + half];
            s[threadIdx.x] = is_max ? fmax(s[threadIdx.x], o) : s[threadIdx.x] + o;
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) acc[j] = s[0];
}

/* tab[0..n) = t.p[0..n), n <= TABLE_LEN: this step's gradient pointers written into the device table by one launch
 * whose arguments carry them (the driver copies a launch's arguments when it is queued, so the host's buffer is free
 * again at once), in place of a pinned host buffer and a copy (~0.1 ms of host time per step inside training,
 * benchmarks/NOTES.md, session 10). */
#define TABLE_LEN 480
struct PtrTable {
    long long p[TABLE_LEN];
};
extern "C" __global__ void __launch_bounds__(THREADS) set_table(long long *__restrict__ tab, int n, PtrTable t) {
    for (int i = threadIdx.x; i < n; i += THREADS) tab[i] = t.p[i];
}
