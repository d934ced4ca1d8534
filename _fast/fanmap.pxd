# The Fan map in the data path (docs/spec.md §1-2): one struct per map, a small table of them.
# All addresses are host byte order here; packets are converted at load/store.
from libc.stdint cimport uint8_t, uint16_t, uint32_t

cdef enum:
    MAX_MAPS = 32

# Queues of one multi-queue TUN/TAP: fanpkt/config.py's MAX_QUEUES (which says why), which
# setup.py passes to the compiler, so that the shell and the engine share one definition.
cdef extern from *:
    """
    #ifndef FANPKT_MAX_QUEUES
    #error "FANPKT_MAX_QUEUES is fanpkt/config.py's MAX_QUEUES: build through setup.py"
    #endif
    """
    enum: MAX_QUEUES "FANPKT_MAX_QUEUES"

# The fan types (docs/spec.md §4 IPIP, §6 VXLAN); FAN_ANY matches either in lookups.
cdef enum:
    FAN_ANY = -1
    FAN_IPIP = 0
    FAN_VXLAN = 1

# The GSO types a TUN/TAP takes in a write's virtio header (fan_map.dev_gso): TCPV4 on
# every kernel with virtio headers, UDP_L4 since Linux 6.2 (before it, such a write is
# EINVAL). fanpkt/tun.py probes each when the device is created.
cdef enum:
    DEV_GSO_TCPV4 = 1
    DEV_GSO_UDP_L4 = 2
    DEV_GSO_ALL = 3

cdef struct fan_map:
    int kind                    # FAN_IPIP or FAN_VXLAN
    uint32_t overlay            # O, network address
    uint32_t overlay_mask       # mask(o)
    uint32_t underlay           # U, network address
    uint32_t underlay_mask      # mask(u)
    uint32_t local              # this host's underlay address H
    uint32_t slice_net          # slice(H)
    uint32_t slice_mask         # mask(o + 32 - u)
    uint32_t gateway            # slice(H) + 1, the host's own overlay address
    uint32_t reserved_last      # slice(H) + host_reserve: the host keeps gateway .. this
    uint32_t shift              # u - o, always > 0 (validated in Python)
    uint32_t mtu                # underlay MTU
    int tun_fd                  # its TUN (IPIP) or TAP (VXLAN), queue 0: a VXLAN frame read
                                # from any queue of it travels only in this map (-1: none,
                                # in tests)
    int n_queues                # queue_fds[0 .. n_queues-1] (queue_fds[0] == tun_fd)
    int queue_fds[MAX_QUEUES]   # decapsulated packets go to the queue of their flow (rx.pxi)
    int dev_gso                 # DEV_GSO_*: the superpackets its device takes (rx.pxi)
    uint32_t vni                # VXLAN network identifier (24 bits)
    uint16_t port               # VXLAN UDP destination port
    uint8_t dev_mac[6]          # VXLAN: the bridge's MAC; a frame from it coming back is ours
    char ifname[16]             # underlay interface, asked for its MTU after EMSGSIZE
    int ifindex                 # the same interface; 0: no packet-socket sending
    uint8_t mac[6]              # its MAC, the source of frames sent through the packet socket

cdef struct fan_table:
    int n
    int check_spoof             # docs/spec.md §4 rule R5 (and VXLAN's V5), on by default
    uint32_t hash_seed          # VXLAN source ports: the flow hash's seed, random per process
    fan_map maps[MAX_MAPS]

cdef inline uint32_t fan_mask(int n) noexcept nogil:
    """mask(n): n leading ones."""
    return 0 if n == 0 else <uint32_t>(0xffffffffUL << (32 - n))

cdef inline uint32_t fan_dest(const fan_map *m, uint32_t d) noexcept nogil:
    """dest(D) = U | ((D & ~mask(o)) >> (u - o)): drops the container bits."""
    return m.underlay | ((d & ~m.overlay_mask) >> m.shift)

cdef inline uint32_t fan_slice(const fan_map *m, uint32_t h) noexcept nogil:
    """slice(H) = O | ((H & ~mask(u)) << (u - o))."""
    return m.overlay | ((h & ~m.underlay_mask) << m.shift)

cdef inline bint fan_host_ok(const fan_map *m, uint32_t h) noexcept nogil:
    """Host bits neither all zero (underlay network) nor all one (underlay broadcast)."""
    cdef uint32_t hb = h & ~m.underlay_mask
    return hb != 0 and hb != (~m.underlay_mask)

cdef inline bint fan_slice_edge(const fan_map *m, uint32_t a) noexcept nogil:
    """Is a the network or broadcast address of its slice (§2: unusable, never routed)?"""
    cdef uint32_t hb = a & ~m.slice_mask
    return hb == 0 or hb == (~m.slice_mask)

cdef inline int fan_lookup_overlay(const fan_table *t, uint32_t a, int kind) noexcept nogil:
    """Index of the map of type kind (or FAN_ANY) whose overlay holds a, or -1. Overlays
    never overlap, so the first match is the only one (longest-prefix by construction)."""
    cdef int i
    for i in range(t.n):
        if ((a & t.maps[i].overlay_mask) == t.maps[i].overlay
                and (kind == FAN_ANY or t.maps[i].kind == kind)):
            return i
    return -1

cdef inline int fan_lookup_underlay(const fan_table *t, uint32_t a, int kind) noexcept nogil:
    """Index of the first map of type kind (or FAN_ANY) whose underlay holds a, or -1."""
    cdef int i
    for i in range(t.n):
        if ((a & t.maps[i].underlay_mask) == t.maps[i].underlay
                and (kind == FAN_ANY or t.maps[i].kind == kind)):
            return i
    return -1
