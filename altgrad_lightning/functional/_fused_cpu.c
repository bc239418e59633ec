/* The CPU backend of the fused diagnostic pass (altgrad_lightning/functional/_fused.py).
 *
 * The same two passes as the Triton kernels, over the same chunk table, writing the same partial-sum rows (one
 * row of float64 columns per chunk, in the column order of _before_columns/_after_columns): `_fused.py` builds,
 * adds and drains them alike for both backends. The element arithmetic is the Triton kernels' (float32 bit surgery
 * for the grid, float64 for the sums), step for step but for the grid below 2**EMIN, which is formed another exact
 * way here (see round_raw), so the sums equal the reference `_update` functions (counts exactly, float64 sums up to
 * summation order), which tests/test_fused.py checks for both backends.
 *
 * Each chunk is cut into blocks of L elements held in GCC/Clang vector types, one machine vector of doubles wide;
 * every sum has lane-wise accumulators (SIMD code without reassociation flags: the lanes are separate sums). On
 * machines with AVX-512 the three loops are written in intrinsics instead (ALTGRAD_AVX512 below), with the same
 * values; the generic code serves every other machine, and tests/test_fused.py checks a build of each. The
 * `after` pass runs its ULP sums and its flip sums as two loops over the chunk (the second re-reads it from L2),
 * so that each loop keeps its accumulators in registers. Threads take chunks from an atomic counter, and a chunk's
 * row is written by the one thread that took it, so the result does not depend on the scheduling. The fine ULP
 * histogram is counted per thread (four interleaved copies, so that equal buckets in a row do not wait on each
 * other) and added to the shared one with atomic adds at the end.
 *
 * Compiled by _fused_cpu.py with the system C compiler; C99 with GCC vector extensions, and OpenMP (the runtime
 * torch runs on) or else pthreads for threads; no Python or torch headers.
 */
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#if defined(__SSE2__)
#include <immintrin.h>
#endif

/* Lanes per block: one machine vector of doubles (GCC splits wider vectors, but turns comparisons of vectors
 * wider than the machine's into scalar code). */
#ifndef L
#if defined(__AVX512F__)
#define L 8
#elif defined(__AVX__)
#define L 4
#else
#define L 2
#endif
#endif
#define MAXF 8      /* formats per call */
#define HIST_BINS 1024
#define HCOPIES 4

typedef struct {
    int32_t emin, eclamp, m, imax;
    int32_t magic;   /* round16 rounds by adding a power of two (see there) */
    int32_t steps32; /* a chunk's sum of grid steps fits a uint32 lane (flip_terms16) */
    uint32_t sub_c_bits;
    float p2m, fmax, sub_c; /* sub_c = 2**(EMIN - M + 23), see round_raw */
    float zero_max;         /* 2**(EMIN - M - 1): the largest value that rounds to 0 (ties to even), M <= 22 */
    double fmax64;
} fmt_t;

typedef struct {
    const int64_t *w_tab, *g_tab, *snap_off, *chunk_start, *numel;
    const int32_t *chunk_t, *idx;
    float *snap;
    double *part;
    int64_t *hist;
    float gscale, fast; /* fast: the bound below which a block takes the fast path (set in altgrad_fused_pass) */
    int has_gscale, write_snap, sampled, do_stiff, do_grid, do_ulp, do_flips, do_hist, nf, ncols;
    int64_t chunk, n_chunks, next;
    fmt_t f[MAXF];
} job_t;

/* L lanes of each type (GCC/Clang vector extensions: SIMD on any target, split into the machine's widths).
 * Comparisons give masks of -1/0 in the signed integer type of the operands' width. */
typedef float vf __attribute__((vector_size(4 * L)));
typedef int32_t vi __attribute__((vector_size(4 * L)));
typedef uint32_t vu __attribute__((vector_size(4 * L)));
typedef double vd __attribute__((vector_size(8 * L)));
typedef int64_t vl __attribute__((vector_size(8 * L)));
#define INLINE static inline __attribute__((always_inline))
#define CVT(v, t) __builtin_convertvector((v), t)

INLINE vf self(vi m, vf a, vf b) { return (vf)(((vi)a & m) | ((vi)b & ~m)); }
INLINE vi seli(vi m, vi a, vi b) { return (a & m) | (b & ~m); }
INLINE vd seld(vl m, vd a, vd b) { return (vd)(((vl)a & m) | ((vl)b & ~m)); }
INLINE vl sell(vl m, vl a, vl b) { return (a & m) | (b & ~m); }
/* Lane-wise min(a, b) = a < b ? a : b and max(a, b) = a > b ? a : b (b where a is NaN): one instruction where the
 * machine has it (a select costs three: compare, mask, blend). */
#if defined(__AVX512F__) && L == 8
INLINE vd vmin(vd a, vd b) { return (vd)_mm512_min_pd((__m512d)a, (__m512d)b); }
INLINE vd vmax(vd a, vd b) { return (vd)_mm512_max_pd((__m512d)a, (__m512d)b); }
#elif defined(__AVX__) && L == 4
INLINE vd vmin(vd a, vd b) { return (vd)_mm256_min_pd((__m256d)a, (__m256d)b); }
INLINE vd vmax(vd a, vd b) { return (vd)_mm256_max_pd((__m256d)a, (__m256d)b); }
#elif defined(__SSE2__) && L == 2
INLINE vd vmin(vd a, vd b) { return (vd)_mm_min_pd((__m128d)a, (__m128d)b); }
INLINE vd vmax(vd a, vd b) { return (vd)_mm_max_pd((__m128d)a, (__m128d)b); }
#else
INLINE vd vmin(vd a, vd b) { return seld(a < b, a, b); }
INLINE vd vmax(vd a, vd b) { return seld(a > b, a, b); }
#endif
INLINE vl wide(vi m) { return CVT(m, vl); } /* a 32-bit mask as a 64-bit one */
INLINE vi narrow(vl m) { return CVT(m, vi); }
/* Broadcasts (one instruction; a scalar operand of a vector operation is broadcast). allf and alld are only given
 * values other than -0 (0 + -0 is +0). */
INLINE vf allf(float x) { return (vf){0} + x; }
INLINE vi alli(int32_t x) { return (vi){0} + x; }
INLINE vd alld(double x) { return (vd){0} + x; }
INLINE float u2f_scalar(uint32_t u) { float x; memcpy(&x, &u, 4); return x; }
INLINE vf vabs(vf x) { return (vf)((vu)x & 0x7FFFFFFFu); }
/* Exponent field of non-negative float32 lanes minus the bias (subnormals -127, inf/NaN 128). */
INLINE vi floor_log2(vf a) { return (vi)((vu)a >> 23) - 127; }
INLINE vf pow2_f32(vi e) { return (vf)((vu)(e + 127) << 23); }             /* -126..127 */
INLINE vd pow2_f64(vi e) { return (vd)(CVT(e + 1023, vl) << 52); }         /* -1022..1023 */
INLINE vi imax(vi a, vi b) { return seli(a > b, a, b); }
INLINE vi imin(vi a, vi b) { return seli(a < b, a, b); }
INLINE vi lanes(void) { vi v; for (int j = 0; j < L; j++) v[j] = j; return v; }

/* Nearest-even grid value of non-negative float32 lanes `a` in format F on the grid extended past its max (inf
 * where that lies past float32's max), and its order-preserving grid index, unsaturated (Triton's _round_index
 * before its saturation, lane for lane; only finite `a` matter, the rest is masked by the callers). */
INLINE vf round_raw(vf a, const fmt_t *F, vi *index) {
    vu bits = (vu)a;
    vf q;
    vi idx;
    if (F->m < 23) {
        vi normal = (vi)(bits >= (vu)alli((F->emin + 127) << 23)); /* a >= 2**EMIN: unsigned order of the bits */
        /* Above 2**EMIN: the significand moved to [2**M, 2**(M + 1)) by setting its exponent field; adding 2**23
         * rounds it to the nearest integer n (ties to even) and leaves n in the low bits. */
        vf t = (vf)((bits & 0x7FFFFFu) | ((uint32_t)(F->m + 127) << 23)) + 8388608.0f;
        vu n_normal = (vu)t - 0x4B000000u;
        vf q_normal = (vf)((bits & 0x7F800000u) - 0x800000u + (n_normal << (23 - F->m)));
        /* Below 2**EMIN the grid is the multiples of 2**(EMIN - M), the spacing of float32 in [C, 2 C) for
         * C = 2**(EMIN - M + 23): a + C rounds a onto it (ties to even), n is the bits above C's, and no operand is a
         * float32 denormal unless a is one (2**(EMIN - M) itself is for bfloat16, and denormals cost x86 a
         * microcode assist per operation). */
        vf t_sub = a + F->sub_c;
        vu n = (vu)seli(normal, (vi)n_normal, (vi)((vu)t_sub - F->sub_c_bits));
        q = self(normal, q_normal, t_sub - F->sub_c);
        idx = (vi)((((bits >> 23) - (uint32_t)(F->emin + 127)) << F->m) & (vu)normal) + (vi)n;
    } else { /* float32's own significand width: nothing to round above 2**EMIN, below it as for M < 23 */
        vi e = imax(floor_log2(a), alli(F->emin));
        vi big = e > 0;
        vf r = (a * self(big, pow2_f32(1 - e), allf(F->p2m))) * self(big, allf(F->p2m * 0.5f), pow2_f32(-e));
        vf n = self(r < 8388608.0f, (r + 8388608.0f) - 8388608.0f, r); /* r < 2**23 only below 2**EMIN */
        q = (n / F->p2m) * pow2_f32(e);
        vf ns = self((n >= 0.0f) & (n < 2147483648.0f), n, allf(0.0f));
        idx = (vi)(((vu)(e - F->emin) << F->m) + (vu)CVT(ns, vi));
    }
    *index = idx;
    return q;
}

/* round_raw saturated at the format's max (Triton's _round_index). */
INLINE vf round_index(vf a, const fmt_t *F, vi *index) {
    vi idx;
    vf q = round_raw(a, F, &idx);
    vi over = idx > F->imax;
    *index = seli(over, alli(F->imax), idx);
    return self(over, allf(F->fmax), q);
}

#if defined(__AVX512F__) && defined(__AVX512VL__) && defined(__AVX512DQ__) && L == 8
/* With AVX-512 the loops are written with intrinsics: comparisons stay in mask registers and selects are single
 * masked instructions, where GCC's lowering of the generic vector code materialises every mask as a vector and
 * splits the int32 -> int64 and float -> double conversions in halves (the flip loop: 343 instructions per block
 * of 8 elements, ~150 with intrinsics; benchmarks/NOTES.md, session 7). The loops take 16 float32 lanes per block,
 * one 512-bit vector, and do the float64 work in two halves of 8: the float32 and int32 steps, most of the
 * instructions, take half as many instructions as in 256-bit vectors (session 12). Every value is the generic
 * code's; a few steps are formulated for the instruction set (session 8, as the CUDA C kernel): saturation as
 * minima, 1 / S from S's float64 bits, the stochastic-rounding gap's exponent from qb's bits minus one toward
 * zero, and the squares fused with their accumulation (in `before` the products are exact, so the sums are the
 * same; in the flips one rounding per term instead of two). The format loops are unrolled over local copies of
 * the formats, so that their constants leave the block loop (GCC keeps them rolled otherwise, with the
 * accumulators on the stack), and a block whose values all lie below J->fast takes a branch where every format
 * rounds with round16_fast and nothing is saturated or clipped (session 13). tests/test_fused.py checks both
 * builds against the reference. */
#define ALTGRAD_AVX512 1
#define L16 16
INLINE __m512i set16(int32_t x) { return _mm512_set1_epi32(x); }
INLINE __m256i lo8i(__m512i x) { return _mm512_castsi512_si256(x); }
INLINE __m256i hi8i(__m512i x) { return _mm512_extracti32x8_epi32(x, 1); }
INLINE __m512d lo_pd(__m512 x) { return _mm512_cvtps_pd(_mm512_castps512_ps256(x)); } /* exact */
INLINE __m512d hi_pd(__m512 x) { return _mm512_cvtps_pd(_mm512_extractf32x8_ps(x, 1)); }
/* 2**(e - 1023) of int32 exponent fields e in 1..2046, as doubles: the low and the high 8 lanes. */
INLINE __m512d pow2_lo(__m512i e) { return _mm512_castsi512_pd(_mm512_slli_epi64(_mm512_cvtepi32_epi64(lo8i(e)), 52)); }
INLINE __m512d pow2_hi(__m512i e) { return _mm512_castsi512_pd(_mm512_slli_epi64(_mm512_cvtepi32_epi64(hi8i(e)), 52)); }
INLINE __mmask8 lo8(__mmask16 m) { return (__mmask8)m; }
INLINE __mmask8 hi8(__mmask16 m) { return (__mmask8)(m >> 8); }
INLINE __mmask16 first16(int cnt) { return (__mmask16)((1u << cnt) - 1); }
INLINE __m512i count16(__m512i acc, __mmask16 m) { return _mm512_mask_sub_epi32(acc, m, acc, set16(-1)); }
/* A 16-lane count folded into L = 8 lanes (each lane of a chunk's count is at most CHUNK / 16: no overflow). */
INLINE vi fold16(__m512i x) { return (vi)_mm256_add_epi32(lo8i(x), hi8i(x)); }

/* load_block of 16 lanes (zero past cnt; gathered with a sample). */
INLINE __m512 load16(const job_t *J, const float *src, int64_t soff, int64_t base, int cnt) {
    if (J->sampled) {
        float buf[L16] = {0};
        const int32_t *ix = J->idx + soff + base;
        for (int j = 0; j < cnt; j++) buf[j] = src[ix[j]];
        return _mm512_loadu_ps(buf);
    }
    return _mm512_maskz_loadu_ps(first16(cnt), src + base);
}

/* The nearest-even grid value and index of 16 lanes 0 <= a <= max, a < 2**(105 + M), for M <= 22 (round16 once
 * saturated, and the blocks below J->fast). With e = max(floor(log2 a), EMIN) and C = 2**(e + 23 - M) (a finite
 * float32 there), a + C lies in [C, 2 C], where float32's spacing is 2**(e - M), the format's at a: the addition
 * rounds a to the nearest-even grid value, t - C is exact, and the bits of t minus C's are the index less 2**M per
 * binade above EMIN's (the CUDA C kernel's round_index). 10 instructions of one uop each (a shift by an xmm count
 * would take two). */
INLINE __m512 round16_fast(__m512 a, const fmt_t *F, __m512i *index) {
    const __m512i k = _mm512_max_epi32(_mm512_srli_epi32(_mm512_castps_si512(a), 23), set16(F->emin + 127));
    const __m512i c = _mm512_slli_epi32(_mm512_add_epi32(k, set16(23 - F->m)), 23);
    const __m512 t = _mm512_add_ps(a, _mm512_castsi512_ps(c));
    const __m512i above = _mm512_sllv_epi32(_mm512_sub_epi32(k, set16(F->emin + 127)), set16(F->m));
    *index = _mm512_add_epi32(_mm512_sub_epi32(_mm512_castps_si512(t), c), above);
    return _mm512_sub_ps(t, _mm512_castsi512_ps(c));
}

/* round_index (saturated nearest-even grid value and index of non-negative float32 lanes) of 16 lanes. */
INLINE __m512 round16(__m512 a, const fmt_t *F, __m512i *index) {
    if (F->m >= 23) { /* the generic code, in halves (rare formats) */
        vi i0, i1;
        const vf q0 = round_index((vf)_mm512_castps512_ps256(a), F, &i0);
        const vf q1 = round_index((vf)_mm512_extractf32x8_ps(a, 1), F, &i1);
        *index = _mm512_inserti32x8(_mm512_castsi256_si512((__m256i)i0), (__m256i)i1, 1);
        return _mm512_insertf32x8(_mm512_castps256_ps512((__m256)q0), (__m256)q1, 1);
    }
    if (F->magic) /* saturation first: max is a grid value and rounding is monotone */
        return round16_fast(_mm512_min_ps(a, _mm512_set1_ps(F->fmax)), F, index);
    const __m512i bits = _mm512_castps_si512(a);
    const __mmask16 normal = _mm512_cmpge_epu32_mask(bits, set16((F->emin + 127) << 23));
    const __m512 t = _mm512_add_ps(
        _mm512_castsi512_ps(_mm512_or_si512(_mm512_and_si512(bits, set16(0x7FFFFF)), set16((F->m + 127) << 23))),
        _mm512_set1_ps(8388608.0f));
    const __m512i n_normal = _mm512_sub_epi32(_mm512_castps_si512(t), set16(0x4B000000));
    const __m512i q_normal = _mm512_add_epi32(_mm512_sub_epi32(_mm512_and_si512(bits, set16(0x7F800000)), set16(0x800000)),
                                              _mm512_sllv_epi32(n_normal, set16(23 - F->m)));
    const __m512 t_sub = _mm512_add_ps(a, _mm512_set1_ps(F->sub_c));
    const __m512i n = _mm512_mask_blend_epi32(
        normal, _mm512_sub_epi32(_mm512_castps_si512(t_sub), set16((int32_t)F->sub_c_bits)), n_normal);
    const __m512 q = _mm512_mask_blend_ps(normal, _mm512_sub_ps(t_sub, _mm512_set1_ps(F->sub_c)),
                                          _mm512_castsi512_ps(q_normal));
    const __m512i e = _mm512_maskz_sllv_epi32(normal, _mm512_sub_epi32(_mm512_srli_epi32(bits, 23), set16(F->emin + 127)),
                                              set16(F->m));
    /* Saturation: past max the extended grid's value is above max (or inf) and its index above IMAX. */
    *index = _mm512_min_epi32(_mm512_add_epi32(e, n), set16(F->imax));
    return _mm512_min_ps(q, _mm512_set1_ps(F->fmax));
}

/* The snapshot of 16 lanes: store_snapshot's streaming store for a whole aligned block, else a masked store. */
INLINE void store16(float *dst, __m512 w, int cnt) {
    if (cnt == L16 && ((uintptr_t)dst & 63) == 0) _mm512_stream_ps(dst, w);
    else _mm512_mask_storeu_ps(dst, first16(cnt), w);
}
#endif

/* float32 bits to order-preserving int32 lanes (-0 and +0 both 0). */
INLINE vi ordered(vf x) {
    vi bits = (vi)x;
    return seli(bits < 0, -(bits & 0x7FFFFFFF), bits);
}

/* The snapshot of a block: whole blocks with streaming stores where the machine has them (the snapshot is read
 * again only after the optimizer step, so it need not pass through the caches, nor be read into them first);
 * the stores are fenced when a worker finishes (flush_stores). Streaming stores need L * 4-byte alignment, which
 * whole blocks have (snapshot slices start at multiples of 64 elements, chunks at multiples of CHUNK, and torch
 * aligns its CPU allocations to 64 bytes); checked anyway, since the snapshot is any torch tensor. */
INLINE void store_snapshot(float *dst, vf w, int cnt) {
    const int aligned = ((uintptr_t)dst & (sizeof(vf) - 1)) == 0;
#if defined(__AVX__) && L == 8
    if (cnt == L && aligned) { _mm256_stream_ps(dst, (__m256)w); return; }
#elif defined(__SSE__) && L == 4
    if (cnt == L && aligned) { _mm_stream_ps(dst, (__m128)w); return; }
#endif
    (void)aligned;
    memcpy(dst, &w, (size_t)cnt * 4);
}

INLINE void flush_stores(void) {
#if defined(__SSE__)
    _mm_sfence();
#endif
}

/* A chunk of the table: its parameter's index, its elements [start, end), the parameter's snapshot offset and
 * weights. */
typedef struct {
    int64_t t, start, end, soff;
    const float *w;
} span_t;

INLINE span_t chunk_span(const job_t *J, int64_t c) {
    span_t S;
    S.t = J->chunk_t[c];
    S.start = J->chunk_start[c];
    S.end = S.start + J->chunk < J->numel[S.t] ? S.start + J->chunk : J->numel[S.t];
    S.soff = J->snap_off[S.t];
    S.w = (const float *)(intptr_t)J->w_tab[S.t];
    return S;
}

/* The elements [base, base + cnt) of a chunk, zero-padded to L lanes (gathered with a sample). */
INLINE vf load_block(const job_t *J, const float *src, int64_t soff, int64_t base, int cnt) {
    vf out = allf(0.0f);
    if (J->sampled) {
        const int32_t *ix = J->idx + soff + base;
        for (int j = 0; j < cnt; j++) out[j] = src[ix[j]];
    } else if (cnt == L) {
        memcpy(&out, src + base, sizeof out);
    } else {
        memcpy(&out, src + base, (size_t)cnt * 4);
    }
    return out;
}

#ifdef ALTGRAD_AVX512
/* One format's stiffness and grid terms of a 16-lane block (before_chunk_n), into its accumulators; `fast` (a
 * constant): the block lies below J->fast. */
INLINE void before_terms16(const job_t *J, const fmt_t *F, const int fast, __m512 a, __m512i e_raw, __mmask16 wfin,
                           __mmask16 wnz, __mmask16 valid, __m512d x_lo, __m512d x_hi, __m512i *below, vd *ratio_s,
                           vd *y_s, vd *yy_s, vd *xy_s, __m512i *on, __m512i *over, __m512i *under, vd *err_s,
                           vd *err2_s, __m512 *err_max) {
    const __m512 zf = _mm512_setzero_ps(), absm = _mm512_castsi512_ps(set16(0x7FFFFFFF));
    if (J->do_stiff) {
        /* S's exponent field, 0 where not valid; |g| / S exactly: 1 / S has the exponent field 2046 - S's, formed
         * on the float64 bits (2**1023 where y = 0, and then x = 0) */
        const __m512i e_lo = _mm512_max_epi32(e_raw, set16(F->emin)); /* below J->fast, e_raw < EMAX <= ECLAMP */
        const __m512i ef = _mm512_maskz_add_epi32(valid, fast ? e_lo : _mm512_min_epi32(e_lo, set16(F->eclamp)),
                                                  set16(1023 - F->m));
        const __m512d y_lo = pow2_lo(ef), y_hi = pow2_hi(ef);
        const __m512i inv = _mm512_set1_epi64((int64_t)2046 << 52);
        const __m512d inv_lo = _mm512_castsi512_pd(_mm512_sub_epi64(inv, _mm512_castpd_si512(y_lo)));
        const __m512d inv_hi = _mm512_castsi512_pd(_mm512_sub_epi64(inv, _mm512_castpd_si512(y_hi)));
        const __m512d ratio_lo = _mm512_mul_pd(x_lo, inv_lo), ratio_hi = _mm512_mul_pd(x_hi, inv_hi);
        *below = count16(*below, _mm512_kunpackb(_mm512_cmp_pd_mask(x_hi, y_hi, _CMP_LT_OQ),
                                                 _mm512_cmp_pd_mask(x_lo, y_lo, _CMP_LT_OQ)));
        *ratio_s += (vd)ratio_lo;
        *ratio_s += (vd)ratio_hi;
        *y_s += (vd)y_lo;
        *y_s += (vd)y_hi;
        *yy_s = (vd)_mm512_fmadd_pd(y_lo, y_lo, (__m512d)*yy_s);
        *yy_s = (vd)_mm512_fmadd_pd(y_hi, y_hi, (__m512d)*yy_s);
        *xy_s = (vd)_mm512_fmadd_pd(x_lo, y_lo, (__m512d)*xy_s);
        *xy_s = (vd)_mm512_fmadd_pd(x_hi, y_hi, (__m512d)*xy_s);
    }
    if (J->do_grid) {
        __m512i ix;
        const __m512 q = fast ? round16_fast(a, F, &ix) : round16(a, F, &ix);
        const __m512 err = _mm512_maskz_and_ps(wfin, _mm512_sub_ps(a, q), absm); /* |w - copysign(q, w)| */
        const __m512d err_lo = lo_pd(err), err_hi = hi_pd(err);
        *on = count16(*on, _mm512_mask_cmp_ps_mask(wfin, err, zf, _CMP_EQ_OQ));
        if (!fast) *over = count16(*over, _mm512_mask_cmp_ps_mask(wfin, a, _mm512_set1_ps(F->fmax), _CMP_GT_OQ));
        /* Below J->fast, q = 0 exactly up to 2**(EMIN - M - 1) */
        *under = count16(*under, fast ? _mm512_mask_cmp_ps_mask(wnz, a, _mm512_set1_ps(F->zero_max), _CMP_LE_OQ)
                                      : _mm512_mask_cmp_ps_mask(wnz, q, zf, _CMP_EQ_OQ));
        *err_s += (vd)err_lo;
        *err_s += (vd)err_hi;
        *err2_s = (vd)_mm512_fmadd_pd(err_lo, err_lo, (__m512d)*err2_s);
        *err2_s = (vd)_mm512_fmadd_pd(err_hi, err_hi, (__m512d)*err2_s);
        *err_max = _mm512_max_ps(err, *err_max);
    }
}
#endif

/* One chunk's stiffness and grid sums (and its snapshot), for nf formats: called with a constant nf (see
 * before_chunk), so that the format loop unrolls and the accumulators stay in registers. */
INLINE void before_chunk_n(job_t *J, int64_t c, const int nf) {
    const span_t S = chunk_span(J, c);
    const int64_t start = S.start, end = S.end, soff = S.soff;
    const float *W = S.w;
    const float *G = J->do_stiff ? (const float *)(intptr_t)J->g_tab[S.t] : 0;
    const vd zd = alld(0.0);
    vi s_valid = alli(0), s_zero = alli(0), r_valid = alli(0);
    vd s_x = zd, s_xx = zd;
    vi below[MAXF], on[MAXF], over[MAXF], under[MAXF];
    vd ratio_s[MAXF], y_s[MAXF], yy_s[MAXF], xy_s[MAXF], err_s[MAXF], err2_s[MAXF];
    vf err_max[MAXF];
    for (int f = 0; f < nf; f++) {
        below[f] = on[f] = over[f] = under[f] = alli(0);
        ratio_s[f] = y_s[f] = yy_s[f] = xy_s[f] = err_s[f] = err2_s[f] = zd;
        err_max[f] = allf(0.0f);
    }
#ifdef ALTGRAD_AVX512
    fmt_t Fs[MAXF]; /* local copies: the unrolled format loop keeps their constants out of the block loop */
    for (int f = 0; f < nf; f++) Fs[f] = J->f[f];
    const __m512 inf = _mm512_set1_ps(__builtin_inff()), zf = _mm512_setzero_ps();
    const __m512 absm = _mm512_castsi512_ps(set16(0x7FFFFFFF));
    const __m512i zi = _mm512_setzero_si512();
    __m512i s_valid16 = zi, s_zero16 = zi, r_valid16 = zi, below16[MAXF], on16[MAXF], over16[MAXF], under16[MAXF];
    __m512 err_max16[MAXF];
    for (int f = 0; f < nf; f++) {
        below16[f] = on16[f] = over16[f] = under16[f] = zi;
        err_max16[f] = zf;
    }
    for (int64_t base = start; base < end; base += L16) {
        const int cnt = end - base < L16 ? (int)(end - base) : L16;
        const __m512 w = load16(J, W, soff, base, cnt);
        if (J->write_snap) store16(J->snap + soff + base, w, cnt);
        const __m512 a = _mm512_and_ps(w, absm);
        const __m512i e_raw = _mm512_sub_epi32(_mm512_srli_epi32(_mm512_castps_si512(a), 23), set16(127));
        const __mmask16 wfin = _mm512_mask_cmp_ps_mask(first16(cnt), a, inf, _CMP_LT_OQ); /* not NaN, inf */
        __mmask16 valid = 0;
        __m512d x_lo = _mm512_setzero_pd(), x_hi = x_lo;
        if (J->do_stiff) {
            __m512 g = load16(J, G, soff, base, cnt);
            if (J->has_gscale) g = _mm512_div_ps(g, _mm512_set1_ps(J->gscale));
            const __m512 xa = _mm512_and_ps(g, absm);
            const __mmask16 ok = _mm512_mask_cmp_ps_mask(wfin, xa, inf, _CMP_LT_OQ);
            valid = _mm512_mask_cmp_ps_mask(ok, a, zf, _CMP_NEQ_OQ);
            const __m512 xv = _mm512_maskz_mov_ps(valid, xa);
            x_lo = lo_pd(xv);
            x_hi = hi_pd(xv);
            s_valid16 = count16(s_valid16, valid);
            s_zero16 = count16(s_zero16, ok & ~valid);
            s_x += (vd)x_lo;
            s_x += (vd)x_hi;
            s_xx = (vd)_mm512_fmadd_pd(x_lo, x_lo, (__m512d)s_xx); /* exact products: fused or not, the same sums */
            s_xx = (vd)_mm512_fmadd_pd(x_hi, x_hi, (__m512d)s_xx);
        }
        if (J->do_grid) r_valid16 = count16(r_valid16, wfin);
        const __mmask16 wnz = _mm512_mask_cmp_ps_mask(wfin, a, zf, _CMP_NEQ_OQ); /* finite, nonzero */
        /* Below J->fast no element needs saturating: every format's grid value is round16_fast's */
        if (!_mm512_mask_cmp_ps_mask(wfin, a, _mm512_set1_ps(J->fast), _CMP_GE_OQ)) {
#pragma GCC unroll 8
            for (int f = 0; f < nf; f++)
                before_terms16(J, &Fs[f], 1, a, e_raw, wfin, wnz, valid, x_lo, x_hi, &below16[f], &ratio_s[f], &y_s[f],
                               &yy_s[f], &xy_s[f], &on16[f], &over16[f], &under16[f], &err_s[f], &err2_s[f],
                               &err_max16[f]);
        } else {
#pragma GCC unroll 8
            for (int f = 0; f < nf; f++)
                before_terms16(J, &Fs[f], 0, a, e_raw, wfin, wnz, valid, x_lo, x_hi, &below16[f], &ratio_s[f], &y_s[f],
                               &yy_s[f], &xy_s[f], &on16[f], &over16[f], &under16[f], &err_s[f], &err2_s[f],
                               &err_max16[f]);
        }
    }
    s_valid = fold16(s_valid16);
    s_zero = fold16(s_zero16);
    r_valid = fold16(r_valid16);
    for (int f = 0; f < nf; f++) {
        below[f] = fold16(below16[f]);
        on[f] = fold16(on16[f]);
        over[f] = fold16(over16[f]);
        under[f] = fold16(under16[f]);
        err_max[f] = (vf)_mm256_max_ps(_mm512_castps512_ps256(err_max16[f]), _mm512_extractf32x8_ps(err_max16[f], 1));
    }
#else
    const vi lane = lanes();
    for (int64_t base = start; base < end; base += L) {
        const int cnt = end - base < L ? (int)(end - base) : L;
        vf w = load_block(J, W, soff, base, cnt);
        if (J->write_snap) store_snapshot(J->snap + soff + base, w, cnt);
        vf a = vabs(w);
        vi e_raw = floor_log2(a);
        vi wfin = (a < __builtin_inff()) & (lane < cnt); /* false for NaN and inf */
        vi valid = alli(0);
        vd x = zd;
        if (J->do_stiff) {
            vf g = load_block(J, G, soff, base, cnt);
            if (J->has_gscale) g = g / J->gscale;
            vf xa = vabs(g);
            vi ok = wfin & (xa < __builtin_inff());
            valid = ok & (a != 0.0f);
            x = CVT((vf)((vi)xa & valid), vd); /* masked in float32: one double operation fewer */
            s_valid -= valid;
            s_zero -= ok & (a == 0.0f);
            s_x += x;
            s_xx += x * x;
        }
        if (J->do_grid) r_valid -= wfin;
        for (int f = 0; f < nf; f++) {
            const fmt_t *F = &J->f[f];
            if (J->do_stiff) {
                vi e = imin(imax(e_raw, alli(F->emin)), alli(F->eclamp));
                /* The stiffness S = 2**(e - M), 0 where not valid (a zero biased exponent field). */
                vd y = (vd)(CVT((e + (1023 - F->m)) & valid, vl) << 52);
                vd ratio = x * pow2_f64(F->m - e); /* |g| / S exactly */
                below[f] -= narrow(x < y);         /* ratio < 1 (scaling by 2**(M - e) is exact); false where y = 0 */
                ratio_s[f] += ratio;
                y_s[f] += y;
                yy_s[f] += y * y;
                xy_s[f] += x * y;
            }
            if (J->do_grid) {
                vi ix;
                vf q = round_index(a, F, &ix);
                vf err = (vf)((vi)vabs(a - q) & wfin); /* |w - copysign(q, w)| in float32, 0 where not finite */
                vd err64 = CVT(err, vd);
                on[f] -= wfin & (err == 0.0f);
                over[f] -= wfin & (a > F->fmax);
                under[f] -= wfin & (q == 0.0f) & (a != 0.0f);
                err_s[f] += err64;
                err2_s[f] += err64 * err64;
                err_max[f] = self(err > err_max[f], err, err_max[f]);
            }
        }
    }
#endif
    double *row = J->part + c * J->ncols;
    int col = 0;
    if (J->do_stiff) {
        double v = 0, z = 0, sx = 0, sxx = 0;
        for (int j = 0; j < L; j++) { v += s_valid[j]; z += s_zero[j]; sx += s_x[j]; sxx += s_xx[j]; }
        row[0] = v; row[1] = z; row[2] = sx; row[3] = sxx;
        col = 4;
    }
    if (J->do_grid) {
        double v = 0;
        for (int j = 0; j < L; j++) v += r_valid[j];
        row[col++] = v;
    }
    for (int f = 0; f < nf; f++) {
        if (J->do_stiff) {
            double b = 0, r = 0, y = 0, yy = 0, xy = 0;
            for (int j = 0; j < L; j++) {
                b += below[f][j]; r += ratio_s[f][j]; y += y_s[f][j]; yy += yy_s[f][j]; xy += xy_s[f][j];
            }
            row[col] = b; row[col + 1] = r; row[col + 2] = y; row[col + 3] = yy; row[col + 4] = xy;
            col += 5;
        }
        if (J->do_grid) {
            double o = 0, ov = 0, u = 0, e = 0, e2 = 0;
            float mx = 0.0f;
            for (int j = 0; j < L; j++) {
                o += on[f][j]; ov += over[f][j]; u += under[f][j]; e += err_s[f][j]; e2 += err2_s[f][j];
                mx = err_max[f][j] > mx ? err_max[f][j] : mx;
            }
            row[col] = o; row[col + 1] = ov; row[col + 2] = u; row[col + 3] = e; row[col + 4] = e2;
            row[col + 5] = (double)mx;
            col += 6;
        }
    }
}

/* The snapshot and w' of one block, zero-padded, and the mask of its valid lanes (both finite, inside the chunk). */
INLINE vi after_block(const job_t *J, const float *W, int64_t soff, int64_t base, int cnt, vf *b, vf *w) {
    *b = allf(0.0f);
    memcpy(b, J->snap + soff + base, (size_t)cnt * 4);
    *w = load_block(J, W, soff, base, cnt);
    return (lanes() < cnt) & (vabs(*b) < __builtin_inff()) & (vabs(*w) < __builtin_inff());
}

#ifdef ALTGRAD_AVX512
/* The AVX-512 ULP loop stores its blocks' buckets as uint16 and counts them here, HBUF at a time: a scalar loop of
 * loads and increments. Taking the 16 buckets of a block out of the vector instead (what the compiler makes of a
 * store and reload) takes two port-5 uops per element, and the loop waited on them
 * (benchmarks/NOTES.md, session 13). */
#define HBUF 1024
static inline void count_buckets(uint32_t (*hist)[HIST_BINS], const uint16_t *bk, int n) {
    for (int j = 0; j < n; j += HCOPIES) /* n: a multiple of 16 */
        for (int h = 0; h < HCOPIES; h++) hist[h][bk[j + h]]++;
}
#endif

/* One chunk's n_valid and ULP sums, and its fine ULP histogram into `hist`: row[0..3]. */
INLINE void ulp_chunk(job_t *J, int64_t c, uint32_t (*hist)[HIST_BINS]) {
    const span_t S = chunk_span(J, c);
    const int64_t start = S.start, end = S.end, soff = S.soff;
    const float *W = S.w;
    vi u_valid = alli(0), u_zero = alli(0);
    vl u_sum = CVT(alli(0), vl);
    vu u_max = (vu)alli(0);
#ifdef ALTGRAD_AVX512
    const __m512i zi = _mm512_setzero_si512(), mag = set16(0x7FFFFFFF);
    const __m512 inf = _mm512_set1_ps(__builtin_inff());
    __m512i u_valid16 = zi, u_zero16 = zi, u_max16 = zi;
    uint16_t bk[HBUF]; /* buckets, counted by count_buckets every HBUF elements */
    int nbk = 0;
    for (int64_t base = start; base < end; base += L16) {
        const int cnt = end - base < L16 ? (int)(end - base) : L16;
        const __m512i b = _mm512_castps_si512(_mm512_maskz_loadu_ps(first16(cnt), J->snap + soff + base));
        const __m512i w = _mm512_castps_si512(load16(J, W, soff, base, cnt));
        const __m512i ab = _mm512_and_si512(b, mag), aw = _mm512_and_si512(w, mag);
        const __mmask16 valid = _mm512_mask_cmp_ps_mask(
            _mm512_mask_cmp_ps_mask(first16(cnt), _mm512_castsi512_ps(ab), inf, _CMP_LT_OQ), _mm512_castsi512_ps(aw),
            inf, _CMP_LT_OQ);
        u_valid16 = count16(u_valid16, valid);
        const __m512i kb = _mm512_mask_sub_epi32(b, _mm512_movepi32_mask(b), zi, ab);
        const __m512i kw = _mm512_mask_sub_epi32(w, _mm512_movepi32_mask(w), zi, aw);
        const __mmask16 ge = _mm512_cmpge_epi32_mask(kw, kb);
        const __m512i d = _mm512_maskz_mov_epi32(valid, _mm512_mask_sub_epi32(_mm512_sub_epi32(kb, kw), ge, kw, kb));
        const __mmask16 moved = _mm512_test_epi32_mask(d, d);
        u_zero16 = count16(u_zero16, valid & ~moved);
        u_sum += (vl)_mm512_cvtepu32_epi64(lo8i(d));
        u_sum += (vl)_mm512_cvtepu32_epi64(hi8i(d));
        u_max16 = _mm512_max_epu32(d, u_max16);
        if (J->do_hist) { /* the generic code's bucket, below */
            const __mmask16 big = _mm512_cmpge_epu32_mask(d, set16(1 << 24));
            const __m512i dd = _mm512_mask_srli_epi32(d, big, d, 8);
            const __m512i top = _mm512_sub_epi32(_mm512_srli_epi32(_mm512_castps_si512(_mm512_cvtepi32_ps(dd)), 19),
                                                 set16(16 * 127 - 1));
            const __m512i bucket = _mm512_maskz_mov_epi32(moved, _mm512_mask_add_epi32(top, big, top, set16(128)));
            _mm256_storeu_si256((__m256i *)(bk + nbk), _mm512_cvtepi32_epi16(bucket)); /* < HIST_BINS */
            nbk += L16;
            if (nbk == HBUF) {
                count_buckets(hist, bk, nbk);
                nbk = 0;
            }
        }
    }
    if (nbk) count_buckets(hist, bk, nbk);
    u_valid = fold16(u_valid16);
    u_zero = fold16(u_zero16);
    u_max = (vu)_mm256_max_epu32(lo8i(u_max16), hi8i(u_max16));
#else
    for (int64_t base = start; base < end; base += L) {
        const int cnt = end - base < L ? (int)(end - base) : L;
        vf b, w;
        vi valid = after_block(J, W, soff, base, cnt, &b, &w);
        u_valid -= valid;
        vi kb = ordered(b), kw = ordered(w);
        vu ub = (vu)kb, uw = (vu)kw;
        vu d = (vu)(seli(kw >= kb, (vi)(uw - ub), (vi)(ub - uw)) & valid); /* modular differences, exact */
        vi moved = (vi)(d != 0u);
        u_zero -= valid & ~moved;
        u_sum += CVT(d, vl);
        u_max = (vu)seli((vi)(d > u_max), (vi)d, (vi)u_max);
        if (J->do_hist) {
            /* Bucket 1 + 16 k + s of d >= 1 (k = floor(log2 d), s the four bits below the leading one): the
             * exponent field and the top four significand bits of d as a float32, exact while the conversion is
             * (d < 2**24); d >= 2**24 is shifted right by 8 first (same leading five bits, 8 octaves lower).
             * Unmoved (and invalid) elements go to bucket 0, which the caller overwrites with n_zero: no branch. */
            vi big = (vi)(d >= (vu)alli(1 << 24));
            vi dd = (vi)(d >> ((vu)big & 8u));
            vi bucket = (((vi)CVT(dd, vf) >> 19) - (16 * 127 - 1) + (big & 128)) & moved;
            for (int j = 0; j < L; j++) hist[j % HCOPIES][bucket[j]]++;
        }
    }
#endif
    double *row = J->part + c * J->ncols;
    double v = 0, z = 0;
    uint32_t mx = 0;
    int64_t si = 0;
    for (int j = 0; j < L; j++) { v += u_valid[j]; z += u_zero[j]; si += u_sum[j]; mx = u_max[j] > mx ? u_max[j] : mx; }
    row[0] = v; row[1] = z; row[2] = (double)si; row[3] = (double)mx;
}

#ifdef ALTGRAD_AVX512
/* One format's flip terms of a 16-lane block (flips_chunk_n), into its accumulators; `fast` (a constant): the
 * block lies below J->fast (see the caller): it needs no saturation nor clipping at max, and its expected
 * stochastic-rounding movement is added by the caller. */
INLINE void flip_terms16(const fmt_t *F, const int fast, __m512 ab, __m512 aw, __m512 b_sign, __m512 w_sign,
                         __mmask16 valid, __mmask16 b_neg, __mmask16 w_neg, __mmask16 toward_sign, __m512d d_lo,
                         __m512d d_hi, __m512i *flip, __m512i *steps32, vl *steps_s, vd *move_s, vd *near_s,
                         vd *sr_s) {
    const __m512i zi = _mm512_setzero_si512();
    __m512i ib, iw;
    const __m512 qb = fast ? round16_fast(ab, F, &ib) : round16(ab, F, &ib);
    const __m512 qw = fast ? round16_fast(aw, F, &iw) : round16(aw, F, &iw);
    const __m512i sw = _mm512_mask_sub_epi32(iw, w_neg, zi, iw), sb = _mm512_mask_sub_epi32(ib, b_neg, zi, ib);
    __mmask16 moved;
    if (F->imax < (1 << 30)) { /* |sw - sb| <= 2 IMAX < 2**31: the two halves' sum fits uint32 */
        const __m512i steps = _mm512_maskz_abs_epi32(valid, _mm512_sub_epi32(sw, sb));
        moved = _mm512_test_epi32_mask(steps, steps);
        if (F->steps32) /* a chunk's sum fits each uint32 lane: widened once, at the end of the chunk */
            *steps32 = _mm512_add_epi32(*steps32, steps);
        else
            *steps_s += (vl)_mm512_cvtepu32_epi64(_mm256_add_epi32(lo8i(steps), hi8i(steps)));
    } else {
        const __m512i s_lo = _mm512_maskz_abs_epi64(lo8(valid), _mm512_sub_epi64(_mm512_cvtepi32_epi64(lo8i(sw)),
                                                                               _mm512_cvtepi32_epi64(lo8i(sb))));
        const __m512i s_hi = _mm512_maskz_abs_epi64(hi8(valid), _mm512_sub_epi64(_mm512_cvtepi32_epi64(hi8i(sw)),
                                                                               _mm512_cvtepi32_epi64(hi8i(sb))));
        moved = _mm512_kunpackb(_mm512_test_epi64_mask(s_hi, s_hi), _mm512_test_epi64_mask(s_lo, s_lo));
        *steps_s += (vl)s_lo;
        *steps_s += (vl)s_hi;
    }
    *flip = count16(*flip, moved);
    /* Stochastic-rounding what-if, as in the generic code. */
    const __m512 vbf = _mm512_maskz_or_ps(valid, qb, b_sign), vwf = _mm512_maskz_or_ps(valid, qw, w_sign);
    const __m512d vb_lo = lo_pd(vbf), vb_hi = hi_pd(vbf), vw_lo = lo_pd(vwf), vw_hi = hi_pd(vwf);
    /* The exponent field of the spacing toward delta: qb's, or that of the value just below qb toward zero
     * (bits - 1: one binade lower from a power of two, half the spacing), not below EMIN's (from qb = 0 the
     * arithmetic shift of -1 is -1); inv_gap = 2**(M - e_gap) has the exponent field 1150 + M - that. */
    const __m512i qbits = _mm512_mask_sub_epi32(_mm512_castps_si512(qb), toward_sign, _mm512_castps_si512(qb),
                                                set16(1));
    const __m512i ig = _mm512_sub_epi32(set16(1150 + F->m),
                                        _mm512_max_epi32(_mm512_srai_epi32(qbits, 23), set16(F->emin + 127)));
    const __m512d one = _mm512_set1_pd(1.0);
    const __m512d p_lo = _mm512_min_pd(_mm512_mul_pd(_mm512_abs_pd(d_lo), pow2_lo(ig)), one);
    const __m512d p_hi = _mm512_min_pd(_mm512_mul_pd(_mm512_abs_pd(d_hi), pow2_hi(ig)), one);
    const __m512d n_lo = _mm512_sub_pd(vw_lo, vb_lo), n_hi = _mm512_sub_pd(vw_hi, vb_hi);
    *near_s = (vd)_mm512_fmadd_pd(n_lo, n_lo, (__m512d)*near_s);
    *near_s = (vd)_mm512_fmadd_pd(n_hi, n_hi, (__m512d)*near_s);
    if (fast) {
        *move_s += (vd)p_lo;
        *move_s += (vd)p_hi;
        return;
    }
    const __mmask16 go = ~_mm512_mask_cmp_ps_mask(~toward_sign, qb, _mm512_set1_ps(F->fmax), _CMP_GE_OQ);
    *move_s = (vd)_mm512_mask_add_pd((__m512d)*move_s, lo8(go), (__m512d)*move_s, p_lo);
    *move_s = (vd)_mm512_mask_add_pd((__m512d)*move_s, hi8(go), (__m512d)*move_s, p_hi);
    /* E[SR(vb + delta)] - vb: delta inside the range, else the clipped value minus vb */
    const __m512d lo = _mm512_set1_pd(-F->fmax64), hi = _mm512_set1_pd(F->fmax64);
    const __m512d t_lo = _mm512_add_pd(vb_lo, d_lo), t_hi = _mm512_add_pd(vb_hi, d_hi);
    const __m512d c_lo = _mm512_min_pd(_mm512_max_pd(t_lo, lo), hi), c_hi = _mm512_min_pd(_mm512_max_pd(t_hi, lo), hi);
    const __m512d e_lo = _mm512_mask_sub_pd(d_lo, _mm512_cmp_pd_mask(t_lo, c_lo, _CMP_NEQ_UQ), c_lo, vb_lo);
    const __m512d e_hi = _mm512_mask_sub_pd(d_hi, _mm512_cmp_pd_mask(t_hi, c_hi, _CMP_NEQ_UQ), c_hi, vb_hi);
    *sr_s = (vd)_mm512_fmadd_pd(e_lo, e_lo, (__m512d)*sr_s);
    *sr_s = (vd)_mm512_fmadd_pd(e_hi, e_hi, (__m512d)*sr_s);
}
#endif

/* One chunk's flip sums of nf formats (a constant, as in before_chunk_n) from row[col] on, and n_valid into
 * row[0] with `count_valid`. A separate loop from ulp_chunk: the chunk is re-read from L2, and each loop keeps its
 * accumulators in registers (measured faster than one loop doing both). */
INLINE void flips_chunk_n(job_t *J, int64_t c, int col, int count_valid, const int nf) {
    const span_t S = chunk_span(J, c);
    const int64_t start = S.start, end = S.end, soff = S.soff;
    const float *W = S.w;
    const vd zd = alld(0.0);
    vi u_valid = alli(0), f_upd = alli(0);
    vd f_dd = zd, sr_fast = zd; /* sr_fast: see the AVX-512 loop */
    vi flip[MAXF];
    vl steps_s[MAXF];
    vd move_s[MAXF], near_s[MAXF], sr_s[MAXF];
    for (int f = 0; f < nf; f++) {
        flip[f] = alli(0);
        steps_s[f] = CVT(alli(0), vl);
        move_s[f] = near_s[f] = sr_s[f] = zd;
    }
#ifdef ALTGRAD_AVX512
    const __m512i zi = _mm512_setzero_si512();
    const __m512 zf = _mm512_setzero_ps(), sign = _mm512_set1_ps(-0.0f), inf = _mm512_set1_ps(__builtin_inff());
    const __m512 absm = _mm512_castsi512_ps(set16(0x7FFFFFFF));
    fmt_t Fs[MAXF]; /* as in before_chunk_n */
    for (int f = 0; f < nf; f++) Fs[f] = J->f[f];
    __m512i u_valid16 = zi, f_upd16 = zi, flip16[MAXF], steps32[MAXF];
    for (int f = 0; f < nf; f++) flip16[f] = steps32[f] = zi;
    for (int64_t base = start; base < end; base += L16) {
        const int cnt = end - base < L16 ? (int)(end - base) : L16;
        const __m512 b = _mm512_maskz_loadu_ps(first16(cnt), J->snap + soff + base);
        const __m512 w = load16(J, W, soff, base, cnt);
        const __m512 ab = _mm512_and_ps(b, absm), aw = _mm512_and_ps(w, absm);
        const __mmask16 valid = _mm512_mask_cmp_ps_mask(_mm512_mask_cmp_ps_mask(first16(cnt), ab, inf, _CMP_LT_OQ),
                                                        aw, inf, _CMP_LT_OQ);
        u_valid16 = count16(u_valid16, valid);
        const __mmask16 updated = _mm512_mask_cmp_ps_mask(valid, w, b, _CMP_NEQ_OQ);
        f_upd16 = count16(f_upd16, updated);
        const __m512d d_lo = _mm512_maskz_sub_pd(lo8(updated), lo_pd(w), lo_pd(b)); /* exact */
        const __m512d d_hi = _mm512_maskz_sub_pd(hi8(updated), hi_pd(w), hi_pd(b));
        f_dd = (vd)_mm512_fmadd_pd(d_lo, d_lo, (__m512d)f_dd);
        f_dd = (vd)_mm512_fmadd_pd(d_hi, d_hi, (__m512d)f_dd);
        const __mmask16 b_neg = _mm512_cmp_ps_mask(b, zf, _CMP_LT_OQ), w_neg = _mm512_cmp_ps_mask(w, zf, _CMP_LT_OQ);
        const __mmask16 toward_sign = _mm512_mask_cmp_ps_mask(updated, w, b, _CMP_LT_OQ) ^ b_neg;
        const __m512 b_sign = _mm512_maskz_mov_ps(b_neg, sign), w_sign = _mm512_maskz_mov_ps(w_neg, sign);
        /* Where no valid element reaches J->fast (the common case), no stored value is at max and v + delta stays
         * inside every format's range: the expected stochastic-rounding movement is delta for every format, added
         * once (sr_fast), and nothing is stuck. */
        if (!_mm512_mask_cmp_ps_mask(valid, _mm512_max_ps(ab, aw), _mm512_set1_ps(J->fast), _CMP_GE_OQ)) {
            sr_fast = (vd)_mm512_fmadd_pd(d_lo, d_lo, (__m512d)sr_fast);
            sr_fast = (vd)_mm512_fmadd_pd(d_hi, d_hi, (__m512d)sr_fast);
#pragma GCC unroll 8
            for (int f = 0; f < nf; f++)
                flip_terms16(&Fs[f], 1, ab, aw, b_sign, w_sign, valid, b_neg, w_neg, toward_sign, d_lo, d_hi,
                             &flip16[f], &steps32[f], &steps_s[f], &move_s[f], &near_s[f], &sr_s[f]);
        } else {
#pragma GCC unroll 8
            for (int f = 0; f < nf; f++)
                flip_terms16(&Fs[f], 0, ab, aw, b_sign, w_sign, valid, b_neg, w_neg, toward_sign, d_lo, d_hi,
                             &flip16[f], &steps32[f], &steps_s[f], &move_s[f], &near_s[f], &sr_s[f]);
        }
    }
    u_valid = fold16(u_valid16);
    f_upd = fold16(f_upd16);
    for (int f = 0; f < nf; f++) {
        flip[f] = fold16(flip16[f]);
        steps_s[f] += (vl)_mm512_cvtepu32_epi64(lo8i(steps32[f]));
        steps_s[f] += (vl)_mm512_cvtepu32_epi64(hi8i(steps32[f]));
    }
#else
    for (int64_t base = start; base < end; base += L) {
        const int cnt = end - base < L ? (int)(end - base) : L;
        vf b, w;
        vi valid = after_block(J, W, soff, base, cnt, &b, &w);
        u_valid -= valid;
        vf ab = vabs(b), aw = vabs(w);
        vi updated = valid & (w != b);
        f_upd -= updated;
        vd delta = (vd)((vl)(CVT(w, vd) - CVT(b, vd)) & wide(updated)); /* exact */
        f_dd += delta * delta;
        vi b_neg = b < 0.0f, w_neg = w < 0.0f;
        vi toward_sign = ((w < b) & updated) != b_neg; /* delta < 0, compared in float32 */
        vd ad = (vd)((vl)delta & 0x7FFFFFFFFFFFFFFFLL);
        for (int f = 0; f < nf; f++) {
            const fmt_t *F = &J->f[f];
            vi ib, iw;
            vf qb = round_index(ab, F, &ib);
            vf qw = round_index(aw, F, &iw);
            vi sw = seli(w_neg, -iw, iw), sb = seli(b_neg, -ib, ib), moved;
            if (F->imax < (1 << 30)) { /* |sw - sb| <= 2 IMAX fits int32: widened once, for the sum */
                vi diff = sw - sb;
                vi steps = seli(diff < 0, -diff, diff) & valid;
                moved = steps != 0;
                steps_s[f] += CVT(steps, vl);
            } else {
                vl diff = CVT(sw, vl) - CVT(sb, vl);
                vl steps = sell(diff < 0, -diff, diff) & wide(valid);
                moved = narrow(steps != 0);
                steps_s[f] += steps;
            }
            flip[f] -= moved;
            /* Stochastic-rounding what-if (flips._survival): stored value vb = q(b), update delta = w - b; the
             * signs and the masks applied in float32 (q >= 0: the sign bit of -q is b's). */
            vd vb = CVT((vf)(((vu)qb | ((vu)b_neg & 0x80000000u)) & (vu)valid), vd);
            vd vw = CVT((vf)(((vu)qw | ((vu)w_neg & 0x80000000u)) & (vu)valid), vd);
            vi eb = imax(floor_log2(qb), alli(F->emin));
            vi toward = (qb != 0.0f) & toward_sign;
            vi half = toward & (eb > F->emin) & (vi)(((vu)qb & 0x7FFFFFu) == 0u); /* a power of two */
            vd inv_gap = pow2_f64(seli(half, F->m + 1 - eb, F->m - eb));
            vd p = ad * inv_gap;
            p = vmin(p, alld(1.0));
            vd p_move = (vd)((vl)p & ~wide((qb >= F->fmax) & ~toward));
            /* E[SR(vb + delta)] - vb: delta inside the range, else the clipped value minus vb */
            vd t = vb + delta, s = vmin(vmax(t, alld(-F->fmax64)), alld(F->fmax64));
            vd e_sr = seld((vl)(t == s), delta, s - vb), m_near = vw - vb;
            move_s[f] += p_move;
            near_s[f] += m_near * m_near;
            sr_s[f] += e_sr * e_sr;
        }
    }
#endif
    double *row = J->part + c * J->ncols;
    if (count_valid) {
        double v = 0;
        for (int j = 0; j < L; j++) v += u_valid[j];
        row[0] = v;
    }
    double u = 0, dd = 0, fast = 0;
    for (int j = 0; j < L; j++) { u += f_upd[j]; dd += f_dd[j]; fast += sr_fast[j]; }
    row[col] = u; row[col + 1] = dd;
    col += 2;
    for (int f = 0; f < nf; f++) {
        double fl = 0, mv = 0, nr = 0, sr = 0;
        int64_t sp = 0;
        for (int j = 0; j < L; j++) {
            fl += flip[f][j]; sp += steps_s[f][j];
            mv += move_s[f][j]; nr += near_s[f][j]; sr += sr_s[f][j];
        }
        /* n_stall = n_updated - n_flip: a grid step needs w != b (the same value rounds the same) */
        row[col] = fl; row[col + 1] = u - fl; row[col + 2] = (double)sp;
        row[col + 3] = mv; row[col + 4] = nr; row[col + 5] = sr + fast;
        col += 6;
    }
}

#define DISPATCH(call, nf)                                                                                    \
    switch (nf) {                                                                                             \
    case 0: call(0); break; case 1: call(1); break; case 2: call(2); break; case 3: call(3); break;            \
    case 4: call(4); break; case 5: call(5); break; case 6: call(6); break; case 7: call(7); break;            \
    default: call(8); break;                                                                                  \
    }

static void before_chunk(job_t *J, int64_t c) {
#define BEFORE(k) before_chunk_n(J, c, k)
    DISPATCH(BEFORE, J->nf)
}

static void after_chunk(job_t *J, int64_t c, uint32_t (*hist)[HIST_BINS]) {
    if (J->do_ulp) ulp_chunk(J, c, hist);
    if (J->do_flips) {
        const int col = J->do_ulp ? 4 : 1, count_valid = !J->do_ulp;
#define FLIPS(k) flips_chunk_n(J, c, col, count_valid, k)
        DISPATCH(FLIPS, J->nf)
    }
}

/* Run worker(arg) on `threads` threads, the caller's included: the OpenMP runtime torch itself runs on (linked by
 * _fused_cpu.py), whose worker threads spin for a while after torch's own parallel regions and so take the work
 * instead of competing with threads of ours; else pthreads. The workers share their tasks through an atomic
 * counter in `arg`. */
static void run_parallel(void *(*worker)(void *), void *arg, int threads) {
#ifdef ALTGRAD_OPENMP
#pragma omp parallel num_threads(threads)
    worker(arg);
#else
    int extra = threads - 1 < 64 ? threads - 1 : 64;
    pthread_t tid[64];
    int started = 0;
    for (; started < extra; started++)
        if (pthread_create(&tid[started], 0, worker, arg) != 0) break; /* fewer threads: still correct */
    worker(arg);
    for (int i = 0; i < started; i++) pthread_join(tid[i], 0);
#endif
}

typedef struct { job_t *job; int after; } worker_arg_t;

static void flush_hist(job_t *J, uint32_t (*hist)[HIST_BINS]) {
    for (int h = 0; h < HCOPIES; h++)
        for (int k = 0; k < HIST_BINS; k++)
            if (hist[h][k]) __atomic_fetch_add(&J->hist[k], (int64_t)hist[h][k], __ATOMIC_RELAXED);
    memset(hist, 0, sizeof(uint32_t) * HCOPIES * HIST_BINS);
}

static void *worker(void *arg) {
    worker_arg_t *A = (worker_arg_t *)arg;
    job_t *J = A->job;
    uint32_t hist[HCOPIES][HIST_BINS]; /* 16 KiB of this thread's stack */
    int count_hist = A->after && J->do_ulp && J->do_hist;
    if (count_hist) memset(hist, 0, sizeof hist);
    int64_t since_flush = 0;
    for (;;) {
        int64_t c = __atomic_fetch_add(&J->next, 1, __ATOMIC_RELAXED);
        if (c >= J->n_chunks) break;
        if (A->after) {
            after_chunk(J, c, hist);
            since_flush += J->chunk;
        } else {
            before_chunk(J, c);
        }
        if (count_hist && since_flush >= ((int64_t)1 << 30)) { /* a uint32 count cannot have wrapped yet */
            flush_hist(J, hist);
            since_flush = 0;
        }
    }
    if (count_hist) flush_hist(J, hist);
    flush_stores();
    return 0;
}

/* A format from one row of _format_constants: (EMIN, ECLAMP, M, 2**M, max, IMAX, sub-scale 1, sub-scale 2,
 * 2**(EMIN - M), MAGIC). */
static void set_format(fmt_t *F, const double *r) {
    F->emin = (int32_t)r[0]; F->eclamp = (int32_t)r[1]; F->m = (int32_t)r[2]; F->p2m = (float)r[3];
    F->fmax = (float)r[4]; F->fmax64 = r[4]; F->imax = (int32_t)r[5];
    F->sub_c_bits = (uint32_t)(F->emin - F->m + 23 + 127) << 23; /* normal: EMIN >= -126, M <= 23 */
    F->sub_c = u2f_scalar(F->sub_c_bits);
    F->magic = r[9] != 0.0; /* 2**(e + 23 - M) is a finite float32 for every binade e up to max's */
    const int zk = F->emin - F->m - 1; /* >= -149 for M <= 22 (EMIN >= -126): a float32, denormal below -126 */
    F->zero_max = u2f_scalar(zk >= -126 ? (uint32_t)(zk + 127) << 23 : zk >= -149 ? 1u << (zk + 149) : 0u);
}

/* Run one pass over all chunks with up to `threads` threads (the caller's included). `fmts` holds nf rows of
 * _format_constants (the layout set_format reads); `flags` is
 * {after, has_gscale, write_snap, sampled, do_stiff, do_grid, do_ulp, do_flips, do_hist}. Returns 0, or -1 for
 * arguments it cannot take (checked by the caller first). */
int altgrad_fused_pass(const int64_t *w_tab, const int64_t *g_tab, const int64_t *snap_off, const int32_t *chunk_t,
                       const int64_t *chunk_start, const int64_t *numel, float *snap, double *part, int64_t *hist,
                       const int32_t *idx, float gscale, const int32_t *flags, const double *fmts, int nf, int ncols,
                       int64_t chunk, int64_t n_chunks, int threads) {
    if (nf < 0 || nf > MAXF || threads < 1) return -1;
    job_t J;
    memset(&J, 0, sizeof J);
    J.w_tab = w_tab; J.g_tab = g_tab; J.snap_off = snap_off; J.chunk_t = chunk_t; J.chunk_start = chunk_start;
    J.numel = numel; J.snap = snap; J.part = part; J.hist = hist; J.idx = idx; J.gscale = gscale;
    J.has_gscale = flags[1]; J.write_snap = flags[2]; J.sampled = flags[3]; J.do_stiff = flags[4];
    J.do_grid = flags[5]; J.do_ulp = flags[6]; J.do_flips = flags[7]; J.do_hist = flags[8];
    J.nf = nf; J.ncols = ncols; J.chunk = chunk; J.n_chunks = n_chunks; J.next = 0;
    /* The fast path's bound: blocks whose valid elements all lie below half of every format's max and below
     * 2**(105 + M) (round16_fast); none if a format has M >= 23. */
    J.fast = __builtin_inff();
    for (int f = 0; f < nf; f++) {
        fmt_t *F = &J.f[f];
        set_format(F, fmts + 10 * f);
        F->steps32 = 2.0 * F->imax * (double)((chunk + 15) / 16) < 4294967296.0; /* a lane's steps per chunk */
        const float magic_bound = F->m < 23 ? u2f_scalar((uint32_t)(105 + F->m + 127) << 23) : 0.0f;
        const float bound = F->fmax * 0.5f < magic_bound ? F->fmax * 0.5f : magic_bound;
        if (bound < J.fast) J.fast = bound;
    }
    worker_arg_t arg = {&J, flags[0]};
    if ((int64_t)threads > n_chunks) threads = n_chunks > 1 ? (int)n_chunks : 1;
    run_parallel(worker, &arg, threads);
    return 0;
}

/* What this build runs: its lanes per block, plus 256 where the AVX-512 intrinsics path is compiled in. */
int altgrad_build_info(void) {
#ifdef ALTGRAD_AVX512
    return L + 256;
#else
    return L;
#endif
}

#define QBLOCK 16384

typedef struct {
    const float *x;
    float *y;
    int64_t n, next;
    float overflow;
    int neg_zero;
    fmt_t f;
} quantize_job_t;

static void *quantize_worker(void *arg) {
    quantize_job_t *Q = (quantize_job_t *)arg;
    const fmt_t *F = &Q->f;
    for (;;) {
        int64_t c = __atomic_fetch_add(&Q->next, 1, __ATOMIC_RELAXED) * QBLOCK;
        if (c >= Q->n) break;
        const int64_t end = c + QBLOCK < Q->n ? c + QBLOCK : Q->n;
        for (int64_t base = c; base < end; base += L) {
            const int cnt = end - base < L ? (int)(end - base) : L;
            vf x = allf(0.0f);
            memcpy(&x, Q->x + base, (size_t)cnt * 4);
            vf a = vabs(x);
            vi ix;
            vf q = round_raw(a, F, &ix);
            q = self(a < __builtin_inff(), q, a); /* inf stays inf, then overflows */
            q = self(q > F->fmax, allf(Q->overflow), q);
            if (Q->neg_zero) q = (vf)((vu)q | ((vu)x & 0x80000000u)); /* copysign, -0 included */
            else q = self(x < 0.0f, -q, q) + 0.0f;                   /* no -0 in the format (fnuz): -0 + 0 is +0 */
            q = self(x != x, x, q);                                    /* NaN stays NaN, payload included */
            memcpy(Q->y + base, &q, (size_t)cnt * 4);
        }
    }
    return 0;
}

/* quantize(x, fmt) with nearest rounding and no scale, float32 to float32 (Triton's _quantize_kernel): the grid
 * value of |x|, `overflow` (max, inf or NaN) above max, x's sign (cleared for formats without -0), NaN for NaN.
 * `fmt` is one row of _format_constants. Returns 0. */
int altgrad_quantize(const float *x, float *y, int64_t n, float overflow, const double *fmt, int neg_zero,
                     int threads) {
    quantize_job_t Q;
    memset(&Q, 0, sizeof Q);
    Q.x = x; Q.y = y; Q.n = n; Q.overflow = overflow; Q.neg_zero = neg_zero;
    set_format(&Q.f, fmt);
    int64_t blocks = (n + QBLOCK - 1) / QBLOCK;
    if ((int64_t)threads > blocks) threads = blocks > 1 ? (int)blocks : 1;
    run_parallel(quantize_worker, &Q, threads);
    return 0;
}
