# Wrappers for tests and benchmarks (included by fastpath.pyx; the loops never call them).
# Each runs a packet through the same cdef functions the loops call, and copies the
# result out as bytes. A Harness owns its scratch buffer and its outer IP ID sequence, as
# a transmit loop owns its queue's: the ID a test sees is the engine's own.


cdef class Harness:
    """One packet, or one burst, at a time through an Engine's data path.

    counters: a writable C-contiguous uint64 buffer of at least N_COUNTERS entries
    (fanpkt.engine.new_counters()). icmp_limit: apply a loop's ICMP budget (icmp.pxd) to
    the ICMPs this harness builds; off by default, so that tests comparing every verdict
    with the oracle see every ICMP.
    """
    cdef Engine eng
    cdef object counters_obj
    cdef uint64_t *c
    cdef uint8_t *buf
    cdef uint8_t icmp[ICMP_MAX_LEN]
    cdef public uint16_t ip_id      # the last outer (or ICMP) IP ID used
    cdef icmp_budget budget

    def __cinit__(self, Engine eng, counters, bint icmp_limit=False):
        self.eng = eng
        self.counters_obj = counters        # keeps the buffer alive
        self.c = _counter_ptr(counters, N_COUNTERS)
        self.buf = <uint8_t *>malloc(SLOT)
        if self.buf == NULL:
            raise MemoryError()
        self.ip_id = 0
        memset(&self.budget, 0, sizeof(self.budget))
        self.budget.unlimited = not icmp_limit

    def __dealloc__(self):
        free(self.buf)

    def encap(self, const uint8_t[:] packet):
        """encap_one: (verdict, reason index or -1, output bytes, underlay dst).

        The output is the outer packet for VERDICT_SEND, the ICMP for VERDICT_ICMP and
        b"" for a drop."""
        cdef result r
        cdef uint32_t n = packet.shape[0]
        cdef int v
        if n > SLOT - HEADROOM:
            raise ValueError("packet larger than any IPv4 datagram")
        if n:
            memcpy(self.buf + HEADROOM, &packet[0], n)
        v = encap_one(self.eng.table, &self.ip_id, self.buf + HEADROOM, n, 0, &r,
                      self.icmp, &self.budget, self.c)
        if v == VERDICT_SEND:
            out = PyBytes_FromStringAndSize(<char *>self.buf + HEADROOM - IPV4_HLEN,
                                            r.out_len)
        elif v == VERDICT_ICMP:
            out = PyBytes_FromStringAndSize(<char *>self.icmp, r.out_len)
        else:
            out = b""
        return Verdict(v), r.reason, out, r.dst if v == VERDICT_SEND else 0

    def decap(self, const uint8_t[:] datagram):
        """decap_one: (verdict, reason index or -1, inner bytes, map index)."""
        cdef result r
        cdef uint32_t n = datagram.shape[0]
        cdef int v
        if n > SLOT:
            raise ValueError("datagram larger than any IPv4 datagram")
        if n:
            memcpy(self.buf, &datagram[0], n)
        v = decap_one(self.eng.table, self.buf, n, &r, self.c)
        if v == VERDICT_DELIVER:
            return (Verdict(v), -1,
                    PyBytes_FromStringAndSize(<char *>self.buf + r.off, r.out_len),
                    r.map_index)
        return Verdict(v), r.reason, b"", -1

    def transmit(self, const uint8_t[:] vnet, const uint8_t[:] packet, bint vxlan=False,
                 int gso_fd=-1):
        """One TUN read (virtio header + packet; vxlan: a TAP read, virtio header + frame,
        from the TAP whose fd the map holds: -1 in tests) through tx_packet, as run_tx does.
        gso_fd: a datagram socket (one end of a socketpair) that takes what VXLAN UDP GSO
        would hand the packet socket, virtio header first, for the caller to read.
        Returns
        (verdict, reason index or -1, outputs, underlay dst). outputs are the outer
        packets for VERDICT_SEND (one per TSO segment or fragment; an Ethernet frame when
        sent to a resolved neighbour, see Engine.set_neighbours), else the one buffer
        written back to the TUN, virtio header included; empty for a drop."""
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
        if txq_init(&q, cap, -1, -1, -1, self.c) < 0:
            txq_release(&q)
            raise MemoryError()
        q.t = self.eng.table
        q.nt = self.eng.neigh
        q.ip_id = self.ip_id
        q.budget = self.budget
        q.kind = FAN_VXLAN if vxlan else FAN_IPIP
        if gso_fd >= 0:
            q.gso_fd = gso_fd
            q.gso_msg.msg_name = NULL       # a socketpair takes no link-layer address
            q.gso_msg.msg_namelen = 0
        memcpy(self.buf + HEADROOM - VNET_HLEN, &vnet[0], VNET_HLEN)
        if n:
            memcpy(self.buf + HEADROOM, &packet[0], n)
        v = tx_packet(&q, self.buf + HEADROOM, n, &r)
        tx_run_close(&q)        # a frame waiting to join a run (vxlan) goes on its lane
        self.ip_id = q.ip_id
        self.budget = q.budget
        outs = []
        if v == VERDICT_SEND:
            for w in range(2):
                l = &q.lanes[w]
                for k in range(l.n):
                    outs.append(PyBytes_FromStringAndSize(<char *>l.iov[2 * k].iov_base,
                                                          l.iov[2 * k].iov_len)
                                + PyBytes_FromStringAndSize(<char *>l.iov[2 * k + 1].iov_base,
                                                            l.iov[2 * k + 1].iov_len))
        elif v == VERDICT_ICMP:
            outs.append(PyBytes_FromStringAndSize(<char *>q.icmp, r.out_len + VNET_HLEN))
        txq_release(&q)
        return Verdict(v), r.reason, outs, r.dst if v == VERDICT_SEND else 0

    def transmit_burst(self, reads, int sock_fd, bint vxlan=True):
        """A burst of TUN or TAP reads through tx_packet and then txq_flush, as one batch
        of run_tx: reads is a list of virtio header + packet (or frame). Everything is
        sent on sock_fd (one end of a socketpair): the frames of the packet-socket lane
        as they are, the UDP GSO superpackets virtio header first, in the order the loop
        sends them. The raw-IP lane sends nowhere (a test gives every host a neighbour
        entry). Returns the verdicts."""
        cdef txq q
        cdef result r
        cdef uint8_t *arena
        cdef const uint8_t[:] d
        cdef int k, v
        cdef uint32_t n
        if len(reads) > BATCH:
            raise ValueError(f"a burst is at most {BATCH} reads")
        arena = <uint8_t *>malloc(<size_t>SLOT * BATCH)
        if arena == NULL or txq_init(&q, TXQ, -1, sock_fd, -1, self.c) < 0:
            free(arena)
            txq_release(&q)
            raise MemoryError()
        for k in range(TXQ):                # a socketpair takes no link-layer address
            q.lanes[LANE_L2].msgs[k].msg_hdr.msg_name = NULL
            q.lanes[LANE_L2].msgs[k].msg_hdr.msg_namelen = 0
        q.t = self.eng.table
        q.nt = self.eng.neigh
        q.ip_id = self.ip_id
        q.budget = self.budget
        q.kind = FAN_VXLAN if vxlan else FAN_IPIP
        q.gso_fd = sock_fd
        q.gso_msg.msg_name = NULL
        q.gso_msg.msg_namelen = 0
        verdicts = []
        try:
            for k, data in enumerate(reads):
                d = data
                n = d.shape[0]
                if n < VNET_HLEN or n - VNET_HLEN > SLOT - HEADROOM:
                    raise ValueError("a read is a virtio header and at most 64 KiB")
                memcpy(arena + <size_t>SLOT * k + HEADROOM - VNET_HLEN, &d[0], n)
                v = tx_packet(&q, arena + <size_t>SLOT * k + HEADROOM, n - VNET_HLEN, &r)
                verdicts.append(Verdict(v))
            txq_flush(&q)
        finally:
            self.ip_id = q.ip_id
            self.budget = q.budget
            txq_release(&q)
            free(arena)
        return verdicts

    def vxlan_decap(self, const uint8_t[:] payload, uint32_t outer_src, uint8_t outer_tos=0,
                    uint16_t port=8472, outer_dst=None):
        """vxlan_decap_one on a UDP payload (VXLAN header + frame) as run_rx_vxlan gets it:
        (verdict, reason index or -1, frame bytes, map index). outer_dst: the datagram's
        destination; None: the local address of the fan its VNI names (sent to us)."""
        cdef result r
        cdef uint32_t n = payload.shape[0]
        cdef uint32_t odst
        cdef int v
        if n > SLOT - RX_OFF:
            raise ValueError("payload larger than any UDP datagram")
        if n:
            memcpy(self.buf + RX_OFF, &payload[0], n)
        odst = vxlan_local(self.eng.table, port, bytes(payload)) if outer_dst is None \
            else outer_dst
        v = vxlan_decap_one(self.eng.table, self.eng.macs, port, outer_src, odst, outer_tos,
                            self.buf + RX_OFF, n, &r, self.c)
        if v == VERDICT_DELIVER:
            return (Verdict(v), -1,
                    PyBytes_FromStringAndSize(<char *>self.buf + RX_OFF + r.off, r.out_len),
                    r.map_index)
        return Verdict(v), r.reason, b"", -1

    def vxlan_receive(self, messages, uint16_t port=8472):
        """Received buffers through vx_rx_message, as run_rx_vxlan takes them: messages
        are (payload, gso_size, outer source, outer TOS[, outer destination]), payload one
        datagram or (gso_size > 0) several of gso_size bytes but the last, as the kernel's
        UDP GRO hands them over; without a destination, the one vxlan_decap assumes. Frames are written to the maps' tun_fd (a test passes a socketpair's end)."""
        cdef vx_rx x
        cdef uint8_t *arena
        cdef const uint8_t[:] d
        cdef int k
        messages = list(messages)
        if len(messages) > BATCH:
            raise ValueError(f"at most {BATCH} buffers in a burst")
        arena = <uint8_t *>malloc(<size_t>SLOT * BATCH)
        if arena == NULL:
            raise MemoryError()
        memset(&x, 0, sizeof(x))
        x.t = self.eng.table
        x.macs = self.eng.macs
        x.c = self.c
        messages = [m if len(m) == 5 else (*m, vxlan_local(x.t, port, bytes(m[0])))
                    for m in messages]
        try:
            for k, (payload, gso, osrc, otos, odst) in enumerate(messages):
                d = payload
                if d.shape[0] > SLOT - RX_OFF:
                    raise ValueError("payload larger than any UDP datagram")
                if d.shape[0]:
                    memcpy(arena + <size_t>SLOT * k + RX_OFF, &d[0], d.shape[0])
            for k, (payload, gso, osrc, otos, odst) in enumerate(messages):
                vx_rx_message(&x, port, osrc, odst, otos, arena + <size_t>SLOT * k + RX_OFF,
                              len(payload), gso, arena + <size_t>SLOT * (k + 1))
            vx_flush(&x)
        finally:
            free(arena)

    def receive(self, datagrams, bint write=False, int refuse=0):
        """A burst of at most BATCH datagrams through rx_batch, as run_rx does: a list of
        (map index, segments, bytes for the TUN, virtio header included, split), in write
        order. write: also write each output to its map's tun_fd through rx_write, as
        run_rx does (a test passes a socketpair's end); split is True where it went out
        segment by segment (rx_write_segments). refuse (DEV_GSO_* bits): write as a loop
        does once its device refused those types at run time - merged by the map's
        dev_gso, then written as if that lacked them."""
        cdef uint32_t lens[BATCH]
        cdef rx_out outs[BATCH]
        cdef uint8_t *arena
        cdef const uint8_t[:] d
        cdef int k, n, refused = 0
        cdef const fan_map *m
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
            n = rx_batch(self.eng.table, arena, lens, len(datagrams), outs, 0, self.c)
            result = []
            for k in range(n):
                # copied before the write: a split write rewrites nothing in place, but
                # the bytes are the superpacket as rx_finish left it
                data = PyBytes_FromStringAndSize(<char *>outs[k].pkt - VNET_HLEN,
                                                 outs[k].len + VNET_HLEN)
                if write:
                    m = &self.eng.table.maps[outs[k].map_index]
                    rx_count(&outs[k], rx_write(m.tun_fd, &outs[k], 0,
                                                m.dev_gso & ~refuse & ~refused, &refused,
                                                self.c), self.c)
                result.append((outs[k].map_index, outs[k].segs, data, bool(outs[k].split)))
            return result
        finally:
            free(arena)


cdef uint32_t vxlan_local(const fan_table *t, uint16_t port, bytes payload):
    """The local underlay address of the VXLAN fan on `port` whose VNI payload's VXLAN
    header names (0 if none): where a peer sends it."""
    cdef uint32_t vni
    cdef int i
    if len(payload) < 8:
        return 0
    vni = int.from_bytes(payload[4:7], "big")
    for i in range(t.n):
        if t.maps[i].kind == FAN_VXLAN and t.maps[i].vni == vni and t.maps[i].port == port:
            return t.maps[i].local
    return 0


def map_dest(Engine eng, uint32_t addr):
    """(map index, underlay host, routable) for an overlay address; index -1 if none."""
    cdef int i = fan_lookup_overlay(eng.table, addr, FAN_ANY)
    if i < 0:
        return -1, 0, False
    u = fan_dest(&eng.table.maps[i], addr)
    return i, u, bool(fan_host_ok(&eng.table.maps[i], u))

def map_batch(Engine eng, const uint32_t[::1] addrs, uint32_t[::1] out, uint8_t[::1] ok):
    """The engine's own batch mapping (overlay address -> underlay host), for
    comparison with fanmap's numpy form; ok[i] = 0 for no map or unroutable."""
    cdef Py_ssize_t k, n = addrs.shape[0]
    cdef int i
    cdef uint32_t a, u
    cdef const fan_table *t = eng.table
    if out.shape[0] < n or ok.shape[0] < n:
        raise ValueError("output arrays shorter than the input")
    with nogil:
        for k in range(n):
            a = addrs[k]
            i = fan_lookup_overlay(t, a, FAN_ANY)
            if i < 0:
                out[k] = 0
                ok[k] = 0
            else:
                u = fan_dest(&t.maps[i], a)
                ok[k] = fan_host_ok(&t.maps[i], u)
                out[k] = u if ok[k] else 0


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


CHECKSUM_PATHS = {"auto": CSUM_AUTO, "scalar": CSUM_SCALAR, "sse2": CSUM_SSE2,
                  "avx2": CSUM_AVX2}


def set_checksum_path(str path):
    """Force the loop long checksums use (csum.h), for every loop of this process: "auto"
    (the best this CPU has), "scalar", "sse2" or "avx2". False if this CPU or build has
    no such loop."""
    return csum_set_path(CHECKSUM_PATHS[path]) == 0


def checksum_update16(uint16_t hc, uint16_t old, uint16_t new):
    """RFC 1624 incremental update, host-order values."""
    return csum_update16(hc, old, new)


cdef class PacketBatch:
    """BATCH slots of SLOT bytes, each holding one packet after HEADROOM bytes of room, for
    benchmarks: the same loop bodies as run_tx and run_rx, without the system calls."""
    cdef uint8_t *arena
    cdef uint32_t lens[BATCH]
    cdef uint8_t vnet[VNET_HLEN]
    cdef public int n
    cdef uint8_t icmp[ICMP_MAX_LEN]
    cdef uint16_t ip_id

    def __cinit__(self, packets, const uint8_t[:] vnet=None):
        """packets: up to BATCH packets; vnet: the virtio header every slot is read with
        (for transmit_all; none means a plain packet)."""
        cdef const uint8_t[:] p
        packets = list(packets)
        if len(packets) > BATCH:
            raise ValueError(f"at most {BATCH} packets in a batch")
        self.arena = <uint8_t *>malloc(<size_t>SLOT * BATCH)
        if self.arena == NULL:
            raise MemoryError()
        memset(self.vnet, 0, VNET_HLEN)
        if vnet is not None:
            if vnet.shape[0] != VNET_HLEN:
                raise ValueError(f"the virtio header is {VNET_HLEN} bytes")
            memcpy(self.vnet, &vnet[0], VNET_HLEN)
        self.n = len(packets)
        self.ip_id = 0
        for k, pkt in enumerate(packets):
            p = pkt
            if p.shape[0] > SLOT - HEADROOM:
                raise ValueError("packet larger than any IPv4 datagram")
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
                             self.lens[k], 0, &r, self.icmp, NULL, c) == VERDICT_SEND:
                    sent += 1
        return sent

    def transmit_all(self, Engine eng, counters):
        """tx_packet over every slot, as run_tx's batch does between read() and sendmmsg:
        the virtio header, TSO split, encap_one, the lane queue. The queue is emptied after
        each slot instead of sent (its fds are -1), so the slots can be used again.
        Returns how many outer packets were queued."""
        cdef uint64_t *c = _counter_ptr(counters, N_COUNTERS)
        cdef txq q
        cdef result r
        cdef uint8_t *pkt
        cdef int k, queued = 0
        if txq_init(&q, TXQ, -1, -1, -1, c) < 0:
            txq_release(&q)
            raise MemoryError()
        q.t = eng.table
        q.nt = eng.neigh
        q.ip_id = self.ip_id
        with nogil:
            for k in range(self.n):
                pkt = self.arena + <size_t>SLOT * k + HEADROOM
                memcpy(pkt - VNET_HLEN, self.vnet, VNET_HLEN)   # as read() puts it
                tx_packet(&q, pkt, self.lens[k], &r)
                queued += q.lanes[LANE_IP].n + q.lanes[LANE_L2].n
                q.lanes[LANE_IP].n = 0
                q.lanes[LANE_L2].n = 0
        self.ip_id = q.ip_id
        txq_release(&q)
        return queued

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
