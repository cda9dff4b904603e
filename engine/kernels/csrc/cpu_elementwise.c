/* RMSNorm with the residual add over float32 or bf16 rows on the CPU, in one pass
 * (engine/kernels/cpu_native.py builds it; engine/kernels/cpu.py calls it), rounding where the reference
 * (engine/kernels/reference.py, Hugging Face's order) rounds:
 *   r = x + residual; n = r * rsqrt(mean(r^2) + eps); out = w * n
 * (bf16: r and n rounded to bf16 as they are made) with float32 math in between; only the order
 * of the mean's sum can differ from torch's. A row's tail past its last whole vector goes
 * through a zero-padded one.
 * (SiLU-and-mul was tried here too: no faster than torch's silu and mul in either dtype, at 1 to
 * 512 rows: the exponential's arithmetic bounds both.)
 */
#include <string.h>

#define VW 16
#include "vec.h"

/* the n <= VW elements at p as a vector (zeros after), and back: load_f32_n, store_bf16_n, ... */
#define DEFINE_PARTIAL_IO(NAME, T)                                 \
    static inline vf load_##NAME##_n(const T *p, int64_t n) {       \
        if (n == VW) return load_##NAME(p);                         \
        T tmp[VW] = {0};                                            \
        memcpy(tmp, p, n * sizeof(T));                              \
        return load_##NAME(tmp);                                    \
    }                                                               \
    static inline void store_##NAME##_n(vf x, T *p, int64_t n) {    \
        if (n == VW) return store_##NAME(x, p);                     \
        T tmp[VW];                                                  \
        store_##NAME(x, tmp);                                       \
        memcpy(p, tmp, n * sizeof(T));                              \
    }
DEFINE_PARTIAL_IO(f32, float)
DEFINE_PARTIAL_IO(bf16, uint16_t)

static inline vf as_is(vf x) { return x; }

/* BODY once per vector of a row of n, with w_ its width */
#define FOR_EACH_VECTOR(i, n, BODY)                                            \
    for (int64_t i = 0, left_ = (n); left_ > 0; i += VW, left_ -= VW) {  \
        const int64_t w_ = left_ < VW ? left_ : VW;                            \
        BODY                                                                   \
    }

/* x, residual: [rows, hidden] with row strides; out, residual_out: [rows, hidden] contiguous.
 * residual NULL: no add (residual_out unused). */
#define DEFINE_RMS_NORM(NAME, T, LOAD, STORE, ROUND)                                              \
    void NAME(const T *x, int64_t x_stride, const T *residual, int64_t residual_stride,          \
              const T *weight, float eps, int64_t rows, int64_t hidden, T *out, T *residual_out) { \
        for (int64_t r = 0; r < rows; r++) {                                                      \
            const T *xr = x + r * x_stride;                                                       \
            T *outr = out + r * hidden;                                                           \
            if (residual) { /* the sum, rounded, is the next residual and what is normalized */   \
                const T *rr = residual + r * residual_stride;                                     \
                T *sr = residual_out + r * hidden;                                                \
                FOR_EACH_VECTOR(i, hidden, STORE(LOAD(xr + i, w_) + LOAD(rr + i, w_), sr + i, w_);) \
                xr = sr;                                                                          \
            }                                                                                     \
            vf squares = {};                                                                      \
            FOR_EACH_VECTOR(i, hidden, vf v = LOAD(xr + i, w_); squares += v * v;)                \
            float total = 0.0f;                                                                   \
            for (int i = 0; i < VW; i++) total += squares[i];                                     \
            const float scale = 1.0f / sqrtf(total / (float)hidden + eps);                        \
            FOR_EACH_VECTOR(i, hidden,                                                            \
                            STORE(LOAD(weight + i, w_) * ROUND(LOAD(xr + i, w_) * scale), outr + i, w_);) \
        }                                                                                         \
    }

DEFINE_RMS_NORM(rms_norm_f32, float, load_f32_n, store_f32_n, as_is)
DEFINE_RMS_NORM(rms_norm_bf16, uint16_t, load_bf16_n, store_bf16_n, round_bf16)
