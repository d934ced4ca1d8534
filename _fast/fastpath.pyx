# cython: language_level=3
"""fanpkt's packet engine: IPIP encapsulation and decapsulation for Fan maps, and the two
forwarding loops that drive them.

Flow, in code order:
  encap_one   overlay packet from the TUN -> validate -> map lookup -> dest(D) -> local?
              -> too big? (ICMP frag needed) -> outer header written into the headroom
  decap_one   IPIP datagram from the raw socket -> outer checks -> source in an underlay?
              -> inner well-formed? -> destination in a local slice? -> anti-spoofing
              -> RFC 6040 ECN -> inner packet to the TUN
  run_tx      read up to BATCH packets from the TUN -> encap_one each -> sendmmsg
              (poll only when the TUN is empty)
  run_rx      recvmmsg up to BATCH -> decap_one each -> write to the TUN
              (poll only when the socket is empty)

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
from icmp cimport *

import numpy as np

# The counters, one per verdict and per drop reason, named after the spec rule they
# enforce. This enum is the single source of truth: Python reads the names from it.
cpdef enum Counter:
    # transmit (overlay -> underlay), spec §4 "Transmit"
    TX_PACKETS                  # sent to the underlay
    TX_BYTES                    # outer bytes sent
    TX_LOCAL                    # rule 4: delivered back to the TUN, no encapsulation
    TX_ICMP_FRAG_NEEDED         # rule 5: ICMP "fragmentation needed" written to the TUN
    DROP_TX_NOT_IPV4            # rule 1
    DROP_TX_MALFORMED           # rule 1: an IPv4 header that does not hold together
    DROP_TX_NO_MAP              # rule 2
    DROP_TX_UNROUTABLE          # §2: underlay network or broadcast
    DROP_TX_LOCAL_UNUSED        # rule 4: local slice address not in use
    DROP_TX_TOO_BIG             # rule 5
    DROP_TX_SEND_ERROR          # the underlay socket refused the packet
    DROP_TX_TUN_WRITE           # a local/ICMP packet could not be written back
    # receive (underlay -> overlay), spec §4 "Receive"
    RX_PACKETS                  # written to the TUN
    RX_BYTES                    # inner bytes written
    RX_ECN_CE                   # rule 6: inner marked CE from the outer header
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
    HEADROOM = IPV4_HLEN        # room for the outer header in front of each packet
    BATCH = 64                  # packets per read/send burst
    SLOT = 65536 + 64           # any IPv4 datagram, plus headroom
    POLL_MS = 200               # how long a stop or a table swap may wait for a loop

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
                   result *r, uint8_t *icmp_out, uint64_t *c) noexcept nogil:
    """Encapsulate the overlay packet pkt[0:len] (spec §4 transmit).

    pkt must have IPV4_HLEN writable bytes in front of it: the outer header goes there, so
    the payload is never copied.
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
    if len + IPV4_HLEN > m.mtu:
        # Without DF the sender allowed fragmentation, but a raw IP_HDRINCL socket will not
        # fragment for us; the TUN's MTU (underlay - 20) keeps such packets from arriving.
        inc(c, DROP_TX_TOO_BIG)
        r.reason = DROP_TX_TOO_BIG
        if frag & IPV4_FLAG_DF:
            r.out_len = icmp_frag_needed(icmp_out, pkt, len, m.gateway,
                                         <uint16_t>(m.mtu - IPV4_HLEN), ip_id[0] + 1)
            if r.out_len:
                ip_id[0] += 1
                inc(c, TX_ICMP_FRAG_NEEDED)
                return VERDICT_ICMP
        return VERDICT_DROP
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
# The table the loops read. Python builds a new one on every (re)configuration and swaps
# the pointer; a loop reads the pointer once per batch, so the old table is freed only
# after every loop has passed a batch boundary (see Engine.retire).

cdef class Engine:
    """The active Fan table, as C structs, plus the loop-control words."""
    cdef fan_table *table
    cdef fan_table *retired

    def __cinit__(self):
        self.table = <fan_table *>calloc(1, sizeof(fan_table))
        self.retired = NULL
        if self.table == NULL:
            raise MemoryError()
        self.table.check_spoof = 1

    def __dealloc__(self):
        free(self.table)
        free(self.retired)

    def __init__(self, maps=(), check_spoof=True):
        self.load(maps, check_spoof)

    def load(self, maps, check_spoof=True):
        """Install a new table. maps: iterables of
        (overlay, o, underlay, u, local, host_reserve, mtu, tun_fd), addresses as ints.
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
            overlay, o, underlay, u, local, reserve, mtu, tun_fd = spec
            if not (0 <= o < u <= 32):
                free(t)
                raise ValueError(f"bad prefix lengths /{o} over /{u}")
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
            t.n += 1
        free(self.retired)
        self.retired = self.table
        self.table = t

    def retire(self):
        """Free the table replaced by the last load(); call once every loop has ticked."""
        free(self.retired)
        self.retired = NULL

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
    v = encap_one(eng.table, &s.ip_id, s.buf + HEADROOM, n, &r, s.icmp, c)
    if v == VERDICT_SEND:
        out = PyBytes_FromStringAndSize(<char *>s.buf, r.out_len)
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
                             self.lens[k], &r, self.icmp, c) == VERDICT_SEND:
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


def run_tx(Engine eng, Loop loop, int tun_fd, int sock_fd, counters):
    """Overlay -> underlay for one TUN until loop.stop(). tun_fd must be non-blocking;
    sock_fd is a raw IPPROTO_IPIP socket with IP_HDRINCL (the outer header is ours)."""
    cdef uint64_t *c = _counter_ptr(counters, N_COUNTERS)
    cdef loop_ctl *ctl = loop.ctl
    cdef uint8_t *arena = <uint8_t *>malloc(<size_t>SLOT * BATCH)
    cdef uint8_t icmp[ICMP_MAX_LEN]
    cdef mmsghdr msgs[BATCH]
    cdef iovec iov[BATCH]
    cdef sockaddr_in addr[BATCH]
    cdef uint32_t lens[BATCH]
    cdef pollfd pfd
    cdef result r
    cdef const fan_table *t
    cdef uint8_t *pkt
    cdef uint16_t ip_id = 0
    cdef ssize_t got
    cdef int n, i, k, v, off, sent
    if arena == NULL:
        raise MemoryError()
    memset(msgs, 0, sizeof(msgs))
    memset(addr, 0, sizeof(addr))
    for i in range(BATCH):
        addr[i].sin_family = AF_INET
        msgs[i].msg_hdr.msg_name = &addr[i]
        msgs[i].msg_hdr.msg_namelen = sizeof(sockaddr_in)
        msgs[i].msg_hdr.msg_iov = &iov[i]
        msgs[i].msg_hdr.msg_iovlen = 1
    with nogil:
        while not stopped(ctl):
            ctl.ticks += 1
            n = 0
            while n < BATCH:
                got = read(tun_fd, arena + <size_t>SLOT * n + HEADROOM, SLOT - HEADROOM)
                if got < 0:
                    if errno == EINTR:
                        continue
                    break           # EAGAIN: drained
                lens[n] = <uint32_t>got
                n += 1
            if n == 0:
                # Sleep only when the TUN is empty: under load the loop goes straight from
                # one burst to the next without a poll() in between.
                pfd.fd = tun_fd
                pfd.events = POLLIN
                pfd.revents = 0
                poll(&pfd, 1, POLL_MS)
                continue
            t = eng.table
            k = 0
            for i in range(n):
                pkt = arena + <size_t>SLOT * i + HEADROOM
                v = encap_one(t, &ip_id, pkt, lens[i], &r, icmp, c)
                if v == VERDICT_SEND:
                    addr[k].sin_addr.s_addr = htonl(r.dst)
                    iov[k].iov_base = pkt - HEADROOM
                    iov[k].iov_len = r.out_len
                    k += 1
                elif v == VERDICT_LOCAL:
                    if write(tun_fd, pkt, r.out_len) < 0:
                        inc(c, DROP_TX_TUN_WRITE)
                elif v == VERDICT_ICMP:
                    if write(tun_fd, icmp, r.out_len) < 0:
                        inc(c, DROP_TX_TUN_WRITE)
            off = 0
            while off < k:
                sent = sendmmsg(sock_fd, &msgs[off], k - off, 0)
                if sent < 0:
                    if errno == EINTR:
                        continue
                    # sendmmsg fails only on its first message: count that one, go on.
                    inc(c, DROP_TX_SEND_ERROR)
                    off += 1
                    continue
                for i in range(off, off + sent):
                    add(c, TX_BYTES, iov[i].iov_len)
                add(c, TX_PACKETS, sent)
                off += sent
    free(arena)


def run_rx(Engine eng, Loop loop, int sock_fd, counters):
    """Underlay -> overlay until loop.stop(): every TUN of the table is written from here."""
    cdef uint64_t *c = _counter_ptr(counters, N_COUNTERS)
    cdef loop_ctl *ctl = loop.ctl
    cdef uint8_t *arena = <uint8_t *>malloc(<size_t>SLOT * BATCH)
    cdef mmsghdr msgs[BATCH]
    cdef iovec iov[BATCH]
    cdef pollfd pfd
    cdef result r
    cdef const fan_table *t
    cdef uint8_t *buf
    cdef int got, i, fd
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
                buf = arena + <size_t>SLOT * i
                if decap_one(t, buf, msgs[i].msg_len, &r, c) != VERDICT_DELIVER:
                    continue
                fd = t.maps[r.map_index].tun_fd
                if fd < 0 or write(fd, buf + r.off, r.out_len) < 0:
                    inc(c, DROP_RX_TUN_WRITE)
                else:
                    inc(c, RX_PACKETS)
                    add(c, RX_BYTES, r.out_len)
    free(arena)
