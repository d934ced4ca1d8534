# IPv4 header access and the Internet checksum (RFC 791, RFC 1071, RFC 1624).
#
# Every helper reads and writes through memcpy so that packets at any alignment are fine;
# gcc turns each memcpy into one load or store.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy
from linux cimport htonl, ntohl, htons, ntohs

cdef enum:
    IPV4_HLEN = 20              # header without options
    IPV4_VER_IHL = 0x45         # byte 0 of such a header: version 4, IHL 5 (20 bytes)
    IPV4_OFF_VER_IHL = 0
    IPV4_OFF_TOS = 1
    IPV4_OFF_TOT_LEN = 2
    IPV4_OFF_ID = 4
    IPV4_OFF_FRAG = 6
    IPV4_OFF_TTL = 8
    IPV4_OFF_PROTO = 9
    IPV4_OFF_CSUM = 10
    IPV4_OFF_SRC = 12
    IPV4_OFF_DST = 16
    IPV4_FLAG_DF = 0x4000
    IPV4_FLAG_MF = 0x2000
    IPV4_FRAG_OFFSET_MASK = 0x1fff
    ECN_NOT_ECT = 0
    ECN_ECT1 = 1
    ECN_ECT0 = 2
    ECN_CE = 3
    CSUM_BULK_MIN = 128         # shorter sums stay scalar: a header, a small packet

cdef extern from "csum.h" nogil:
    # the whole 32-byte blocks of a long sum, vectorised (csum.h says why and how)
    size_t csum_bulk(const uint8_t *p, size_t n, uint64_t *acc)
    int csum_set_path(int path)
    enum:
        CSUM_AUTO
        CSUM_SCALAR
        CSUM_SSE2
        CSUM_AVX2

cdef inline uint32_t ipv4_ihl(const uint8_t *ip) noexcept nogil:
    """Header length in bytes, from the IHL field (the caller checks the version)."""
    return (ip[0] & 15) * 4

cdef inline uint16_t load16(const uint8_t *p) noexcept nogil:
    cdef uint16_t v
    memcpy(&v, p, 2)
    return ntohs(v)

cdef inline uint32_t load32(const uint8_t *p) noexcept nogil:
    cdef uint32_t v
    memcpy(&v, p, 4)
    return ntohl(v)

cdef inline void store16(uint8_t *p, uint16_t v) noexcept nogil:
    v = htons(v)
    memcpy(p, &v, 2)

cdef inline void store32(uint8_t *p, uint32_t v) noexcept nogil:
    v = htonl(v)
    memcpy(p, &v, 4)

cdef inline uint64_t csum_add(const uint8_t *p, size_t n, uint64_t acc) noexcept nogil:
    """Add n bytes to a ones'-complement accumulator, 8 bytes at a time.

    Words are summed in memory (not host) order: the ones'-complement sum is byte-order
    independent (RFC 1071 §2(B)), so the folded result can be stored back with memcpy.
    A carry out of bit 63 is added back in, which is the end-around carry. A long buffer's
    whole 32-byte blocks go to csum_bulk (csum.h), which sums the same words faster.
    """
    cdef uint64_t w
    cdef uint32_t w32 = 0
    cdef uint16_t w16 = 0
    cdef uint8_t tail[2]
    cdef size_t done
    if n >= CSUM_BULK_MIN:
        done = csum_bulk(p, n, &acc)
        p += done
        n -= done
    while n >= 8:
        memcpy(&w, p, 8)
        acc += w
        if acc < w:
            acc += 1
        p += 8
        n -= 8
    if n >= 4:
        memcpy(&w32, p, 4)
        acc += w32
        if acc < w32:
            acc += 1
        p += 4
        n -= 4
    if n >= 2:
        memcpy(&w16, p, 2)
        acc += w16
        if acc < w16:
            acc += 1
        p += 2
        n -= 2
    if n:
        tail[0] = p[0]
        tail[1] = 0
        memcpy(&w16, tail, 2)
        acc += w16
        if acc < w16:
            acc += 1
    return acc

cdef inline uint16_t csum_fold(uint64_t acc) noexcept nogil:
    """Fold a 64-bit accumulator to 16 bits and complement: the checksum in memory order."""
    acc = (acc & 0xffffffffUL) + (acc >> 32)
    acc = (acc & 0xffffffffUL) + (acc >> 32)
    acc = (acc & 0xffff) + (acc >> 16)
    acc = (acc & 0xffff) + (acc >> 16)
    return <uint16_t>(~acc & 0xffff)

cdef inline uint16_t checksum(const uint8_t *p, size_t n) noexcept nogil:
    """The Internet checksum of p[0:n], in memory order (store it with memcpy)."""
    return csum_fold(csum_add(p, n, 0))

cdef inline bint ipv4_header_csum_ok(const uint8_t *ip, size_t ihl_bytes) noexcept nogil:
    return checksum(ip, ihl_bytes) == 0

cdef inline void ipv4_set_header_csum(uint8_t *ip, size_t ihl_bytes) noexcept nogil:
    cdef uint16_t c
    ip[IPV4_OFF_CSUM] = 0
    ip[IPV4_OFF_CSUM + 1] = 0
    c = checksum(ip, ihl_bytes)
    memcpy(ip + IPV4_OFF_CSUM, &c, 2)

cdef inline uint16_t csum_update16(uint16_t hc, uint16_t old, uint16_t new) noexcept nogil:
    """RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m'), all values in host order.

    Used when the ECN bits change on decapsulation: recomputing the whole header would also
    'fix' a checksum that was wrong, while an incremental update keeps a wrong one wrong.
    """
    cdef uint32_t s = (~hc & 0xffff) + (~old & 0xffff) + new
    s = (s & 0xffff) + (s >> 16)
    s = (s & 0xffff) + (s >> 16)
    return <uint16_t>(~s & 0xffff)

cdef inline void ipv4_set_ecn(uint8_t *ip, uint8_t ecn) noexcept nogil:
    """Rewrite the ECN field of a header and update its checksum incrementally."""
    cdef uint16_t old = load16(ip)                     # version/IHL + TOS as one 16-bit word
    cdef uint16_t new = (old & 0xfffc) | ecn
    store16(ip, new)
    store16(ip + IPV4_OFF_CSUM, csum_update16(load16(ip + IPV4_OFF_CSUM), old, new))

cdef inline void ipv4_outer(uint8_t *o, uint8_t tos, uint16_t tot_len, uint16_t ip_id,
                            uint16_t frag, uint8_t ttl, uint8_t proto, uint32_t src,
                            uint32_t dst) noexcept nogil:
    """Write at o a 20-byte IPv4 header without options, checksum included: the one writer
    of every header fanpkt originates (IPIP's and VXLAN's outer headers, its ICMPs). frag
    holds the flags and the fragment offset; values in host order."""
    o[IPV4_OFF_VER_IHL] = IPV4_VER_IHL
    o[IPV4_OFF_TOS] = tos
    store16(o + IPV4_OFF_TOT_LEN, tot_len)
    store16(o + IPV4_OFF_ID, ip_id)
    store16(o + IPV4_OFF_FRAG, frag)
    o[IPV4_OFF_TTL] = ttl
    o[IPV4_OFF_PROTO] = proto
    store32(o + IPV4_OFF_SRC, src)
    store32(o + IPV4_OFF_DST, dst)
    ipv4_set_header_csum(o, IPV4_HLEN)
