/* kvtier's int4r codec for one chunk (kvtier/quant4.py says what it is and why): each
 * token's head rotated by a normalized Walsh-Hadamard transform of r points (a butterfly in
 * log2(r) stages, then a multiply by 1/sqrt(r)), then 4-bit asymmetric levels as KIVI
 * groups them: K per channel over groups of `gk` tokens, V per token over groups of `gv`
 * channels, a bf16 minimum and step per group. Decoding dequantizes and applies the same
 * transform (it is its own inverse). The arithmetic is quant4.py's torch path, operation for
 * operation (compiled without contracting a multiply and an add into one), so both write
 * the same bytes; kvtier checks that once per process before it uses this.
 *
 * A head's channels are rotated as a row of vectors (16 floats with AVX-512, 8 without; GCC's
 * and clang's vector extensions): the butterflies at strides of a vector or more pair whole
 * vectors, those within one pair its lanes through a shuffle. A group's byte i holds levels
 * i and i + group / 2 (low and high nibble), so that packing and unpacking move whole
 * vectors. K's groups run across tokens and are stored token-pair by token-pair, each a row of
 * the head's channels: a group of K is rotated token by token and its levels computed for
 * all channels at once, with no transposition. Measured on one thread of a 2-core Xeon
 * (a 5.9 MB bf16 chunk of SmolLM2-135M): encode 2.9 ms, decode 1.3 ms (4.5 GB/s out);
 * compiled for AVX2 on the same CPU, 5.3 and 2.5 ms; with 16-float vectors on AVX2, whose
 * shuffles then went through memory, 28 and 19 ms. Heads whose size is not a multiple of 32,
 * or above 256, are left to torch.
 *
 * The same kernel runs k8v4 (gk 0): K stored as int8 rows, a bf16 scale per token and head
 * (int8row.h, int8.c's arithmetic), V as int4r stores it. */
#include "int8row.h"
#include "vec.h"

typedef struct {
    int64_t layers, tokens, heads, dim, gk, gv, r, kr;
} shape4;

/* Where row i of a layer's K (of tokens x heads rows of dim values) lies among the layer's
 * 2 x tokens x heads rows: K and V alternate in runs of kr rows (its V row: kr further on).
 * kr = tokens x heads is the chunk layout, all K then all V; an engine whose blocks hold each
 * head's K then its V (vLLM's AMX-packed CPU cache, moved as opaque blocks) has kr = the
 * block's tokens. */
INLINE int64_t k_row(shape4 s, int64_t i) {
    return i / s.kr * 2 * s.kr + i % s.kr;
}

/* [min, step] of groups whose extremes are lo and hi: the minimum rounded to bf16, the step
 * (hi - that) / 15 rounded to bf16, or 1 where a group has no range. */
INLINE void params4(vf *lo, vf hi, vf *step) {
    *lo = bf16_round(*lo);
    *step = bf16_round(pick(hi > *lo, (hi - *lo) / splat(15.0f), splat(1.0f)));
}

/* Levels (x - lo) / step rounded to nearest even (adding and taking away 1.5 x 2^23 rounds
 * as rintf does over the levels' range, and saturates outside it) clamped to [0, 15]; NaN
 * KV is garbage and gets 0, never undefined behaviour. */
INLINE vb levels4(vf x, vf lo, vf step) {
    const vf magic = splat(12582912.0f);
    vf v = ((x - lo) / step + magic) - magic;
    v = pick(v > splat(15.0f), splat(15.0f), v);
    v = pick(v < splat(0.0f), splat(0.0f), v);
    v = pick(v == v, v, splat(0.0f));
    return __builtin_convertvector(__builtin_convertvector(v, vi), vb);
}

INLINE vf values4(vb q, vf lo, vf step) {
    vf v = __builtin_convertvector(__builtin_convertvector(q, vi), vf); /* via int32: */
    return v * step + lo; /* GCC 12 scalarizes uint8 -> float; not contracted: -ffp-contract=off */
}

INLINE float hmin(vf v) {
    float m = v[0];
    for (int i = 1; i < LANES; i++) m = v[i] < m ? v[i] : m;
    return m;
}

INLINE float hmax(vf v) {
    float m = v[0];
    for (int i = 1; i < LANES; i++) m = v[i] > m ? v[i] : m;
    return m;
}

/* Where a group of K's levels and [min, step]s start: the levels of a group are gk / 2 rows
 * of dim bytes (byte b of a channel holds tokens b and b + gk / 2), its [min, step]s a row of
 * dim bf16 minima then one of dim steps. */
INLINE int64_t k_group(shape4 s, int64_t l, int64_t h, int64_t g) {
    return (l * s.heads + h) * ((s.tokens + s.gk - 1) / s.gk) + g;
}

/* K of one layer and head, one group of gk tokens (a short group repeats its last token). */
INLINE void encode_k_group(const void *x, int bf16, shape4 s, int64_t nv, int64_t l, int64_t h,
                           int64_t g, uint8_t *q, uint16_t *p) {
    vf rows[GKMAX][VMAX], lo[VMAX], hi[VMAX], step[VMAX];
    int64_t t0 = g * s.gk, valid = s.tokens - t0 < s.gk ? s.tokens - t0 : s.gk, half = s.gk / 2;
    int64_t at = k_group(s, l, h, g);
    for (int64_t j = 0; j < s.gk; j++) {
        int64_t tok = t0 + (j < valid ? j : valid - 1);
        load_row(x, bf16, ((l * 2 * s.tokens + tok) * s.heads + h) * s.dim, nv, rows[j]);
        rotate(rows[j], nv, s.r);
    }
    for (int64_t k = 0; k < nv; k++) {
        lo[k] = hi[k] = rows[0][k];
        for (int64_t j = 1; j < s.gk; j++) {
            lo[k] = pick(rows[j][k] < lo[k], rows[j][k], lo[k]);
            hi[k] = pick(rows[j][k] > hi[k], rows[j][k], hi[k]);
        }
        params4(&lo[k], hi[k], &step[k]);
        store_row(p, 1, at * 2 * s.dim + LANES * k, 1, &lo[k], 0);
        store_row(p, 1, (at * 2 + 1) * s.dim + LANES * k, 1, &step[k], 0);
        for (int64_t b = 0; b < half; b++) {
            vb c = levels4(rows[b][k], lo[k], step[k]) |
                     levels4(rows[b + half][k], lo[k], step[k]) << 4;
            memcpy(q + (at * half + b) * s.dim + LANES * k, &c, sizeof c);
        }
    }
}

INLINE void decode_k_group(const uint8_t *q, const uint16_t *p, shape4 s, int64_t nv, int64_t l,
                           int64_t h, int64_t g, void *out, int bf16, int64_t out_l, int nt) {
    vf row[VMAX], lo[VMAX], step[VMAX];
    int64_t at = k_group(s, l, h, g), half = s.gk / 2;
    load_row(p, 1, at * 2 * s.dim, nv, lo);
    load_row(p, 1, (at * 2 + 1) * s.dim, nv, step);
    int64_t t0 = g * s.gk, valid = s.tokens - t0 < s.gk ? s.tokens - t0 : s.gk;
    for (int64_t j = 0; j < valid; j++) {
        int shift = j < half ? 0 : 4;
        const uint8_t *b = q + (at * half + (j < half ? j : j - half)) * s.dim;
        for (int64_t k = 0; k < nv; k++) {
            vb c;
            memcpy(&c, b + LANES * k, sizeof c);
            row[k] = values4((c >> shift) & 15, lo[k], step[k]);
        }
        rotate(row, nv, s.r);
        store_row(out, bf16, ((out_l * 2 * s.tokens + t0 + j) * s.heads + h) * s.dim, nv, row,
                     nt);
    }
}

/* k8v4's K: one row of int8 levels times its scale, int8row.h's drow in vectors (the same
 * product, rounded once), so that its stores too may bypass the cache (`nt`). The levels are
 * widened one by one, which GCC turns into one sign-extending load; a vector of int8
 * converted whole was slower than drow (one thread of a 2-core Xeon, a 5.9 MB bf16 chunk
 * into blocks out of cache: drow 1.49 ms, converted whole 1.68, widened 1.31 and, with the
 * stores bypassing the cache, 1.03). */
INLINE void decode_k8_row(const uint8_t *q, float scale, int64_t nv, void *out, int bf16,
                          int64_t at, int nt) {
    vf row[VMAX];
    for (int64_t k = 0; k < nv; k++) {
        vi w;
        for (int i = 0; i < LANES; i++) w[i] = (int8_t)q[LANES * k + i];
        row[k] = __builtin_convertvector(w, vf) * splat(scale);
    }
    store_row(out, bf16, at, nv, row, nt);
}

/* V of one token's head: rotated, then levels over groups of gv channels (a multiple of 32:
 * byte i of a group holds channels i and i + gv / 2). */
INLINE void encode_v_row(const void *x, int bf16, shape4 s, int64_t nv, int64_t at,
                         int64_t index, uint8_t *q, uint16_t *p) {
    vf row[VMAX];
    load_row(x, bf16, at, nv, row);
    rotate(row, nv, s.r);
    int64_t groups = s.dim / s.gv, per = s.gv / LANES;
    for (int64_t g = 0; g < groups; g++) {
        const vf *v = row + g * per;
        vf lo = v[0], hi = v[0], step;
        for (int64_t k = 1; k < per; k++) {
            lo = pick(v[k] < lo, v[k], lo);
            hi = pick(v[k] > hi, v[k], hi);
        }
        lo = splat(hmin(lo));
        params4(&lo, splat(hmax(hi)), &step);
        uint8_t *o = q + (index * groups + g) * (s.gv / 2);
        for (int64_t k = 0; k < per / 2; k++) {
            vb c = levels4(v[k], lo, step) | levels4(v[k + per / 2], lo, step) << 4;
            memcpy(o + LANES * k, &c, sizeof c);
        }
        p[(index * groups + g) * 2] = to_bf16(lo[0]);
        p[(index * groups + g) * 2 + 1] = to_bf16(step[0]);
    }
}

INLINE void decode_v_row(const uint8_t *q, const uint16_t *p, shape4 s, int64_t nv, int64_t index,
                         void *out, int bf16, int64_t at, int nt) {
    vf row[VMAX];
    int64_t groups = s.dim / s.gv, per = s.gv / LANES;
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *b = q + (index * groups + g) * (s.gv / 2);
        vf lo = splat(from_bf16(p[(index * groups + g) * 2]));
        vf step = splat(from_bf16(p[(index * groups + g) * 2 + 1]));
        for (int64_t k = 0; k < per / 2; k++) {
            vb c;
            memcpy(&c, b + LANES * k, sizeof c);
            row[g * per + k] = values4(c & 15, lo, step);
            row[g * per + k + per / 2] = values4(c >> 4, lo, step);
        }
    }
    rotate(row, nv, s.r);
    store_row(out, bf16, at, nv, row, nt);
}

/* The stored form's four parts: K levels, K [min, step]s, V levels, V [min, step]s; where
 * each after the first starts. With gk 0 (k8v4), K's parts are int8's: a level per value,
 * then a bf16 scale per token and head. */
static void parts(shape4 s, int64_t *kq, int64_t *kp, int64_t *vq) {
    int64_t rows = s.layers * s.tokens * s.heads;
    int64_t v_groups = rows * (s.dim / s.gv);
    if (s.gk) {
        int64_t k_groups = s.layers * s.heads * s.dim * ((s.tokens + s.gk - 1) / s.gk);
        *kq = k_groups * s.gk / 2;
        *kp = *kq + k_groups * 4;
    } else {
        *kq = rows * s.dim;
        *kp = *kq + rows * 2;
    }
    *vq = *kp + v_groups * s.gv / 2;
}

typedef int (*hash_update)(void *state, const void *data, size_t len);

/* Where a decoded chunk goes: straight into `out` (the whole payload), or, with `scratch`
 * (room for one layer), layer by layer into it and from there by `n` copies into their
 * destinations (an engine's blocks): copy i moves nbytes[i] from payload offset src[i] to
 * dst[i], each within one layer's K and V, in payload order. The layer is still in cache
 * when it is copied: the decoded chunk is written once, where it is used. */
typedef struct {
    void *out, *scratch;
    int64_t n;
    void *const *dst;
    const int64_t *src, *nbytes;
    hash_update update;
    void *state;
} sink4;

/* Every group of a chunk, layer by layer, with nv (the head's vectors) a constant for a head
 * of 64, so that the compiler unrolls each row's loops into straight code. Decoding with
 * `update` (XXH3's streaming update, `state` holding the raw chunk's header) hashes each
 * layer's K and V right after writing them, while they are in cache: the decoded chunk's
 * checksum without another pass over it. */
INLINE void run(int encode, void *kv, int bf16, shape4 s, int64_t nv, uint8_t *st, sink4 k) {
    int64_t kq, kp, vq, groups = s.gk ? (s.tokens + s.gk - 1) / s.gk : 0;
    int64_t rows = s.tokens * s.heads;
    size_t layer = (size_t)(2 * rows * s.dim) * (bf16 ? 2 : 4);
    int64_t c = 0;
    parts(s, &kq, &kp, &vq);
    for (int64_t l = 0; l < s.layers; l++) {
        void *out = k.scratch ? k.scratch : kv;
        int64_t out_l = k.scratch ? 0 : l;
        /* A layer whose one copy is the whole layer (its blocks consecutive): decoded
         * straight into its destination, without the scratch. */
        int whole = !encode && k.scratch && c < k.n && k.src[c] == (int64_t)((size_t)l * layer) &&
                    k.nbytes[c] == (int64_t)layer;
        if (whole)
            out = k.dst[c];
        int nt = whole && ((uintptr_t)out % sizeof(vh)) == 0;
        for (int64_t i = 0; !s.gk && i < rows; i++) { /* k8v4: K as int8 rows */
            int64_t row = l * rows + i;
            uint16_t *scale = (uint16_t *)(st + kq) + row;
            if (encode && bf16)
                row_bf16((const uint16_t *)kv + (l * 2 * rows + k_row(s, i)) * s.dim, s.dim,
                         (int8_t *)st + row * s.dim, scale);
            else if (encode)
                row_f32((const uint32_t *)kv + (l * 2 * rows + k_row(s, i)) * s.dim, s.dim,
                        (int8_t *)st + row * s.dim, scale);
            else
                decode_k8_row(st + row * s.dim, from_bf16(*scale), nv, out, bf16,
                              (out_l * 2 * rows + k_row(s, i)) * s.dim, nt);
        }
        for (int64_t h = 0; s.gk && h < s.heads; h++)
            for (int64_t g = 0; g < groups; g++) {
                if (encode)
                    encode_k_group(kv, bf16, s, nv, l, h, g, st, (uint16_t *)(st + kq));
                else
                    decode_k_group(st, (const uint16_t *)(st + kq), s, nv, l, h, g, out, bf16,
                                   out_l, nt);
            }
        for (int64_t i = 0; i < rows; i++) {
            int64_t v = k_row(s, i) + s.kr; /* the layer's row holding V's row i */
            if (encode)
                encode_v_row(kv, bf16, s, nv, (l * 2 * rows + v) * s.dim, l * rows + i, st + kp,
                             (uint16_t *)(st + vq));
            else
                decode_v_row(st + kp, (const uint16_t *)(st + vq), s, nv, l * rows + i, out, bf16,
                             (out_l * 2 * rows + v) * s.dim, nt);
        }
        if (encode) { /* the raw layer hashed while it is in cache (recoding: its checksum) */
            if (k.update)
                k.update(k.state, (const char *)kv + (size_t)l * layer, layer);
            continue;
        }
        const char *done = (const char *)out + (size_t)out_l * layer;
        if (k.update)
            k.update(k.state, done, layer);
        c += whole;
        for (; k.scratch && c < k.n && k.src[c] < (int64_t)((size_t)(l + 1) * layer); c++)
            memcpy(k.dst[c], done + (k.src[c] - (int64_t)((size_t)l * layer)), (size_t)k.nbytes[c]);
    }
#if defined(__x86_64__)
    if (!encode && k.scratch)
        __builtin_ia32_sfence(); /* the cache-bypassing stores land before the caller goes on */
#endif
}

static void dispatch(int encode, void *kv, int bf16, shape4 s, uint8_t *st, sink4 k) {
    if (s.dim == 64 && bf16)
        run(encode, kv, 1, s, 64 / LANES, st, k);
    else if (s.dim == 64)
        run(encode, kv, 0, s, 64 / LANES, st, k);
    else
        run(encode, kv, bf16, s, s.dim / LANES, st, k);
}

/* kv: (layers, 2, tokens, heads, dim) of bf16 (bf16 != 0) or fp32; stored: its stored form.
 * The caller checks: dim a multiple of 32 up to 256, gk even up to 32 (0: K stored as int8
 * rows, the k8v4 codec), gv a multiple of 32 dividing dim, r a power of two of at least 16
 * dividing dim, kr (k_row's runs; 0: tokens x heads) dividing tokens x heads, and 0 where
 * gk is not. */
/* update and state: NULL, or XXH3's streaming update and a state to hash the input into. */
void kvtier_int4r_encode(const void *x, int bf16, int64_t layers, int64_t tokens, int64_t heads,
                         int64_t dim, int64_t gk, int64_t gv, int64_t r, int64_t kr,
                         uint8_t *stored, void *update, void *state) {
    shape4 s = {layers, tokens, heads, dim, gk, gv, r, kr ? kr : tokens * heads};
    sink4 k = {0};
    k.update = (hash_update)update;
    k.state = state;
    dispatch(1, (void *)x, bf16, s, stored, k);
}

/* update and state: NULL, or XXH3's streaming update and a state to hash the output into.
 * scratch: NULL (decode into out), or one layer's room and the n copies of a sink4. */
void kvtier_int4r_decode(const uint8_t *stored, int64_t layers, int64_t tokens, int64_t heads,
                         int64_t dim, int64_t gk, int64_t gv, int64_t r, int64_t kr, void *out,
                         int bf16, void *update, void *state, void *scratch, int64_t n,
                         void *const *dst, const int64_t *src, const int64_t *nbytes) {
    shape4 s = {layers, tokens, heads, dim, gk, gv, r, kr ? kr : tokens * heads};
    sink4 k = {out, scratch, n, dst, src, nbytes, (hash_update)update, state};
    dispatch(0, out, bf16, s, (uint8_t *)stored, k);
}
