# Receive with TUN offloads, for both fans (included by fastpath.pyx after ipip.pxi and
# vxlan.pxi, whose decapsulations it calls). A burst of datagrams from recvmmsg is
# decapsulated (decap_one); consecutive TCP segments of one flow in it are appended to the
# first (GRO) and written as one superpacket, which the kernel takes as already
# checksummed (NEEDS_CSUM) - so every segment's TCP checksum is verified before it
# is merged. Consecutive UDP datagrams of one flow, of one size (the last may be shorter),
# are coalesced the same way into a UDP GSO superpacket (VNET_GSO_UDP_L4), which the
# kernel splits into the same datagrams again: one TUN write for up to 64 of them. Only the
# newest superpacket of a flow takes more, so a flow's order is kept.
#
# Both kinds of superpacket need the device to take their GSO type in a write: UDP_L4
# only since Linux 6.2. A map's dev_gso says what its device took when it was probed, and
# only that is merged; a superpacket refused at run time all the same (EINVAL) is written
# segment by segment (rx_write_segments) and its type is not merged again by that loop.

cdef enum:
    GRO_SCAN = 8                # how far back a segment looks for its flow
    RX_OFF = 16                 # receive offset in a slot: room for the virtio header
                                # in front of the frame (VXLAN_HLEN + RX_OFF >= VNET_HLEN)
    RX_CTL = 128                # control buffer per message: IP_TOS, UDP_GRO and
                                # SO_RXQ_OVFL cmsgs, 24 bytes each, IP_PKTINFO's 32
    SOL_UDP_ = 17               # <netinet/udp.h> SOL_UDP and UDP_GRO: the kernel hands
    UDP_GRO_ = 104              # over consecutive datagrams of a flow in one buffer

cdef struct rx_out:
    uint8_t *pkt                # inner packet; VNET_HLEN free bytes in front of it
    uint32_t len
    int map_index
    uint32_t segs               # underlay packets in it
    uint32_t bytes              # their inner bytes
    uint32_t gso_size           # payload of the first segment
    uint32_t thl                # TCP (or UDP) header length; 0: nothing may join it
    bint tcp                    # a TCP packet (any): conn identifies its connection
    bint udp                    # a UDP packet (any): the same
    bint ports                  # conn holds its ports (not a non-first fragment)
    uint8_t conn[12]            # source and destination address, source and dest port
    uint32_t room               # the most IPv4 bytes pkt may grow to in its buffer
    bint open                   # may take more segments
    bint csum_ok                # the first segment's TCP checksum was verified
    bint kernel_gro             # merged by the underlay's GRO before we saw it
    bint split                  # written segment by segment (rx_write)


cdef inline int rx_queue_fd(const fan_map *m, const uint8_t *ip, uint32_t len) noexcept nogil:
    """The queue of m's device that a decapsulated packet is written to (ip: its IPv4
    header and len bytes, or NULL for a frame without one). By its flow: a TUN or TAP
    sends a flow to the queue that last wrote it (tun_automq_select_queue), so writing
    every flow to queue 0 would put all their replies on one transmit loop."""
    if m.n_queues <= 1 or ip == NULL or len < IPV4_HLEN:
        return m.tun_fd
    return m.queue_fds[(<uint64_t>flow_hash(ip, len, 0) * <uint32_t>m.n_queues) >> 32]


cdef bint gro_append(rx_out *o, uint8_t *p, uint32_t len, uint32_t thl) noexcept nogil:
    """Append segment p (same flow as o) to o if it continues it; False if it must start
    a superpacket of its own."""
    cdef uint32_t pay = len - IPV4_HLEN - thl
    cdef uint32_t have = o.len - IPV4_HLEN - o.thl
    cdef uint8_t flags = p[IPV4_HLEN + TCP_OFF_FLAGS]
    if not o.open or pay > o.gso_size or o.len + pay > o.room:
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
    # memmove: in a VXLAN datagram the kernel's UDP GRO coalesced, the payload moves back
    # over the headers just read (vxlan.pxi)
    memmove(o.pkt + o.len, p + IPV4_HLEN + thl, pay)
    o.len += pay
    o.segs += 1
    o.bytes += len
    if flags & TCP_PSH:
        o.pkt[IPV4_HLEN + TCP_OFF_FLAGS] |= TCP_PSH
        o.open = False          # PSH ends a superpacket, as the kernel's GRO does
    if pay < o.gso_size:
        o.open = False          # only the last segment may be short
    return True


cdef bint udp_append(rx_out *o, uint8_t *p, uint32_t len) noexcept nogil:
    """Append datagram p (same flow and header fields as o) to o if it fits the
    superpacket: no larger than the first, room left, under GSO_SEGS. Each datagram's
    UDP checksum is verified first: the kernel recomputes them all when it splits."""
    cdef uint32_t pay = len - IPV4_HLEN - UDP_HLEN
    if (not o.open or pay > o.gso_size or o.len + pay > o.room
            or o.segs >= GSO_SEGS):
        return False
    if not o.csum_ok:
        if not udp_csum_ok(o.pkt, o.len):
            o.open = False
            return False
        o.csum_ok = True
    if not udp_csum_ok(p, len):
        return False
    memmove(o.pkt + o.len, p + IPV4_HLEN + UDP_HLEN, pay)
    o.len += pay
    o.segs += 1
    o.bytes += len
    if pay < o.gso_size:
        o.open = False          # only the last datagram may be short
    return True


cdef bint udp_candidate(const uint8_t *p, uint32_t len) noexcept nogil:
    """May this UDP packet start or join a UDP GSO superpacket? IPv4 without options, not
    a fragment, a UDP length that matches, and a payload (a zero-length one has no
    gso_size)."""
    return (p[0] == IPV4_VER_IHL and len > IPV4_HLEN + UDP_HLEN
            and not (load16(p + IPV4_OFF_FRAG) & (IPV4_FLAG_MF | IPV4_FRAG_OFFSET_MASK))
            and load16(p + IPV4_HLEN + UDP_OFF_LEN) == len - IPV4_HLEN)


cdef bint tcp_connection(const uint8_t *p, uint32_t len, uint8_t *conn,
                         bint *ports) noexcept nogil:
    """Is p[0:len] (a well-formed IPv4 packet) TCP or UDP, of any shape - no payload, IP
    options, a fragment? If so conn gets its addresses, and its ports where the packet
    carries them (ports[0] False for a non-first fragment)."""
    cdef uint32_t ihl = ipv4_ihl(p)
    if p[IPV4_OFF_PROTO] != IPPROTO_TCP and p[IPV4_OFF_PROTO] != IPPROTO_UDP:
        return False
    memcpy(conn, p + IPV4_OFF_SRC, 8)
    ports[0] = ((load16(p + IPV4_OFF_FRAG) & IPV4_FRAG_OFFSET_MASK) == 0
                and ihl + 4 <= len)
    if ports[0]:
        memcpy(conn + 8, p + ihl, 4)
    return True


cdef inline bint same_connection(const rx_out *o, const uint8_t *conn,
                                 bint ports) noexcept nogil:
    """Could o be of this connection? Without ports on either side (a fragment), the
    addresses decide: better a superpacket closed early than a segment reordered."""
    return (memcmp(o.conn, conn, 8) == 0
            and (not (o.ports and ports) or memcmp(o.conn + 8, conn + 8, 4) == 0))


cdef int rx_gather(rx_out *outs, int n, uint8_t *p, uint32_t len, int map_index,
                   uint32_t mtu, int gso_ok) noexcept nogil:
    """Add a decapsulated packet to the batch's outputs: merged into its connection's
    newest output if that can take it, else as a new output. Never into an older one: that
    would deliver the segment ahead of the packets in between. mtu is the map's underlay
    MTU; gso_ok (DEV_GSO_*) the superpackets that may be built for its device. Any TCP packet of the connection, mergeable or not (a pure ACK, a bare FIN or
    RST, one with IP options, a fragment), closes the scan: the segment after it may not
    join a superpacket before it. Returns the new number of outputs."""
    cdef uint32_t thl = 0, seg_max = 0
    cdef uint8_t flags
    cdef uint8_t conn[12]
    cdef rx_out *o
    cdef int k
    cdef bint kernel_gro = False, candidate = False, tcp, udp, ports = False
    tcp = tcp_connection(p, len, conn, &ports)
    udp = tcp and p[IPV4_OFF_PROTO] == IPPROTO_UDP
    tcp = tcp and not udp
    if udp and udp_candidate(p, len):
        thl = UDP_HLEN
        candidate = (gso_ok & DEV_GSO_UDP_L4) != 0
    elif tcp and p[0] == IPV4_VER_IHL:
        thl = tcp_header_len(p, len)
    if thl and tcp:
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
            candidate = ((gso_ok & DEV_GSO_TCPV4) != 0
                         and (load16(p + IPV4_OFF_FRAG) & IPV4_FLAG_DF) != 0
                         and (flags == TCP_ACK or flags == (TCP_ACK | TCP_PSH)))
    if tcp or udp:
        k = n - 1
        while k >= 0 and k >= n - GRO_SCAN:
            o = &outs[k]
            if (o.tcp == tcp and o.udp == udp and o.map_index == map_index
                    and same_connection(o, conn, ports)):
                if candidate and o.thl == thl and (
                        (udp and udp_same_flow(o.pkt, p) and udp_append(o, p, len))
                        or (tcp and gro_same_flow(o.pkt, p, thl)
                            and gro_append(o, p, len, thl))):
                    return n
                break
            k -= 1
    o = &outs[n]
    o.pkt = p
    o.len = len
    o.map_index = map_index
    o.segs = 1
    o.bytes = len
    o.thl = thl
    o.tcp = tcp                 # every TCP or UDP output, so that its connection stops
    o.udp = udp                 # the scan
    o.ports = ports
    memcpy(o.conn, conn, 12)
    o.room = 0xffff             # each datagram has a SLOT of its own
    o.gso_size = seg_max if kernel_gro else len - IPV4_HLEN - thl
    o.open = candidate and (udp or not (p[IPV4_HLEN + TCP_OFF_FLAGS] & TCP_PSH))
    o.csum_ok = False
    o.kernel_gro = kernel_gro
    o.split = False
    return n + 1


cdef void rx_finish(rx_out *o, uint32_t l2) noexcept nogil:
    """Put the virtio header in front of an output (and of its l2 bytes of Ethernet header
    on a TAP); a superpacket also gets its IP total length, header checksum and, in the TCP
    checksum field, the pseudo-header sum the kernel completes (NEEDS_CSUM) if it ever
    splits the superpacket again."""
    cdef vnet_hdr h
    cdef uint16_t c16
    memset(&h, 0, sizeof(h))
    if o.segs > 1 and o.udp:
        store16(o.pkt + IPV4_OFF_TOT_LEN, o.len)
        ipv4_set_header_csum(o.pkt, IPV4_HLEN)
        store16(o.pkt + IPV4_HLEN + UDP_OFF_LEN, o.len - IPV4_HLEN)
        c16 = ~csum_fold(pseudo_header(o.pkt, IPPROTO_UDP, o.len - IPV4_HLEN))
        memcpy(o.pkt + IPV4_HLEN + UDP_OFF_CSUM, &c16, 2)
        h.flags = VNET_F_NEEDS_CSUM
        h.gso_type = VNET_GSO_UDP_L4
        h.hdr_len = l2 + IPV4_HLEN + UDP_HLEN
        h.gso_size = o.gso_size
        h.csum_start = l2 + IPV4_HLEN
        h.csum_offset = UDP_OFF_CSUM
        memcpy(o.pkt - l2 - VNET_HLEN, &h, VNET_HLEN)
        return
    if o.segs > 1:
        store16(o.pkt + IPV4_OFF_TOT_LEN, o.len)
        ipv4_set_header_csum(o.pkt, IPV4_HLEN)
        c16 = ~csum_fold(pseudo_header(o.pkt, IPPROTO_TCP, o.len - IPV4_HLEN))
        memcpy(o.pkt + IPV4_HLEN + TCP_OFF_CSUM, &c16, 2)
    if o.segs > 1 or o.kernel_gro:
        h.flags = VNET_F_NEEDS_CSUM
        h.gso_type = VNET_GSO_TCPV4
        h.hdr_len = l2 + IPV4_HLEN + o.thl
        h.gso_size = o.gso_size
        h.csum_start = l2 + IPV4_HLEN
        h.csum_offset = TCP_OFF_CSUM
    memcpy(o.pkt - l2 - VNET_HLEN, &h, VNET_HLEN)


cdef inline bint rx_superpacket(const rx_out *o) noexcept nogil:
    """Does the output's write carry a GSO type (rx_finish)?"""
    return o.segs > 1 or o.kernel_gro


cdef bint rx_write_segments(int fd, rx_out *o, uint32_t l2) noexcept nogil:
    """Write a finished superpacket as the packets the kernel would have split it into
    (inet_gso_segment with __udp_gso_segment or tcp_gso_segment): gso_size bytes of
    payload each (the last may be shorter), each with its own IPv4 header, the IP ID
    counting up from the first, and its own UDP length, or TCP sequence number with FIN
    and PSH on the last segment only and CWR on the first only; every checksum complete,
    no offload asked of the kernel. Each goes out in one writev of a header built here and
    the payload where it lies. For a device that refuses the superpacket itself. False if
    a write failed (the rest is not written)."""
    cdef uint8_t hdr[VNET_HLEN + ETH_HLEN + IPV4_HLEN + 60]    # 60: the longest TCP header
    cdef iovec iov[2]
    cdef uint8_t *ip = hdr + VNET_HLEN + l2
    cdef uint8_t *l4 = ip + IPV4_HLEN
    cdef uint32_t thl = o.thl, off = IPV4_HLEN + o.thl, total = o.len - off
    cdef uint32_t done = 0, pay, k = 0, seq0 = 0
    cdef uint16_t id0 = load16(o.pkt + IPV4_OFF_ID), c16
    cdef uint8_t flags = 0, proto = IPPROTO_UDP if o.udp else IPPROTO_TCP
    cdef uint32_t csum_at = UDP_OFF_CSUM if o.udp else TCP_OFF_CSUM
    memset(hdr, 0, VNET_HLEN)                       # no offload: a plain packet
    memcpy(hdr + VNET_HLEN, o.pkt - l2, l2 + off)
    if not o.udp:
        seq0 = load32(o.pkt + IPV4_HLEN + TCP_OFF_SEQ)
        flags = o.pkt[IPV4_HLEN + TCP_OFF_FLAGS]
    iov[0].iov_base = hdr
    iov[0].iov_len = VNET_HLEN + l2 + off
    while done < total:
        pay = o.gso_size if o.gso_size and o.gso_size < total - done else total - done
        store16(ip + IPV4_OFF_TOT_LEN, off + pay)
        store16(ip + IPV4_OFF_ID, <uint16_t>(id0 + k))
        ipv4_set_header_csum(ip, IPV4_HLEN)
        if o.udp:
            store16(l4 + UDP_OFF_LEN, UDP_HLEN + pay)
        else:
            store32(l4 + TCP_OFF_SEQ, seq0 + done)
            l4[TCP_OFF_FLAGS] = flags
            if done + pay < total:
                l4[TCP_OFF_FLAGS] &= ~(TCP_FIN | TCP_PSH)
            if k > 0:
                l4[TCP_OFF_FLAGS] &= ~TCP_CWR
        l4[csum_at] = 0
        l4[csum_at + 1] = 0
        # thl is even, so the payload's words line up after the header's
        c16 = csum_fold(acc_add(pseudo_header(ip, proto, thl + pay),
                                csum_add(o.pkt + off + done, pay, csum_add(l4, thl, 0))))
        if c16 == 0 and o.udp:
            c16 = 0xffff                # 0 would mean "no checksum" to UDP
        memcpy(l4 + csum_at, &c16, 2)
        iov[1].iov_base = o.pkt + off + done
        iov[1].iov_len = pay
        if writev(fd, iov, 2) < 0:
            return False
        done += pay
        k += 1
    return True


cdef bint rx_write(int fd, rx_out *o, uint32_t l2, int gso_ok, int *refused,
                   uint64_t *c) noexcept nogil:
    """Write a finished output (virtio header, l2 bytes of Ethernet header, packet) to fd.
    A superpacket whose GSO type gso_ok (the map's dev_gso less the loop's refused) lacks,
    or that the device refuses with EINVAL, goes out segment by segment instead; a refusal
    adds its type to *refused, so that the loop merges no more of it (RX_GSO_FALLBACK)."""
    cdef int kind = DEV_GSO_UDP_L4 if o.udp else DEV_GSO_TCPV4
    o.split = False
    if fd < 0:
        return False
    if not rx_superpacket(o) or (gso_ok & kind):
        if write(fd, o.pkt - l2 - VNET_HLEN, o.len + l2 + VNET_HLEN) >= 0:
            return True
        if errno != EINVAL or not rx_superpacket(o):
            return False
        refused[0] |= kind
        inc(c, RX_GSO_FALLBACK)
    o.split = True
    return rx_write_segments(fd, o, l2)


cdef inline void rx_count(const rx_out *o, bint written, uint64_t *c) noexcept nogil:
    """The counters of one output's write."""
    if not written:
        add(c, DROP_RX_TUN_WRITE, o.segs)
        return
    add(c, RX_PACKETS, o.segs)
    add(c, RX_BYTES, o.bytes)
    if not o.split:
        add(c, RX_GRO_MERGED, o.segs - 1)


cdef int rx_batch(const fan_table *t, uint8_t *arena, const uint32_t *lens, int got,
                  rx_out *outs, int refused, uint64_t *c) noexcept nogil:
    """Decapsulate got datagrams (SLOT apart in arena) and gather what is delivered into
    outs, each finished and ready to write; refused: the GSO types (DEV_GSO_*) the loop
    no longer merges. Returns the number of outputs."""
    cdef result r
    cdef uint8_t *buf
    cdef int i, n = 0
    for i in range(got):
        buf = arena + <size_t>SLOT * i
        if decap_one(t, buf, lens[i], &r, c) == VERDICT_DELIVER:
            n = rx_gather(outs, n, buf + r.off, r.out_len, r.map_index,
                          t.maps[r.map_index].mtu, t.maps[r.map_index].dev_gso & ~refused)
    for i in range(n):
        rx_finish(&outs[i], 0)
        if outs[i].kernel_gro:
            inc(c, RX_KERNEL_GRO)
    return n


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


# -- VXLAN's receive: datagrams to TAP writes, TCP segments coalesced ----------------------
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
