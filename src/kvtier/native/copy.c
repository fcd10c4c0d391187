/* Many memory copies in one call: a load scatters a chunk into the engine's paged blocks as
 * one copy per layer and run of consecutive blocks (hundreds per load). Through torch each
 * copy is a dispatch, taken with the GIL, that may start an OpenMP team; here they are one
 * loop, without the GIL (kvtier/native/__init__.py). */
#include <stdint.h>
#include <string.h>

void kvtier_copy_many(int64_t n, void *const *dst, const void *const *src, const int64_t *nbytes) {
    for (int64_t i = 0; i < n; i++) memcpy(dst[i], src[i], (size_t)nbytes[i]);
}

/* The same, hashing what it copies: a chunk's payload verified while it moves, in one read of
 * it instead of two (a hash pass, then the copy). The pairs run through the payload in order;
 * each block is hashed right after its copy, while it is in cache. `update` is XXH3's
 * streaming update (from the xxhash package's library, kvtier/native/xxh3.py), `state` its
 * state, already holding the header's bytes. */
typedef int (*kvtier_hash_update)(void *state, const void *data, size_t len);

void kvtier_copy_hash(int64_t n, void *const *dst, const void *const *src, const int64_t *nbytes,
                      void *update, void *state) {
    const int64_t block = 64 * 1024;
    kvtier_hash_update hash = (kvtier_hash_update)update;
    for (int64_t i = 0; i < n; i++) {
        char *d = dst[i];
        const char *s = src[i];
        for (int64_t at = 0; at < nbytes[i]; at += block) {
            size_t len = (size_t)(nbytes[i] - at < block ? nbytes[i] - at : block);
            memcpy(d + at, s + at, len);
            hash(state, d + at, len);
        }
    }
}
