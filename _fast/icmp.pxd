# ICMP "fragmentation needed" (RFC 792 type 3 code 4, next-hop MTU from RFC 1191).
from libc.stdint cimport uint8_t, uint16_t, uint32_t
from libc.string cimport memcpy
from linux cimport IPPROTO_ICMP
from ipv4 cimport (IPV4_HLEN, IPV4_OFF_TOS, IPV4_OFF_TOT_LEN, IPV4_OFF_ID, IPV4_OFF_FRAG,
                   IPV4_OFF_TTL, IPV4_OFF_PROTO, IPV4_OFF_SRC, IPV4_OFF_DST,
                   IPV4_FRAG_OFFSET_MASK, ipv4_ihl, load16, load32, store16, store32,
                   checksum, ipv4_set_header_csum)

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
    length, or 0 when RFC 1122 3.2.2 forbids an answer (an ICMP error, a non-first
    fragment, a source that is no single host)."""
    cdef uint32_t ihl = ipv4_ihl(pkt)
    cdef uint32_t dst = load32(pkt + IPV4_OFF_SRC)
    cdef uint32_t quote = len if len < ICMP_QUOTE_MAX else ICMP_QUOTE_MAX
    cdef uint16_t c
    if icmp_is_error(pkt, len, ihl) or (load16(pkt + IPV4_OFF_FRAG) & IPV4_FRAG_OFFSET_MASK):
        return 0
    if dst == 0 or (dst & 0xf0000000UL) == 0xe0000000UL or dst == 0xffffffffUL:
        return 0
    out[0] = 0x45
    out[IPV4_OFF_TOS] = 0
    store16(out + IPV4_OFF_TOT_LEN, IPV4_HLEN + ICMP_HLEN + quote)
    store16(out + IPV4_OFF_ID, ip_id)
    store16(out + IPV4_OFF_FRAG, 0)
    out[IPV4_OFF_TTL] = 64
    out[IPV4_OFF_PROTO] = IPPROTO_ICMP
    store32(out + IPV4_OFF_SRC, src)
    store32(out + IPV4_OFF_DST, dst)
    ipv4_set_header_csum(out, IPV4_HLEN)
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
