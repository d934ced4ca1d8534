# The transmit queue (included by fastpath.pyx after ipip.pxi and vxlan.pxi, whose
# encapsulations it calls): from one TUN or TAP read to sendmmsg, for both fans.
#
# Every read from the TUN starts with a virtio_net_hdr. tx_packet takes one read: a plain
# packet is encapsulated in place (encap_one, ipip.pxi); a TCP superpacket (gso_type TCPV4) is split
# here into MSS-sized segments, each with its own outer header (tx_tso). Each outer packet
# is queued on a lane - the raw IP socket, or the packet socket for an underlay host the
# kernel has already resolved - and each lane is flushed with one sendmmsg. A queued packet
# is two iovecs: its headers, copied into the lane, and its payload, left where read() put
# it. A packet too big without DF leaves as outer fragments (tx_fragments); a packet the
# socket refuses as too big (EMSGSIZE) is answered with ICMP (tx_refused_too_big).

cdef enum:
    TXQ = 128                   # segments queued per sendmmsg, per lane
    LANE_IP = 0                 # the raw IP socket: the kernel routes and resolves
    LANE_L2 = 1                 # the packet socket: frames to neighbours already resolved
    # the largest headers of one queued segment: Ethernet, outer IPv4/UDP/VXLAN, inner
    # Ethernet, IPv4 and TCP with options
    SEG_HDR_MAX = ETH_HLEN + VXLAN_OUTER + ETH_HLEN + 60 + 60
    GSO_SEGS = 64               # segments per UDP GSO send (the kernel's UDP_MAX_SEGMENTS)
    GSO_SEG_HDR = VXLAN_HLEN + ETH_HLEN + 60 + 60   # headers in front of a segment's payload
    GSO_HDR = VNET_HLEN + ETH_HLEN + IPV4_HLEN + UDP_HLEN   # in front of a GSO superpacket


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


cdef struct tx_route:          # where one packet, or every segment of one, goes
    int lane
    int map_index
    uint32_t dst
    const uint8_t *dmac


cdef struct txq:
    const fan_table *t          # the tables of the current batch
    neigh_table *nt             # NULL: everything goes by LANE_IP
    int kind                    # FAN_IPIP: packets from a TUN; FAN_VXLAN: frames from a TAP
    int tun_fd                  # the device queue read: where ICMP for EMSGSIZE goes
    int dev_fd                  # the device's own fd (queue 0): which map a frame is from
    int cap
    uint16_t ip_id              # the last outer (or ICMP) IP ID this loop used
    uint16_t id_end             # the first ID past its block (id_reserve)
    uint16_t id_size            # the block's size; 0: no block yet
    uint32_t *id_pool           # the host's ID sequence (Engine.ids); NULL: this loop's
                                # own (tests)
    icmp_budget budget          # the ICMPs this loop may still send (icmp.pxd)
    uint64_t *c
    lane lanes[2]
    uint8_t *icmp               # VNET_HLEN zero bytes, then an ICMP to write to the TUN
    uint8_t *quote              # the inner packet of a refused message, gathered for ICMP
    # VXLAN UDP GSO (vxlan.pxi tx_vxlan_gso): a packet socket with PACKET_VNET_HDR
    int gso_fd                  # -1: none (every segment on the lanes)
    int gso_off                 # the kernel refused UDP GSO once: segments from now on
    uint8_t *gso_hdr            # GSO_HDR bytes: virtio header, Ethernet, IPv4, UDP
    uint8_t *gso_segs           # GSO_SEGS x GSO_SEG_HDR: each segment's own headers
    iovec *gso_iov              # the headers, then two per segment: headers, payload
    sockaddr_ll gso_sll
    msghdr gso_msg
    # A run (vxlan.pxi tx_run_add): plain frames of one flow, read one after another, each
    # encapsulated in place, waiting to leave together in one UDP GSO send
    int run_n                   # frames in the run; 0: none
    bint run_shut               # its last frame was shorter: nothing more may join
    uint32_t run_seg            # UDP payload of each frame but the last (VXLAN + frame)
    uint32_t run_ulen           # UDP length of the whole run: header and every payload
    tx_route run_rt
    uint8_t *run_o[GSO_SEGS]    # each frame's outer IPv4 header, in the read arena


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
    """A queue for one sending loop. The caller sets q.gso_fd for VXLAN UDP GSO."""
    memset(q, 0, sizeof(txq))
    q.cap = cap
    q.tun_fd = tun_fd
    q.dev_fd = tun_fd
    q.c = c
    q.gso_fd = -1
    q.icmp = <uint8_t *>calloc(1, VNET_HLEN + ICMP_MAX_LEN)
    q.quote = <uint8_t *>malloc(ICMP_QUOTE_MAX)
    q.gso_hdr = <uint8_t *>malloc(GSO_HDR)
    q.gso_segs = <uint8_t *>malloc(GSO_SEGS * GSO_SEG_HDR)
    q.gso_iov = <iovec *>calloc(1 + 2 * GSO_SEGS, sizeof(iovec))
    q.gso_sll.sll_family = AF_PACKET
    q.gso_sll.sll_protocol = htons(ETH_P_IP)
    q.gso_msg.msg_name = &q.gso_sll
    q.gso_msg.msg_namelen = sizeof(sockaddr_ll)
    q.gso_msg.msg_iov = q.gso_iov
    if (lane_init(&q.lanes[LANE_IP], cap, sock_fd, 0) < 0
            or lane_init(&q.lanes[LANE_L2], cap, packet_fd, ETH_HLEN) < 0
            or q.icmp == NULL or q.quote == NULL or q.gso_hdr == NULL
            or q.gso_segs == NULL or q.gso_iov == NULL):
        return -1
    return 0


cdef void txq_release(txq *q) noexcept nogil:
    lane_release(&q.lanes[LANE_IP])
    lane_release(&q.lanes[LANE_L2])
    free(q.icmp)
    free(q.quote)
    free(q.gso_hdr)
    free(q.gso_segs)
    free(q.gso_iov)
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
    tx_run_close(q)         # it sends what the lanes held before it, then itself
    lane_flush(q, LANE_IP)
    lane_flush(q, LANE_L2)


cdef void tx_refused_too_big(txq *q, lane *l, int k) noexcept nogil:
    """EMSGSIZE: the underlay device's MTU is now smaller than the one the map was built
    with (an operator lowered it). Tell the sender the MTU that fits today, as T5 does
    for a packet that is too big for the map's MTU."""
    cdef const fan_map *m = &q.t.maps[l.map_index[k]]
    cdef iovec *v = &l.iov[2 * k]
    cdef uint32_t head = <uint32_t>v[0].iov_len - l.l2_len - IPV4_HLEN
    cdef uint32_t n, more
    cdef ifreq ifr
    inc(q.c, DROP_TX_TOO_BIG)
    if m.kind == FAN_VXLAN:
        return              # a bridged frame: no IP hop of ours to answer from
    # A refused outer fragment: its sender allowed fragmentation (no DF), and a later
    # fragment's payload is no IP header - quoting it would forge an ICMP to any address.
    if load16(<uint8_t *>v[0].iov_base + l.l2_len + IPV4_OFF_FRAG) & (IPV4_FLAG_MF
                                                                      | IPV4_FRAG_OFFSET_MASK):
        return
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
    if not icmp_source_ok(q.t, q.quote):
        return
    n = icmp_frag_needed(q.icmp + VNET_HLEN, q.quote, n, m.gateway,
                         <uint16_t>(ifr.ifr_mtu - IPV4_HLEN), q.ip_id + 1)
    if n == 0:
        return
    if not icmp_allow(&q.budget):
        inc(q.c, TX_ICMP_RATE_LIMITED)
        return
    q.ip_id += 1
    inc(q.c, TX_ICMP_FRAG_NEEDED)
    if write(q.tun_fd, q.icmp, n + VNET_HLEN) < 0:
        inc(q.c, DROP_TX_TUN_WRITE)


cdef extern from *:
    """
    static inline uint32_t fanpkt_fetch_add(uint32_t *p, uint32_t n) {
        return __atomic_fetch_add(p, n, __ATOMIC_RELAXED);
    }
    """
    uint32_t fetch_add "fanpkt_fetch_add"(uint32_t *p, uint32_t n) noexcept nogil

cdef enum:
    ID_BLOCK = 2048             # outer IP IDs a loop takes from the host's sequence at once


cdef inline void id_reserve(txq *q, uint32_t need) noexcept nogil:
    """Make sure the loop's block holds `need` more IDs, taking a new block of the host's
    sequence if not: two loops never use one ID at once (each counting from 0 would send
    the same IDs to the same host together, and outer fragments could be reassembled
    across packets), and one atomic add per block costs nothing per packet. The code that
    uses IDs keeps counting up q.ip_id; a block's rest is skipped."""
    cdef uint32_t base, size
    cdef uint16_t left = <uint16_t>(q.id_end - q.ip_id - 1)    # > id_size: overrun
    if q.id_pool == NULL or (need <= left <= q.id_size):
        return
    size = ID_BLOCK if need <= ID_BLOCK else need
    base = fetch_add(q.id_pool, size)
    q.ip_id = <uint16_t>(base - 1)
    q.id_end = <uint16_t>(base + size)
    q.id_size = <uint16_t>size


cdef int tx_packet(txq *q, uint8_t *pkt, uint32_t len, result *r) noexcept nogil:
    """One read from the TUN: the packet pkt[0:len], its virtio header in the VNET_HLEN
    bytes in front, HEADROOM bytes of room in all. Queues what goes to the underlay and
    returns the verdict; the caller writes VERDICT_ICMP (q.icmp, VNET_HLEN + r.out_len)
    back to the TUN."""
    cdef vnet_hdr h
    cdef tx_route rt
    cdef int v
    memcpy(&h, pkt - VNET_HLEN, VNET_HLEN)     # the outer header will overwrite it
    # IDs this read may use: one per segment (a TSO split), and an ICMP's
    id_reserve(q, 2 + (len // TCP_MIN_MSS if h.gso_type != VNET_GSO_NONE else 1))
    if q.kind == FAN_VXLAN:
        return tx_frame(q, &h, pkt, len, r)
    if h.gso_type != VNET_GSO_NONE:
        return tx_tso(q, &h, pkt, len, r)
    v = encap_one(q.t, &q.ip_id, pkt, len, 0, r, q.icmp + VNET_HLEN, &q.budget, q.c)
    if v == VERDICT_SEND:
        if (h.flags & VNET_F_NEEDS_CSUM) and not csum_complete(pkt, r.out_len - IPV4_HLEN, &h):
            return drop(q.c, r, DROP_TX_BAD_OFFLOAD)
        tx_route_of(q, r, &rt)
        if r.out_len > q.t.maps[r.map_index].mtu:
            tx_fragments(q, &rt, pkt - IPV4_HLEN, r.out_len, q.t.maps[r.map_index].mtu)
        else:
            txq_add(q, &rt, pkt - IPV4_HLEN, r.out_len, NULL, 0)
    return v


cdef int tx_frame(txq *q, const vnet_hdr *h, uint8_t *frame, uint32_t len,
                  result *r) noexcept nogil:
    """One frame read from a VXLAN fan's TAP: its checksum completed first (the outer UDP
    checksum covers it), then encapsulated and queued, in outer fragments if the frame
    does not fit the underlay (the kernel's vxlan sends DF clear)."""
    cdef tx_route rt
    cdef int v
    r.reason = -1
    r.map_index = -1
    if h.gso_type != VNET_GSO_NONE:
        tx_run_close(q)     # its segments go on the lanes or in their own GSO sends
        return tx_frame_tso(q, h, frame, len, r)
    if (h.flags & VNET_F_NEEDS_CSUM) and not csum_complete(frame, len, h):
        return drop(q.c, r, DROP_TX_BAD_OFFLOAD)
    v = vxlan_encap_one(q.t, q.dev_fd, &q.ip_id, frame, len, r, q.c)
    if v == VERDICT_SEND:
        tx_route_of(q, r, &rt)
        # A frame that cannot join (or begin) a run ends it: the run has left first.
        if tx_run_add(q, &rt, frame - VXLAN_OUTER, r.out_len):
            return v
        if r.out_len > q.t.maps[r.map_index].mtu:
            tx_fragments(q, &rt, frame - VXLAN_OUTER, r.out_len, q.t.maps[r.map_index].mtu)
        else:
            txq_add(q, &rt, frame - VXLAN_OUTER, r.out_len, NULL, 0)
    return v


cdef void tx_fragments(txq *q, const tx_route *rt, uint8_t *o, uint32_t len,
                       uint32_t mtu) noexcept nogil:
    """Queue the outer packet o[0:len] (DF clear) as IPv4 fragments of at most mtu bytes.
    Each is a header in the queue and a slice of the packet: the payload is not copied."""
    tx_fragments_split(q, rt, o, IPV4_HLEN, o + IPV4_HLEN, len - IPV4_HLEN, mtu)


cdef void tx_fragments_split(txq *q, const tx_route *rt, const uint8_t *head,
                             uint32_t head_len, uint8_t *body, uint32_t body_len,
                             uint32_t mtu) noexcept nogil:
    """tx_fragments for an outer packet in two pieces, head[0:head_len] (the IPv4 header
    and the headers after it, copied into the first fragment) and body[0:body_len]
    (sliced into every fragment, not copied). The caller has checked that the first
    fragment holds head and at least 8 bytes of body (tx_fragments: head is the IPv4
    header alone)."""
    cdef uint32_t chunk = ((mtu - IPV4_HLEN) // 8) * 8
    cdef uint32_t rest = head_len - IPV4_HLEN        # IP payload in head
    cdef uint32_t pay = rest + body_len, off, n
    cdef uint8_t *h
    n = chunk - rest if body_len > chunk - rest else body_len
    h = txq_add(q, rt, NULL, head_len, body, n)
    memcpy(h, head, head_len)
    store16(h + IPV4_OFF_TOT_LEN, head_len + n)
    store16(h + IPV4_OFF_FRAG, IPV4_FLAG_MF if rest + n < pay else 0)
    ipv4_set_header_csum(h, IPV4_HLEN)
    off = n                                         # in body; rest + off is a multiple of 8
    while off < body_len:
        n = body_len - off if body_len - off < chunk else chunk
        h = txq_add(q, rt, NULL, IPV4_HLEN, body + off, n)
        memcpy(h, head, IPV4_HLEN)
        store16(h + IPV4_OFF_TOT_LEN, IPV4_HLEN + n)
        store16(h + IPV4_OFF_FRAG, ((rest + off) >> 3)
                | (IPV4_FLAG_MF if off + n < body_len else 0))
        ipv4_set_header_csum(h, IPV4_HLEN)
        off += n


cdef void tso_segment(uint8_t *ip, const uint8_t *src, uint32_t ihl, uint32_t thl,
                      const uint8_t *payload, uint32_t n, uint32_t i, uint32_t mss,
                      bint last) noexcept nogil:
    """Write at ip the IPv4 and TCP headers of segment i (payload[0:n]) of the TCP
    superpacket whose headers are src[0:ihl+thl], as the kernel's tcp_gso_segment does:
    total length and header checksum set, ID + i, sequence + i * mss, CWR on the first
    segment only, FIN and PSH on the last only, the TCP checksum computed in full."""
    cdef uint8_t *tcp = ip + ihl
    cdef uint8_t f = src[ihl + TCP_OFF_FLAGS]
    cdef uint16_t c16
    memcpy(ip, src, ihl + thl)
    store16(ip + IPV4_OFF_TOT_LEN, ihl + thl + n)
    store16(ip + IPV4_OFF_ID, <uint16_t>(load16(src + IPV4_OFF_ID) + i))
    ipv4_set_header_csum(ip, ihl)
    store32(tcp + TCP_OFF_SEQ, load32(src + ihl + TCP_OFF_SEQ) + i * mss)
    if i:
        f &= ~TCP_CWR
    if not last:
        f &= ~(TCP_FIN | TCP_PSH)
    tcp[TCP_OFF_FLAGS] = f
    tcp[TCP_OFF_CSUM] = 0
    tcp[TCP_OFF_CSUM + 1] = 0
    c16 = csum_fold(acc_add(acc_add(pseudo_header(ip, IPPROTO_TCP, thl + n),
                                    csum_add(tcp, thl, 0)),
                            csum_add(payload, n, 0)))
    memcpy(tcp + TCP_OFF_CSUM, &c16, 2)


cdef int tx_tso(txq *q, const vnet_hdr *h, uint8_t *pkt, uint32_t len,
                result *r) noexcept nogil:
    """Split a TCP superpacket into segments as the kernel's tcp_gso_segment does: headers
    copied, IP total length, ID (+1 per segment) and checksum set, TCP sequence advanced,
    CWR kept on the first segment only, FIN and PSH on the last only, TCP checksum computed
    in full. Routing, local delivery and the MTU check happen once, for the first segment."""
    cdef uint32_t ihl, thl, hdrs, mss, off, n, i = 0
    cdef uint16_t id_out
    cdef uint8_t *o
    cdef uint8_t *b
    cdef tx_route rt
    cdef int v
    r.reason = -1
    r.map_index = -1
    mss = h.gso_size
    # A gso_size below the least MSS no kernel sends: 64 KiB at gso_size 1 would be 65,000
    # outer packets from one read.
    if ((h.gso_type & ~VNET_GSO_ECN) != VNET_GSO_TCPV4 or mss < TCP_MIN_MSS
            or len < IPV4_HLEN or (pkt[0] >> 4) != 4):
        return drop(q.c, r, DROP_TX_BAD_OFFLOAD)
    ihl = ipv4_ihl(pkt)
    if ihl < IPV4_HLEN or load16(pkt + IPV4_OFF_TOT_LEN) != len:
        return drop(q.c, r, DROP_TX_BAD_OFFLOAD)
    thl = tcp_header_len(pkt, len)
    if thl == 0:
        return drop(q.c, r, DROP_TX_BAD_OFFLOAD)
    hdrs = ihl + thl
    n = len - hdrs
    v = encap_one(q.t, &q.ip_id, pkt, len, hdrs + (mss if mss < n else n), r,
                  q.icmp + VNET_HLEN, &q.budget, q.c)
    if v != VERDICT_SEND:
        return v
    inc(q.c, TX_TSO_SPLIT)
    tx_route_of(q, r, &rt)
    o = pkt - IPV4_HLEN
    id_out = load16(o + IPV4_OFF_ID)
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
        tso_segment(b + IPV4_HLEN, pkt, ihl, thl, pkt + off, n, i, mss, off + n >= len)
        off += n
        i += 1
    q.ip_id = <uint16_t>(id_out + i - 1)
    return VERDICT_SEND


# -- VXLAN's transmit offloads ------------------------------------------------------------
# A TCP superpacket from a TAP is split here (tx_frame_tso) and leaves as UDP GSO
# superpackets (tx_vxlan_gso) or segment by segment on the lanes; plain frames of one flow
# read one after another join a run (tx_run_add) that leaves in one UDP GSO send
# (tx_run_close). Both sends are gso_send. vxlan.pxi writes the headers they carry.

cdef int tx_frame_tso(txq *q, const vnet_hdr *h, uint8_t *frame, uint32_t len,
                      result *r) noexcept nogil:
    """A TCP superpacket frame from the TAP (TSO): split into MSS-sized frames, each with
    its own outer IPv4/UDP/VXLAN. To a resolved neighbour they leave as UDP GSO
    superpackets (tx_vxlan_gso: one send for up to GSO_SEGS segments); otherwise, or if
    the kernel refuses UDP GSO, one outer packet per segment on the lanes. All segments of
    a flow share its source port, whichever way they leave."""
    cdef uint8_t *ip = frame + ETH_HLEN
    cdef uint32_t iplen, ihl, thl, hdrs, mss, off, n, i = 0
    cdef uint16_t sport
    cdef uint8_t ecn
    cdef const fan_map *m
    cdef tx_route rt
    cdef uint8_t *o
    cdef uint8_t seg[VXLAN_OUTER + ETH_HLEN + 60 + 60]     # one segment's headers, aside
    cdef bint big
    cdef int v
    r.reason = -1
    r.map_index = -1
    mss = h.gso_size
    if ((h.gso_type & ~VNET_GSO_ECN) != VNET_GSO_TCPV4 or mss < TCP_MIN_MSS
            or len < ETH_HLEN + IPV4_HLEN or load16(frame + ETH_OFF_TYPE) != ETH_P_IP
            or (ip[0] >> 4) != 4):
        return drop(q.c, r, DROP_TX_BAD_OFFLOAD)
    iplen = len - ETH_HLEN
    ihl = ipv4_ihl(ip)
    if ihl < IPV4_HLEN or load16(ip + IPV4_OFF_TOT_LEN) != iplen:
        return drop(q.c, r, DROP_TX_BAD_OFFLOAD)
    thl = tcp_header_len(ip, iplen)
    if thl == 0:
        return drop(q.c, r, DROP_TX_BAD_OFFLOAD)
    v = vxlan_route(q.t, q.dev_fd, frame, len, r, &ecn, q.c)
    if v != VERDICT_SEND:
        return v
    m = &q.t.maps[r.map_index]
    hdrs = ETH_HLEN + ihl + thl
    if (VXLAN_OUTER + hdrs + mss > m.mtu
            and ((m.mtu - IPV4_HLEN) // 8) * 8 < VXLAN_OUTER - IPV4_HLEN + hdrs + 8):
        return drop(q.c, r, DROP_TX_TOO_BIG)    # no first fragment holds the headers
    inc(q.c, TX_TSO_SPLIT)
    sport = vxlan_source_port(frame, len, q.t.hash_seed)
    tx_route_of(q, r, &rt)
    if (rt.lane == LANE_L2 and q.gso_fd >= 0 and not q.gso_off
            and VXLAN_OUTER + hdrs + mss <= m.mtu):
        if tx_vxlan_gso(q, &rt, m, frame, len, ihl, thl, mss, sport, ecn) == 0:
            return VERDICT_SEND
        q.gso_off = 1           # this kernel or NIC takes no UDP GSO: segments from now on
        inc(q.c, TX_GSO_FALLBACK)
    off = hdrs
    while off < len:
        n = len - off
        if n > mss:
            n = mss
        # A segment too big for the underlay (a gso_size the TAP's MTU does not allow: a
        # container's own MTU) leaves in outer fragments, DF being clear, as the kernel's
        # vxlan does with it; its headers are built aside, then cut with the payload.
        big = VXLAN_OUTER + hdrs + n > m.mtu
        o = &seg[0] if big else txq_add(q, &rt, NULL, VXLAN_OUTER + hdrs, frame + off, n)
        memcpy(o + VXLAN_OUTER, frame, ETH_HLEN)
        tso_segment(o + VXLAN_OUTER + ETH_HLEN, ip, ihl, thl, frame + off, n, i, mss,
                    off + n >= len)
        q.ip_id += 1
        vxlan_outer(m, r.dst, q.ip_id, sport, ecn, o, hdrs + n, frame + off, n)
        if big:
            inc(q.c, TX_FRAGMENTED)
            tx_fragments_split(q, &rt, &seg[0], VXLAN_OUTER + hdrs, frame + off, n, m.mtu)
        off += n
        i += 1
    return VERDICT_SEND


cdef int tx_vxlan_gso(txq *q, const tx_route *rt, const fan_map *m, uint8_t *frame,
                      uint32_t len, uint32_t ihl, uint32_t thl, uint32_t mss, uint16_t sport,
                      uint8_t ecn) noexcept nogil:
    """Send the TCP superpacket frame[0:len] to the resolved neighbour rt as UDP GSO
    superpackets through the packet socket q.gso_fd (PACKET_VNET_HDR): one Ethernet frame
    with one outer IPv4/UDP header, whose UDP payload is up to GSO_SEGS complete VXLAN
    packets of one size (the last may be shorter), each a VXLAN header and an MSS-sized
    inner frame. The kernel cuts it into those packets and gives each its own outer
    IPv4 ID, lengths and checksums (a virtio header with gso_type UDP_L4 and a partial UDP
    checksum asks for exactly that), or hands it whole to a device that takes UDP GSO.
    Returns 0; -1 if the kernel refused the first send (nothing of the frame left)."""
    cdef uint32_t hdrs = ETH_HLEN + ihl + thl
    cdef uint32_t seg = VXLAN_HLEN + hdrs + mss         # UDP payload of a full segment
    cdef uint32_t per = (0xffff - IPV4_HLEN - UDP_HLEN) // seg
    cdef uint32_t off = hdrs, n, k, ulen, i = 0
    cdef uint8_t *sh
    cdef ssize_t sent
    if per > GSO_SEGS:
        per = GSO_SEGS
    txq_flush(q)            # what was queued before goes first: a flow stays in order
    while off < len:
        k = 0
        ulen = UDP_HLEN
        while off < len and k < per:
            n = len - off
            if n > mss:
                n = mss
            sh = q.gso_segs + <size_t>k * GSO_SEG_HDR
            sh[0] = VXLAN_FLAG_I
            memset(sh + 1, 0, 3)
            store32(sh + 4, m.vni << 8)
            memcpy(sh + VXLAN_HLEN, frame, ETH_HLEN)
            tso_segment(sh + VXLAN_HLEN + ETH_HLEN, frame + ETH_HLEN, ihl, thl, frame + off,
                        n, i, mss, off + n >= len)
            q.gso_iov[1 + 2 * k].iov_base = sh
            q.gso_iov[1 + 2 * k].iov_len = VXLAN_HLEN + hdrs
            q.gso_iov[2 + 2 * k].iov_base = frame + off
            q.gso_iov[2 + 2 * k].iov_len = n
            ulen += VXLAN_HLEN + hdrs + n
            off += n
            i += 1
            k += 1
        sent = gso_send(q, m, rt, ecn, sport, <uint16_t>(q.ip_id + 1), ulen, seg, k,
                        2 * k)     # IDs: the kernel counts up per segment from the first
        if sent < 0:
            if i == k and (errno == EINVAL or errno == EOPNOTSUPP or errno == ENOPROTOOPT):
                return -1
            add(q.c, DROP_TX_SEND_ERROR, k)
            continue
        q.ip_id += k
        inc(q.c, TX_GSO)
        add(q.c, TX_PACKETS, k)
        add(q.c, TX_L2, k)
        add(q.c, TX_BYTES, (IPV4_HLEN + UDP_HLEN) * k + ulen - UDP_HLEN)
    return 0


cdef ssize_t gso_send(txq *q, const fan_map *m, const tx_route *rt, uint8_t tos,
                      uint16_t sport, uint16_t ip_id, uint32_t ulen, uint32_t seg,
                      uint32_t k, int niov) noexcept nogil:
    """One UDP GSO superpacket through q.gso_fd: a virtio header, Ethernet to the resolved
    neighbour rt, one outer IPv4/UDP header for a UDP length of ulen, then the niov
    payload iovecs already in q.gso_iov[1:]: k segments of seg bytes of UDP payload (the
    last may be shorter). The kernel cuts it into k packets, IDs counting up from ip_id,
    each with its own lengths and checksums (the UDP one is left partial for it), or hands
    it whole to a device that takes UDP GSO. Returns what sendmsg returns."""
    cdef uint8_t *e = q.gso_hdr + VNET_HLEN
    cdef uint8_t *o = e + ETH_HLEN
    cdef uint8_t *u = o + IPV4_HLEN
    cdef vnet_hdr vh
    cdef uint16_t c16
    cdef ssize_t sent
    memset(&vh, 0, sizeof(vh))
    vh.flags = VNET_F_NEEDS_CSUM
    vh.csum_start = ETH_HLEN + IPV4_HLEN
    vh.csum_offset = UDP_OFF_CSUM
    if k > 1:
        vh.gso_type = VNET_GSO_UDP_L4
        vh.gso_size = <uint16_t>seg
        vh.hdr_len = ETH_HLEN + IPV4_HLEN + UDP_HLEN
    memcpy(q.gso_hdr, &vh, VNET_HLEN)
    q.gso_sll.sll_ifindex = m.ifindex
    memcpy(e, rt.dmac, ETH_ALEN)
    memcpy(e + ETH_ALEN, m.mac, ETH_ALEN)
    store16(e + 2 * ETH_ALEN, ETH_P_IP)
    ipv4_outer(o, tos, IPV4_HLEN + ulen, ip_id, 0, VXLAN_TTL, IPPROTO_UDP, m.local, rt.dst)
    store16(u + UDP_OFF_SPORT, sport)
    store16(u + UDP_OFF_DPORT, m.port)
    store16(u + UDP_OFF_LEN, ulen)
    c16 = ~csum_fold(pseudo_header(o, IPPROTO_UDP, ulen))   # partial: the kernel ends it
    memcpy(u + UDP_OFF_CSUM, &c16, 2)
    q.gso_iov[0].iov_base = q.gso_hdr
    q.gso_iov[0].iov_len = GSO_HDR
    q.gso_msg.msg_iovlen = 1 + niov
    sent = sendmsg(q.gso_fd, &q.gso_msg, 0)
    while sent < 0 and errno == EINTR:
        sent = sendmsg(q.gso_fd, &q.gso_msg, 0)
    return sent


cdef bint tx_run_add(txq *q, const tx_route *rt, uint8_t *o, uint32_t out_len) noexcept nogil:
    """A plain frame, encapsulated in place (its outer IPv4 header at o, out_len bytes in
    all): True if it joined the run or began one, to leave with it in one UDP GSO send;
    False if it cannot (the run, if any, has then been sent: the caller queues the frame
    after it). Frames join while they follow one another with the same neighbour, outer
    TOS and source port (one flow, X3), consecutive IDs, and one size, the last maybe
    shorter, up to GSO_SEGS frames and 64 KiB: what the kernel's UDP GSO turns back into
    exactly these packets. Like the kernel's UDP GSO on a socket, this saves a trip down
    the stack per packet: a flood of small datagrams costs one send per run, not one
    message of a sendmmsg each."""
    cdef uint32_t seg = out_len - IPV4_HLEN - UDP_HLEN
    cdef const uint8_t *f
    if (rt.lane != LANE_L2 or q.gso_fd < 0 or q.gso_off
            or out_len > q.t.maps[rt.map_index].mtu):
        tx_run_close(q)
        return False
    if q.run_n:
        f = q.run_o[0]
        if (not q.run_shut and q.run_n < GSO_SEGS and seg <= q.run_seg
                and rt.map_index == q.run_rt.map_index and rt.dst == q.run_rt.dst
                and IPV4_HLEN + q.run_ulen + seg <= 0xffff
                and o[IPV4_OFF_TOS] == f[IPV4_OFF_TOS]
                and load16(o + IPV4_HLEN + UDP_OFF_SPORT)
                == load16(f + IPV4_HLEN + UDP_OFF_SPORT)
                and load16(o + IPV4_OFF_ID) == <uint16_t>(load16(f + IPV4_OFF_ID) + q.run_n)):
            q.run_shut = seg < q.run_seg
            q.run_o[q.run_n] = o
            q.run_n += 1
            q.run_ulen += seg
            return True
        tx_run_close(q)
    q.run_rt = rt[0]
    q.run_seg = seg
    q.run_ulen = UDP_HLEN + seg
    q.run_shut = False
    q.run_o[0] = o
    q.run_n = 1
    return True


cdef void tx_run_close(txq *q) noexcept nogil:
    """Send the run: a single frame on the lanes, as it came; two or more in one UDP GSO
    send, after what the lanes hold (read before them). If the kernel refuses UDP GSO
    (as in tx_frame_tso) the frames go on the lanes one by one, their own outer headers
    intact, and this loop stops trying."""
    cdef int n = q.run_n, k
    cdef const uint8_t *f = q.run_o[0]
    cdef const fan_map *m
    cdef ssize_t sent
    if n == 0:
        return
    q.run_n = 0
    if n > 1:
        m = &q.t.maps[q.run_rt.map_index]
        lane_flush(q, LANE_IP)
        lane_flush(q, LANE_L2)
        for k in range(n):
            q.gso_iov[1 + k].iov_base = q.run_o[k] + IPV4_HLEN + UDP_HLEN
            q.gso_iov[1 + k].iov_len = load16(q.run_o[k] + IPV4_OFF_TOT_LEN) - IPV4_HLEN - UDP_HLEN
        sent = gso_send(q, m, &q.run_rt, f[IPV4_OFF_TOS],
                        load16(f + IPV4_HLEN + UDP_OFF_SPORT), load16(f + IPV4_OFF_ID),
                        q.run_ulen, q.run_seg, n, n)
        if sent >= 0:
            inc(q.c, TX_GSO)
            add(q.c, TX_GSO_JOINED, n)
            add(q.c, TX_PACKETS, n)
            add(q.c, TX_L2, n)
            add(q.c, TX_BYTES, (IPV4_HLEN + UDP_HLEN) * n + q.run_ulen - UDP_HLEN)
            return
        if not (errno == EINVAL or errno == EOPNOTSUPP or errno == ENOPROTOOPT):
            add(q.c, DROP_TX_SEND_ERROR, n)
            return
        q.gso_off = 1
        inc(q.c, TX_GSO_FALLBACK)
    for k in range(n):
        txq_add(q, &q.run_rt, q.run_o[k], load16(q.run_o[k] + IPV4_OFF_TOT_LEN), NULL, 0)
