# ICMP "fragmentation needed" (RFC 792 type 3 code 4, next-hop MTU from RFC 1191).
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC
from libc.string cimport memcpy
from linux cimport IPPROTO_ICMP
from ipv4 cimport (IPV4_HLEN, IPV4_OFF_FRAG, IPV4_OFF_PROTO, IPV4_OFF_SRC, IPV4_OFF_DST,
                   IPV4_FRAG_OFFSET_MASK, ipv4_ihl, load16, load32, store16, checksum,
                   ipv4_outer)

# Types and codes as <linux/icmp.h> names them.
cdef enum:
    ICMP_DEST_UNREACH = 3
    ICMP_SOURCE_QUENCH = 4
    ICMP_REDIRECT = 5
    ICMP_TIME_EXCEEDED = 11
    ICMP_PARAMETERPROB = 12
    ICMP_FRAG_NEEDED = 4        # code, with ICMP_DEST_UNREACH

cdef enum:
    ICMP_HLEN = 8
    ICMP_MAX_LEN = 576          # RFC 1812 4.3.2.3: at most 576 bytes in all
    ICMP_QUOTE_MAX = ICMP_MAX_LEN - IPV4_HLEN - ICMP_HLEN

# The ICMP budget of one sending loop: a token bucket like the kernel's icmp_msgs_per_sec
# and icmp_msgs_burst (1000 a second, bursts of 50). A container that sends oversized DF
# packets with forged sources gets at most this many ICMPs sent on its behalf.
cdef enum:
    ICMP_PER_SEC = 1000
    ICMP_BURST = 50

cdef struct icmp_budget:
    uint64_t last_ms            # when credit was last refilled (CLOCK_MONOTONIC, ms)
    uint32_t credit             # ICMPs that may go now; all zero = a full burst is due
    int unlimited               # tests that compare every verdict with the oracle

cdef inline bint icmp_allow(icmp_budget *b) noexcept nogil:
    """Take one ICMP from the budget; False: over the rate, send none."""
    cdef timespec ts
    cdef uint64_t now, refill
    if b == NULL or b.unlimited:
        return True
    clock_gettime(CLOCK_MONOTONIC, &ts)
    now = <uint64_t>ts.tv_sec * 1000 + <uint64_t>ts.tv_nsec // 1000000
    refill = (now - b.last_ms) * ICMP_PER_SEC // 1000
    if refill:
        b.credit = ICMP_BURST if b.credit + refill > ICMP_BURST else <uint32_t>(b.credit + refill)
        b.last_ms = now
    if b.credit == 0:
        return False
    b.credit -= 1
    return True

cdef inline bint icmp_is_error(const uint8_t *ip, uint32_t len, uint32_t ihl) noexcept nogil:
    """Is this an ICMP error message (RFC 1122 3.2.2: never answered with another)?"""
    cdef uint8_t t
    if ip[IPV4_OFF_PROTO] != IPPROTO_ICMP or len <= ihl:
        return False
    t = ip[ihl]
    return (t == ICMP_DEST_UNREACH or t == ICMP_SOURCE_QUENCH or t == ICMP_REDIRECT
            or t == ICMP_TIME_EXCEEDED or t == ICMP_PARAMETERPROB)

cdef inline uint32_t icmp_frag_needed(uint8_t *out, const uint8_t *pkt, uint32_t len,
                                      uint32_t src, uint16_t mtu, uint16_t ip_id) noexcept nogil:
    """Build the ICMP for a packet that does not fit, addressed to its sender; return its
    length, or 0 when RFC 1122 3.2.2 and RFC 1812 4.3.2.7 forbid an answer: an ICMP
    error, a non-first fragment, a source that is no single host (0/8 "this network",
    127/8 loopback, multicast, limited broadcast) or a packet sent to a multicast or
    broadcast address. A slice's network and broadcast sources are the caller's to check
    (they need the map)."""
    cdef uint32_t ihl = ipv4_ihl(pkt)
    cdef uint32_t dst = load32(pkt + IPV4_OFF_SRC)
    cdef uint32_t odst = load32(pkt + IPV4_OFF_DST)
    cdef uint32_t quote = len if len < ICMP_QUOTE_MAX else ICMP_QUOTE_MAX
    cdef uint16_t c
    if icmp_is_error(pkt, len, ihl) or (load16(pkt + IPV4_OFF_FRAG) & IPV4_FRAG_OFFSET_MASK):
        return 0
    if ((dst >> 24) == 0 or (dst >> 24) == 127 or (dst & 0xf0000000UL) == 0xe0000000UL
            or dst == 0xffffffffUL):
        return 0
    if (odst & 0xf0000000UL) == 0xe0000000UL or odst == 0xffffffffUL:
        return 0
    ipv4_outer(out, 0, IPV4_HLEN + ICMP_HLEN + quote, ip_id, 0, 64, IPPROTO_ICMP, src, dst)
    out += IPV4_HLEN
    out[0] = ICMP_DEST_UNREACH
    out[1] = ICMP_FRAG_NEEDED
    store16(out + 2, 0)
    store16(out + 4, 0)
    store16(out + 6, mtu)
    memcpy(out + ICMP_HLEN, pkt, quote)
    c = checksum(out, ICMP_HLEN + quote)
    memcpy(out + 2, &c, 2)
    return IPV4_HLEN + ICMP_HLEN + quote
