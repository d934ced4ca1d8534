# The VXLAN fan (included by fastpath.pyx): Ethernet frames from a fan bridge's TAP port,
# steered by the inner IPv4 destination or the ARP target, carried in UDP (docs/spec.md
# §6, transmit rules X1-X3, receive rules V1-V6).
#
# This unit holds the protocol, one frame or datagram at a time; the queues around it are
# tx.pxi's and rx.pxi's, which include VXLAN's offloads.
# Transmit: run_tx reads a frame from the TAP -> tx_packet -> tx_frame (tx.pxi):
# vxlan_encap_one writes outer IPv4 + UDP + VXLAN (VXLAN_OUTER bytes) into the headroom in
# front of the frame -> the lanes of tx.pxi send it like an IPIP packet (the raw socket
# takes any IPv4 packet with IP_HDRINCL), or a UDP GSO send takes it with the frames of
# its flow (tx_run_add). A TCP superpacket (TSO) -> tx_frame_tso (tx.pxi), whose segments
# get their headers from vxlan_outer.
# Receive: run_rx_vxlan takes datagrams from the fan port's UDP socket (the kernel has
# checked the outer IPv4 and UDP, checksum included), with the outer source, destination
# (IP_PKTINFO: the socket is bound to 0.0.0.0) and TOS beside them -> vx_rx_message
# (rx.pxi) -> vxlan_decap_one -> the frame is written to the map's TAP.

cdef enum:
    VXLAN_TTL = 64              # the route's hop limit, as the kernel's vxlan sends (not
                                # the inner TTL: the frame is switched, not routed)
    DHCP_SERVER = 67            # UDP ports of DHCP (RFC 2131): it never crosses a fan
    DHCP_CLIENT = 68


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
    # DF clear, as the kernel's vxlan sends
    ipv4_outer(o, ecn, IPV4_HLEN + ulen, ip_id, 0, VXLAN_TTL, IPPROTO_UDP, m.local, under)
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
