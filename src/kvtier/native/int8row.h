/* The int8 codec's rows, shared by int8.c (the int8 codec) and int4.c (k8v4's K): symmetric,
 * one bf16 scale per row of `dim` values (a token's head), the same arithmetic as
 * kvtier/quant.py's torch path, so both write the same bytes: the scale is max|x| / 127
 * rounded to bf16 (nearest even; 1 for an all-zero row), each level x / scale rounded to
 * nearest even and clamped to [-127, 127]. |x| is taken on the bit pattern (sign bit
 * cleared), whose unsigned order is that of the values: the reduction vectorizes without
 * relaxing IEEE semantics. */
#ifndef KVTIER_INT8ROW_H
#define KVTIER_INT8ROW_H
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"

static inline float scale_of(float amax, uint16_t *scale) {
    uint16_t s = to_bf16(amax > 0.0f ? amax / 127.0f : 1.0f);
    *scale = s;
    return from_bf16(s);
}

static inline int8_t level(float x, float s) {
    float v = rintf(x / s);
    v = v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v);
    return v == v ? (int8_t)v : 0; /* NaN KV is garbage: store 0, never undefined behaviour */
}

static inline void row_bf16(const uint16_t *restrict x, int64_t dim, int8_t *restrict q,
                            uint16_t *restrict scale) {
    uint16_t top = 0;
    for (int64_t i = 0; i < dim; i++) {
        uint16_t a = x[i] & 0x7FFFu;
        top = a > top ? a : top;
    }
    float s = scale_of(from_bf16(top), scale);
    for (int64_t i = 0; i < dim; i++) q[i] = level(from_bf16(x[i]), s);
}

static inline void row_f32(const uint32_t *restrict x, int64_t dim, int8_t *restrict q,
                           uint16_t *restrict scale) {
    uint32_t top = 0;
    for (int64_t i = 0; i < dim; i++) {
        uint32_t a = x[i] & 0x7FFFFFFFu;
        top = a > top ? a : top;
    }
    float s = scale_of(from_bits(top), scale);
    for (int64_t i = 0; i < dim; i++) q[i] = level(from_bits(x[i]), s);
}

/* n (up to 256) levels at q times s, into o (bf16 or fp32 values); the levels are copied to
 * the stack first, so o may cover q. A head of 64 values takes a constant n: loops of a known
 * length (7.4 GB/s out against 5.9 for the general loop on one thread of a 2-core Xeon). */
static inline void dpiece(const uint8_t *q, int64_t n, float s, void *o, int bf16) {
    int8_t levels[256];
    memcpy(levels, q, (size_t)n);
    for (int64_t i = 0; i < n; i++) {
        float v = (float)levels[i] * s;
        if (bf16)
            ((uint16_t *)o)[i] = to_bf16(v);
        else
            ((float *)o)[i] = v;
    }
}

/* One row of `dim` levels at q with its scale s, into o: in pieces of 256 from the last. */
static inline void drow(const uint8_t *q, int64_t dim, float s, void *o, int bf16) {
    if (bf16 && dim == 64) {
        dpiece(q, 64, s, o, 1);
        return;
    }
    for (int64_t i0 = (dim - 1) / 256 * 256; i0 >= 0; i0 -= 256)
        dpiece(q + i0, dim - i0 < 256 ? dim - i0 : 256, s, (char *)o + i0 * (bf16 ? 2 : 4), bf16);
}

#endif
