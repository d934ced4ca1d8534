# The VXLAN fan (included by fastpath.pyx): Ethernet frames from a fan bridge's TAP port,
# steered by the inner IPv4 destination or the ARP target, carried in UDP (docs/spec.md
# §6, transmit rules X1-X3, receive rules V1-V6).
#
# Transmit: run_tx reads a frame from the TAP -> tx_packet -> tx_frame: vxlan_encap_one
# writes outer IPv4 + UDP + VXLAN (VXLAN_OUTER bytes) into the headroom in front of the
# frame -> the lanes of tx.pxi send it like an IPIP packet (the raw socket takes any IPv4
# packet with IP_HDRINCL); plain frames of one flow that follow one another in a batch
# join a run instead (tx_run_add) and leave in one UDP GSO send (tx_run_close). A TCP
# superpacket (TSO) -> tx_frame_tso: split into segments, sent as UDP GSO superpackets
# (tx_vxlan_gso) or segment by segment on the lanes. Both sends are gso_send.
# Receive: run_rx_vxlan takes datagrams from the fan port's UDP socket (the kernel has
# checked the outer IPv4 and UDP, checksum included), with the outer source, destination
# (IP_PKTINFO: the socket is bound to 0.0.0.0) and TOS beside them -> vxlan_decap_one ->
# the frame is written to the map's TAP.

cdef enum:
    VXLAN_TTL = 64              # the route's hop limit, as the kernel's vxlan sends (not
                                # the inner TTL: the frame is switched, not routed)
    RX_OFF = 16                 # receive offset in a slot: room for the virtio header
                                # in front of the frame (VXLAN_HLEN + RX_OFF >= VNET_HLEN)
    RX_CTL = 128                # control buffer per message: IP_TOS, UDP_GRO and
                                # SO_RXQ_OVFL cmsgs, 24 bytes each, IP_PKTINFO's 32
    DHCP_SERVER = 67            # UDP ports of DHCP (RFC 2131): it never crosses a fan
    DHCP_CLIENT = 68
    SOL_UDP_ = 17               # <netinet/udp.h> SOL_UDP and UDP_GRO: the kernel hands
    UDP_GRO_ = 104              # over consecutive datagrams of a flow in one buffer


cdef int vxlan_route(const fan_table *t, int tap_fd, const uint8_t *frame, uint32_t len,
                     result *r, uint8_t *ecn, uint64_t *c) noexcept nogil:
    """Rules X1-X2 for the frame frame[0:len] read from the TAP tap_fd: VERDICT_SEND with
    r.map_index, r.dst (the underlay host) and *ecn (the outer ECN) set, or a drop."""
    cdef const uint8_t *p = frame + ETH_HLEN
    cdef uint32_t n, ihl, key, under
    cdef uint16_t ethertype
    cdef const fan_map *m
    cdef int i
    r.reason = -1
    r.map_index = -1
    ecn[0] = ECN_NOT_ECT
    if len < ETH_HLEN:
        return drop(c, r, DROP_TX_MALFORMED)
    n = len - ETH_HLEN
    ethertype = load16(frame + ETH_OFF_TYPE)
    # X1: the key is the inner IPv4 destination, or the ARP target address
    if ethertype == ETH_P_IP:
        if n < IPV4_HLEN or (p[0] >> 4) != 4:
            return drop(c, r, DROP_TX_MALFORMED)
        ihl = ipv4_ihl(p)
        if ihl < IPV4_HLEN or ihl > n or load16(p + IPV4_OFF_TOT_LEN) < ihl \
                or load16(p + IPV4_OFF_TOT_LEN) > n:
            return drop(c, r, DROP_TX_MALFORMED)
        key = load32(p + IPV4_OFF_DST)
        ecn[0] = p[IPV4_OFF_TOS] & 3
        if ecn[0] == ECN_CE:    # CE -> ECT(0) as Linux does, as for IPIP (T3)
            ecn[0] = ECN_ECT0
    elif ethertype == ETH_P_ARP:
        if (n < ARP_LEN or load16(p) != 1 or load16(p + 2) != ETH_P_IP or p[4] != ETH_ALEN
                or p[5] != 4):
            return drop(c, r, DROP_TX_MALFORMED)
        key = load32(p + ARP_OFF_TPA)
    else:
        return drop(c, r, DROP_TX_ETHERTYPE)
    # A frame read from fan X's TAP travels in fan X only.
    i = fan_lookup_overlay(t, key, FAN_VXLAN)
    if i < 0 or t.maps[i].tun_fd != tap_fd:
        return drop(c, r, DROP_TX_NO_MAP)
    m = &t.maps[i]
    r.map_index = i
    # X2: the underlay host; the bridge floods frames for local containers to the TAP too
    under = fan_dest(m, key)
    r.dst = under
    if not fan_host_ok(m, under) or fan_slice_edge(m, key):
        return drop(c, r, DROP_TX_UNROUTABLE)
    if under == m.local:
        return drop(c, r, DROP_TX_TO_SELF)
    return VERDICT_SEND


cdef void vxlan_outer(const fan_map *m, uint32_t under, uint16_t ip_id, uint16_t sport,
                      uint8_t ecn, uint8_t *o, uint32_t frame_len, const uint8_t *body,
                      uint32_t body_len) noexcept nogil:
    """Rule X3: write the outer IPv4, UDP and VXLAN headers at o, in front of a frame of
    frame_len bytes whose first frame_len - body_len bytes follow them and whose last
    body_len bytes are at body (a segment's payload, left where read() put it). The part
    that follows the headers has an even length, so the checksum can be summed in two."""
    cdef uint8_t *u = o + IPV4_HLEN
    cdef uint32_t ulen = UDP_HLEN + VXLAN_HLEN + frame_len
    cdef uint64_t acc
    cdef uint16_t csum
    o[0] = IPV4_VER_IHL
    o[IPV4_OFF_TOS] = ecn
    store16(o + IPV4_OFF_TOT_LEN, IPV4_HLEN + ulen)
    store16(o + IPV4_OFF_ID, ip_id)
    store16(o + IPV4_OFF_FRAG, 0)       # DF clear, as the kernel's vxlan sends
    o[IPV4_OFF_TTL] = VXLAN_TTL
    o[IPV4_OFF_PROTO] = IPPROTO_UDP
    store32(o + IPV4_OFF_SRC, m.local)
    store32(o + IPV4_OFF_DST, under)
    ipv4_set_header_csum(o, IPV4_HLEN)
    store16(u + UDP_OFF_SPORT, sport)
    store16(u + UDP_OFF_DPORT, m.port)
    store16(u + UDP_OFF_LEN, ulen)
    memset(u + UDP_OFF_CSUM, 0, 2)
    u[UDP_HLEN] = VXLAN_FLAG_I
    memset(u + UDP_HLEN + 1, 0, 3)
    store32(u + UDP_HLEN + 4, m.vni << 8)
    # A full UDP checksum, as the kernel's vxlan sends (receivers accept a zero one, but a
    # middlebox may not): ~80 ns for 1500 bytes.
    acc = acc_add(pseudo_header(o, IPPROTO_UDP, ulen), csum_add(u, ulen - body_len, 0))
    if body_len:
        acc = acc_add(acc, csum_add(body, body_len, 0))
    csum = csum_fold(acc)
    if csum == 0:
        csum = 0xffff
    memcpy(u + UDP_OFF_CSUM, &csum, 2)


cdef int vxlan_encap_one(const fan_table *t, int tap_fd, uint16_t *ip_id, uint8_t *frame,
                         uint32_t len, result *r, uint64_t *c) noexcept nogil:
    """Encapsulate the frame frame[0:len] read from the TAP tap_fd (rules X1-X3). frame
    must have VXLAN_OUTER writable bytes in front of it: the outer headers go there."""
    cdef uint8_t ecn
    cdef const fan_map *m
    cdef int v = vxlan_route(t, tap_fd, frame, len, r, &ecn, c)
    if v != VERDICT_SEND:
        return v
    m = &t.maps[r.map_index]
    ip_id[0] += 1
    vxlan_outer(m, r.dst, ip_id[0], vxlan_source_port(frame, len, t.hash_seed), ecn,
                frame - VXLAN_OUTER, len, NULL, 0)
    r.out_len = VXLAN_OUTER + len
    if r.out_len > m.mtu:
        inc(c, TX_FRAGMENTED)   # sent as outer fragments (DF is clear), as the kernel would
    return VERDICT_SEND


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
    o[0] = IPV4_VER_IHL
    o[IPV4_OFF_TOS] = tos
    store16(o + IPV4_OFF_TOT_LEN, IPV4_HLEN + ulen)
    store16(o + IPV4_OFF_ID, ip_id)
    store16(o + IPV4_OFF_FRAG, 0)
    o[IPV4_OFF_TTL] = VXLAN_TTL
    o[IPV4_OFF_PROTO] = IPPROTO_UDP
    store32(o + IPV4_OFF_SRC, m.local)
    store32(o + IPV4_OFF_DST, rt.dst)
    ipv4_set_header_csum(o, IPV4_HLEN)
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


cdef int vxlan_decap_one(const fan_table *t, const mac_set *macs, uint16_t port,
                         uint32_t osrc, uint32_t odst, uint8_t otos, uint8_t *buf,
                         uint32_t len, result *r, uint64_t *c) noexcept nogil:
    """Check the UDP payload buf[0:len] that arrived on `port` from osrc for the outer
    destination odst with outer TOS otos (rules V1-V6 in order); macs: this host's own
    MACs on its fan bridges (NULL: none known). On VERDICT_DELIVER the frame is at
    buf + r.off."""
    cdef uint8_t *f = buf + VXLAN_HLEN
    cdef uint8_t *p
    cdef uint32_t n, pn, ihl, vni, key, ksrc
    cdef uint16_t ethertype
    cdef const fan_map *m
    cdef int i
    r.reason = -1
    r.map_index = -1
    ihl = 0
    # V1: a whole VXLAN header and Ethernet header; flags exactly I, reserved bits zero
    # (the kernel drops anything else too); the VNI of a VXLAN fan on this port
    if len < VXLAN_HLEN + ETH_HLEN:
        return drop(c, r, DROP_RX_TRUNCATED)
    if buf[0] != VXLAN_FLAG_I or buf[1] or buf[2] or buf[3] or buf[7]:
        return drop(c, r, DROP_RX_BAD_VXLAN)
    vni = load32(buf + 4) >> 8
    i = -1
    for i in range(t.n):
        if t.maps[i].kind == FAN_VXLAN and t.maps[i].vni == vni and t.maps[i].port == port:
            break
    else:
        return drop(c, r, DROP_RX_UNKNOWN_VNI)
    m = &t.maps[i]
    # V2: the outer source is in that fan's underlay (the kernel does not check)
    if (osrc & m.underlay_mask) != m.underlay:
        return drop(c, r, DROP_RX_SRC_NOT_UNDERLAY)
    # ... and sent to this host's underlay address, as IPIP's R2: the socket also takes
    # datagrams to the underlay broadcast (one reaches every host) and to any other
    # address of the host (another link's, reachable by whoever is on that link)
    if odst != m.local:
        return drop(c, r, DROP_RX_OUTER_DST)
    # V3: IPv4 (well-formed; Ethernet padding after it is allowed) or Ethernet/IPv4 ARP,
    # and not from our own bridge's MAC
    n = len - VXLAN_HLEN
    p = f + ETH_HLEN
    pn = n - ETH_HLEN
    ethertype = load16(f + ETH_OFF_TYPE)
    if ethertype == ETH_P_IP:
        if pn < IPV4_HLEN or (p[0] >> 4) != 4:
            return drop(c, r, DROP_RX_BAD_INNER)
        ihl = ipv4_ihl(p)
        if ihl < IPV4_HLEN or ihl > pn or load16(p + IPV4_OFF_TOT_LEN) < ihl \
                or load16(p + IPV4_OFF_TOT_LEN) > pn:
            return drop(c, r, DROP_RX_BAD_INNER)
        if not ipv4_header_csum_ok(p, ihl):
            return drop(c, r, DROP_RX_BAD_INNER_CSUM)
        key = load32(p + IPV4_OFF_DST)
        ksrc = load32(p + IPV4_OFF_SRC)
    elif ethertype == ETH_P_ARP:
        if (pn < ARP_LEN or load16(p) != 1 or load16(p + 2) != ETH_P_IP or p[4] != ETH_ALEN
                or p[5] != 4):
            return drop(c, r, DROP_RX_BAD_INNER)
        key = load32(p + ARP_OFF_TPA)
        ksrc = load32(p + ARP_OFF_SPA)
    else:
        return drop(c, r, DROP_RX_BAD_INNER)
    if memcmp(f + ETH_OFF_SRC, m.dev_mac, ETH_ALEN) == 0:
        return drop(c, r, DROP_RX_OWN_MAC)
    # ... nor from a MAC on this host's side of a fan bridge: the TAP port does not learn
    # (plumbing.py), and a local container's MAC from the wire is forged
    if mac_set_has(macs, f + ETH_OFF_SRC):
        return drop(c, r, DROP_RX_LOCAL_MAC)
    # ... nor DHCP: the bridge's dnsmasq cannot tell a frame from the TAP from a local
    # container's, and a peer could lease its whole pool (the transmit side never sends
    # DHCP either: a container's broadcast has no fan destination)
    if (ethertype == ETH_P_IP and p[IPV4_OFF_PROTO] == IPPROTO_UDP
            and ihl + 4 <= load16(p + IPV4_OFF_TOT_LEN)
            and (load16(p + IPV4_OFF_FRAG) & IPV4_FRAG_OFFSET_MASK) == 0
            and (load16(p + ihl + UDP_OFF_DPORT) == DHCP_SERVER
                 or load16(p + ihl + UDP_OFF_DPORT) == DHCP_CLIENT)):
        return drop(c, r, DROP_RX_DHCP)
    # V4: for this host's slice, and not its network or broadcast address
    if (key & m.slice_mask) != m.slice_net or fan_slice_edge(m, key):
        return drop(c, r, DROP_RX_NOT_LOCAL)
    # V5: the sender may only speak for its own slice (the kernel does not check)
    if t.check_spoof and ((ksrc & m.overlay_mask) != m.overlay or fan_dest(m, ksrc) != osrc):
        return drop(c, r, DROP_RX_SPOOFED_SRC)
    # V6: RFC 6040 ECN, for IPv4 inside
    if ethertype == ETH_P_IP and not ecn_decapsulate(otos & 3, p, c):
        return drop(c, r, DROP_RX_ECN_CE_NOT_ECT)
    r.map_index = i
    r.off = VXLAN_HLEN
    r.out_len = n
    return VERDICT_DELIVER


# -- receive: datagrams to TAP writes, TCP segments coalesced -----------------------------
# The kernel's UDP GRO hands over up to 64 KiB of one UDP flow's consecutive datagrams in
# one buffer, all of one size but the last. Each is checked on its own (vxlan_decap_one);
# consecutive TCP segments of one inner flow are appended to the pending output in place
# (the payload moves back over headers already read), which is written to the TAP as one
# superpacket when the next frame cannot join it. One output pending at a time: it is
# always the newest, so appending never overwrites anything not yet read or written.

cdef struct vx_rx:
    const fan_table *t
    const mac_set *macs
    uint64_t *c
    rx_out o                    # the pending output (an inner IPv4 packet in its frame)
    bint pending
    int refused                 # GSO types a TAP refused: not merged by this loop again


cdef void vx_flush(vx_rx *x) noexcept nogil:
    """Write the pending output to its map's TAP."""
    cdef rx_out *o = &x.o
    cdef const fan_map *m
    cdef int fd
    if not x.pending:
        return
    x.pending = False
    m = &x.t.maps[o.map_index]
    rx_finish(o, ETH_HLEN)
    fd = rx_queue_fd(m, o.pkt if load16(o.pkt - ETH_HLEN + ETH_OFF_TYPE) == ETH_P_IP else NULL,
                     o.len)
    rx_count(o, rx_write(fd, o, ETH_HLEN, m.dev_gso & ~x.refused, &x.refused, x.c), x.c)


cdef void vx_take(vx_rx *x, uint8_t *f, uint32_t flen, int map_index,
                  uint32_t room) noexcept nogil:
    """A delivered frame: appended to the pending output if it continues its TCP flow, or
    its UDP flow with a datagram no larger than the first (same MACs, the rules of
    rx_gather), else the pending output is written and this frame becomes the pending
    one. room: how far its IPv4 packet may grow in its buffer."""
    cdef uint8_t *p = f + ETH_HLEN
    cdef uint32_t plen = flen - ETH_HLEN, thl = 0
    cdef uint8_t flags = 0
    cdef bint candidate = False, udp = False
    cdef rx_out *o = &x.o
    cdef int gso_ok = x.t.maps[map_index].dev_gso & ~x.refused
    if (load16(f + ETH_OFF_TYPE) == ETH_P_IP and plen >= IPV4_HLEN and p[0] == IPV4_VER_IHL
            and load16(p + IPV4_OFF_TOT_LEN) == plen):
        if p[IPV4_OFF_PROTO] == IPPROTO_UDP:
            udp = udp_candidate(p, plen)
        else:
            thl = tcp_header_len(p, plen)
    if udp:
        thl = UDP_HLEN
        candidate = (gso_ok & DEV_GSO_UDP_L4) != 0
        if (candidate and x.pending and o.udp and o.map_index == map_index
                and memcmp(o.pkt - ETH_HLEN, f, ETH_HLEN) == 0
                and udp_same_flow(o.pkt, p) and udp_append(o, p, plen)):
            o.bytes += ETH_HLEN
            return
    elif thl:
        flags = p[IPV4_HLEN + TCP_OFF_FLAGS]
        candidate = ((gso_ok & DEV_GSO_TCPV4) != 0
                     and (load16(p + IPV4_OFF_FRAG) & IPV4_FLAG_DF) != 0
                     and (flags == TCP_ACK or flags == (TCP_ACK | TCP_PSH)))
        if (x.pending and candidate and not o.udp and o.thl == thl
                and o.map_index == map_index
                and memcmp(o.pkt - ETH_HLEN, f, ETH_HLEN) == 0
                and gro_same_flow(o.pkt, p, thl) and gro_append(o, p, plen, thl)):
            o.bytes += ETH_HLEN
            return
    vx_flush(x)
    o.pkt = p
    o.len = plen
    o.map_index = map_index
    o.segs = 1
    o.bytes = flen
    o.thl = thl
    o.udp = udp
    o.gso_size = plen - IPV4_HLEN - thl if thl else 0
    o.open = candidate and (udp or not (flags & TCP_PSH))
    o.csum_ok = False
    o.kernel_gro = False
    o.split = False
    o.room = room if room < 0xffff else 0xffff
    x.pending = True


cdef void vx_rx_message(vx_rx *x, uint16_t port, uint32_t osrc, uint32_t odst, uint8_t otos,
                        uint8_t *buf, uint32_t total, uint32_t gso,
                        const uint8_t *buf_end) noexcept nogil:
    """One received buffer: a datagram, or (gso > 0) the kernel's UDP GRO of datagrams of
    gso bytes each but the last. Each is decapsulated and its frame taken (vx_take)."""
    cdef uint32_t step = gso if 0 < gso < total else total
    cdef uint32_t off = 0, n
    cdef result r
    cdef uint8_t *f
    if step < total:
        add(x.c, RX_UDP_GRO, (total + step - 1) // step)
    if total == 0:          # an empty datagram is one too: V1 counts it (drop_rx_truncated)
        vxlan_decap_one(x.t, x.macs, port, osrc, odst, otos, buf, 0, &r, x.c)
    while off < total:
        n = total - off if total - off < step else step
        if vxlan_decap_one(x.t, x.macs, port, osrc, odst, otos, buf + off, n, &r,
                           x.c) == VERDICT_DELIVER:
            f = buf + off + r.off
            vx_take(x, f, r.out_len, r.map_index, <uint32_t>(buf_end - f - ETH_HLEN))
        off += n


cdef void rx_cmsgs(msghdr *h, uint8_t *tos, uint32_t *gso, uint32_t *dst,
                   uint64_t *c) noexcept nogil:
    """The outer TOS (IP_TOS, asked for with IP_RECVTOS), the UDP GRO segment size and
    the outer destination (IP_PKTINFO's ipi_addr, host order) of a received message, 0 for
    what it does not carry; and the socket's drop count (SO_RXQ_OVFL) into c's
    DROP_RX_SOCKET_FULL."""
    cdef cmsghdr *cm = CMSG_FIRSTHDR(h)
    cdef int v
    cdef uint32_t dropped
    tos[0] = 0
    gso[0] = 0
    dst[0] = 0
    while cm != NULL:
        if cm.cmsg_level == IPPROTO_IP and cm.cmsg_type == IP_TOS:
            tos[0] = CMSG_DATA(cm)[0]
        elif cm.cmsg_level == IPPROTO_IP and cm.cmsg_type == IP_PKTINFO:
            dst[0] = load32(CMSG_DATA(cm) + 8)
        elif cm.cmsg_level == SOL_UDP_ and cm.cmsg_type == UDP_GRO_:
            memcpy(&v, CMSG_DATA(cm), sizeof(int))
            gso[0] = <uint32_t>v if v > 0 else 0
        elif cm.cmsg_level == SOL_SOCKET and cm.cmsg_type == SO_RXQ_OVFL:
            memcpy(&dropped, CMSG_DATA(cm), sizeof(uint32_t))
            c[<int>DROP_RX_SOCKET_FULL] = dropped   # the socket's total: one socket a block
        cm = CMSG_NXTHDR(h, cm)
