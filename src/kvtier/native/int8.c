/* kvtier's int8 codec for one chunk: rows of a token's head as int8row.h encodes them, all
 * levels then all scales. Compiled on the host at first use (kvtier/native/build.py) with
 * its own vector instructions. */
#include "int8row.h"

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
