/* bf16 <-> fp32 by bits, shared by kvtier's kernels: bf16 is fp32's top half, and rounding
 * to it is to nearest even (what torch's conversion does). */
#ifndef KVTIER_BF16_H
#define KVTIER_BF16_H
#include <stdint.h>
#include <string.h>

static inline float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t to_bf16(float f) { /* nearest even; never given a NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
#endif
