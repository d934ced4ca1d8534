# The IPIP fan (included by fastpath.pyx): an overlay packet from the TUN in an outer IPv4
# header (encap_one, rules T1-T5), and an IPIP datagram from the raw socket back to the
# overlay packet it carries (decap_one, rules R1-R7; docs/spec.md §4). Each takes one
# packet and returns a Verdict (fastpath.pxd); the queues around them are tx.pxi's and
# rx.pxi's.


cdef bint icmp_source_ok(const fan_table *t, const uint8_t *pkt) noexcept nogil:
    """A source a Fan slice cannot hold (its network or broadcast address) is no single
    host (RFC 1812 4.3.2.7): no ICMP to it. icmp_frag_needed checks the rest."""
    cdef uint32_t src = load32(pkt + IPV4_OFF_SRC)
    cdef int j = fan_lookup_overlay(t, src, FAN_ANY)
    return j < 0 or not fan_slice_edge(&t.maps[j], src)


cdef int encap_one(const fan_table *t, uint16_t *ip_id, uint8_t *pkt, uint32_t len,
                   uint32_t wire, result *r, uint8_t *icmp_out, icmp_budget *budget,
                   uint64_t *c) noexcept nogil:
    """Encapsulate the overlay packet pkt[0:len] (docs/spec.md §4, rules T1-T5).

    pkt must have IPV4_HLEN writable bytes in front of it: the outer header goes there, so
    the payload is never copied. wire is the largest inner packet that will go out: 0 for
    the packet itself, the first segment's size for a TSO superpacket (whose outer header
    is then the template of every segment's).
    """
    cdef uint32_t ihl, tot, dst, under, frag
    cdef const fan_map *m
    cdef uint8_t ecn
    cdef bint tso
    cdef int i
    r.reason = -1
    r.map_index = -1
    if len < 1 or (pkt[0] >> 4) != 4:
        return drop(c, r, DROP_TX_NOT_IPV4)
    ihl = ipv4_ihl(pkt)
    if len < IPV4_HLEN or ihl < IPV4_HLEN or ihl > len:
        return drop(c, r, DROP_TX_MALFORMED)
    tot = load16(pkt + IPV4_OFF_TOT_LEN)
    if tot < ihl or tot > len:
        return drop(c, r, DROP_TX_MALFORMED)
    len = tot                   # anything past the total length is padding, not packet
    dst = load32(pkt + IPV4_OFF_DST)
    i = fan_lookup_overlay(t, dst, FAN_IPIP)
    if i < 0:
        return drop(c, r, DROP_TX_NO_MAP)
    m = &t.maps[i]
    r.map_index = i
    under = fan_dest(m, dst)
    r.dst = under
    if not fan_host_ok(m, under) or fan_slice_edge(m, dst):
        return drop(c, r, DROP_TX_UNROUTABLE)
    if under == m.local:
        # T4: the kernel delivers an address this host holds before it routes anything
        # to the TUN, and reaches containers through the bridge. So this address is held
        # by no one: written back, it would come straight back, until its TTL ran out.
        return drop(c, r, DROP_TX_LOCAL_UNUSED)
    frag = load16(pkt + IPV4_OFF_FRAG)
    tso = wire != 0
    if not tso:
        wire = len
    if wire + IPV4_HLEN > m.mtu:
        if frag & IPV4_FLAG_DF:
            inc(c, DROP_TX_TOO_BIG)
            r.reason = DROP_TX_TOO_BIG
            r.out_len = 0
            if icmp_source_ok(t, pkt):
                r.out_len = icmp_frag_needed(icmp_out, pkt, len, m.gateway,
                                             <uint16_t>(m.mtu - IPV4_HLEN), ip_id[0] + 1)
            if r.out_len and not icmp_allow(budget):
                inc(c, TX_ICMP_RATE_LIMITED)
                r.out_len = 0
            if r.out_len:
                ip_id[0] += 1
                inc(c, TX_ICMP_FRAG_NEEDED)
                return VERDICT_ICMP
            return VERDICT_DROP
        if tso or len + IPV4_HLEN > 0xffff:
            # A TSO superpacket without DF whose segments do not fit: no sane TCP sends one
            # (the TUN's MTU is underlay - 20), and splitting segments into fragments too
            # is not worth the code. An inner packet of 65516 bytes or more has no outer
            # total length: its fragments could never be reassembled.
            return drop(c, r, DROP_TX_TOO_BIG)
        # Without DF the sender allows fragmentation: the outer packet is built whole here
        # and sent as fragments (tx_fragments), as the kernel's ipip would.
        inc(c, TX_FRAGMENTED)
    # Copy ECN but never send CE outside (a CE inner is encapsulated as ECT(0)), as Linux
    # does (RFC 3168 §9.1.1; RFC 6040's normal mode would copy CE). DSCP is not copied
    # (T3: DSCP 0).
    ecn = pkt[IPV4_OFF_TOS] & 3
    if ecn == ECN_CE:
        ecn = ECN_ECT0
    # One sequence per host, which the loops take in blocks (tx.pxi id_reserve): an ID
    # repeats only after about 65536 packets from this host, and only DF=0 packets
    # (which may be fragmented) need it unique (RFC 6864).
    ip_id[0] += 1
    ipv4_outer(pkt - IPV4_HLEN, ecn, len + IPV4_HLEN, ip_id[0], frag & IPV4_FLAG_DF,
               pkt[IPV4_OFF_TTL], IPPROTO_IPIP, m.local, under)
    r.out_len = len + IPV4_HLEN
    return VERDICT_SEND


cdef int decap_one(const fan_table *t, uint8_t *buf, uint32_t len, result *r,
                   uint64_t *c) noexcept nogil:
    """Check and unwrap the IPIP datagram buf[0:len] (docs/spec.md §4, rules R1-R7 in order).

    The outer header checksum is not verified: the kernel's ip_rcv did that before the raw
    socket saw the datagram, and reassembly rewrites it.
    """
    cdef uint32_t ihl, iihl, ilen, osrc, idst, isrc
    cdef uint8_t *inner
    cdef const fan_map *m
    cdef int i, j
    r.reason = -1
    r.map_index = -1
    if len < IPV4_HLEN:
        return drop(c, r, DROP_RX_TRUNCATED)
    ihl = ipv4_ihl(buf)
    if ((buf[0] >> 4) != 4 or ihl < IPV4_HLEN or ihl > len
            or load16(buf + IPV4_OFF_TOT_LEN) != len
            or (load16(buf + IPV4_OFF_FRAG) & (IPV4_FLAG_MF | IPV4_FRAG_OFFSET_MASK))):
        return drop(c, r, DROP_RX_BAD_OUTER)
    if buf[IPV4_OFF_PROTO] != IPPROTO_IPIP:
        return drop(c, r, DROP_RX_NOT_IPIP)
    osrc = load32(buf + IPV4_OFF_SRC)
    j = fan_lookup_underlay(t, osrc, FAN_IPIP)
    if j < 0:
        return drop(c, r, DROP_RX_SRC_NOT_UNDERLAY)
    # A peer sends to the host that owns a slice, never to a broadcast: the raw socket
    # sees IPIP to the underlay broadcast too, and one such datagram reaches every host.
    if load32(buf + IPV4_OFF_DST) != t.maps[j].local:
        return drop(c, r, DROP_RX_OUTER_DST)
    inner = buf + ihl
    ilen = len - ihl
    if ilen < IPV4_HLEN or (inner[0] >> 4) != 4:
        return drop(c, r, DROP_RX_BAD_INNER)
    iihl = ipv4_ihl(inner)
    if iihl < IPV4_HLEN or iihl > ilen or load16(inner + IPV4_OFF_TOT_LEN) != ilen:
        return drop(c, r, DROP_RX_BAD_INNER)
    if not ipv4_header_csum_ok(inner, iihl):
        return drop(c, r, DROP_RX_BAD_INNER_CSUM)
    idst = load32(inner + IPV4_OFF_DST)
    i = fan_lookup_overlay(t, idst, FAN_IPIP)
    if (i < 0 or (idst & t.maps[i].slice_mask) != t.maps[i].slice_net
            or fan_slice_edge(&t.maps[i], idst)):
        return drop(c, r, DROP_RX_NOT_LOCAL)
    if t.check_spoof:
        # A host may only send from its own slice: the inner source must map back to the
        # outer source. The original kernel decapsulates IPIP from anyone.
        isrc = load32(inner + IPV4_OFF_SRC)
        j = fan_lookup_overlay(t, isrc, FAN_IPIP)
        if j < 0 or fan_dest(&t.maps[j], isrc) != osrc:
            return drop(c, r, DROP_RX_SPOOFED_SRC)
    if not ecn_decapsulate(buf[IPV4_OFF_TOS] & 3, inner, c):
        return drop(c, r, DROP_RX_ECN_CE_NOT_ECT)
    r.map_index = i
    r.off = ihl
    r.out_len = ilen
    return VERDICT_DELIVER
