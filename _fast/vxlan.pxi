# The VXLAN fan (included by fastpath.pyx): Ethernet frames from a fan bridge's TAP port,
# steered by the inner IPv4 destination or the ARP target, carried in UDP (docs/design.md
# §12, transmit rules X1-X3, receive rules V1-V6).
#
# Transmit: run_tx reads a frame from the TAP -> tx_packet -> vxlan_encap_one writes outer
# IPv4 + UDP + VXLAN (VXLAN_OUTER bytes) into the headroom in front of the frame -> the
# lanes of tx.pxi send it like an IPIP packet (the raw socket takes any IPv4 packet with
# IP_HDRINCL). Receive: run_rx_vxlan takes datagrams from the fan port's UDP socket (the
# kernel has checked the outer IPv4 and UDP, checksum included), with the outer source
# and TOS beside them -> vxlan_decap_one -> the frame is written to the map's TAP.

cdef enum:
    VXLAN_TTL = 64              # the route's hop limit, as the kernel's vxlan sends (not
                                # the inner TTL: the frame is switched, not routed)
    RX_OFF = 16                 # receive offset in a slot: room for the virtio header
                                # in front of the frame (VXLAN_HLEN + RX_OFF >= VNET_HLEN)
    RX_CTL = 64                 # control buffer per message: one IP_TOS cmsg


cdef int vxlan_encap_one(const fan_table *t, int tap_fd, uint16_t *ip_id, uint8_t *frame,
                         uint32_t len, result *r, uint64_t *c) noexcept nogil:
    """Encapsulate the frame frame[0:len] read from the TAP tap_fd (rules X1-X3). frame
    must have VXLAN_OUTER writable bytes in front of it: the outer headers go there."""
    cdef uint8_t *p = frame + ETH_HLEN
    cdef uint32_t n, ihl, key, under, ulen
    cdef uint16_t ethertype, csum
    cdef uint8_t ecn = ECN_NOT_ECT
    cdef const fan_map *m
    cdef uint8_t *o
    cdef uint8_t *u
    cdef int i
    r.reason = -1
    r.map_index = -1
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
        ecn = p[IPV4_OFF_TOS] & 3
        if ecn == ECN_CE:       # CE -> ECT(0) as Linux does, as for IPIP (T3)
            ecn = ECN_ECT0
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
    if not fan_host_ok(m, under):
        return drop(c, r, DROP_TX_UNROUTABLE)
    if under == m.local:
        return drop(c, r, DROP_TX_TO_SELF)
    # X3: outer IPv4 (DF clear, as the kernel's vxlan sends), UDP, VXLAN
    o = frame - VXLAN_OUTER
    o[0] = 0x45
    o[IPV4_OFF_TOS] = ecn
    store16(o + IPV4_OFF_TOT_LEN, VXLAN_OUTER + len)
    ip_id[0] += 1
    store16(o + IPV4_OFF_ID, ip_id[0])
    store16(o + IPV4_OFF_FRAG, 0)
    o[IPV4_OFF_TTL] = VXLAN_TTL
    o[IPV4_OFF_PROTO] = IPPROTO_UDP
    store32(o + IPV4_OFF_SRC, m.local)
    store32(o + IPV4_OFF_DST, under)
    ipv4_set_header_csum(o, IPV4_HLEN)
    u = o + IPV4_HLEN
    ulen = UDP_HLEN + VXLAN_HLEN + len
    store16(u + UDP_OFF_SPORT, vxlan_source_port(frame, len, t.hash_seed))
    store16(u + UDP_OFF_DPORT, m.port)
    store16(u + UDP_OFF_LEN, ulen)
    memset(u + UDP_OFF_CSUM, 0, 2)
    u[UDP_HLEN] = VXLAN_FLAG_I
    memset(u + UDP_HLEN + 1, 0, 3)
    store32(u + UDP_HLEN + 4, m.vni << 8)
    # A full UDP checksum, as the kernel's vxlan sends (receivers accept a zero one, but a
    # middlebox may not): ~80 ns for 1500 bytes.
    csum = csum_fold(acc_add(pseudo_header(o, IPPROTO_UDP, ulen), csum_add(u, ulen, 0)))
    if csum == 0:
        csum = 0xffff
    memcpy(u + UDP_OFF_CSUM, &csum, 2)
    r.out_len = VXLAN_OUTER + len
    if r.out_len > m.mtu:
        inc(c, TX_FRAGMENTED)   # sent as outer fragments (DF is clear), as the kernel would
    return VERDICT_SEND


cdef int vxlan_decap_one(const fan_table *t, uint16_t port, uint32_t osrc, uint8_t otos,
                         uint8_t *buf, uint32_t len, result *r, uint64_t *c) noexcept nogil:
    """Check the UDP payload buf[0:len] that arrived on `port` from osrc with outer TOS
    otos (rules V1-V6 in order). On VERDICT_DELIVER the frame is at buf + r.off."""
    cdef uint8_t *f = buf + VXLAN_HLEN
    cdef uint8_t *p
    cdef uint32_t n, pn, ihl, vni, key, ksrc
    cdef uint16_t ethertype
    cdef const fan_map *m
    cdef int i
    r.reason = -1
    r.map_index = -1
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
    # V4: for this host's slice
    if (key & m.slice_mask) != m.slice_net:
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
