/* The bulk of a ones'-complement sum, vectorised (ipv4.pxd's csum_add calls it for long
 * buffers and finishes the tail itself).
 *
 * Why: every TCP segment fanpkt cuts from a TSO superpacket needs its checksum computed
 * over its payload, and every segment GRO merges on receive needs its checksum verified,
 * so VXLAN at ~7 Gbit/s sums ~1.7 GB/s. The scalar loop adds 8 bytes with carry per step,
 * one long dependency chain (~98 ns per 1408 bytes here); in a perf profile of one TCP
 * stream those two sums were ~8 % of the machine's CPU.
 *
 * How: 32-bit words are added into 64-bit lanes, which cannot carry out before 2^32 adds
 * (any IPv4 packet is far fewer words), so the adds are independent and vectorise: 16
 * bytes per add with SSE2 (every x86-64), 32 with AVX2 where the CPU has it (~25 ns per
 * 1408 bytes). The lanes are then added with end-around carry. This is the same sum: the
 * ones'-complement sum of memory-order 32-bit words, folded, equals that of 16-bit words
 * (2^16 = 1 modulo 0xffff), and the words are in memory order as csum_add's are.
 *
 * csum_bulk(p, n, acc) adds the first whole 32-byte blocks of p[0:n] to *acc and returns
 * how many bytes it took (a multiple of 32; 0 on other architectures). */
#ifndef FANPKT_CSUM_H
#define FANPKT_CSUM_H

#include <stddef.h>
#include <stdint.h>

/* Which loop csum_bulk uses. fastpath.pyx sets the best the CPU has when it is imported
 * (csum_set_path(CSUM_AUTO)), before any loop runs; the tests force each in turn
 * (testing.pxi: set_checksum_path) so that every one is checked on this CPU. The loops
 * only read it. */
enum { CSUM_AUTO = 0, CSUM_SCALAR = 1, CSUM_SSE2 = 2, CSUM_AVX2 = 3 };
static int csum_path = CSUM_AUTO;

static inline uint64_t csum_add1(uint64_t acc, uint64_t w)
{
    acc += w;
    return acc + (acc < w);
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

static size_t csum_bulk_sse2(const uint8_t *p, size_t n, uint64_t *acc)
{
    const __m128i z = _mm_setzero_si128();
    __m128i a0 = z, a1 = z, v;
    uint64_t lanes[2];
    size_t done = 0;
    for (; done + 32 <= n; done += 32) {
        v = _mm_loadu_si128((const __m128i *)(p + done));
        a0 = _mm_add_epi64(a0, _mm_unpacklo_epi32(v, z));
        a1 = _mm_add_epi64(a1, _mm_unpackhi_epi32(v, z));
        v = _mm_loadu_si128((const __m128i *)(p + done + 16));
        a0 = _mm_add_epi64(a0, _mm_unpacklo_epi32(v, z));
        a1 = _mm_add_epi64(a1, _mm_unpackhi_epi32(v, z));
    }
    _mm_storeu_si128((__m128i *)lanes, _mm_add_epi64(a0, a1));
    *acc = csum_add1(csum_add1(*acc, lanes[0]), lanes[1]);
    return done;
}

__attribute__((target("avx2")))
static size_t csum_bulk_avx2(const uint8_t *p, size_t n, uint64_t *acc)
{
    const __m256i z = _mm256_setzero_si256();
    __m256i a0 = z, a1 = z, v;
    uint64_t lanes[4];
    size_t done = 0;
    int i;
    for (; done + 64 <= n; done += 64) {
        v = _mm256_loadu_si256((const __m256i *)(p + done));
        a0 = _mm256_add_epi64(a0, _mm256_unpacklo_epi32(v, z));
        a1 = _mm256_add_epi64(a1, _mm256_unpackhi_epi32(v, z));
        v = _mm256_loadu_si256((const __m256i *)(p + done + 32));
        a0 = _mm256_add_epi64(a0, _mm256_unpacklo_epi32(v, z));
        a1 = _mm256_add_epi64(a1, _mm256_unpackhi_epi32(v, z));
    }
    _mm256_storeu_si256((__m256i *)lanes, _mm256_add_epi64(a0, a1));
    for (i = 0; i < 4; i++)
        *acc = csum_add1(*acc, lanes[i]);
    return done + csum_bulk_sse2(p + done, n - done, acc);   /* a last 32-byte block */
}

static inline int csum_best(void)
{
    return __builtin_cpu_supports("avx2") ? CSUM_AVX2 : CSUM_SSE2;
}

static inline size_t csum_bulk(const uint8_t *p, size_t n, uint64_t *acc)
{
    int path = csum_path;
    if (path == CSUM_AUTO)          /* not set yet: decide, but leave the setting alone */
        path = csum_best();
    if (path == CSUM_AVX2)
        return csum_bulk_avx2(p, n, acc);
    if (path == CSUM_SSE2)
        return csum_bulk_sse2(p, n, acc);
    return 0;
}

static inline int csum_set_path(int path)
{
    if (path == CSUM_AUTO)
        path = csum_best();
    if (path == CSUM_AVX2 && !__builtin_cpu_supports("avx2"))
        return -1;
    csum_path = path;
    return 0;
}

#else   /* elsewhere csum_add's scalar loop does it all */

static inline size_t csum_bulk(const uint8_t *p, size_t n, uint64_t *acc)
{
    (void)p; (void)n; (void)acc;
    return 0;
}

static inline int csum_set_path(int path)
{
    return path == CSUM_AUTO || path == CSUM_SCALAR ? 0 : -1;
}

#endif
#endif
