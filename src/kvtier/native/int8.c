/* kvtier's int8 codec for one chunk: symmetric, one bf16 scale per row of `dim` values (a
 * token's head), the same arithmetic as kvtier/quant.py's torch path, so both write the same
 * bytes: the scale is max|x| / 127 rounded to bf16 (nearest even; 1 for an all-zero row),
 * each level x / scale rounded to nearest even and clamped to [-127, 127].
 *
 * Compiled on the host at first use (kvtier/native/__init__.py) with its own vector
 * instructions. |x| is taken on the bit pattern (sign bit cleared), whose unsigned order is
 * that of the values: the reduction vectorizes without relaxing IEEE semantics. */
#include <math.h>

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

/* `rows` rows of `dim` values: levels into q (rows x dim), scales into scales (rows). A head
 * of 64 values gets loops of a known length, which the compiler unrolls into whole vectors. */
void kvtier_int8_encode_bf16(const uint16_t *restrict x, int64_t rows, int64_t dim,
                             int8_t *restrict q, uint16_t *restrict scales) {
    if (dim == 64)
        for (int64_t r = 0; r < rows; r++) row_bf16(x + r * 64, 64, q + r * 64, scales + r);
    else
        for (int64_t r = 0; r < rows; r++) row_bf16(x + r * dim, dim, q + r * dim, scales + r);
}

void kvtier_int8_encode_f32(const uint32_t *restrict x, int64_t rows, int64_t dim,
                            int8_t *restrict q, uint16_t *restrict scales) {
    if (dim == 64)
        for (int64_t r = 0; r < rows; r++) row_f32(x + r * 64, 64, q + r * 64, scales + r);
    else
        for (int64_t r = 0; r < rows; r++) row_f32(x + r * dim, dim, q + r * dim, scales + r);
}

/* Decoding: each value is level x scale, rounded once to the output's dtype (what torch's
 * bf16 multiply writes). `stored` is the encoder's output, levels then scales; `out` may
 * begin where `stored` does (a chunk read into the front of the buffer it decodes into): the
 * scales are copied aside first, then rows run from the last down, each row's levels copied
 * to the stack before its values are written. Row r writes bytes [r, r + 1) x dim x size of
 * the output, which hold the levels of rows >= r only, already decoded; within a row, pieces
 * of 256 values run from the last too (row 0's output covers its own levels). */
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

static inline void decode(const uint8_t *stored, int64_t rows, int64_t dim, void *out,
                          uint16_t *scales_aside, int bf16) {
    memcpy(scales_aside, stored + rows * dim, (size_t)rows * 2);
    int64_t row_bytes = dim * (bf16 ? 2 : 4);
    for (int64_t r = rows - 1; r >= 0; r--)
        drow(stored + r * dim, dim, from_bf16(scales_aside[r]), (char *)out + r * row_bytes, bf16);
}

void kvtier_int8_decode_bf16(const uint8_t *stored, int64_t rows, int64_t dim, uint16_t *out,
                             uint16_t *scales_aside) {
    decode(stored, rows, dim, out, scales_aside, 1);
}

void kvtier_int8_decode_f32(const uint8_t *stored, int64_t rows, int64_t dim, float *out,
                            uint16_t *scales_aside) {
    decode(stored, rows, dim, out, scales_aside, 0);
}

/* Decoding straight into an engine's blocks: copy i of the raw payload, nbytes[i] from byte
 * offset src[i] (both whole rows) to dst[i], is decoded from its rows' levels and scales, with
 * no raw chunk between (a disk hit read the int8 form, decoded it into a raw buffer and
 * copied that into the blocks). */
static inline void decode_table(const uint8_t *stored, int64_t rows, int64_t dim, int bf16,
                                int64_t n, void *const *dst, const int64_t *src,
                                const int64_t *nbytes) {
    const uint8_t *scales = stored + rows * dim;
    int64_t row_bytes = dim * (bf16 ? 2 : 4);
    for (int64_t i = 0; i < n; i++) {
        int64_t r0 = src[i] / row_bytes, count = nbytes[i] / row_bytes;
        for (int64_t r = r0; r < r0 + count; r++) {
            uint16_t bits;
            memcpy(&bits, scales + 2 * r, 2);
            drow(stored + r * dim, dim, from_bf16(bits), (char *)dst[i] + (r - r0) * row_bytes,
                 bf16);
        }
    }
}

void kvtier_int8_decode_table(const uint8_t *stored, int64_t rows, int64_t dim, int bf16,
                              int64_t n, void *const *dst, const int64_t *src,
                              const int64_t *nbytes) {
    if (bf16) /* the dtype a constant in each copy of the loops */
        decode_table(stored, rows, dim, 1, n, dst, src, nbytes);
    else
        decode_table(stored, rows, dim, 0, n, dst, src, nbytes);
}

/* Recoding a raw chunk for a lower tier in one pass: each block of rows is hashed (the raw
 * payload's checksum, verified before the encoded form is used), encoded, and its levels
 * hashed (the encoded form's checksum) while both are in cache; the scales are hashed last,
 * as they follow the levels. Before: a verify pass over the raw chunk, the encode, a hash
 * pass over its output and a copy joining it to its header. `update` is XXH3's streaming
 * update, `raw_state` and `out_state` already hold the two headers' bytes. */
typedef int (*kvtier_update)(void *state, const void *data, size_t len);
typedef void (*kvtier_encode)(const void *x, int64_t rows, int64_t dim, int8_t *q, uint16_t *scales);
#define RECODE_ROWS 256

static void recode(kvtier_encode encode, size_t size, const char *x, int64_t rows, int64_t dim,
                   int8_t *q, uint16_t *scales, void *update, void *raw_state, void *out_state) {
    kvtier_update hash = (kvtier_update)update;
    for (int64_t r = 0; r < rows; r += RECODE_ROWS) {
        int64_t n = rows - r < RECODE_ROWS ? rows - r : RECODE_ROWS;
        hash(raw_state, x + r * dim * size, (size_t)(n * dim) * size);
        encode(x + r * dim * size, n, dim, q + r * dim, scales + r);
        hash(out_state, q + r * dim, (size_t)(n * dim));
    }
    hash(out_state, scales, (size_t)rows * 2);
}

void kvtier_int8_recode_bf16(const uint16_t *x, int64_t rows, int64_t dim, int8_t *q,
                             uint16_t *scales, void *update, void *raw_state, void *out_state) {
    recode((kvtier_encode)kvtier_int8_encode_bf16, 2, (const char *)x, rows, dim, q, scales,
           update, raw_state, out_state);
}

void kvtier_int8_recode_f32(const uint32_t *x, int64_t rows, int64_t dim, int8_t *q,
                            uint16_t *scales, void *update, void *raw_state, void *out_state) {
    recode((kvtier_encode)kvtier_int8_encode_f32, 4, (const char *)x, rows, dim, q, scales,
           update, raw_state, out_state);
}
