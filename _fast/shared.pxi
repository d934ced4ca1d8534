# What every unit of the engine shares (included by fastpath.pyx before the others: it
# includes shared.pxi, ipip.pxi, vxlan.pxi, tx.pxi, rx.pxi, then its loops, then
# testing.pxi, and each unit uses only what is defined before it): the counters and their
# helpers, the verdicts, the buffer sizes and the result of one packet's encapsulation or
# decapsulation. An included file, not a .pxd: the cpdef enums are the module's Python
# enums as well (fanpkt/engine.py reads the counter names from Counter), and Cython makes
# those only for enums of the module itself, never for cimported ones.

# The counters, one per verdict and per drop reason, named after the rule they enforce
# (docs/spec.md §4 states the rules T1-T5 and R1-R7; §5 lists every counter). This
# enum is the single source of truth: Python reads the names from it.
cpdef enum Counter:
    # transmit (overlay -> underlay)
    TX_PACKETS                  # sent to the underlay
    TX_BYTES                    # outer bytes sent
    TX_ICMP_FRAG_NEEDED         # T5: ICMP "fragmentation needed" written to the TUN
    TX_ICMP_RATE_LIMITED        # T5: an ICMP not sent, over the loop's budget (icmp.pxd)
    TX_TSO_SPLIT                # TCP superpackets read from the TUN and split into segments
    TX_L2                       # of TX_PACKETS, sent as frames through the packet socket
    TX_FRAGMENTED               # T5 without DF: too big for the underlay, sent as outer
                                # fragments (the receiver's kernel reassembles them)
    TX_GSO                      # X3: UDP GSO superpackets sent (one send, many segments)
    TX_GSO_FALLBACK             # X3: the kernel refused UDP GSO: segments sent one by one
    TX_GSO_JOINED               # X3: plain frames of one flow sent together in a UDP GSO send
    DROP_TX_NOT_IPV4            # T1
    DROP_TX_MALFORMED           # T1: an IPv4 header that does not hold together
    DROP_TX_NO_MAP              # T2
    DROP_TX_UNROUTABLE          # T3: underlay network or broadcast, slice network or
                                # broadcast (§2)
    DROP_TX_LOCAL_UNUSED        # T4: an address of this host's own slice reached the TUN
    DROP_TX_TOO_BIG             # T5, or EMSGSIZE from the underlay socket
    DROP_TX_BAD_OFFLOAD         # a virtio header we cannot honour (never from a sane kernel)
    DROP_TX_SEND_ERROR          # the underlay socket refused the packet
    DROP_TX_TUN_WRITE           # an ICMP could not be written back to the TUN
    DROP_TX_READ_ERROR          # read() from the TUN/TAP failed (not EAGAIN or EINTR)
    DROP_TX_ETHERTYPE           # X1: a frame neither IPv4 nor ARP (IPv6, LLDP, ...)
    DROP_TX_TO_SELF             # X2: a frame for this host's own slice (bridges flood)
    # receive (underlay -> overlay)
    RX_PACKETS                  # written to the TUN
    RX_BYTES                    # inner bytes written
    RX_ECN_CE                   # R6: inner marked CE from the outer header
    RX_GRO_MERGED               # TCP segments appended to the previous one (TUN writes saved)
    RX_KERNEL_GRO               # datagrams the underlay's own GRO had already merged
    RX_UDP_GRO                  # VXLAN datagrams the kernel's UDP GRO handed over together
    RX_GSO_FALLBACK             # the TUN/TAP refused a superpacket (a kernel older than
                                # its GSO type): written segment by segment, and that
                                # merging off for the loop
    DROP_RX_TRUNCATED           # R1: shorter than an IPv4 header
    DROP_RX_BAD_OUTER           # R1: version, IHL or lengths
    DROP_RX_NOT_IPIP            # R1: protocol is not 4
    DROP_RX_SRC_NOT_UNDERLAY    # R2
    DROP_RX_OUTER_DST           # R2, V2: not sent to this host's underlay address (the
                                # underlay broadcast, another address of the host)
    DROP_RX_BAD_INNER           # R3: version, IHL or lengths
    DROP_RX_BAD_INNER_CSUM      # R3: header checksum
    DROP_RX_NOT_LOCAL           # R4
    DROP_RX_SPOOFED_SRC         # R5
    DROP_RX_ECN_CE_NOT_ECT      # R6
    DROP_RX_TUN_WRITE           # the TUN refused the packet (EIO while the link is down)
    DROP_RX_RECV_ERROR          # recvmmsg() failed (not EAGAIN or EINTR)
    DROP_RX_SOCKET_FULL         # datagrams the kernel dropped at our receive socket, its
                                # buffer full (SO_RXQ_OVFL: set, not added)
    DROP_RX_BAD_VXLAN           # V1: VXLAN flags other than I alone, or reserved bits set
    DROP_RX_UNKNOWN_VNI         # V1: no VXLAN fan with this VNI on this port
    DROP_RX_OWN_MAC             # V3: a frame from our own bridge's MAC came back
    DROP_RX_LOCAL_MAC           # V3: a frame from a MAC on this host's side of a fan
                                # bridge (a local container's): forged
    DROP_RX_DHCP                # V3: DHCP (UDP to port 67 or 68): never crosses a fan
    N_COUNTERS

# Each loop owns one block of COUNTER_BLOCK counters (a multiple of 8, so 64-byte aligned
# in the counter file): two threads never write the same cache line.
cpdef enum:
    COUNTER_BLOCK = 64

cpdef enum Verdict:
    VERDICT_DROP = 0
    VERDICT_SEND = 1            # outer packet at pkt - IPV4_HLEN, out_len bytes
    VERDICT_ICMP = 3            # write the ICMP built in icmp_out back to the TUN
    VERDICT_DELIVER = 4         # decap: inner packet at off, out_len bytes

# Why these sizes: docs/internals.md §9.
cdef enum:
    HEADROOM = ETH_HLEN + VXLAN_OUTER   # room for the outer headers in front of each
                                        # packet: Ethernet + IPv4 (+ UDP + VXLAN)
    BATCH = 64                  # packets per read/send burst
    SLOT = 65536 + 64           # any IPv4 datagram, plus headroom

cdef struct result:
    uint32_t dst                # encap: underlay destination (host order)
    uint32_t off                # decap: offset of the inner packet
    uint32_t out_len            # bytes to send / deliver / ICMP length
    int map_index
    int reason                  # the counter incremented on drop, or -1


cdef inline void inc(uint64_t *c, Counter k) noexcept nogil:
    c[<int>k] += 1


cdef inline void add(uint64_t *c, Counter k, uint64_t n) noexcept nogil:
    c[<int>k] += n


cdef inline int drop(uint64_t *c, result *r, Counter reason) noexcept nogil:
    c[<int>reason] += 1
    r.reason = reason
    return VERDICT_DROP


# Both fans decapsulate ECN alike (R6 for IPIP, V6 for VXLAN).
cdef inline bint ecn_decapsulate(uint8_t oecn, uint8_t *inner, uint64_t *c) noexcept nogil:
    """RFC 6040 §4.2 decapsulation of the inner IPv4 header, the combinations that change
    anything (R6, V6). False: outer CE over a Not-ECT inner, to be dropped."""
    cdef uint8_t iecn = inner[IPV4_OFF_TOS] & 3
    if oecn == ECN_CE:
        if iecn == ECN_NOT_ECT:
            return False
        if iecn != ECN_CE:
            ipv4_set_ecn(inner, ECN_CE)
            inc(c, RX_ECN_CE)
    elif oecn == ECN_ECT1 and iecn == ECN_ECT0:
        ipv4_set_ecn(inner, ECN_ECT1)
    return True
