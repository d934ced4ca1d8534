# cython: language_level=3
"""fanpkt's packet engine: IPIP encapsulation and decapsulation for Fan maps, and the two
forwarding loops that drive them.

Flow, in code order:
  encap_one   overlay packet from the TUN -> validate -> map lookup -> dest(D) -> local?
              -> too big? (ICMP frag needed) -> outer header written into the headroom
  decap_one   IPIP datagram from the raw socket -> outer checks -> source in an underlay?
              -> inner well-formed? -> destination in a local slice? -> anti-spoofing
              -> RFC 6040 ECN -> inner packet to the TUN
  run_tx      read up to BATCH packets from the TUN -> tx_packet each (TSO superpackets
              split, encap_one) -> queued on a lane: the packet socket as a frame if the
              underlay host is a resolved neighbour, else the raw IP socket -> sendmmsg
              per lane (poll only when the TUN is empty)
  run_rx      recvmmsg up to BATCH -> decap_one each -> coalesced per connection (GRO)
              -> write to the TUN (poll only when the socket is empty)

Each check that fails increments one counter and the loop moves on: nothing here raises,
logs or touches a Python object per packet. The def functions at the end are thin wrappers
over the same cdef functions, for tests and benchmarks.
"""
from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcpy, memset

from linux cimport *
from ipv4 cimport *
from fanmap cimport *
from neigh cimport *
from icmp cimport *
from offload cimport *

import numpy as np

# The counters, one per verdict and per drop reason, named after the spec rule they
# enforce. This enum is the single source of truth: Python reads the names from it.
cpdef enum Counter:
    # transmit (overlay -> underlay), spec §4 "Transmit"
    TX_PACKETS                  # sent to the underlay
    TX_BYTES                    # outer bytes sent
    TX_LOCAL                    # rule 4: delivered back to the TUN, no encapsulation
    TX_ICMP_FRAG_NEEDED         # rule 5: ICMP "fragmentation needed" written to the TUN
    TX_TSO_SPLIT                # TCP superpackets read from the TUN and split into segments
    TX_L2                       # of TX_PACKETS, sent as frames through the packet socket
    TX_FRAGMENTED               # rule 5 without DF: too big for the underlay, sent as outer
                                # fragments (the receiver's kernel reassembles them)
    DROP_TX_NOT_IPV4            # rule 1
    DROP_TX_MALFORMED           # rule 1: an IPv4 header that does not hold together
    DROP_TX_NO_MAP              # rule 2
    DROP_TX_UNROUTABLE          # §2: underlay network or broadcast
    DROP_TX_LOCAL_UNUSED        # rule 4: local slice address not in use
    DROP_TX_TOO_BIG             # rule 5, or EMSGSIZE from the underlay socket
    DROP_TX_BAD_OFFLOAD         # a virtio header we cannot honour (never from a sane kernel)
    DROP_TX_SEND_ERROR          # the underlay socket refused the packet
    DROP_TX_TUN_WRITE           # a local/ICMP packet could not be written back
    # receive (underlay -> overlay), spec §4 "Receive"
    RX_PACKETS                  # written to the TUN
    RX_BYTES                    # inner bytes written
    RX_ECN_CE                   # rule 6: inner marked CE from the outer header
    RX_GRO_MERGED               # TCP segments appended to the previous one (TUN writes saved)
    RX_KERNEL_GRO               # datagrams the underlay's own GRO had already merged
    DROP_RX_TRUNCATED           # rule 1: shorter than an IPv4 header
    DROP_RX_BAD_OUTER           # rule 1: version, IHL or lengths
    DROP_RX_NOT_IPIP            # rule 1: protocol is not 4
    DROP_RX_SRC_NOT_UNDERLAY    # rule 2
    DROP_RX_BAD_INNER           # rule 3: version, IHL or lengths
    DROP_RX_BAD_INNER_CSUM      # rule 3: header checksum
    DROP_RX_NOT_LOCAL           # rule 4
    DROP_RX_SPOOFED_SRC         # rule 5
    DROP_RX_ECN_CE_NOT_ECT      # rule 6
    DROP_RX_TUN_WRITE           # the TUN refused the packet (EIO while the link is down)
    N_COUNTERS

# Each loop owns one block of COUNTER_BLOCK counters, 64-byte aligned, so two threads never
# write the same cache line.
COUNTER_BLOCK = 32

cpdef enum Verdict:
    VERDICT_DROP = 0
    VERDICT_SEND = 1            # outer packet at pkt - IPV4_HLEN, out_len bytes
    VERDICT_LOCAL = 2           # write the inner packet back to the TUN
    VERDICT_ICMP = 3            # write the ICMP built in icmp_out back to the TUN
    VERDICT_DELIVER = 4         # decap: inner packet at off, out_len bytes

cdef enum:
    HEADROOM = ETH_HLEN + IPV4_HLEN  # room for the outer headers in front of each packet
    BATCH = 64                  # packets per read/send burst
    SLOT = 65536 + 64           # any IPv4 datagram, plus headroom
    POLL_MS = 200               # how long a stop or a table swap may wait for a loop
    RX_NAP_NS = 50000           # pause after a short burst (see run_rx)

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


cdef int encap_one(const fan_table *t, uint16_t *ip_id, uint8_t *pkt, uint32_t len,
                   uint32_t wire, result *r, uint8_t *icmp_out, uint64_t *c) noexcept nogil:
    """Encapsulate the overlay packet pkt[0:len] (spec §4 transmit).

    pkt must have IPV4_HLEN writable bytes in front of it: the outer header goes there, so
    the payload is never copied. wire is the largest inner packet that will go out: 0 for
    the packet itself, the first segment's size for a TSO superpacket (whose outer header
    is then the template of every segment's).
    """
    cdef uint32_t ihl, tot, dst, under, frag
    cdef const fan_map *m
    cdef uint8_t *o
    cdef uint8_t ecn
    cdef int i
    r.reason = -1
    r.map_index = -1
    if len < 1 or (pkt[0] >> 4) != 4:
        return drop(c, r, DROP_TX_NOT_IPV4)
    ihl = (pkt[0] & 15) * 4
    if len < IPV4_HLEN or ihl < IPV4_HLEN or ihl > len:
        return drop(c, r, DROP_TX_MALFORMED)
    tot = load16(pkt + IPV4_OFF_TOT_LEN)
    if tot < ihl or tot > len:
        return drop(c, r, DROP_TX_MALFORMED)
    len = tot                   # anything past the total length is padding, not packet
    dst = load32(pkt + IPV4_OFF_DST)
    i = fan_lookup_overlay(t, dst)
    if i < 0:
        return drop(c, r, DROP_TX_NO_MAP)
    m = &t.maps[i]
    r.map_index = i
    under = fan_dest(m, dst)
    r.dst = under
    if not fan_host_ok(m, under):
        return drop(c, r, DROP_TX_UNROUTABLE)
    if under == m.local:
        if dst >= m.gateway and dst <= m.reserved_last:
            r.out_len = len
            inc(c, TX_LOCAL)
            return VERDICT_LOCAL
        return drop(c, r, DROP_TX_LOCAL_UNUSED)
    frag = load16(pkt + IPV4_OFF_FRAG)
    if wire == 0:
        wire = len
    if wire + IPV4_HLEN > m.mtu:
        if frag & IPV4_FLAG_DF:
            inc(c, DROP_TX_TOO_BIG)
            r.reason = DROP_TX_TOO_BIG
            r.out_len = icmp_frag_needed(icmp_out, pkt, len, m.gateway,
                                         <uint16_t>(m.mtu - IPV4_HLEN), ip_id[0] + 1)
            if r.out_len:
                ip_id[0] += 1
                inc(c, TX_ICMP_FRAG_NEEDED)
                return VERDICT_ICMP
            return VERDICT_DROP
        if wire != len:
            # A TSO superpacket without DF whose segments do not fit: no sane TCP sends one
            # (the TUN's MTU is underlay - 20), and splitting segments into fragments too
            # is not worth the code.
            return drop(c, r, DROP_TX_TOO_BIG)
        # Without DF the sender allows fragmentation: the outer packet is built whole here
        # and sent as fragments (tx_fragments), as the kernel's ipip would.
        inc(c, TX_FRAGMENTED)
    # RFC 6040 §4.1 normal mode, as the Linux kernel does: copy ECN, but never send CE
    # outside (a CE inner is encapsulated as ECT(0)). DSCP is not copied (spec: DSCP 0).
    ecn = pkt[IPV4_OFF_TOS] & 3
    if ecn == ECN_CE:
        ecn = ECN_ECT0
    o = pkt - IPV4_HLEN
    o[0] = 0x45
    o[IPV4_OFF_TOS] = ecn
    store16(o + IPV4_OFF_TOT_LEN, len + IPV4_HLEN)
    # One counter per sending loop: an ID repeats only after 65536 packets from this host,
    # and only DF=0 packets (which may be fragmented) need it unique (RFC 6864).
    ip_id[0] += 1
    store16(o + IPV4_OFF_ID, ip_id[0])
    store16(o + IPV4_OFF_FRAG, frag & IPV4_FLAG_DF)
    o[IPV4_OFF_TTL] = pkt[IPV4_OFF_TTL]
    o[IPV4_OFF_PROTO] = IPPROTO_IPIP_
    store32(o + IPV4_OFF_SRC, m.local)
    store32(o + IPV4_OFF_DST, under)
    ipv4_set_header_csum(o, IPV4_HLEN)
    r.out_len = len + IPV4_HLEN
    return VERDICT_SEND


cdef int decap_one(const fan_table *t, uint8_t *buf, uint32_t len, result *r,
                   uint64_t *c) noexcept nogil:
    """Check and unwrap the IPIP datagram buf[0:len] (spec §4 receive, rules in order).

    The outer header checksum is not verified: the kernel's ip_rcv did that before the raw
    socket saw the datagram, and reassembly rewrites it.
    """
    cdef uint32_t ihl, iihl, ilen, osrc, idst, isrc
    cdef uint8_t *inner
    cdef uint8_t oecn, iecn
    cdef const fan_map *m
    cdef int i, j
    r.reason = -1
    r.map_index = -1
    if len < IPV4_HLEN:
        return drop(c, r, DROP_RX_TRUNCATED)
    ihl = (buf[0] & 15) * 4
    if ((buf[0] >> 4) != 4 or ihl < IPV4_HLEN or ihl > len
            or load16(buf + IPV4_OFF_TOT_LEN) != len
            or (load16(buf + IPV4_OFF_FRAG) & (IPV4_FLAG_MF | IPV4_FRAG_OFFSET_MASK))):
        return drop(c, r, DROP_RX_BAD_OUTER)
    if buf[IPV4_OFF_PROTO] != IPPROTO_IPIP_:
        return drop(c, r, DROP_RX_NOT_IPIP)
    osrc = load32(buf + IPV4_OFF_SRC)
    if fan_lookup_underlay(t, osrc) < 0:
        return drop(c, r, DROP_RX_SRC_NOT_UNDERLAY)
    inner = buf + ihl
    ilen = len - ihl
    if ilen < IPV4_HLEN or (inner[0] >> 4) != 4:
        return drop(c, r, DROP_RX_BAD_INNER)
    iihl = (inner[0] & 15) * 4
    if iihl < IPV4_HLEN or iihl > ilen or load16(inner + IPV4_OFF_TOT_LEN) != ilen:
        return drop(c, r, DROP_RX_BAD_INNER)
    if not ipv4_header_csum_ok(inner, iihl):
        return drop(c, r, DROP_RX_BAD_INNER_CSUM)
    idst = load32(inner + IPV4_OFF_DST)
    i = fan_lookup_overlay(t, idst)
    if i < 0 or (idst & t.maps[i].slice_mask) != t.maps[i].slice_net:
        return drop(c, r, DROP_RX_NOT_LOCAL)
    if t.check_spoof:
        # A host may only send from its own slice: the inner source must map back to the
        # outer source. The original kernel decapsulates IPIP from anyone.
        isrc = load32(inner + IPV4_OFF_SRC)
        j = fan_lookup_overlay(t, isrc)
        if j < 0 or fan_dest(&t.maps[j], isrc) != osrc:
            return drop(c, r, DROP_RX_SPOOFED_SRC)
    # RFC 6040 §4.2 decapsulation, the combinations that change anything.
    oecn = buf[IPV4_OFF_TOS] & 3
    iecn = inner[IPV4_OFF_TOS] & 3
    if oecn == ECN_CE:
        if iecn == ECN_NOT_ECT:
            return drop(c, r, DROP_RX_ECN_CE_NOT_ECT)
        if iecn != ECN_CE:
            ipv4_set_ecn(inner, ECN_CE)
            inc(c, RX_ECN_CE)
    elif oecn == ECN_ECT1 and iecn == ECN_ECT0:
        ipv4_set_ecn(inner, ECN_ECT1)
    r.map_index = i
    r.off = ihl
    r.out_len = ilen
    return VERDICT_DELIVER


# ---------------------------------------------------------------------------------------
# Transmit with TUN offloads. Every read from the TUN starts with a virtio_net_hdr; a TCP
# superpacket (gso_type TCPV4) is split here into MSS-sized segments, each with its own
# outer header. A segment is two iovecs: its headers, copied into the queue, and its
# payload, left where read() put it.

cdef enum:
    TXQ = 128                   # segments queued per sendmmsg, per lane
    LANE_IP = 0                 # the raw IP socket: the kernel routes and resolves
    LANE_L2 = 1                 # the packet socket: frames to neighbours already resolved


cdef struct lane:
    int fd                      # -1 in tests (the lane then never fills)
    int l2_len                  # bytes in front of the outer IP header: 0, or ETH_HLEN
    int n
    mmsghdr *msgs
    iovec *iov                  # two per message: headers (or the whole packet), payload
    sockaddr_in *sin            # LANE_IP: the underlay host
    sockaddr_ll *sll            # LANE_L2: the interface
    int *map_index
    uint8_t *hdrs               # SEG_HDR_MAX bytes per message


cdef struct txq:
    const fan_table *t          # the tables of the current batch
    neigh_table *nt             # NULL: everything goes by LANE_IP
    int tun_fd                  # where ICMP for EMSGSIZE goes
    int cap
    uint16_t ip_id              # outer (and ICMP) IP ID, one sequence per sending loop
    uint64_t *c
    lane lanes[2]
    uint8_t *icmp               # VNET_HLEN zero bytes, then an ICMP to write to the TUN
    uint8_t *quote              # the inner packet of a refused message, gathered for ICMP


cdef struct tx_route:          # where one packet, or every segment of one, goes
    int lane
    int map_index
    uint32_t dst
    const uint8_t *dmac


cdef int lane_init(lane *l, int cap, int fd, int l2_len) noexcept nogil:
    cdef int k
    l.fd = fd
    l.l2_len = l2_len
    l.msgs = <mmsghdr *>calloc(cap, sizeof(mmsghdr))
    l.iov = <iovec *>calloc(2 * cap, sizeof(iovec))
    l.sin = <sockaddr_in *>calloc(cap, sizeof(sockaddr_in))
    l.sll = <sockaddr_ll *>calloc(cap, sizeof(sockaddr_ll))
    l.map_index = <int *>calloc(cap, sizeof(int))
    l.hdrs = <uint8_t *>malloc(<size_t>cap * SEG_HDR_MAX)
    if (l.msgs == NULL or l.iov == NULL or l.sin == NULL or l.sll == NULL
            or l.map_index == NULL or l.hdrs == NULL):
        return -1
    for k in range(cap):
        l.sin[k].sin_family = AF_INET
        l.sll[k].sll_family = AF_PACKET
        l.sll[k].sll_protocol = htons(ETH_P_IP)
        if l2_len:
            l.msgs[k].msg_hdr.msg_name = &l.sll[k]
            l.msgs[k].msg_hdr.msg_namelen = sizeof(sockaddr_ll)
        else:
            l.msgs[k].msg_hdr.msg_name = &l.sin[k]
            l.msgs[k].msg_hdr.msg_namelen = sizeof(sockaddr_in)
        l.msgs[k].msg_hdr.msg_iov = &l.iov[2 * k]
    return 0


cdef void lane_release(lane *l) noexcept nogil:
    free(l.msgs)
    free(l.iov)
    free(l.sin)
    free(l.sll)
    free(l.map_index)
    free(l.hdrs)


cdef int txq_init(txq *q, int cap, int sock_fd, int packet_fd, int tun_fd,
                  uint64_t *c) noexcept nogil:
    memset(q, 0, sizeof(txq))
    q.cap = cap
    q.tun_fd = tun_fd
    q.c = c
    q.icmp = <uint8_t *>calloc(1, VNET_HLEN + ICMP_MAX_LEN)
    q.quote = <uint8_t *>malloc(ICMP_QUOTE_MAX)
    if (lane_init(&q.lanes[LANE_IP], cap, sock_fd, 0) < 0
            or lane_init(&q.lanes[LANE_L2], cap, packet_fd, ETH_HLEN) < 0
            or q.icmp == NULL or q.quote == NULL):
        return -1
    return 0


cdef void txq_release(txq *q) noexcept nogil:
    lane_release(&q.lanes[LANE_IP])
    lane_release(&q.lanes[LANE_L2])
    free(q.icmp)
    free(q.quote)
    memset(q, 0, sizeof(txq))


cdef void tx_route_of(txq *q, const result *r, tx_route *rt) noexcept nogil:
    """LANE_L2 when the map's interface can take frames and the kernel has resolved the
    underlay host on it (fanpkt/neighbours.py keeps q.nt to entries it trusts)."""
    cdef const fan_map *m = &q.t.maps[r.map_index]
    cdef neigh_entry *e = NULL
    rt.map_index = r.map_index
    rt.dst = r.dst
    rt.lane = LANE_IP
    rt.dmac = NULL
    if m.ifindex:
        e = neigh_find(q.nt, r.dst)
    if e != NULL and e.ifindex == m.ifindex:
        if not e.used:
            e.used = 1          # written once per refresh, not per packet: no line bouncing
        rt.lane = LANE_L2
        rt.dmac = e.mac


cdef uint8_t *txq_add(txq *q, const tx_route *rt, uint8_t *head, uint32_t head_len,
                      uint8_t *body, uint32_t body_len) noexcept nogil:
    """Queue one outer packet: the outer IP header and whatever follows it in
    head[0:head_len], then body[0:body_len]. head NULL means the lane's own header slot.
    Returns head, for the caller to fill; on LANE_L2 the Ethernet header is written in
    the ETH_HLEN bytes in front of it."""
    cdef lane *l = &q.lanes[rt.lane]
    cdef const fan_map *m = &q.t.maps[rt.map_index]
    cdef uint8_t *f
    cdef int k
    if l.n == q.cap:
        lane_flush(q, rt.lane)
    k = l.n
    l.n += 1
    if head == NULL:
        head = l.hdrs + <size_t>k * SEG_HDR_MAX + l.l2_len
    if rt.lane == LANE_L2:
        f = head - ETH_HLEN
        memcpy(f, rt.dmac, ETH_ALEN)
        memcpy(f + ETH_ALEN, m.mac, ETH_ALEN)
        store16(f + 2 * ETH_ALEN, ETH_P_IP)
        l.sll[k].sll_ifindex = m.ifindex
    else:
        l.sin[k].sin_addr.s_addr = htonl(rt.dst)
    l.map_index[k] = rt.map_index
    l.iov[2 * k].iov_base = head - l.l2_len
    l.iov[2 * k].iov_len = head_len + l.l2_len
    l.iov[2 * k + 1].iov_base = body
    l.iov[2 * k + 1].iov_len = body_len
    l.msgs[k].msg_hdr.msg_iovlen = 2 if body_len else 1
    return head


cdef void lane_flush(txq *q, int which) noexcept nogil:
    cdef lane *l = &q.lanes[which]
    cdef int off = 0, sent, k
    while off < l.n:
        sent = sendmmsg(l.fd, l.msgs + off, l.n - off, 0)
        if sent < 0:
            if errno == EINTR:
                continue
            # sendmmsg fails only on its first message: deal with that one, go on.
            if errno == EMSGSIZE:
                tx_refused_too_big(q, l, off)
            else:
                inc(q.c, DROP_TX_SEND_ERROR)
            off += 1
            continue
        for k in range(off, off + sent):
            add(q.c, TX_BYTES, l.iov[2 * k].iov_len + l.iov[2 * k + 1].iov_len - l.l2_len)
        add(q.c, TX_PACKETS, sent)
        if which == LANE_L2:
            add(q.c, TX_L2, sent)
        off += sent
    l.n = 0


cdef void txq_flush(txq *q) noexcept nogil:
    lane_flush(q, LANE_IP)
    lane_flush(q, LANE_L2)


cdef void tx_refused_too_big(txq *q, lane *l, int k) noexcept nogil:
    """EMSGSIZE: the underlay device's MTU is now smaller than the one the map was built
    with (an operator lowered it). Tell the sender the MTU that fits today, as rule 5 does
    for a packet that is too big for the map's MTU."""
    cdef const fan_map *m = &q.t.maps[l.map_index[k]]
    cdef iovec *v = &l.iov[2 * k]
    cdef uint32_t head = <uint32_t>v[0].iov_len - l.l2_len - IPV4_HLEN
    cdef uint32_t n, more
    cdef ifreq ifr
    inc(q.c, DROP_TX_TOO_BIG)
    # The inner packet's first bytes, from the header iovec and the payload iovec.
    n = head if head < ICMP_QUOTE_MAX else ICMP_QUOTE_MAX
    memcpy(q.quote, <uint8_t *>v[0].iov_base + l.l2_len + IPV4_HLEN, n)
    more = ICMP_QUOTE_MAX - n
    if more > v[1].iov_len:
        more = <uint32_t>v[1].iov_len
    if more:
        memcpy(q.quote + n, v[1].iov_base, more)
    n += more
    if not (load16(q.quote + IPV4_OFF_FRAG) & IPV4_FLAG_DF):
        return
    memset(&ifr, 0, sizeof(ifr))
    memcpy(ifr.ifr_name, m.ifname, 16)
    if ioctl(l.fd, SIOCGIFMTU, &ifr) < 0 or ifr.ifr_mtu < 68 + IPV4_HLEN:
        return
    n = icmp_frag_needed(q.icmp + VNET_HLEN, q.quote, n, m.gateway,
                         <uint16_t>(ifr.ifr_mtu - IPV4_HLEN), q.ip_id + 1)
    if n == 0:
        return
    q.ip_id += 1
    inc(q.c, TX_ICMP_FRAG_NEEDED)
    if write(q.tun_fd, q.icmp, n + VNET_HLEN) < 0:
        inc(q.c, DROP_TX_TUN_WRITE)


cdef int tx_packet(txq *q, uint8_t *pkt, uint32_t len, result *r) noexcept nogil:
    """One read from the TUN: the packet pkt[0:len], its virtio header in the VNET_HLEN
    bytes in front, HEADROOM bytes of room in all. Queues what goes to the underlay and
    returns the verdict; the caller writes back VERDICT_LOCAL (pkt - VNET_HLEN, as read)
    and VERDICT_ICMP (q.icmp, VNET_HLEN + r.out_len)."""
    cdef vnet_hdr h
    cdef tx_route rt
    cdef int v
    memcpy(&h, pkt - VNET_HLEN, VNET_HLEN)     # the outer header will overwrite it
    if h.gso_type != VNET_GSO_NONE:
        return tx_tso(q, &h, pkt, len, r)
    v = encap_one(q.t, &q.ip_id, pkt, len, 0, r, q.icmp + VNET_HLEN, q.c)
    if v == VERDICT_SEND:
        if (h.flags & VNET_F_NEEDS_CSUM) and not csum_complete(pkt, r.out_len - IPV4_HLEN, &h):
            return drop(q.c, r, DROP_TX_BAD_OFFLOAD)
        tx_route_of(q, r, &rt)
        if r.out_len > q.t.maps[r.map_index].mtu:
            tx_fragments(q, &rt, pkt - IPV4_HLEN, r.out_len, q.t.maps[r.map_index].mtu)
        else:
            txq_add(q, &rt, pkt - IPV4_HLEN, r.out_len, NULL, 0)
    return v


cdef void tx_fragments(txq *q, const tx_route *rt, uint8_t *o, uint32_t len,
                       uint32_t mtu) noexcept nogil:
    """Queue the outer packet o[0:len] (DF clear) as IPv4 fragments of at most mtu bytes.
    Each is a header in the queue and a slice of the packet: the payload is not copied."""
    cdef uint32_t chunk = ((mtu - IPV4_HLEN) // 8) * 8
    cdef uint32_t pay = len - IPV4_HLEN, off = 0, n
    cdef uint8_t *h
    while off < pay:
        n = pay - off if pay - off < chunk else chunk
        h = txq_add(q, rt, NULL, IPV4_HLEN, o + IPV4_HLEN + off, n)
        memcpy(h, o, IPV4_HLEN)
        store16(h + IPV4_OFF_TOT_LEN, IPV4_HLEN + n)
        store16(h + IPV4_OFF_FRAG, (off >> 3) | (IPV4_FLAG_MF if off + n < pay else 0))
        ipv4_set_header_csum(h, IPV4_HLEN)
        off += n


cdef int tx_tso(txq *q, const vnet_hdr *h, uint8_t *pkt, uint32_t len,
                result *r) noexcept nogil:
    """Split a TCP superpacket into segments as the kernel's tcp_gso_segment does: headers
    copied, IP total length, ID (+1 per segment) and checksum set, TCP sequence advanced,
    CWR kept on the first segment only, FIN and PSH on the last only, TCP checksum computed
    in full. Routing, local delivery and the MTU check happen once, for the first segment."""
    cdef uint32_t ihl, thl, hdrs, mss, off, n, seq, i = 0
    cdef uint16_t id_in, id_out, c16
    cdef uint8_t *o
    cdef uint8_t *b
    cdef uint8_t *ip
    cdef uint8_t *tcp
    cdef uint8_t flags, f
    cdef tx_route rt
    cdef int v
    r.reason = -1
    r.map_index = -1
    mss = h.gso_size
    if ((h.gso_type & ~VNET_GSO_ECN) != VNET_GSO_TCPV4 or mss == 0 or len < IPV4_HLEN
            or (pkt[0] >> 4) != 4):
        return drop(q.c, r, DROP_TX_BAD_OFFLOAD)
    ihl = (pkt[0] & 15) * 4
    if ihl < IPV4_HLEN or load16(pkt + IPV4_OFF_TOT_LEN) != len:
        return drop(q.c, r, DROP_TX_BAD_OFFLOAD)
    thl = tcp_header_len(pkt, len)
    if thl == 0:
        return drop(q.c, r, DROP_TX_BAD_OFFLOAD)
    hdrs = ihl + thl
    n = len - hdrs
    v = encap_one(q.t, &q.ip_id, pkt, len, hdrs + (mss if mss < n else n), r,
                  q.icmp + VNET_HLEN, q.c)
    if v != VERDICT_SEND:
        return v
    inc(q.c, TX_TSO_SPLIT)
    tx_route_of(q, r, &rt)
    o = pkt - IPV4_HLEN
    id_out = load16(o + IPV4_OFF_ID)
    id_in = load16(pkt + IPV4_OFF_ID)
    seq = load32(pkt + ihl + TCP_OFF_SEQ)
    flags = pkt[ihl + TCP_OFF_FLAGS]
    off = hdrs
    while off < len:
        n = len - off
        if n > mss:
            n = mss
        b = txq_add(q, &rt, NULL, IPV4_HLEN + hdrs, pkt + off, n)
        memcpy(b, o, IPV4_HLEN)
        store16(b + IPV4_OFF_TOT_LEN, IPV4_HLEN + hdrs + n)
        store16(b + IPV4_OFF_ID, <uint16_t>(id_out + i))
        ipv4_set_header_csum(b, IPV4_HLEN)
        ip = b + IPV4_HLEN
        memcpy(ip, pkt, hdrs)
        store16(ip + IPV4_OFF_TOT_LEN, hdrs + n)
        store16(ip + IPV4_OFF_ID, <uint16_t>(id_in + i))
        ipv4_set_header_csum(ip, ihl)
        tcp = ip + ihl
        store32(tcp + TCP_OFF_SEQ, seq + i * mss)
        f = flags
        if i:
            f &= ~TCP_CWR
        if off + n < len:
            f &= ~(TCP_FIN | TCP_PSH)
        tcp[TCP_OFF_FLAGS] = f
        tcp[TCP_OFF_CSUM] = 0
        tcp[TCP_OFF_CSUM + 1] = 0
        c16 = csum_fold(acc_add(acc_add(pseudo_header(ip, IPPROTO_TCP_, thl + n),
                                        csum_add(tcp, thl, 0)),
                                csum_add(pkt + off, n, 0)))
        memcpy(tcp + TCP_OFF_CSUM, &c16, 2)
        off += n
        i += 1
    q.ip_id = <uint16_t>(id_out + i - 1)
    return VERDICT_SEND


# ---------------------------------------------------------------------------------------
# Receive with TUN offloads: consecutive TCP segments of one flow in a batch are appended
# to the first (GRO) and written as one superpacket, which the kernel takes as already
# checksummed (NEEDS_CSUM) - so every segment's TCP checksum is verified before it is
# merged. Only the newest superpacket of a flow takes more, so a flow's order is kept.

cdef enum:
    GRO_SCAN = 8                # how far back a segment looks for its flow

cdef struct rx_out:
    uint8_t *pkt                # inner packet; VNET_HLEN free bytes in front of it
    uint32_t len
    int map_index
    uint32_t segs               # underlay packets in it
    uint32_t bytes              # their inner bytes
    uint32_t gso_size           # payload of the first segment
    uint32_t thl                # TCP header length; 0: not TCP
    bint open                   # may take more segments
    bint csum_ok                # the first segment's TCP checksum was verified
    bint kernel_gro             # merged by the underlay's GRO before we saw it


cdef bint gro_append(rx_out *o, uint8_t *p, uint32_t len, uint32_t thl) noexcept nogil:
    """Append segment p (same flow as o) to o if it continues it; False if it must start
    a superpacket of its own."""
    cdef uint32_t pay = len - IPV4_HLEN - thl
    cdef uint32_t have = o.len - IPV4_HLEN - o.thl
    cdef uint8_t flags = p[IPV4_HLEN + TCP_OFF_FLAGS]
    if not o.open or pay > o.gso_size or o.len + pay > 0xffff:
        return False
    if load32(p + IPV4_HLEN + TCP_OFF_SEQ) != load32(o.pkt + IPV4_HLEN + TCP_OFF_SEQ) + have:
        return False
    if not o.csum_ok:
        if not tcp_csum_ok(o.pkt, IPV4_HLEN, o.len):
            o.open = False
            return False
        o.csum_ok = True
    if not tcp_csum_ok(p, IPV4_HLEN, len):
        return False
    memcpy(o.pkt + o.len, p + IPV4_HLEN + thl, pay)
    o.len += pay
    o.segs += 1
    o.bytes += len
    if flags & TCP_PSH:
        o.pkt[IPV4_HLEN + TCP_OFF_FLAGS] |= TCP_PSH
        o.open = False          # PSH ends a superpacket, as the kernel's GRO does
    if pay < o.gso_size:
        o.open = False          # only the last segment may be short
    return True


cdef int rx_gather(rx_out *outs, int n, uint8_t *p, uint32_t len, int map_index,
                   uint32_t mtu) noexcept nogil:
    """Add a decapsulated packet to the batch's outputs: merged into its connection's
    newest output if that can take it, else as a new output. Never into an older one: that
    would deliver the segment ahead of the packets in between. mtu is the map's underlay
    MTU. Returns the new number of outputs."""
    cdef uint32_t thl = 0, seg_max = 0
    cdef uint8_t flags
    cdef rx_out *o
    cdef int k
    cdef bint kernel_gro = False, candidate = False
    if p[0] == 0x45:
        thl = tcp_header_len(p, len)
    if thl:
        # Longer than any one segment from a peer with our MTU: the underlay NIC's GRO
        # merged it (the kernel's IPIP GRO is built in, module or not), verifying every
        # segment's checksum and leaving the pseudo-header sum in the TCP checksum field
        # (tcp4_gro_complete). Written as the superpacket it is; segments are seg_max long.
        seg_max = mtu - 2 * IPV4_HLEN - thl if mtu > 2 * IPV4_HLEN + thl else 1
        if len - IPV4_HLEN - thl > seg_max and tcp_csum_is_partial(p, len):
            kernel_gro = True
        else:
            # Candidates: DF, and only ACK (PSH) set: SYN, FIN, RST, URG, CWR, ECE never.
            flags = p[IPV4_HLEN + TCP_OFF_FLAGS]
            candidate = ((load16(p + IPV4_OFF_FRAG) & IPV4_FLAG_DF) != 0
                         and (flags == TCP_ACK or flags == (TCP_ACK | TCP_PSH)))
        k = n - 1
        while k >= 0 and k >= n - GRO_SCAN:
            o = &outs[k]
            if o.thl and o.map_index == map_index and tcp_same_connection(o.pkt, p):
                if (candidate and o.thl == thl and gro_same_flow(o.pkt, p, thl)
                        and gro_append(o, p, len, thl)):
                    return n
                break
            k -= 1
    o = &outs[n]
    o.pkt = p
    o.len = len
    o.map_index = map_index
    o.segs = 1
    o.bytes = len
    o.thl = thl                 # every TCP output, so that its connection stops the scan
    o.gso_size = seg_max if kernel_gro else len - IPV4_HLEN - thl
    o.open = candidate and not (p[IPV4_HLEN + TCP_OFF_FLAGS] & TCP_PSH)
    o.csum_ok = False
    o.kernel_gro = kernel_gro
    return n + 1


cdef void rx_finish(rx_out *o) noexcept nogil:
    """Put the virtio header in front of an output; a superpacket also gets its IP total
    length, header checksum and, in the TCP checksum field, the pseudo-header sum the
    kernel completes (NEEDS_CSUM) if it ever splits the superpacket again."""
    cdef vnet_hdr h
    cdef uint16_t c16
    memset(&h, 0, sizeof(h))
    if o.segs > 1:
        store16(o.pkt + IPV4_OFF_TOT_LEN, o.len)
        ipv4_set_header_csum(o.pkt, IPV4_HLEN)
        c16 = ~csum_fold(pseudo_header(o.pkt, IPPROTO_TCP_, o.len - IPV4_HLEN))
        memcpy(o.pkt + IPV4_HLEN + TCP_OFF_CSUM, &c16, 2)
    if o.segs > 1 or o.kernel_gro:
        h.flags = VNET_F_NEEDS_CSUM
        h.gso_type = VNET_GSO_TCPV4
        h.hdr_len = IPV4_HLEN + o.thl
        h.gso_size = o.gso_size
        h.csum_start = IPV4_HLEN
        h.csum_offset = TCP_OFF_CSUM
    memcpy(o.pkt - VNET_HLEN, &h, VNET_HLEN)


cdef int rx_batch(const fan_table *t, uint8_t *arena, const uint32_t *lens, int got,
                  rx_out *outs, uint64_t *c) noexcept nogil:
    """Decapsulate got datagrams (SLOT apart in arena) and gather what is delivered into
    outs, each finished and ready to write. Returns the number of outputs."""
    cdef result r
    cdef uint8_t *buf
    cdef int i, n = 0
    for i in range(got):
        buf = arena + <size_t>SLOT * i
        if decap_one(t, buf, lens[i], &r, c) == VERDICT_DELIVER:
            n = rx_gather(outs, n, buf + r.off, r.out_len, r.map_index,
                          t.maps[r.map_index].mtu)
    for i in range(n):
        rx_finish(&outs[i])
        if outs[i].kernel_gro:
            inc(c, RX_KERNEL_GRO)
    return n


# ---------------------------------------------------------------------------------------
# The table the loops read. Python builds a new one on every (re)configuration and swaps
# the pointer; a loop reads the pointer once per batch, so the old table is freed only
# after every loop has passed a batch boundary (see Engine.retire).

cdef class Engine:
    """The active Fan table and neighbour table, as C structs. Each is replaced whole; the
    one replaced stays allocated until retire()."""
    cdef fan_table *table
    cdef fan_table *retired
    cdef neigh_table *neigh
    cdef neigh_table *neigh_retired

    def __cinit__(self):
        self.table = <fan_table *>calloc(1, sizeof(fan_table))
        self.retired = NULL
        self.neigh = NULL
        self.neigh_retired = NULL
        if self.table == NULL:
            raise MemoryError()
        self.table.check_spoof = 1

    def __dealloc__(self):
        free(self.table)
        free(self.retired)
        free(self.neigh)
        free(self.neigh_retired)

    def __init__(self, maps=(), check_spoof=True):
        self.load(maps, check_spoof)

    def load(self, maps, check_spoof=True):
        """Install a new table. maps: iterables of
        (overlay, o, underlay, u, local, host_reserve, mtu, tun_fd, underlay interface name,
        its ifindex, its MAC), addresses as ints; ifindex 0 (and MAC b"") for an interface
        that cannot take Ethernet frames.
        The previous table stays allocated until retire()."""
        cdef fan_table *t
        cdef fan_map *m
        cdef int o, u
        maps = list(maps)
        if len(maps) > MAX_MAPS:
            raise ValueError(f"at most {MAX_MAPS} fan maps in one process")
        t = <fan_table *>calloc(1, sizeof(fan_table))
        if t == NULL:
            raise MemoryError()
        t.check_spoof = 1 if check_spoof else 0
        # Longest overlay prefix first: with non-overlapping maps this changes nothing, but
        # the first match is then the longest-prefix match by construction.
        maps.sort(key=lambda spec: -spec[1])
        for spec in maps:
            overlay, o, underlay, u, local, reserve, mtu, tun_fd, ifname, ifindex, mac = spec
            ifname = ifname.encode()
            mac = bytes(mac)
            if (not (0 <= o < u <= 32) or len(ifname) > 15
                    or len(mac) != (ETH_ALEN if ifindex else 0)):
                free(t)
                raise ValueError(f"bad prefix lengths /{o} over /{u} or interface "
                                 f"{ifname!r} ({ifindex}, MAC {mac.hex()})")
            m = &t.maps[t.n]
            m.overlay_mask = _mask(o)
            m.underlay_mask = _mask(u)
            m.overlay = overlay & m.overlay_mask
            m.underlay = underlay & m.underlay_mask
            m.shift = u - o
            m.local = local
            m.slice_mask = _mask(o + 32 - u)
            m.slice_net = fan_slice(m, local)
            m.gateway = m.slice_net + 1
            m.reserved_last = m.slice_net + reserve
            m.mtu = mtu
            m.tun_fd = tun_fd
            memcpy(m.ifname, <char *>ifname, len(ifname))   # calloc'd: NUL-terminated
            m.ifindex = ifindex
            if ifindex:
                memcpy(m.mac, <char *>mac, ETH_ALEN)
            t.n += 1
        free(self.retired)
        self.retired = self.table
        self.table = t

    def set_neighbours(self, entries):
        """Install a new neighbour table: (underlay address as int, ifindex, 6-byte MAC)
        for each host the kernel has resolved. The previous one stays until retire()."""
        cdef neigh_table *nt
        cdef neigh_entry *e
        cdef uint32_t slots = 16, i, a
        entries = list(entries)
        while slots < 2 * len(entries) + 1:
            slots *= 2
        for a, ifindex, mac in entries:
            if a == 0 or ifindex <= 0 or len(mac) != ETH_ALEN:
                raise ValueError(f"bad neighbour {a:#x} on {ifindex} at {bytes(mac).hex()}")
        nt = <neigh_table *>calloc(1, sizeof(neigh_table) + slots * sizeof(neigh_entry))
        if nt == NULL:
            raise MemoryError()
        nt.mask = slots - 1
        nt.e = <neigh_entry *>(nt + 1)
        for a, ifindex, mac in entries:
            mac = bytes(mac)
            e = neigh_find(nt, a)
            if e == NULL:
                i = neigh_slot(nt, a)
                while nt.e[i].addr != 0:
                    i = (i + 1) & nt.mask
                e = &nt.e[i]
            e.addr = a
            e.ifindex = ifindex
            memcpy(e.mac, <char *>mac, ETH_ALEN)
        free(self.neigh_retired)
        self.neigh_retired = self.neigh
        self.neigh = nt

    def neighbours_used(self):
        """Addresses frames went to since the last call (each entry's used mark, cleared)."""
        cdef neigh_table *nt = self.neigh
        cdef uint32_t i
        used = []
        if nt == NULL:
            return used
        for i in range(nt.mask + 1):
            if nt.e[i].addr and (<volatile uint8_t *>&nt.e[i].used)[0]:
                (<volatile uint8_t *>&nt.e[i].used)[0] = 0
                used.append(nt.e[i].addr)
        return used

    def retire(self):
        """Free the tables replaced by the last load() and set_neighbours(); call once
        every loop has ticked."""
        free(self.retired)
        self.retired = NULL
        free(self.neigh_retired)
        self.neigh_retired = NULL

    def dest(self, uint32_t addr):
        """(map index, underlay host, routable) for an overlay address; index -1 if none."""
        cdef int i = fan_lookup_overlay(self.table, addr)
        if i < 0:
            return -1, 0, False
        u = fan_dest(&self.table.maps[i], addr)
        return i, u, bool(fan_host_ok(&self.table.maps[i], u))

    def map_batch(self, const uint32_t[::1] addrs, uint32_t[::1] out, uint8_t[::1] ok):
        """The engine's own batch mapping (overlay address -> underlay host), for
        comparison with fanmap's numpy form; ok[i] = 0 for no map or unroutable."""
        cdef Py_ssize_t k, n = addrs.shape[0]
        cdef int i
        cdef uint32_t a, u
        cdef const fan_table *t = self.table
        if out.shape[0] < n or ok.shape[0] < n:
            raise ValueError("output arrays shorter than the input")
        with nogil:
            for k in range(n):
                a = addrs[k]
                i = fan_lookup_overlay(t, a)
                if i < 0:
                    out[k] = 0
                    ok[k] = 0
                else:
                    u = fan_dest(&t.maps[i], a)
                    ok[k] = fan_host_ok(&t.maps[i], u)
                    out[k] = u if ok[k] else 0


cdef inline uint32_t _mask(int n) noexcept nogil:
    return 0 if n == 0 else <uint32_t>(0xffffffffUL << (32 - n))


cdef uint64_t *_counter_ptr(object counters, int need) except NULL:
    """A pointer into a writable, C-contiguous uint64 array (a counter block)."""
    cdef uint64_t[::1] view = counters
    if view.shape[0] < need:
        raise ValueError(f"counter block needs {need} entries")
    return &view[0]


# ---------------------------------------------------------------------------------------
# Wrappers for tests and benchmarks: one packet in, verdict and bytes out.

cdef class _Scratch:
    cdef uint8_t *buf
    cdef uint8_t icmp[ICMP_MAX_LEN]
    cdef uint16_t ip_id

    def __cinit__(self):
        self.buf = <uint8_t *>malloc(SLOT)
        if self.buf == NULL:
            raise MemoryError()
        self.ip_id = 0

    def __dealloc__(self):
        free(self.buf)

_scratch = _Scratch()


def counter_names():
    """Counter names in index order, lower case, as `fanpkt stats` prints them."""
    return [c.name.lower() for c in sorted(Counter, key=int) if c.name != "N_COUNTERS"]


def encap(Engine eng, const uint8_t[:] packet, counters, int ip_id=-1):
    """Encapsulate one packet: (verdict, reason index or -1, output bytes, underlay dst).

    The output is the outer packet for VERDICT_SEND, the inner packet for VERDICT_LOCAL,
    the ICMP for VERDICT_ICMP and b"" for a drop. ip_id >= 0 fixes the next outer ID - 1.
    """
    cdef _Scratch s = _scratch
    cdef result r
    cdef uint32_t n = packet.shape[0]
    cdef uint64_t *c = _counter_ptr(counters, N_COUNTERS)
    cdef int v
    if n > SLOT - HEADROOM:
        raise ValueError("packet larger than any IPv4 datagram")
    if ip_id >= 0:
        s.ip_id = ip_id
    if n:
        memcpy(s.buf + HEADROOM, &packet[0], n)
    v = encap_one(eng.table, &s.ip_id, s.buf + HEADROOM, n, 0, &r, s.icmp, c)
    if v == VERDICT_SEND:
        out = PyBytes_FromStringAndSize(<char *>s.buf + HEADROOM - IPV4_HLEN, r.out_len)
    elif v == VERDICT_LOCAL:
        out = PyBytes_FromStringAndSize(<char *>s.buf + HEADROOM, r.out_len)
    elif v == VERDICT_ICMP:
        out = PyBytes_FromStringAndSize(<char *>s.icmp, r.out_len)
    else:
        out = b""
    return Verdict(v), r.reason, out, r.dst if v == VERDICT_SEND else 0


def decap(Engine eng, const uint8_t[:] datagram, counters):
    """Decapsulate one datagram: (verdict, reason index or -1, inner bytes, map index)."""
    cdef _Scratch s = _scratch
    cdef result r
    cdef uint32_t n = datagram.shape[0]
    cdef uint64_t *c = _counter_ptr(counters, N_COUNTERS)
    cdef int v
    if n > SLOT:
        raise ValueError("datagram larger than any IPv4 datagram")
    if n:
        memcpy(s.buf, &datagram[0], n)
    v = decap_one(eng.table, s.buf, n, &r, c)
    if v == VERDICT_DELIVER:
        return Verdict(v), -1, PyBytes_FromStringAndSize(<char *>s.buf + r.off, r.out_len), r.map_index
    return Verdict(v), r.reason, b"", -1


def transmit(Engine eng, const uint8_t[:] vnet, const uint8_t[:] packet, counters,
             int ip_id=-1):
    """One TUN read (virtio header + packet) through the transmit path of run_tx:
    (verdict, reason index or -1, outputs, underlay dst). outputs are the outer packets
    for VERDICT_SEND (one per TSO segment; an Ethernet frame when sent to a resolved
    neighbour, see Engine.set_neighbours), else the one buffer written back to the TUN,
    virtio header included; empty for a drop. ip_id >= 0 fixes the next outer ID - 1."""
    cdef _Scratch s = _scratch
    cdef uint64_t *c = _counter_ptr(counters, N_COUNTERS)
    cdef uint32_t n = packet.shape[0]
    cdef txq q
    cdef lane *l
    cdef int w
    cdef result r
    cdef vnet_hdr h
    cdef int v, k, cap
    if vnet.shape[0] != VNET_HLEN:
        raise ValueError(f"the virtio header is {VNET_HLEN} bytes")
    if n > SLOT - HEADROOM:
        raise ValueError("packet larger than any IPv4 datagram")
    memcpy(&h, &vnet[0], VNET_HLEN)
    # room for every segment or fragment, so the queue never fills and never flushes
    cap = n // (h.gso_size if 0 < h.gso_size < 48 else 48) + 2
    if txq_init(&q, cap, -1, -1, -1, c) < 0:
        txq_release(&q)
        raise MemoryError()
    q.t = eng.table
    q.nt = eng.neigh
    q.ip_id = s.ip_id if ip_id < 0 else ip_id
    memcpy(s.buf + HEADROOM - VNET_HLEN, &vnet[0], VNET_HLEN)
    if n:
        memcpy(s.buf + HEADROOM, &packet[0], n)
    v = tx_packet(&q, s.buf + HEADROOM, n, &r)
    s.ip_id = q.ip_id
    outs = []
    if v == VERDICT_SEND:
        for w in range(2):
            l = &q.lanes[w]
            for k in range(l.n):
                outs.append(PyBytes_FromStringAndSize(<char *>l.iov[2 * k].iov_base,
                                                      l.iov[2 * k].iov_len)
                            + PyBytes_FromStringAndSize(<char *>l.iov[2 * k + 1].iov_base,
                                                        l.iov[2 * k + 1].iov_len))
    elif v == VERDICT_LOCAL:
        outs.append(PyBytes_FromStringAndSize(<char *>s.buf + HEADROOM - VNET_HLEN,
                                              r.out_len + VNET_HLEN))
    elif v == VERDICT_ICMP:
        outs.append(PyBytes_FromStringAndSize(<char *>q.icmp, r.out_len + VNET_HLEN))
    txq_release(&q)
    return Verdict(v), r.reason, outs, r.dst if v == VERDICT_SEND else 0


def receive(Engine eng, datagrams, counters):
    """A burst of at most BATCH datagrams through the receive path of run_rx (decapsulate,
    coalesce): a list of (map index, segments, bytes written to the TUN, virtio header
    included), in write order."""
    cdef uint64_t *c = _counter_ptr(counters, N_COUNTERS)
    cdef uint32_t lens[BATCH]
    cdef rx_out outs[BATCH]
    cdef uint8_t *arena
    cdef const uint8_t[:] d
    cdef int k, n
    datagrams = list(datagrams)
    if len(datagrams) > BATCH:
        raise ValueError(f"at most {BATCH} datagrams in a burst")
    arena = <uint8_t *>malloc(<size_t>SLOT * BATCH)
    if arena == NULL:
        raise MemoryError()
    try:
        for k, dg in enumerate(datagrams):
            d = dg
            if d.shape[0] > SLOT:
                raise ValueError("datagram larger than any IPv4 datagram")
            lens[k] = d.shape[0]
            if d.shape[0]:
                memcpy(arena + <size_t>SLOT * k, &d[0], d.shape[0])
        n = rx_batch(eng.table, arena, lens, len(datagrams), outs, c)
        return [(outs[k].map_index, outs[k].segs,
                 PyBytes_FromStringAndSize(<char *>outs[k].pkt - VNET_HLEN,
                                           outs[k].len + VNET_HLEN)) for k in range(n)]
    finally:
        free(arena)


def internet_checksum(const uint8_t[:] data):
    """The RFC 1071 checksum of data as an int (big-endian value of the two bytes)."""
    cdef uint16_t c
    cdef uint8_t *b
    if data.shape[0] == 0:
        c = checksum(NULL, 0)
    else:
        c = checksum(&data[0], data.shape[0])
    b = <uint8_t *>&c
    return (b[0] << 8) | b[1]


def checksum_update16(uint16_t hc, uint16_t old, uint16_t new):
    """RFC 1624 incremental update, host-order values."""
    return csum_update16(hc, old, new)


cdef class PacketBatch:
    """BATCH-sized arena of packet slots with headroom, for batch benchmarks and tests."""
    cdef uint8_t *arena
    cdef uint32_t lens[BATCH]
    cdef uint32_t orig[BATCH]
    cdef public int n
    cdef uint8_t icmp[ICMP_MAX_LEN]
    cdef uint16_t ip_id

    def __cinit__(self, packets):
        cdef const uint8_t[:] p
        packets = list(packets)
        if len(packets) > BATCH:
            raise ValueError(f"at most {BATCH} packets in a batch")
        self.arena = <uint8_t *>malloc(<size_t>SLOT * BATCH)
        if self.arena == NULL:
            raise MemoryError()
        self.n = len(packets)
        self.ip_id = 0
        for k, pkt in enumerate(packets):
            p = pkt
            self.lens[k] = p.shape[0]
            if p.shape[0]:
                memcpy(self.arena + <size_t>SLOT * <size_t>k + HEADROOM, &p[0], p.shape[0])

    def __dealloc__(self):
        free(self.arena)

    def encap_all(self, Engine eng, counters):
        """encap_one over every slot (the outer header overwrites only headroom, so the
        batch can be encapsulated again); returns how many were to be sent."""
        cdef uint64_t *c = _counter_ptr(counters, N_COUNTERS)
        cdef result r
        cdef int k, sent = 0
        cdef const fan_table *t = eng.table
        with nogil:
            for k in range(self.n):
                if encap_one(t, &self.ip_id, self.arena + <size_t>SLOT * k + HEADROOM,
                             self.lens[k], 0, &r, self.icmp, c) == VERDICT_SEND:
                    sent += 1
        return sent

    def decap_all(self, Engine eng, counters):
        """decap_one over every slot (slots hold IPIP datagrams); returns how many were
        delivered. ECN rewrites are idempotent, so the batch can be decapsulated again."""
        cdef uint64_t *c = _counter_ptr(counters, N_COUNTERS)
        cdef result r
        cdef int k, ok = 0
        cdef const fan_table *t = eng.table
        with nogil:
            for k in range(self.n):
                if decap_one(t, self.arena + <size_t>SLOT * k + HEADROOM, self.lens[k],
                             &r, c) == VERDICT_DELIVER:
                    ok += 1
        return ok

    def checksum_all(self):
        cdef int k
        cdef uint32_t acc = 0
        with nogil:
            for k in range(self.n):
                acc += checksum(self.arena + <size_t>SLOT * k + HEADROOM, self.lens[k])
        return acc


# ---------------------------------------------------------------------------------------
# The forwarding loops. Each runs in its own Python thread, released from the GIL for its
# whole life: Python calls run_tx/run_rx once and they return only when told to stop.

cdef struct loop_ctl:
    int stop
    uint64_t ticks              # advanced at every wake-up: proof the loop left a batch


cdef class Loop:
    """Stop flag and liveness tick of one loop, shared with the thread that runs it."""
    cdef loop_ctl *ctl

    def __cinit__(self):
        self.ctl = <loop_ctl *>calloc(1, sizeof(loop_ctl))
        if self.ctl == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self.ctl)

    def stop(self):
        (<volatile int *>&self.ctl.stop)[0] = 1

    @property
    def ticks(self):
        return (<volatile uint64_t *>&self.ctl.ticks)[0]


cdef inline bint stopped(loop_ctl *ctl) noexcept nogil:
    return (<volatile int *>&ctl.stop)[0] != 0


def run_tx(Engine eng, Loop loop, int tun_fd, int sock_fd, int packet_fd, counters):
    """Overlay -> underlay for one TUN until loop.stop(). tun_fd is non-blocking and opened
    with IFF_VNET_HDR; sock_fd is a raw IPPROTO_IPIP socket with IP_HDRINCL; packet_fd an
    AF_PACKET SOCK_RAW socket for frames to resolved neighbours, or -1 for none."""
    cdef uint64_t *c = _counter_ptr(counters, N_COUNTERS)
    cdef loop_ctl *ctl = loop.ctl
    cdef uint8_t *arena = <uint8_t *>malloc(<size_t>SLOT * BATCH)
    cdef uint32_t lens[BATCH]
    cdef txq q
    cdef pollfd pfd
    cdef result r
    cdef uint8_t *pkt
    cdef ssize_t got
    cdef int n, i, v
    if arena == NULL or txq_init(&q, TXQ, sock_fd, packet_fd, tun_fd, c) < 0:
        free(arena)
        txq_release(&q)
        raise MemoryError()
    with nogil:
        while not stopped(ctl):
            ctl.ticks += 1
            n = 0
            while n < BATCH:
                # The virtio header lands in the last VNET_HLEN bytes of the headroom.
                got = read(tun_fd, arena + <size_t>SLOT * n + HEADROOM - VNET_HLEN,
                           SLOT - HEADROOM + VNET_HLEN)
                if got < 0:
                    if errno == EINTR:
                        continue
                    break           # EAGAIN: drained
                if got < VNET_HLEN:
                    inc(c, DROP_TX_BAD_OFFLOAD)
                    continue
                lens[n] = <uint32_t>(got - VNET_HLEN)
                n += 1
            if n == 0:
                # Sleep only when the TUN is empty: under load the loop goes straight from
                # one burst to the next without a poll() in between.
                pfd.fd = tun_fd
                pfd.events = POLLIN
                pfd.revents = 0
                poll(&pfd, 1, POLL_MS)
                continue
            q.t = eng.table
            q.nt = eng.neigh if packet_fd >= 0 else NULL
            for i in range(n):
                pkt = arena + <size_t>SLOT * i + HEADROOM
                v = tx_packet(&q, pkt, lens[i], &r)
                if v == VERDICT_LOCAL:
                    if write(tun_fd, pkt - VNET_HLEN, r.out_len + VNET_HLEN) < 0:
                        inc(c, DROP_TX_TUN_WRITE)
                elif v == VERDICT_ICMP:
                    if write(tun_fd, q.icmp, r.out_len + VNET_HLEN) < 0:
                        inc(c, DROP_TX_TUN_WRITE)
            txq_flush(&q)
    txq_release(&q)
    free(arena)


def run_rx(Engine eng, Loop loop, int sock_fd, counters):
    """Underlay -> overlay until loop.stop(): every TUN of the table is written from here."""
    cdef uint64_t *c = _counter_ptr(counters, N_COUNTERS)
    cdef loop_ctl *ctl = loop.ctl
    cdef uint8_t *arena = <uint8_t *>malloc(<size_t>SLOT * BATCH)
    cdef mmsghdr msgs[BATCH]
    cdef iovec iov[BATCH]
    cdef uint32_t lens[BATCH]
    cdef rx_out outs[BATCH]
    cdef pollfd pfd
    cdef const fan_table *t
    cdef rx_out *o
    cdef int got, i, n, fd
    cdef timespec nap
    nap.tv_sec = 0
    nap.tv_nsec = RX_NAP_NS
    if arena == NULL:
        raise MemoryError()
    memset(msgs, 0, sizeof(msgs))
    for i in range(BATCH):
        iov[i].iov_base = arena + <size_t>SLOT * i
        iov[i].iov_len = SLOT
        msgs[i].msg_hdr.msg_iov = &iov[i]
        msgs[i].msg_hdr.msg_iovlen = 1
    with nogil:
        while not stopped(ctl):
            ctl.ticks += 1
            got = recvmmsg(sock_fd, msgs, BATCH, MSG_DONTWAIT, NULL)
            if got <= 0:
                pfd.fd = sock_fd    # empty (or EINTR): sleep until there is work
                pfd.events = POLLIN
                pfd.revents = 0
                poll(&pfd, 1, POLL_MS)
                continue
            t = eng.table
            for i in range(got):
                lens[i] = msgs[i].msg_len
            n = rx_batch(t, arena, lens, got, outs, c)
            for i in range(n):
                o = &outs[i]
                fd = t.maps[o.map_index].tun_fd
                if fd < 0 or write(fd, o.pkt - VNET_HLEN, o.len + VNET_HLEN) < 0:
                    add(c, DROP_RX_TUN_WRITE, o.segs)
                else:
                    add(c, RX_PACKETS, o.segs)
                    add(c, RX_BYTES, o.bytes)
                    add(c, RX_GRO_MERGED, o.segs - 1)
            if got < BATCH:
                nanosleep(&nap, NULL)
    free(arena)
