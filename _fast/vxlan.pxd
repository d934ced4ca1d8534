# VXLAN (RFC 7348) as the Fan uses it: the outer UDP and VXLAN headers, the inner Ethernet
# and ARP fields the data path reads, and the flow hash that picks the UDP source port.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from linux cimport ETH_P_IP, IPPROTO_TCP, IPPROTO_UDP
from ipv4 cimport (IPV4_OFF_FRAG, IPV4_OFF_PROTO, IPV4_OFF_SRC, IPV4_FLAG_MF,
                   IPV4_FRAG_OFFSET_MASK, ipv4_ihl, load16, load32)

cdef enum:
    UDP_HLEN = 8
    UDP_OFF_SPORT = 0
    UDP_OFF_DPORT = 2
    UDP_OFF_LEN = 4
    UDP_OFF_CSUM = 6
    VXLAN_HLEN = 8
    VXLAN_FLAG_I = 0x08         # "a valid VNI": the only flag a VXLAN header carries
    VXLAN_OUTER = 20 + UDP_HLEN + VXLAN_HLEN    # outer IPv4 + UDP + VXLAN in front of a frame
    VXLAN_OVERHEAD = 14 + VXLAN_OUTER           # ... and the frame's own Ethernet header: 50
    ETH_OFF_DST = 0
    ETH_OFF_SRC = 6
    ETH_OFF_TYPE = 12
    ARP_LEN = 28                # Ethernet/IPv4 ARP: htype 1, ptype 0x0800, hlen 6, plen 4
    ARP_OFF_SPA = 14            # sender protocol address
    ARP_OFF_TPA = 24            # target protocol address
    SPORT_MIN = 32768           # the kernel's default ip_local_port_range, which its vxlan
    SPORT_SPAN = 28232          # driver maps the flow hash into: 32768..60999


cdef inline uint32_t hash_mix(uint32_t h, uint32_t v) noexcept nogil:
    """One round of a multiply-xorshift mix (murmur3's constants)."""
    h ^= v * <uint32_t>0xcc9e2d51U
    h = (h << 13) | (h >> 19)
    return h * 5 + <uint32_t>0xe6546b64U


cdef inline uint32_t hash_final(uint32_t h) noexcept nogil:
    h ^= h >> 16
    h *= <uint32_t>0x85ebca6bU
    h ^= h >> 13
    h *= <uint32_t>0xc2b2ae35U
    return h ^ (h >> 16)


cdef inline uint32_t flow_hash(const uint8_t *ip, uint32_t len, uint32_t seed) noexcept nogil:
    """A hash of the IPv4 packet ip[0:len]'s flow: addresses, protocol and, for TCP and
    UDP (not a fragment), ports, taken in a fixed order so that both directions of a flow
    hash alike. len is at least an IPv4 header (checked by the caller)."""
    cdef uint32_t a, b, t, ports = 0, ihl
    cdef uint16_t p1, p2
    cdef uint8_t proto
    a = load32(ip + IPV4_OFF_SRC)
    b = load32(ip + IPV4_OFF_SRC + 4)
    proto = ip[IPV4_OFF_PROTO]
    ihl = ipv4_ihl(ip)
    if ((proto == IPPROTO_TCP or proto == IPPROTO_UDP) and len >= ihl + 4
            and not (load16(ip + IPV4_OFF_FRAG) & (IPV4_FLAG_MF | IPV4_FRAG_OFFSET_MASK))):
        p1 = load16(ip + ihl)
        p2 = load16(ip + ihl + 2)
        if a > b or (a == b and p1 > p2):
            t = p1
            p1 = p2
            p2 = <uint16_t>t
        ports = (<uint32_t>p1 << 16) | p2
    if a > b:
        t = a
        a = b
        b = t
    return hash_final(hash_mix(hash_mix(hash_mix(hash_mix(seed, a), b), proto), ports))


cdef inline uint16_t vxlan_source_port(const uint8_t *frame, uint32_t len,
                                       uint32_t seed) noexcept nogil:
    """UDP source port for a frame, from a hash of its inner flow, as the kernel's vxlan
    does (udp_flow_src_port): flow_hash of an IPv4 frame, so that both directions of a
    flow share the port; any other frame (ARP) hashes its EtherType only, so all of them
    share one port. The frame is at least an Ethernet header long (checked by the
    caller)."""
    cdef uint16_t ethertype = load16(frame + ETH_OFF_TYPE)
    if ethertype != ETH_P_IP or len < 14 + 20:
        return SPORT_MIN + <uint16_t>((<unsigned long long>hash_final(hash_mix(seed, ethertype))
                                       * SPORT_SPAN) >> 32)
    return SPORT_MIN + <uint16_t>((<unsigned long long>flow_hash(frame + 14, len - 14, seed)
                                   * SPORT_SPAN) >> 32)


# The MACs of this host's side of its VXLAN fan bridges (every port but the TAP, the
# bridges themselves): a frame from the wire with one of them as its source is forged
# (V3). An open-addressing hash of the 48-bit MAC, as neigh.pxd's; Python builds it from
# the bridges' forwarding databases (fanpkt/neighbours.py) and the engine swaps it whole.
cdef struct mac_set:
    uint32_t mask               # slots - 1; slots a power of two, over twice the entries
    uint64_t *k                 # MAC | MAC_SET_USED; 0 marks an empty slot

cdef inline uint64_t mac_key(const uint8_t *mac) noexcept nogil:
    return ((<uint64_t>mac[0] << 40) | (<uint64_t>mac[1] << 32) | (<uint64_t>mac[2] << 24)
            | (<uint64_t>mac[3] << 16) | (<uint64_t>mac[4] << 8) | mac[5]
            | (<uint64_t>1 << 48))


cdef inline uint32_t mac_slot(const mac_set *s, uint64_t key) noexcept nogil:
    return <uint32_t>((key * <uint64_t>0x9E3779B97F4A7C15ULL) >> 40) & s.mask


cdef inline bint mac_set_has(const mac_set *s, const uint8_t *mac) noexcept nogil:
    """Is mac in s (NULL: the empty set)? There is always an empty slot: the probe ends."""
    cdef uint64_t key
    cdef uint32_t i
    if s == NULL:
        return False
    key = mac_key(mac)
    i = mac_slot(s, key)
    while s.k[i] != 0:
        if s.k[i] == key:
            return True
        i = (i + 1) & s.mask
    return False
