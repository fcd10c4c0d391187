/* Vectors of floats (GCC's and clang's vector extensions) and the normalized Walsh-Hadamard
 * rotation over a row of them, for int4.c (int4r and k8v4). A head's channels are a row of
 * vectors, 16 floats with AVX-512, 8 without. */
#ifndef KVTIER_VEC_H
#define KVTIER_VEC_H
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#define DMAX 256
/* Lanes of a vector: 16 floats where the host has AVX-512, 8 elsewhere (wider vectors than
 * the host's turn each shuffle into scalar moves: 13x slower on AVX2). */
#ifdef __AVX512F__
#define LANES 16
#else
#define LANES 8
#endif
#define VMAX (DMAX / 8)
#define GKMAX 32

typedef float vf __attribute__((vector_size(LANES * 4)));
typedef int32_t vi __attribute__((vector_size(LANES * 4)));
typedef uint32_t vu __attribute__((vector_size(LANES * 4)));
typedef uint16_t vh __attribute__((vector_size(LANES * 2)));
typedef uint8_t vb __attribute__((vector_size(LANES)));

#if defined(__clang__) || __GNUC__ >= 12
#define SWAP(v, ...) __builtin_shufflevector(v, v, __VA_ARGS__)
#else
#define SWAP(v, ...) __builtin_shuffle(v, (vi){__VA_ARGS__})
#endif
#if LANES == 16
#define SWAP1(v) SWAP(v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14)
#define SWAP2(v) SWAP(v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13)
#define SWAP4(v) SWAP(v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11)
#define SWAP8(v) SWAP(v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7)
#else
#define SWAP1(v) SWAP(v, 1, 0, 3, 2, 5, 4, 7, 6)
#define SWAP2(v) SWAP(v, 2, 3, 0, 1, 6, 7, 4, 5)
#define SWAP4(v) SWAP(v, 4, 5, 6, 7, 0, 1, 2, 3)
#endif

/* Row functions inline into run() so that a head of 64 gets its loops unrolled. */
#define INLINE static inline __attribute__((always_inline))

INLINE vf splat(float f) { return (vf){0} + f; }

INLINE vf pick(vi mask, vf a, vf b) {
    return (vf)(((vi)a & mask) | ((vi)b & ~mask));
}

/* One butterfly stage within a vector: lane i pairs with lane i ^ h; the lane whose bit h is
 * clear takes the sum, the other (partner - itself): the scalar a + b, a - b exactly. */
INLINE vf stage(vf x, vf partner, vi high) { return pick(high, partner - x, x + partner); }

INLINE void rotate(vf *x, int64_t nv, int64_t r) {
    vi lane;
    for (int i = 0; i < LANES; i++) lane[i] = i;
    const vi h1 = -((lane >> 0) & 1), h2 = -((lane >> 1) & 1), h4 = -((lane >> 2) & 1);
    for (int64_t k = 0; k < nv; k++) {
        vf v = x[k];
        v = stage(v, SWAP1(v), h1);
        v = stage(v, SWAP2(v), h2);
        v = stage(v, SWAP4(v), h4);
#if LANES == 16
        v = stage(v, SWAP8(v), -((lane >> 3) & 1));
#endif
        x[k] = v;
    }
    for (int64_t step = 1; step * LANES < r; step *= 2)
        for (int64_t b = 0; b < nv; b += 2 * step)
            for (int64_t i = b; i < b + step; i++) {
                vf a = x[i], c = x[i + step];
                x[i] = a + c;
                x[i + step] = a - c;
            }
    const vf c = splat(1.0f / sqrtf((float)r));
    for (int64_t k = 0; k < nv; k++) x[k] *= c;
}

INLINE void load_row(const void *x, int bf16, int64_t at, int64_t nv, vf *row) {
    for (int64_t k = 0; k < nv; k++) {
        if (bf16) {
            vh h;
            memcpy(&h, (const uint16_t *)x + at + LANES * k, sizeof h);
            row[k] = (vf)(__builtin_convertvector(h, vu) << 16);
        } else {
            memcpy(&row[k], (const float *)x + at + LANES * k, sizeof row[k]);
        }
    }
}

/* One vector to p (aligned to its size) past the cache: no read of each line of memory the
 * caller reads no more (an engine's blocks) before it is written over. */
INLINE void stream(vh h, void *p) {
#if defined(__x86_64__) && LANES == 16
    _mm256_stream_si256((__m256i *)p, (__m256i)h);
#elif defined(__x86_64__)
    _mm_stream_si128((__m128i *)p, (__m128i)h);
#else
    memcpy(p, &h, sizeof h);
#endif
}

/* A row at `at`; bf16 rows streamed past the cache with `nt` (`out` aligned for it). */
INLINE void store_row(void *out, int bf16, int64_t at, int64_t nv, const vf *row, int nt) {
    for (int64_t k = 0; k < nv; k++) {
        if (bf16) { /* nearest even, as to_bf16 */
            vu u = (vu)row[k];
            u += 0x7FFFu + ((u >> 16) & 1u);
            vh h = __builtin_convertvector(u >> 16, vh);
            if (nt)
                stream(h, (uint16_t *)out + at + LANES * k);
            else
                memcpy((uint16_t *)out + at + LANES * k, &h, sizeof h);
        } else {
            memcpy((float *)out + at + LANES * k, &row[k], sizeof row[k]);
        }
    }
}

INLINE vf bf16_round(vf f) { /* f rounded to bf16, nearest even, back in fp32 */
    vu u = (vu)f;
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (vf)(u & 0xFFFF0000u);
}

#endif
