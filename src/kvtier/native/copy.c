/* Many memory copies in one call: a load scatters a chunk into the engine's paged blocks as
 * one copy per layer and run of consecutive blocks (hundreds per load). Through torch each
 * copy is a dispatch, taken with the GIL, that may start an OpenMP team; here they are one
 * loop, without the GIL (kvtier/native/__init__.py). */
#include <stdint.h>
#include <string.h>

void kvtier_copy_many(int64_t n, void *const *dst, const void *const *src, const int64_t *nbytes) {
    for (int64_t i = 0; i < n; i++) memcpy(dst[i], src[i], (size_t)nbytes[i]);
}
