/* Paged causal extend (prefill) attention on the CPU (engine/kernels/cpu_native.py builds it per
 * head dim and query group; engine/kernels/cpu.py calls it).
 *
 * A work item is one request and KV head: its keys (cached prefix and new rows) are gathered
 * from the pages once, K transposed to [HEAD_DIM, keys] (float32; a bf16 pool's as bf16 pairs of
 * dims for AVX512-BF16 dot products where the CPU has them) and V as [keys, HEAD_DIM] float32.
 * Then QT query vectors at a time (the rows x group of the KV head, in order):
 *   1. scores: for each d, a vector of VW keys of K^T times each query's q[d] (broadcast): pure
 *      multiply-adds into QT x KV accumulators, no horizontal sum; only the keys up to the
 *      tile's last row are computed, and a query's keys past its own row are masked;
 *   2. softmax numerators and their sums, VW scores at a time (vexp);
 *   3. the probabilities times V: each key's V row loaded once for the tile, QT x NV
 *      accumulators in registers; divided by the sums at the end.
 * float32 math throughout, the output written as float32 (the caller rounds it once).
 */
#include <string.h>

#if !defined(HEAD_DIM) || !defined(GROUP)
#error "compile with -DHEAD_DIM= and -DGROUP= (query heads per KV head)"
#endif

#include "vec.h"
#define NV (HEAD_DIM / VW)   /* vectors per row of V */
#define KV 4                 /* key vectors per score tile */
#define QT (NV <= 4 ? 4 : 2) /* query vectors per tile: QT x NV accumulators in registers */

static inline int64_t round_up(int64_t n, int64_t to) { return (n + to - 1) / to * to; }

static inline float widen_f32(float x) { return x; }
static inline float widen_bf16(uint16_t x) {
    union { uint32_t u; float f; } v = {.u = (uint32_t)x << 16};
    return v.f;
}

/* K^T of one request's KV head for the float32 score tile: kt[d][t], float32 */
#define DEFINE_KT_F32(NAME, T, WIDEN)                                                             \
    static void NAME(const T *k, const int64_t *rows, int64_t keys, int64_t row, int64_t stride,  \
                     void *out) {                                                                 \
        float *kt = out;                                                                          \
        for (int64_t t = 0; t < keys; t++)                                                        \
            for (int d = 0; d < HEAD_DIM; d++) kt[d * stride + t] = WIDEN(k[rows[t] * row + d]);  \
        for (int d = 0; d < HEAD_DIM; d++) /* keys past the last: finite, masked later */        \
            for (int64_t t = keys; t < stride; t++) kt[d * stride + t] = 0.0f;                    \
    }
DEFINE_KT_F32(kt_f32, float, widen_f32)

/* Scores of QT query vectors against KV * VW keys from t0: for each d, a vector of keys of K^T
 * times each query's q[d] (broadcast), multiply-adds alone */
static inline void score_tile_f32(const void *kt_, int64_t stride, const float *qn[QT], int64_t t0,
                                  vf acc[QT][KV]) {
    const float *kt = kt_;
    for (int d = 0; d < HEAD_DIM; d++) {
        vf kv[KV];
        for (int j = 0; j < KV; j++) kv[j] = load_f32(kt + d * stride + t0 + j * VW);
        for (int i = 0; i < QT; i++)
            for (int j = 0; j < KV; j++) acc[i][j] += qn[i][d] * kv[j];
    }
}

#if defined(__AVX512BF16__) && VW == 16 && HEAD_DIM % 2 == 0
/* bf16 pools: K^T kept in bf16 as pairs of dims, kt[d / 2][t][d % 2], and scored by AVX512-BF16
 * dot products (each pair's exact products summed into the key's float32 lane): half the
 * instructions of the multiply-adds, and no widening. q is a bf16 tensor passed as float32,
 * so taking its high halves is exact. */
#include <immintrin.h>
static void kt_bf16_pairs(const uint16_t *k, const int64_t *rows, int64_t keys, int64_t row,
                          int64_t stride, void *out) {
    uint16_t *kt = out;
    for (int64_t t = 0; t < keys; t++)
        for (int d = 0; d < HEAD_DIM; d++) kt[(d / 2 * stride + t) * 2 + d % 2] = k[rows[t] * row + d];
    for (int d = 0; d < HEAD_DIM; d++)
        for (int64_t t = keys; t < stride; t++) kt[(d / 2 * stride + t) * 2 + d % 2] = 0;
}
static inline void score_tile_pairs(const void *kt_, int64_t stride, const float *qn[QT], int64_t t0,
                                    vf acc[QT][KV]) {
    const uint16_t *kt = kt_;
    for (int d = 0; d < HEAD_DIM; d += 2) {
        __m512bh kv[KV];
        for (int j = 0; j < KV; j++) kv[j] = (__m512bh)_mm512_loadu_si512(kt + (d / 2 * stride + t0 + j * VW) * 2);
        for (int i = 0; i < QT; i++) {
            uint32_t lo, hi;
            memcpy(&lo, qn[i] + d, 4);
            memcpy(&hi, qn[i] + d + 1, 4);
            const __m512bh qq = (__m512bh)_mm512_set1_epi32((int)((lo >> 16) | (hi & 0xFFFF0000u)));
            for (int j = 0; j < KV; j++) acc[i][j] = (vf)_mm512_dpbf16_ps((__m512)acc[i][j], qq, kv[j]);
        }
    }
}
#define KT_BF16 kt_bf16_pairs
#define SCORE_TILE_BF16 score_tile_pairs
#else
DEFINE_KT_F32(kt_bf16_wide, uint16_t, widen_bf16)
#define KT_BF16 kt_bf16_wide
#define SCORE_TILE_BF16 score_tile_f32
#endif

#define DEFINE_EXTEND(NAME, T, WIDEN, GATHER_KT, SCORE_TILE)                                                             \
    /* V [keys][HEAD_DIM], float32, of one request's KV head */                               \
    static void NAME##_gather_v(const T *v, const int64_t *rows, int64_t keys, int64_t row, float *vc) { \
        for (int64_t t = 0; t < keys; t++)                                                        \
            for (int d = 0; d < HEAD_DIM; d++) vc[t * HEAD_DIM + d] = WIDEN(v[rows[t] * row + d]); \
    }                                                                                             \
                                                                                                  \
    void NAME(const float *q, const T *k, const T *v, const int32_t *table, int64_t table_stride,  \
              const int32_t *qo_indptr, const int32_t *prefix_lens, int64_t item_begin,            \
              int64_t item_end, int64_t num_kv_heads, int64_t page_size, float scale,              \
              float *scratch, int64_t key_stride, float *out) {                                   \
        const int64_t num_heads = num_kv_heads * GROUP, row = num_kv_heads * HEAD_DIM;            \
        float *kt = scratch, *vc = kt + HEAD_DIM * key_stride, *scores = vc + HEAD_DIM * key_stride; \
        int64_t *rows_of_keys = (int64_t *)(scores + QT * key_stride);                            \
        for (int64_t item = item_begin; item < item_end; item++) {                                \
            const int64_t r = item / num_kv_heads, h = item % num_kv_heads;                       \
            const int64_t lo = qo_indptr[r], rows = qo_indptr[r + 1] - lo, prefix = prefix_lens[r]; \
            if (rows == 0) continue;                                                              \
            const int64_t keys = prefix + rows, stride = round_up(keys, VW * KV);                 \
            key_rows(table + r * table_stride, keys, page_size, rows_of_keys);                   \
            NAME##_gather_v(v + h * HEAD_DIM, rows_of_keys, keys, row, vc);                       \
            GATHER_KT(k + h * HEAD_DIM, rows_of_keys, keys, row, stride, kt);                     \
            for (int64_t n0 = 0; n0 < rows * GROUP; n0 += QT) {                                   \
                const int64_t tile = rows * GROUP - n0 < QT ? rows * GROUP - n0 : QT;            \
                const float *qn[QT];                                                              \
                float *on[QT];                                                                    \
                int64_t limit[QT]; /* keys each query sees */                                     \
                for (int i = 0; i < QT; i++) {                                                    \
                    const int64_t n = n0 + (i < tile ? i : tile - 1), t = lo + n / GROUP;         \
                    qn[i] = q + (t * num_heads + h * GROUP + n % GROUP) * HEAD_DIM;               \
                    on[i] = out + (t * num_heads + h * GROUP + n % GROUP) * HEAD_DIM;             \
                    limit[i] = prefix + n / GROUP + 1;                                            \
                }                                                                                 \
                const int64_t span = round_up(limit[QT - 1], VW * KV);                           \
                for (int64_t t0 = 0; t0 < span; t0 += VW * KV) { /* 1. scores */                  \
                    vf acc[QT][KV] = {};                                                          \
                    SCORE_TILE(kt, stride, qn, t0, acc);                                          \
                    for (int i = 0; i < QT; i++)                                                  \
                        for (int j = 0; j < KV; j++)                                              \
                            store_f32(acc[i][j] * scale, scores + i * key_stride + t0 + j * VW);  \
                }                                                                                 \
                float sums[QT];                                                                   \
                for (int i = 0; i < QT; i++) /* 2. softmax numerators */                          \
                    sums[i] = softmax_numerators(scores + i * key_stride, limit[i], span);        \
                vf acc[QT][NV] = {};                                                              \
                for (int64_t t = 0; t < limit[QT - 1]; t++) { /* 3. probabilities times V */      \
                    vf vv[NV];                                                                    \
                    for (int j = 0; j < NV; j++) vv[j] = load_f32(vc + t * HEAD_DIM + j * VW);    \
                    for (int i = 0; i < QT; i++) {                                                \
                        const float p = scores[i * key_stride + t];                               \
                        for (int j = 0; j < NV; j++) acc[i][j] += p * vv[j];                      \
                    }                                                                             \
                }                                                                                 \
                for (int i = 0; i < tile; i++)                                                    \
                    for (int j = 0; j < NV; j++) store_f32(acc[i][j] / sums[i], on[i] + j * VW);  \
            }                                                                                     \
        }                                                                                         \
    }

DEFINE_EXTEND(extend_f32, float, widen_f32, kt_f32, score_tile_f32)
DEFINE_EXTEND(extend_bf16, uint16_t, widen_bf16, KT_BF16, SCORE_TILE_BF16)
