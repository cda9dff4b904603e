/* RMSNorm with the residual add over bf16 rows on the CPU, in one pass (engine/kernels/
 * cpu_native.py builds it; engine/kernels/cpu.py calls it), rounding where the reference
 * (engine/kernels/reference.py, Hugging Face's order) rounds:
 *   r = bf16(x + residual); n = bf16(r * rsqrt(mean(r^2) + eps)); out = bf16(w * n)
 * with float32 math in between; only the order of the mean's sum can differ from torch's. A
 * row's tail past its last whole vector goes through a zero-padded one.
 * (SiLU-and-mul was tried here too: torch's bf16 silu and mul measured faster from 64 rows.)
 */
#include <string.h>

#define VW 16
#include "vec.h"

/* the n < VW elements at p as a vector (zeros after), and back */
static inline vf load_bf16_tail(const uint16_t *p, int64_t n) {
    uint16_t tmp[VW] = {0};
    memcpy(tmp, p, n * sizeof(uint16_t));
    return load_bf16(tmp);
}
static inline void store_bf16_tail(vf x, uint16_t *p, int64_t n) {
    uint16_t tmp[VW];
    store_bf16(x, tmp);
    memcpy(p, tmp, n * sizeof(uint16_t));
}

#define FOR_EACH_VECTOR(i, n, LOAD_STORE_BODY)                                \
    for (int64_t i = 0, left_ = (n); left_ > 0; i += VW, left_ -= VW) { \
        const int64_t w_ = left_ < VW ? left_ : VW;                           \
        LOAD_STORE_BODY                                                       \
    }
#define LOAD(p) (w_ == VW ? load_bf16(p) : load_bf16_tail(p, w_))
#define STORE(x, p) (w_ == VW ? store_bf16(x, p) : store_bf16_tail(x, p, w_))

/* x, residual: [rows, hidden] with row strides; out, residual_out: [rows, hidden] contiguous.
 * residual NULL: no add (residual_out unused). */
void rms_norm_bf16(const uint16_t *x, int64_t x_stride, const uint16_t *residual, int64_t residual_stride,
                   const uint16_t *weight, float eps, int64_t rows, int64_t hidden, uint16_t *out,
                   uint16_t *residual_out) {
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *xr = x + r * x_stride;
        uint16_t *outr = out + r * hidden;
        if (residual) { /* the sum, rounded, is the next residual and what is normalized */
            const uint16_t *rr = residual + r * residual_stride;
            uint16_t *sr = residual_out + r * hidden;
            FOR_EACH_VECTOR(i, hidden, STORE(LOAD(xr + i) + LOAD(rr + i), sr + i);)
            xr = sr;
        }
        vf squares = {};
        FOR_EACH_VECTOR(i, hidden, vf v = LOAD(xr + i); squares += v * v;)
        float total = 0.0f;
        for (int i = 0; i < VW; i++) total += squares[i];
        const float scale = 1.0f / sqrtf(total / (float)hidden + eps);
        FOR_EACH_VECTOR(i, hidden, STORE(LOAD(weight + i) * round_bf16(LOAD(xr + i) * scale), outr + i);)
    }
}
