# TUN offloads: the virtio_net_hdr in front of every packet of a TUN opened with
# IFF_VNET_HDR (include/uapi/linux/virtio_net.h), TCP segmentation of the superpackets the
# kernel hands us (TSO) and the checks for coalescing received segments into one (GRO).
#
# Why (docs/performance.md §3, docs/internals.md §3): the kernel's per-packet cost
# dominates. With offloads a TCP sender's 64 KB write crosses the TUN once instead of ~45
# times, and so does the receiver's; only the underlay still carries one packet per
# segment (there is no GSO type for IPIP).
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy
from linux cimport ETH_HLEN, IPPROTO_TCP, IPPROTO_UDP, htons
from ipv4 cimport (IPV4_HLEN, IPV4_OFF_TOS, IPV4_OFF_FRAG, IPV4_OFF_PROTO, IPV4_OFF_SRC,
                   IPV4_FLAG_MF, IPV4_FRAG_OFFSET_MASK, ipv4_ihl, load16, csum_add,
                   csum_fold, checksum)

cdef enum:
    VNET_HLEN = 10                  # sizeof(struct virtio_net_hdr); TUN's default
    VNET_F_NEEDS_CSUM = 1           # checksum from csum_start to the end still to be done
    VNET_GSO_NONE = 0
    VNET_GSO_TCPV4 = 1
    VNET_GSO_UDP_L4 = 5             # UDP segmentation (VIRTIO_NET_HDR_GSO_UDP_L4)
    VNET_GSO_ECN = 0x80             # CWR set in the superpacket: keep it on the first segment
    TCP_HLEN = 20
    TCP_OFF_SEQ = 4
    TCP_OFF_ACK = 8
    TCP_OFF_DOFF = 12
    TCP_OFF_FLAGS = 13
    TCP_OFF_WINDOW = 14
    TCP_OFF_CSUM = 16
    TCP_FIN = 0x01
    TCP_PSH = 0x08
    TCP_ACK = 0x10
    TCP_CWR = 0x80
    TCP_MIN_MSS = 88                # the kernel's least MSS: a smaller gso_size is no TSO

# Fields in host byte order: a TUN uses the host's ("legacy virtio") endianness.
cdef struct vnet_hdr:
    uint8_t flags
    uint8_t gso_type
    uint16_t hdr_len                # a hint only (the kernel puts its linear length here)
    uint16_t gso_size               # payload bytes per segment (the MSS)
    uint16_t csum_start
    uint16_t csum_offset


cdef inline uint64_t acc_add(uint64_t a, uint64_t b) noexcept nogil:
    """Add two ones'-complement accumulators (memory order), end-around carry included."""
    a += b
    if a < b:
        a += 1
    return a


cdef inline uint64_t pseudo_header(const uint8_t *ip, uint8_t proto, uint32_t l4_len) noexcept nogil:
    """The RFC 793 pseudo-header sum (source, destination, protocol, length), memory order."""
    return acc_add(csum_add(ip + IPV4_OFF_SRC, 8, 0), <uint64_t>htons(proto) + htons(<uint16_t>l4_len))


cdef inline bint csum_complete(uint8_t *pkt, uint32_t len, const vnet_hdr *h) noexcept nogil:
    """Finish a NEEDS_CSUM checksum: the field already holds the pseudo-header sum, so the
    checksum of csum_start..end, field included, is the final value. False if the offsets do
    not fit the packet."""
    cdef uint32_t at = <uint32_t>h.csum_start + h.csum_offset
    cdef uint16_t c
    if h.csum_start < IPV4_HLEN or at + 2 > len:
        return False
    c = checksum(pkt + h.csum_start, len - h.csum_start)
    if c == 0:
        c = 0xffff                  # as the kernel does: 0 means "no checksum" to UDP
    memcpy(pkt + at, &c, 2)
    return True


cdef inline bint tcp_csum_ok(const uint8_t *ip, uint32_t ihl, uint32_t len) noexcept nogil:
    """Verify the TCP checksum of a whole IPv4/TCP packet."""
    return csum_fold(acc_add(pseudo_header(ip, IPPROTO_TCP, len - ihl),
                             csum_add(ip + ihl, len - ihl, 0))) == 0


cdef inline bint tcp_csum_is_partial(const uint8_t *ip, uint32_t len) noexcept nogil:
    """Does the TCP checksum field hold just the pseudo-header sum (what the kernel leaves
    in a superpacket it coalesced, for the checksum to be completed later)?"""
    cdef uint16_t want = ~csum_fold(pseudo_header(ip, IPPROTO_TCP, len - IPV4_HLEN))
    cdef uint16_t have
    memcpy(&have, ip + IPV4_HLEN + TCP_OFF_CSUM, 2)
    return have == want


cdef inline uint32_t tcp_header_len(const uint8_t *ip, uint32_t len) noexcept nogil:
    """Length of the TCP header of an IPv4 packet whose IHL was checked, or 0 if it is not a
    whole, unfragmented IPv4/TCP packet with at least one payload byte."""
    cdef uint32_t ihl = ipv4_ihl(ip)
    cdef uint32_t thl
    if ip[IPV4_OFF_PROTO] != IPPROTO_TCP or ihl + TCP_HLEN > len:
        return 0
    if load16(ip + IPV4_OFF_FRAG) & (IPV4_FLAG_MF | IPV4_FRAG_OFFSET_MASK):
        return 0
    thl = (ip[ihl + TCP_OFF_DOFF] >> 4) * 4
    if thl < TCP_HLEN or ihl + thl >= len:
        return 0
    return thl


cdef inline bint udp_csum_ok(const uint8_t *ip, uint32_t len) noexcept nogil:
    """Verify the UDP checksum of a whole IPv4/UDP packet without options (0: none sent)."""
    if load16(ip + IPV4_HLEN + 6) == 0:       # the UDP checksum field
        return True
    return csum_fold(acc_add(pseudo_header(ip, IPPROTO_UDP, len - IPV4_HLEN),
                             csum_add(ip + IPV4_HLEN, len - IPV4_HLEN, 0))) == 0


cdef inline bint udp_same_flow(const uint8_t *a, const uint8_t *b) noexcept nogil:
    """Can datagram b follow datagram a in one UDP GSO superpacket? (Both IPv4 without
    options, of one connection.) What the kernel copies from the superpacket onto every
    datagram when it splits it must match: TOS, DF, TTL, addresses, ports."""
    return (a[IPV4_OFF_TOS] == b[IPV4_OFF_TOS]
            and memcmp(a + IPV4_OFF_FRAG, b + IPV4_OFF_FRAG, 3) == 0      # flags, offset, TTL
            and memcmp(a + IPV4_OFF_SRC, b + IPV4_OFF_SRC, 12) == 0)      # addresses, ports


cdef inline bint gro_same_flow(const uint8_t *a, const uint8_t *b, uint32_t thl) noexcept nogil:
    """Can segment b follow segment a in one superpacket, header-wise? (Both IPv4 without
    options, same TCP header length.) Everything the kernel would copy from the first
    segment onto every segment when it splits the superpacket again must match: TOS, DF,
    TTL, addresses, ports, ACK number, header length, window and options; the flags may
    differ only in PSH (checked by the caller)."""
    return (a[IPV4_OFF_TOS] == b[IPV4_OFF_TOS]
            and memcmp(a + IPV4_OFF_FRAG, b + IPV4_OFF_FRAG, 3) == 0      # flags, offset, TTL
            and memcmp(a + IPV4_OFF_SRC, b + IPV4_OFF_SRC, 8) == 0
            and memcmp(a + IPV4_HLEN, b + IPV4_HLEN, 4) == 0                # ports
            and memcmp(a + IPV4_HLEN + TCP_OFF_ACK, b + IPV4_HLEN + TCP_OFF_ACK, 5) == 0
            and memcmp(a + IPV4_HLEN + TCP_OFF_WINDOW, b + IPV4_HLEN + TCP_OFF_WINDOW, 2) == 0
            and memcmp(a + IPV4_HLEN + TCP_HLEN, b + IPV4_HLEN + TCP_HLEN, thl - TCP_HLEN) == 0)
