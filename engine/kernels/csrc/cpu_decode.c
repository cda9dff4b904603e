/* Paged decode attention on the CPU (engine/kernels/cpu_native.py builds and loads it;
 * engine/kernels/cpu_decode.py calls it).
 *
 * Built per model shape: HEAD_DIM and GROUP (query heads per KV head) are constants, so the
 * rows of q, the accumulators and the loops over them live in registers. Written in GCC's
 * portable vector extensions, built with -march=native: the same source gives AVX-512, AVX2 or
 * NEON code. Per request and KV head, three passes over the request's pages in place:
 *   1. the group's q·k scores, into a scratch row per query: a K row is loaded once for the
 *      group (a bf16 one widened by a shift, or taken as it is by AVX512-BF16 dot products);
 *      each dot product is left as a vector of partial sums, and VW keys' vectors are summed
 *      into one vector of VW scores by a tree of shuffles (push_key), not one horizontal sum
 *      per key;
 *   2. the exponentials (vexp, a polynomial) and their sums, VW scores at a time;
 *   3. the probabilities times V, the group's accumulators in registers, divided at the end.
 * The rows PREFETCH keys ahead are prefetched: a request's keys are scattered over its pages.
 */
#include <string.h>

#if !defined(HEAD_DIM) || !defined(GROUP)
#error "compile with -DHEAD_DIM= and -DGROUP= (query heads per KV head)"
#endif

#include "vec.h"
#define NV (HEAD_DIM / VW) /* vectors per row */

#if VW > 1
/* Lanes summed pairwise across two vectors: the even lanes of (a, b) plus their odd lanes. After
 * log2(VW) levels over VW vectors, lane i is the sum of the lanes of the i-th. */
static inline vf pair_sums(vf a, vf b) {
    vi even, odd;
    for (int i = 0; i < VW; i++) {
        even[i] = (2 * i) % (2 * VW);
        odd[i] = (2 * i + 1) % (2 * VW);
    }
    return __builtin_shuffle(a, b, even) + __builtin_shuffle(a, b, odd);
}
#endif

/* Key i (of VW) of a block joins the pending partial sums of its block: a binary counter, so
 * at most log2(VW) + 1 vectors per query wait in registers. */
static inline void push_key(vf pending[], int i, vf x) {
    int level = 0;
#if VW > 1
    for (; i & 1; i >>= 1, level++) x = pair_sums(pending[level], x);
#else
    (void)i;
#endif
    pending[level] = x;
}

#define PREFETCH 8 /* keys ahead */
#define prefetch_row(p)                                                                 \
    do {                                                                                \
        for (int c = 0; c < (int)sizeof(*(p)) * HEAD_DIM; c += 64) __builtin_prefetch((const char *)(p) + c); \
    } while (0)

#define LEVELS (__builtin_ctz(VW) + 1)

/* q·k of the query group against one K row, as a vector of partial sums per query (summed
 * across lanes by push_key). float32: multiply-adds over the row's vectors. */
static inline void q_f32(const float *qb, vf qv[GROUP][NV]) {
    for (int g = 0; g < GROUP; g++)
        for (int j = 0; j < NV; j++) qv[g][j] = load_f32(qb + g * HEAD_DIM + j * VW);
}
#define DOTS(NAME, T, LOAD)                                                   \
    static inline void NAME(vf qv[GROUP][NV], const T *kr, vf out[GROUP]) {  \
        vf kv[NV];                                                            \
        for (int j = 0; j < NV; j++) kv[j] = LOAD(kr + j * VW);               \
        for (int g = 0; g < GROUP; g++) {                                     \
            vf s = qv[g][0] * kv[0];                                          \
            for (int j = 1; j < NV; j++) s += qv[g][j] * kv[j];               \
            out[g] = s;                                                       \
        }                                                                     \
    }
DOTS(dots_f32, float, load_f32)

#if defined(__AVX512BF16__) && VW == 16 && NV % 2 == 0
/* bf16: AVX512-BF16 dot products, 32 elements of q (rounded back to bf16: exact, q is a bf16
 * tensor) against 32 of the row per instruction, each pair's products summed into a float32
 * lane: the products of bf16 inputs are exact in float32, as with the multiply-adds, in half the
 * instructions and without widening the row. */
#include <immintrin.h>
#define QBF16_T __m512bh
#define QBF16_W (NV / 2)
static inline void q_bf16(const float *qb, __m512bh qh[GROUP][NV / 2]) {
    for (int g = 0; g < GROUP; g++)
        for (int j = 0; j < NV / 2; j++)
            qh[g][j] = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(qb + g * HEAD_DIM + 32 * j + 16),
                                           _mm512_loadu_ps(qb + g * HEAD_DIM + 32 * j));
}
static inline void dots_bf16(__m512bh qh[GROUP][NV / 2], const uint16_t *kr, vf out[GROUP]) {
    __m512bh kh[NV / 2];
    for (int j = 0; j < NV / 2; j++) kh[j] = (__m512bh)_mm512_loadu_si512(kr + 32 * j);
    for (int g = 0; g < GROUP; g++) {
        __m512 s = _mm512_dpbf16_ps(_mm512_setzero_ps(), qh[g][0], kh[0]);
        for (int j = 1; j < NV / 2; j++) s = _mm512_dpbf16_ps(s, qh[g][j], kh[j]);
        out[g] = (vf)s;
    }
}
#else
#define QBF16_T vf
#define QBF16_W NV
#define q_bf16 q_f32
DOTS(dots_bf16, uint16_t, load_bf16)
#endif

#define DEFINE_DECODE(NAME, T, LOAD, Q_T, Q_W, Q_PREP, DOTS_FN)                                  \
    static void NAME##_head(const float *qb, const T *k, const T *v, const int64_t *rows,         \
                            int64_t length, int64_t stride, int64_t score_stride, float scale, float *scores, float *ob) { \
        Q_T qs[GROUP][Q_W];                                                                       \
        vf acc[GROUP][NV];                                                                        \
        float sums[GROUP];                                                                        \
        Q_PREP(qb, qs);                                                                           \
        for (int64_t t0 = 0; t0 < length; t0 += VW) { /* q·k, VW keys at a time */                \
            vf pending[GROUP][LEVELS];                                                            \
            for (int i = 0; i < VW; i++) {                                                        \
                const T *kr = k + rows[t0 + i < length ? t0 + i : length - 1] * stride;           \
                if (t0 + i + PREFETCH < length) prefetch_row(k + rows[t0 + i + PREFETCH] * stride);     \
                vf dots[GROUP];                                                                   \
                DOTS_FN(qs, kr, dots);                                                            \
                for (int g = 0; g < GROUP; g++) push_key(pending[g], i, dots[g]);                 \
            }                                                                                     \
            for (int g = 0; g < GROUP; g++)                                                       \
                store_f32(pending[g][LEVELS - 1] * scale, scores + g * score_stride + t0);        \
        }                                                                                         \
        for (int g = 0; g < GROUP; g++) {                                                         \
            sums[g] = softmax_numerators(scores + g * score_stride, length, (length + VW - 1) / VW * VW); \
            for (int j = 0; j < NV; j++) acc[g][j] = splat(0.0f);                                 \
        }                                                                                         \
        for (int64_t t = 0; t < length; t++) { /* probabilities times V */                        \
            const T *vr = v + rows[t] * stride;                                                   \
            if (t + PREFETCH < length) prefetch_row(v + rows[t + PREFETCH] * stride);               \
            vf vv[NV];                                                                            \
            for (int j = 0; j < NV; j++) vv[j] = LOAD(vr + j * VW);                               \
            for (int g = 0; g < GROUP; g++) {                                                     \
                const float p = scores[g * score_stride + t];                                     \
                for (int j = 0; j < NV; j++) acc[g][j] += p * vv[j];                              \
            }                                                                                     \
        }                                                                                         \
        for (int g = 0; g < GROUP; g++)                                                           \
            for (int j = 0; j < NV; j++) store_f32(acc[g][j] / sums[g], ob + g * HEAD_DIM + j * VW); \
    }                                                                                             \
                                                                                                  \
    void NAME(const float *q, const T *k, const T *v, const int32_t *table, int64_t table_stride,  \
              const int32_t *lens, int64_t batch_begin, int64_t batch_end, int64_t num_kv_heads,   \
              int64_t page_size, float scale, float *scratch, int64_t score_stride, float *out) {                       \
        const int64_t stride = num_kv_heads * HEAD_DIM;                                           \
        int64_t *rows = (int64_t *)(scratch + GROUP * score_stride);                              \
        for (int64_t b = batch_begin; b < batch_end; b++) {                                       \
            const int64_t length = lens[b];                                                       \
            key_rows(table + b * table_stride, length, page_size, rows);                          \
            for (int64_t h = 0; h < num_kv_heads; h++) {                                          \
                const int64_t first = (b * num_kv_heads + h) * GROUP * HEAD_DIM;                  \
                if (length == 0)                                                                  \
                    memset(out + first, 0, sizeof(float) * GROUP * HEAD_DIM);                     \
                else                                                                              \
                    NAME##_head(q + first, k + h * HEAD_DIM, v + h * HEAD_DIM, rows, length,      \
                                stride, score_stride, scale, scratch, out + first);                             \
            }                                                                                     \
        }                                                                                         \
    }

DEFINE_DECODE(decode_f32, float, load_f32, vf, NV, q_f32, dots_f32)
DEFINE_DECODE(decode_bf16, uint16_t, load_bf16, QBF16_T, QBF16_W, q_bf16, dots_bf16)
