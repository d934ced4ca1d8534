# cython: language_level=3
"""fanpkt's packet engine: the Fan data path for IPIP and VXLAN, and the loops that drive
it.

One compiled module, in units that fastpath.pyx includes in this order. Each uses only
what the .pxd files and the units before it define, never a later one's (checked by
tests/test_layout.py). docs/internals.md §1 follows one packet through them:
  shared.pxi    what every unit shares: the counters (the one list of their names) and
                inc/add/drop, the verdicts, the buffer sizes, a packet's result, ECN
                decapsulation
  ipip.pxi      the IPIP fan: encap_one and decap_one, one packet each
  vxlan.pxi     the VXLAN fan: frames in UDP (vxlan_encap_one, vxlan_decap_one)
  tx.pxi        the transmit queue, for both fans: TSO split, lanes, sendmmsg, fragments,
                EMSGSIZE, and VXLAN's UDP GSO sends and runs
  rx.pxi        the receive side, for both fans: ancillary data, decapsulation bursts, GRO,
                VXLAN's TAP writes
  fastpath.pyx  the Engine that holds the tables, and the forwarding loops
  testing.pxi   def wrappers over the same cdef functions, for tests and benchmarks only

Flow, in code order:
  run_tx      read up to BATCH packets from the TUN -> tx_packet each (tx.pxi: TSO
              superpackets split; ipip.pxi encap_one) -> queued on a lane: the packet
              socket as a frame if the underlay host is a resolved neighbour, else the
              raw IP socket -> one sendmmsg per lane (poll only when the TUN is empty)
  encap_one   overlay packet -> validate -> map lookup -> dest(D) -> local? -> too big?
              (ICMP frag needed) -> outer header written into the headroom
  run_rx      recvmmsg up to BATCH -> rx_batch (rx.pxi): decap_one each, coalesced per
              connection (GRO) -> write to the TUN (poll only when the socket is empty)
  decap_one   IPIP datagram -> outer checks -> source in an underlay? -> inner well-formed?
              -> destination in a local slice? -> anti-spoofing -> RFC 6040 ECN
  VXLAN       run_tx on a TAP: frames through vxlan_encap_one into the same lanes (tx.pxi
              tx_frame); run_rx_vxlan: recvmmsg on the fan port's UDP socket ->
              vx_rx_message (rx.pxi) -> vxlan_decap_one -> TAP

Each check that fails increments one counter and the loop moves on: nothing here raises,
logs or touches a Python object per packet.
"""
from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcmp, memcpy, memmove, memset

from linux cimport (errno, IP_PKTINFO, SOL_SOCKET, SO_RXQ_OVFL, EINTR, EAGAIN, EMSGSIZE, EINVAL, EOPNOTSUPP, ENOPROTOOPT, iovec, writev, sockaddr_in, msghdr, mmsghdr, cmsghdr,
                    CMSG_FIRSTHDR, CMSG_NXTHDR, CMSG_DATA, sendmsg, sendmmsg, recvmmsg,
                    MSG_DONTWAIT,
                    AF_INET, AF_PACKET, IPPROTO_IP, IP_TOS, IPPROTO_IPIP, IPPROTO_TCP,
                    IPPROTO_UDP, sockaddr_ll, ETH_ALEN, ETH_HLEN, ETH_P_IP, ETH_P_ARP, pollfd,
                    poll, POLLIN, read, write, htonl, ntohl, htons, ioctl, ifreq, SIOCGIFMTU,
                    timespec, nanosleep)
from ipv4 cimport IPV4_VER_IHL
from ipv4 cimport (IPV4_HLEN, IPV4_OFF_TOS, IPV4_OFF_TOT_LEN, IPV4_OFF_ID, IPV4_OFF_FRAG,
                   IPV4_OFF_TTL, IPV4_OFF_PROTO, IPV4_OFF_SRC, IPV4_OFF_DST, IPV4_FLAG_DF,
                   IPV4_FLAG_MF, IPV4_FRAG_OFFSET_MASK, ECN_NOT_ECT, ECN_ECT1, ECN_ECT0,
                   ECN_CE, ipv4_ihl, load16, load32, store16, store32, csum_add, csum_fold,
                   checksum, csum_update16, ipv4_header_csum_ok, ipv4_set_header_csum,
                   ipv4_set_ecn, ipv4_outer, csum_set_path, CSUM_AUTO, CSUM_SCALAR, CSUM_SSE2,
                   CSUM_AVX2)
from fanmap cimport (MAX_MAPS, MAX_QUEUES, DEV_GSO_TCPV4, DEV_GSO_UDP_L4, DEV_GSO_ALL, FAN_ANY, FAN_IPIP, FAN_VXLAN, fan_map, fan_table, fan_mask,
                     fan_dest, fan_slice, fan_host_ok, fan_slice_edge,
                     fan_lookup_overlay, fan_lookup_underlay)
from neigh cimport neigh_entry, neigh_table, neigh_slot, neigh_find
from icmp cimport (ICMP_MAX_LEN, ICMP_QUOTE_MAX, icmp_budget, icmp_allow,
                   icmp_frag_needed)
from offload cimport (VNET_HLEN, VNET_F_NEEDS_CSUM, VNET_GSO_NONE, VNET_GSO_TCPV4,
                      VNET_GSO_UDP_L4, VNET_GSO_ECN, TCP_OFF_SEQ, TCP_OFF_FLAGS,
                      TCP_OFF_CSUM, TCP_FIN, TCP_PSH, TCP_ACK, TCP_CWR, TCP_MIN_MSS,
                      vnet_hdr, acc_add,
                      pseudo_header, csum_complete, tcp_csum_ok, tcp_csum_is_partial,
                      tcp_header_len, gro_same_flow, udp_csum_ok, udp_same_flow)
from vxlan cimport (flow_hash, UDP_HLEN, UDP_OFF_SPORT, UDP_OFF_DPORT, UDP_OFF_LEN, UDP_OFF_CSUM,
                    VXLAN_HLEN, VXLAN_FLAG_I, VXLAN_OUTER, ETH_OFF_SRC, ETH_OFF_TYPE, ARP_LEN,
                    ARP_OFF_SPA, ARP_OFF_TPA, vxlan_source_port, mac_set, mac_key,
                    mac_slot, mac_set_has)

include "shared.pxi"

# fan_map.dev_gso's bits by the names fanpkt/tun.py probes and reports them under
DEV_GSO_TYPES = {"tcpv4": DEV_GSO_TCPV4, "udp_l4": DEV_GSO_UDP_L4}

cdef extern from *:
    """
    /* A compile-time check: a negative array size (a compile error) unless a <= b. */
    #define FANPKT_STATIC_LE(a, b) ((void)sizeof(char[(int)(a) <= (int)(b) ? 1 : -1]))
    """
    void static_le "FANPKT_STATIC_LE"(int a, int b) noexcept nogil

# The long-checksum loop this CPU does best (csum.h), chosen once, before any loop runs.
csum_set_path(CSUM_AUTO)


def counter_names():
    """Counter names in index order, lower case, as `fanpkt stats` prints them."""
    static_le(N_COUNTERS, COUNTER_BLOCK)     # the counters must fit one loop's block
    return [c.name.lower() for c in sorted(Counter, key=int) if c.name != "N_COUNTERS"]


include "ipip.pxi"
include "vxlan.pxi"
include "tx.pxi"
include "rx.pxi"

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
    cdef mac_set *macs          # this host's MACs on its fan bridges (vxlan.pxd)
    cdef mac_set *macs_retired
    cdef uint32_t *ids          # the next outer IP ID, shared by every transmit loop
                                # (tx.pxi id_reserve), alone on its cache line
    cdef uint32_t seed          # the VXLAN flow hash's seed, fixed for the engine's life

    def __cinit__(self):
        self.table = <fan_table *>calloc(1, sizeof(fan_table))
        self.retired = NULL
        self.neigh = NULL
        self.neigh_retired = NULL
        self.macs = NULL
        self.macs_retired = NULL
        self.ids = <uint32_t *>calloc(16, sizeof(uint32_t))
        if self.table == NULL or self.ids == NULL:
            raise MemoryError()
        self.table.check_spoof = 1

    def __dealloc__(self):
        free(self.table)
        free(self.retired)
        free(self.neigh)
        free(self.neigh_retired)
        free(self.macs)
        free(self.macs_retired)
        free(self.ids)

    def __init__(self, rows=(), check_spoof=True, seed=None):
        """seed: of the VXLAN source-port hash; random unless given (tests)."""
        import os
        self.seed = int.from_bytes(os.urandom(4), "little") if seed is None else seed
        # a random start, as the kernel's IP IDs: a restart does not begin where the last
        # run's fragments may still wait for reassembly
        self.ids[0] = int.from_bytes(os.urandom(2), "little")
        self.load(rows, check_spoof)

    def load(self, rows, check_spoof=True):
        """Install a new table. rows: objects with the fields of fanpkt.engine.MapRow
        (overlay, overlay_len, underlay, underlay_len, local, host_reserve, mtu, tun_fd,
        ifname, ifindex, mac, kind, vni, port, dev_mac, queue_fds, dev_gso), addresses as
        ints; ifindex 0 (and
        mac b"") for an underlay interface that cannot take Ethernet frames. Checked here too, whoever calls: a
        bad row is a ValueError, never a table the loops would compute garbage from.
        The previous table stays allocated until retire()."""
        cdef fan_table *t
        cdef fan_map *m
        cdef int o, u
        rows = sorted(rows, key=lambda row: -row.overlay_len)
        # Longest overlay prefix first: with non-overlapping maps this changes nothing, but
        # the first match is then the longest-prefix match by construction.
        if len(rows) > MAX_MAPS:
            raise ValueError(f"at most {MAX_MAPS} fan maps in one process")
        for row in rows:
            o, u = row.overlay_len, row.underlay_len
            # 1 <= o < u <= 32 keeps every shift in 1..31; 68 is the least IPv4 MTU
            if not (1 <= o < u <= 32) or o + 32 - u > 30:
                raise ValueError(f"bad prefix lengths /{o} over /{u}")
            if not (68 + IPV4_HLEN <= row.mtu <= 65535) or not (0 < row.host_reserve):
                raise ValueError(f"bad MTU {row.mtu} or host reserve {row.host_reserve}")
            if len(row.ifname.encode()) > 15 or \
                    len(row.mac) != (ETH_ALEN if row.ifindex else 0):
                raise ValueError(f"bad underlay interface {row.ifname!r} ({row.ifindex}, "
                                 f"MAC {bytes(row.mac).hex()})")
            qfds = tuple(row.queue_fds)
            if len(qfds) > MAX_QUEUES or (qfds and qfds[0] != row.tun_fd):
                raise ValueError(f"bad queues {qfds}: at most {MAX_QUEUES}, the first the "
                                 f"device's own fd {row.tun_fd}")
            if row.kind not in ("ipip", "vxlan"):
                raise ValueError(f"bad fan type {row.kind!r}")
            if row.kind == "vxlan" and not (0 <= row.vni < 1 << 24 and 0 < row.port < 65536
                                            and len(row.dev_mac) == ETH_ALEN):
                raise ValueError(f"bad VXLAN VNI {row.vni}, port {row.port} or bridge MAC "
                                 f"{bytes(row.dev_mac).hex()}")
        t = <fan_table *>calloc(1, sizeof(fan_table))
        if t == NULL:
            raise MemoryError()
        t.check_spoof = 1 if check_spoof else 0
        t.hash_seed = self.seed
        for row in rows:
            o, u = row.overlay_len, row.underlay_len
            ifname = row.ifname.encode()
            mac = bytes(row.mac)
            m = &t.maps[t.n]
            m.overlay_mask = fan_mask(o)
            m.underlay_mask = fan_mask(u)
            m.overlay = row.overlay & m.overlay_mask
            m.underlay = row.underlay & m.underlay_mask
            m.shift = u - o
            m.local = row.local
            m.slice_mask = fan_mask(o + 32 - u)
            m.slice_net = fan_slice(m, row.local)
            m.gateway = m.slice_net + 1
            m.reserved_last = m.slice_net + row.host_reserve
            m.mtu = row.mtu
            m.tun_fd = row.tun_fd
            qfds = tuple(row.queue_fds) or (row.tun_fd,)
            m.n_queues = len(qfds)
            for k, fd in enumerate(qfds):
                m.queue_fds[k] = fd
            m.dev_gso = row.dev_gso & DEV_GSO_ALL
            memcpy(m.ifname, <char *>ifname, len(ifname))   # calloc'd: NUL-terminated
            m.ifindex = row.ifindex
            if row.ifindex:
                memcpy(m.mac, <char *>mac, ETH_ALEN)
            m.kind = FAN_VXLAN if row.kind == "vxlan" else FAN_IPIP
            if m.kind == FAN_VXLAN:
                m.vni = row.vni
                m.port = row.port
                dev_mac = bytes(row.dev_mac)
                memcpy(m.dev_mac, <char *>dev_mac, ETH_ALEN)
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

    def set_local_macs(self, macs):
        """Install a new set of this host's MACs on its fan bridges (6-byte each): a frame
        from the wire with one of them as source is dropped (V3, drop_rx_local_mac). The
        previous set stays until retire()."""
        cdef mac_set *s
        cdef uint32_t slots = 16, i
        cdef uint64_t key
        cdef const uint8_t[:] view
        macs = {bytes(m) for m in macs}
        for mac in macs:
            if len(mac) != ETH_ALEN:
                raise ValueError(f"bad MAC {mac.hex()}")
        while slots < 2 * len(macs) + 1:
            slots *= 2
        s = <mac_set *>calloc(1, sizeof(mac_set) + slots * sizeof(uint64_t))
        if s == NULL:
            raise MemoryError()
        s.mask = slots - 1
        s.k = <uint64_t *>(s + 1)
        for mac in macs:
            view = mac
            key = mac_key(&view[0])
            i = mac_slot(s, key)
            while s.k[i] != 0:
                i = (i + 1) & s.mask
            s.k[i] = key
        free(self.macs_retired)
        self.macs_retired = self.macs
        self.macs = s

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
        free(self.macs_retired)
        self.macs_retired = NULL


cdef uint64_t *_counter_ptr(object counters, int need) except NULL:
    """A pointer into a writable, C-contiguous uint64 array (a counter block)."""
    cdef uint64_t[::1] view = counters
    if view.shape[0] < need:
        raise ValueError(f"counter block needs {need} entries")
    return &view[0]


# ---------------------------------------------------------------------------------------
# The forwarding loops. Each runs in its own Python thread, released from the GIL for its
# whole life: Python calls run_tx/run_rx once and they return only when told to stop.

# Why these times: docs/internals.md §9.
cdef enum:
    POLL_MS = 200               # how long a stop or a table swap may wait for a loop
    RX_NAP_NS = 50000           # pause after a short burst (see run_rx)
    RX_NAP_BYTES = 16384        # ... unless it brought this much (see run_rx_vxlan)
    ERROR_PAUSE_NS = 1000000    # after a failed read: a device in error state is not spun on


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


cdef inline void wait_readable(int fd) noexcept nogil:
    """Sleep until fd has input, at most POLL_MS (so a stop or a table swap is seen)."""
    cdef pollfd pfd
    pfd.fd = fd
    pfd.events = POLLIN
    pfd.revents = 0
    poll(&pfd, 1, POLL_MS)


cdef inline void recv_failed(int got, uint64_t *c) noexcept nogil:
    """Count a recvmmsg() failure that is not "nothing there" (ENOMEM, or an error a
    peer's ICMP left on the socket): the next call goes on."""
    if got < 0 and errno != EAGAIN and errno != EINTR:
        inc(c, DROP_RX_RECV_ERROR)


cdef inline bint stopped(loop_ctl *ctl) noexcept nogil:
    return (<volatile int *>&ctl.stop)[0] != 0


def run_tx(Engine eng, Loop loop, int tun_fd, int sock_fd, int packet_fd, counters,
           bint vxlan=False, int gso_fd=-1, int dev_fd=-1):
    """Overlay -> underlay for one TUN (or, vxlan, one TAP) until loop.stop(). tun_fd is
    non-blocking and opened with IFF_VNET_HDR; sock_fd is a raw IPPROTO_IPIP socket with
    IP_HDRINCL (it sends VXLAN's UDP packets as well); packet_fd an AF_PACKET SOCK_RAW
    socket for frames to resolved neighbours, or -1 for none; gso_fd (vxlan) another one
    with PACKET_VNET_HDR, for UDP GSO, or -1. For one queue of a multi-queue device, tun_fd
    is the queue and dev_fd the device's own fd (its first queue, the map's tun_fd)."""
    cdef uint64_t *c = _counter_ptr(counters, N_COUNTERS)
    cdef loop_ctl *ctl = loop.ctl
    cdef uint8_t *arena = <uint8_t *>malloc(<size_t>SLOT * BATCH)
    cdef uint32_t lens[BATCH]
    cdef txq q
    cdef result r
    cdef uint8_t *pkt
    cdef ssize_t got
    cdef int n, i, v
    cdef timespec pause
    pause.tv_sec = 0
    pause.tv_nsec = ERROR_PAUSE_NS
    memset(&q, 0, sizeof(q))    # txq_release is safe on a queue never initialised
    if arena == NULL or txq_init(&q, TXQ, sock_fd, packet_fd, tun_fd, c) < 0:
        free(arena)
        txq_release(&q)
        raise MemoryError()
    q.kind = FAN_VXLAN if vxlan else FAN_IPIP
    q.id_pool = eng.ids
    q.gso_fd = gso_fd
    if dev_fd >= 0:
        q.dev_fd = dev_fd       # tun_fd is one queue of a multi-queue device
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
                    if errno != EAGAIN:
                        # Counted, and paused on: poll() would report the error at once
                        # and the loop would spin.
                        inc(c, DROP_TX_READ_ERROR)
                        nanosleep(&pause, NULL)
                    break           # EAGAIN: drained
                if got < VNET_HLEN:
                    inc(c, DROP_TX_BAD_OFFLOAD)
                    continue
                lens[n] = <uint32_t>(got - VNET_HLEN)
                n += 1
            if n == 0:
                # Sleep only when the TUN is empty: under load the loop goes straight from
                # one burst to the next without a poll() in between.
                wait_readable(tun_fd)
                continue
            q.t = eng.table
            q.nt = eng.neigh if packet_fd >= 0 else NULL
            for i in range(n):
                pkt = arena + <size_t>SLOT * i + HEADROOM
                v = tx_packet(&q, pkt, lens[i], &r)
                if v == VERDICT_ICMP:
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
    cdef const fan_table *t
    cdef rx_out *o
    cdef int got, i, n
    cdef int refused = 0        # GSO types a device refused: not merged by this loop again
    cdef uint8_t otos
    cdef uint32_t gso, odst
    cdef uint8_t *ctl_bufs = <uint8_t *>malloc(<size_t>RX_CTL * BATCH)
    cdef timespec nap
    nap.tv_sec = 0
    nap.tv_nsec = RX_NAP_NS
    if arena == NULL or ctl_bufs == NULL:
        free(arena)
        free(ctl_bufs)
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
            for i in range(BATCH):      # the kernel shortens it to what it wrote
                msgs[i].msg_hdr.msg_control = ctl_bufs + <size_t>RX_CTL * i
                msgs[i].msg_hdr.msg_controllen = RX_CTL
            got = recvmmsg(sock_fd, msgs, BATCH, MSG_DONTWAIT, NULL)
            if got <= 0:
                recv_failed(got, c)
                wait_readable(sock_fd)      # empty (or EINTR): sleep until there is work
                continue
            rx_cmsgs(&msgs[got - 1].msg_hdr, &otos, &gso, &odst, c)  # the newest drop count
            t = eng.table
            for i in range(got):
                lens[i] = msgs[i].msg_len
            n = rx_batch(t, arena, lens, got, outs, refused, c)
            for i in range(n):
                o = &outs[i]
                rx_count(o, rx_write(rx_queue_fd(&t.maps[o.map_index], o.pkt, o.len), o, 0,
                                     t.maps[o.map_index].dev_gso & ~refused, &refused, c), c)
            if got < BATCH:
                nanosleep(&nap, NULL)
    free(arena)
    free(ctl_bufs)


def run_rx_vxlan(Engine eng, Loop loop, int sock_fd, int port, counters):
    """Underlay -> overlay for the VXLAN fans on UDP `port` until loop.stop(). sock_fd is
    the UDP socket bound to the port, with IP_RECVTOS, IP_PKTINFO and, where the kernel
    has it, UDP_GRO; every TAP of those fans is written from here (vxlan.pxi, vx_rx_message)."""
    cdef uint64_t *c = _counter_ptr(counters, N_COUNTERS)
    cdef loop_ctl *ctl = loop.ctl
    cdef uint8_t *arena = <uint8_t *>malloc(<size_t>SLOT * BATCH)
    cdef uint8_t *ctl_bufs = <uint8_t *>malloc(<size_t>RX_CTL * BATCH)
    cdef mmsghdr msgs[BATCH]
    cdef iovec iov[BATCH]
    cdef sockaddr_in names[BATCH]
    cdef vx_rx x
    cdef uint8_t otos
    cdef uint32_t gso, odst
    cdef size_t bytes_in
    cdef int got, i
    cdef timespec nap
    nap.tv_sec = 0
    nap.tv_nsec = RX_NAP_NS
    if arena == NULL or ctl_bufs == NULL:
        free(arena)
        free(ctl_bufs)
        raise MemoryError()
    memset(msgs, 0, sizeof(msgs))
    memset(&x, 0, sizeof(x))
    x.c = c
    for i in range(BATCH):
        iov[i].iov_base = arena + <size_t>SLOT * i + RX_OFF
        iov[i].iov_len = SLOT - RX_OFF
        msgs[i].msg_hdr.msg_iov = &iov[i]
        msgs[i].msg_hdr.msg_iovlen = 1
        msgs[i].msg_hdr.msg_name = &names[i]
    with nogil:
        while not stopped(ctl):
            ctl.ticks += 1
            for i in range(BATCH):      # the kernel shortens both to what it wrote
                msgs[i].msg_hdr.msg_namelen = sizeof(sockaddr_in)
                msgs[i].msg_hdr.msg_control = ctl_bufs + <size_t>RX_CTL * i
                msgs[i].msg_hdr.msg_controllen = RX_CTL
            got = recvmmsg(sock_fd, msgs, BATCH, MSG_DONTWAIT, NULL)
            if got <= 0:
                recv_failed(got, c)
                wait_readable(sock_fd)      # empty (or EINTR): sleep until there is work
                continue
            x.t = eng.table
            x.macs = eng.macs
            bytes_in = 0
            for i in range(got):
                rx_cmsgs(&msgs[i].msg_hdr, &otos, &gso, &odst, c)
                vx_rx_message(&x, <uint16_t>port, ntohl(names[i].sin_addr.s_addr), odst, otos,
                              arena + <size_t>SLOT * i + RX_OFF, msgs[i].msg_len, gso,
                              arena + <size_t>SLOT * (i + 1))
                bytes_in += msgs[i].msg_len
            vx_flush(&x)
            # The nap lets a trickle of small datagrams gather into one recvmmsg; a burst
            # the kernel's UDP GRO already gathered (up to 64 KiB a message) needs none,
            # and napping after it would cap a stream at 64 KiB per nap.
            if got < BATCH and bytes_in < RX_NAP_BYTES:
                nanosleep(&nap, NULL)
    free(arena)
    free(ctl_bufs)


include "testing.pxi"
