/* Paged decode attention on the CPU (engine/kernels/cpu_native.py builds and loads it;
 * engine/kernels/cpu_decode.py calls it).
 *
 * Built per model shape: HEAD_DIM and GROUP (query heads per KV head) are constants, so the
 * rows of q, the accumulators and the loops over them live in registers. Written in GCC's
 * portable vector extensions, built with -march=native: the same source gives AVX-512, AVX2 or
 * NEON code. Per request, three passes over its pages in place, each a block of VW keys at a time
 * and every KV head within a block (a key's row holds all heads, [page, slot, KV head, dim], so
 * a block's rows come from memory once, not once per head):
 *   1. each query group's q·k scores, into a scratch row per query: a K row is loaded once for
 *      the group (a bf16 one widened by a shift, or taken as it is by AVX512-BF16 dot products);
 *      each dot product is left as a vector of partial sums, and VW keys' vectors are summed
 *      into one vector of VW scores by a tree of shuffles (push_key), not one horizontal sum
 *      per key;
 *   2. the exponentials (vexp, a polynomial) and their sums, VW scores at a time;
 *   3. the probabilities times V, a group's accumulators in registers over a block (in scratch
 *      between blocks), divided at the end.
 * The rows PREFETCH_BYTES ahead are prefetched into L2 (a request's keys are scattered over its
 * pages). Served, a step's KV comes from DRAM: over 30 layers' pools of 64 requests of 64-512
 * tokens, a pass per KV head with 8 keys ahead prefetched into L1 (prefetcht0: L1 has few fills
 * in flight) took 3.1 CPU-ms per layer in float32 and 1.9 in bf16, its V pass waiting on loads
 * for 40 % of it; 4 KiB ahead into L2, 2.2 and 1.3; the blocks of all heads, 1.95 and 1.2.
 * (Tried and slower: one pass with an online softmax, K and V of a block read together, 2.3 and
 * 1.5; V prefetched during the K pass, no change.)
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

#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 4096 /* 2 and 8 KiB measured slower in one dtype or the other, 16 KiB in both */
#endif
#define prefetch_row(p)                                                                 \
    do {                                                                                \
        for (int c = 0; c < (int)sizeof(*(p)) * HEAD_DIM; c += 64) __builtin_prefetch((const char *)(p) + c, 0, 2); \
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

/* Each pass goes over a request's keys a block of VW at a time, and over every KV head within a
 * block: a key's row holds all heads (the pool is [page, slot, KV head, dim]), so the block's rows
 * are read from memory once and stay in cache for the other heads. */
#define DEFINE_DECODE(NAME, T, LOAD, Q_T, Q_W, Q_PREP, DOTS_FN)                                  \
    /* 1. each KV head's query group against the keys, scaled, into a score row per query */     \
    static void NAME##_scores(const float *q, const T *k, const int64_t *rows, int64_t length,     \
                              int64_t heads, int64_t ahead, float scale, int64_t score_stride,     \
                              float *scores) {                                                     \
        const int64_t stride = heads * HEAD_DIM;                                                  \
        for (int64_t t0 = 0; t0 < length; t0 += VW)                                               \
            for (int64_t h = 0; h < heads; h++) {                                                 \
                const T *kh = k + h * HEAD_DIM;                                                   \
                Q_T qs[GROUP][Q_W];                                                               \
                vf pending[GROUP][LEVELS];                                                        \
                Q_PREP(q + h * GROUP * HEAD_DIM, qs);                                             \
                _Pragma("GCC unroll 16") /* push_key's levels constants: pending in registers */   \
                for (int i = 0; i < VW; i++) {                                                    \
                    const int64_t t = t0 + i < length ? t0 + i : length - 1;                      \
                    if (t0 + i + ahead < length) prefetch_row(kh + rows[t0 + i + ahead] * stride); \
                    vf dots[GROUP];                                                               \
                    DOTS_FN(qs, kh + rows[t] * stride, dots);                                     \
                    for (int g = 0; g < GROUP; g++) push_key(pending[g], i, dots[g]);             \
                }                                                                                 \
                for (int g = 0; g < GROUP; g++)                                                   \
                    store_f32(pending[g][LEVELS - 1] * scale, scores + (h * GROUP + g) * score_stride + t0); \
            }                                                                                     \
    }                                                                                             \
                                                                                                  \
    /* 3. the probabilities times V, added into acc [query][HEAD_DIM] (in registers over a block) */ \
    static void NAME##_values(const T *v, const int64_t *rows, int64_t length, int64_t heads,     \
                              int64_t ahead, const float *probs, int64_t score_stride, float *acc) { \
        const int64_t stride = heads * HEAD_DIM;                                                  \
        for (int64_t t0 = 0; t0 < length; t0 += VW) {                                             \
            const int64_t end = t0 + VW < length ? t0 + VW : length;                              \
            for (int64_t h = 0; h < heads; h++) {                                                 \
                const T *vh = v + h * HEAD_DIM;                                                   \
                const float *ph = probs + h * GROUP * score_stride;                               \
                float *ah = acc + h * GROUP * HEAD_DIM;                                           \
                vf a[GROUP][NV];                                                                  \
                for (int g = 0; g < GROUP; g++)                                                   \
                    for (int j = 0; j < NV; j++) a[g][j] = load_f32(ah + g * HEAD_DIM + j * VW);  \
                for (int64_t t = t0; t < end; t++) {                                              \
                    if (t + ahead < length) prefetch_row(vh + rows[t + ahead] * stride);          \
                    const T *vr = vh + rows[t] * stride;                                          \
                    vf vv[NV];                                                                    \
                    for (int j = 0; j < NV; j++) vv[j] = LOAD(vr + j * VW);                       \
                    for (int g = 0; g < GROUP; g++) {                                             \
                        const float p = ph[g * score_stride + t];                                 \
                        for (int j = 0; j < NV; j++) a[g][j] += p * vv[j];                        \
                    }                                                                             \
                }                                                                                 \
                for (int g = 0; g < GROUP; g++)                                                   \
                    for (int j = 0; j < NV; j++) store_f32(a[g][j], ah + g * HEAD_DIM + j * VW);  \
            }                                                                                     \
        }                                                                                         \
    }                                                                                             \
                                                                                                  \
    /* scratch: an int64 pool row per key (2 * score_stride floats), a score row per query head,  \
     * then an accumulator row per query head */                                                 \
    void NAME(const float *q, const T *k, const T *v, const int32_t *table, int64_t table_stride,  \
              const int32_t *lens, int64_t batch_begin, int64_t batch_end, int64_t num_kv_heads,   \
              int64_t page_size, float scale, float *scratch, int64_t score_stride, float *out) {  \
        const int64_t queries = num_kv_heads * GROUP;                                             \
        const int64_t ahead = PREFETCH_BYTES / (int64_t)(sizeof(T) * HEAD_DIM); /* keys */       \
        int64_t *rows = (int64_t *)scratch;                                                       \
        float *scores = scratch + 2 * score_stride, *acc = scores + queries * score_stride;       \
        float sums[queries];                                                                      \
        for (int64_t b = batch_begin; b < batch_end; b++) {                                       \
            const int64_t length = lens[b];                                                       \
            const float *qb = q + b * queries * HEAD_DIM;                                         \
            float *ob = out + b * queries * HEAD_DIM;                                             \
            if (length == 0) {                                                                    \
                memset(ob, 0, sizeof(float) * queries * HEAD_DIM);                                \
                continue;                                                                         \
            }                                                                                     \
            key_rows(table + b * table_stride, length, page_size, rows);                          \
            NAME##_scores(qb, k, rows, length, num_kv_heads, ahead, scale, score_stride, scores); \
            for (int64_t n = 0; n < queries; n++) /* 2. softmax numerators and their sums */      \
                sums[n] = softmax_numerators(scores + n * score_stride, length, (length + VW - 1) / VW * VW); \
            memset(acc, 0, sizeof(float) * queries * HEAD_DIM);                                   \
            NAME##_values(v, rows, length, num_kv_heads, ahead, scores, score_stride, acc);       \
            for (int64_t n = 0; n < queries; n++)                                                 \
                for (int j = 0; j < NV; j++)                                                      \
                    store_f32(load_f32(acc + n * HEAD_DIM + j * VW) / sums[n], ob + n * HEAD_DIM + j * VW); \
        }                                                                                         \
    }

DEFINE_DECODE(decode_f32, float, load_f32, vf, NV, q_f32, dots_f32)
DEFINE_DECODE(decode_bf16, uint16_t, load_bf16, QBF16_T, QBF16_W, q_bf16, dots_bf16)
