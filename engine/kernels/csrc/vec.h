/* What the CPU kernels share: VW-lane float vectors in GCC's portable vector extensions, bf16
 * held as its uint16 bits and widened / rounded in registers, a vector exponential, a row's
 * softmax numerators, and the pool rows of a request's keys. Built
 * with -march=native: AVX-512, AVX2 or NEON code from one source. VW is the kernel's (defined
 * before including), else the widest of 16, 8, 4 and 1 lanes that divides HEAD_DIM. */
#ifndef PDSERVE_VEC_H
#define PDSERVE_VEC_H

#ifndef VW
#if HEAD_DIM % 16 == 0
#define VW 16
#elif HEAD_DIM % 8 == 0
#define VW 8
#elif HEAD_DIM % 4 == 0
#define VW 4
#else
#define VW 1
#endif
#endif

#include <math.h>
#include <stdint.h>

typedef float vf __attribute__((vector_size(VW * 4)));
typedef float vf_u __attribute__((vector_size(VW * 4), aligned(4))); /* for unaligned access */
typedef int32_t vi __attribute__((vector_size(VW * 4)));
typedef uint32_t vu __attribute__((vector_size(VW * 4)));
typedef uint16_t vh_u __attribute__((vector_size(VW * 2), aligned(2)));

static inline vf splat(float x) { return (vf){} + x; }
static inline vf blend(vi mask, vf yes, vf no) { return (vf)(((vi)yes & mask) | ((vi)no & ~mask)); }
static inline vf load_f32(const float *p) { return *(const vf_u *)p; }
static inline void store_f32(vf x, float *p) { *(vf_u *)p = x; }

/* the largest of n floats at s, n a multiple of VW (a NaN-free row) */
static inline float max_of(const float *s, int64_t n) {
    vf m = splat(-INFINITY);
    for (int64_t t = 0; t < n; t += VW) {
        vf x = load_f32(s + t);
        m = blend(x > m, x, m);
    }
    float out = m[0];
    for (int i = 1; i < VW; i++) out = m[i] > out ? m[i] : out;
    return out;
}

/* bf16 is the high half of a float32: widening is a shift */
static inline vf load_bf16(const uint16_t *p) { return (vf)(__builtin_convertvector(*(const vh_u *)p, vu) << 16); }

/* x rounded to bf16 (nearest even; a NaN stays a quiet NaN), as float32 bits */
static inline vu bf16_bits(vf x) {
    vu bits = (vu)x;
    vu rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000u;
    vi nan = x != x;
    return (vu)(((vi)rounded & ~nan) | (nan & 0x7FC00000));
}
static inline vf round_bf16(vf x) { return (vf)bf16_bits(x); }
static inline void store_bf16(vf x, uint16_t *p) { *(vh_u *)p = __builtin_convertvector(bf16_bits(x) >> 16, vh_u); }

/* e^x over the whole float range (0 below -87.3, inf above 88.7): 2^n * p(r) with
 * r = x - n ln2 in [-ln2/2, ln2/2] and p Cephes' polynomial; relative error < 2e-7. */
static inline vf vexp(vf x) {
    const vi under = x < splat(-87.3f), over = x > splat(88.7f);
    x = blend(under, splat(-87.0f), blend(over, splat(88.0f), x));
    vf y = x * 1.44269504088896341f + 0.5f;
    vi n = __builtin_convertvector(y, vi);
    n += __builtin_convertvector(n, vf) > y; /* floor: a true comparison is -1 */
    vf nf = __builtin_convertvector(n, vf);
    vf r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
    vf p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    vf e = p * (vf)((n + 127) << 23);
    return blend(under, splat(0.0f), blend(over, splat(INFINITY), e));
}

/* A row of scores, valid up to length and padded to width (a multiple of VW): the padding
 * masked, each score replaced by e^(score - the row's max); returns their sum. */
static inline float softmax_numerators(float *s, int64_t length, int64_t width) {
    for (int64_t t = length; t < width; t++) s[t] = -INFINITY;
    const float m = max_of(s, width);
    vf total = {};
    for (int64_t t = 0; t < width; t += VW) {
        vf e = vexp(load_f32(s + t) - m);
        store_f32(e, s + t);
        total += e;
    }
    float sum = 0.0f;
    for (int i = 0; i < VW; i++) sum += total[i];
    return sum;
}

/* The position of each of a request's first `length` keys in the pool, in rows (of the pool's
 * KV heads x head dim elements), from its page ids: no division per key. */
static inline void key_rows(const int32_t *pages, int64_t length, int64_t page_size, int64_t *rows) {
    for (int64_t t = 0, p = 0; t < length; p++)
        for (int64_t o = 0; o < page_size && t < length; o++, t++) rows[t] = (int64_t)pages[p] * page_size + o;
}

#endif
