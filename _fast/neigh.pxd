# Underlay neighbours the kernel has resolved, for sending Ethernet frames through a packet
# socket instead of the raw IP socket: an open-addressing hash of IPv4 address ->
# (interface, MAC). Python builds it from the kernel's neighbour table (fanpkt/neighbours.py)
# and the engine swaps it in whole, as it does the Fan table, so a loop never sees half an
# entry.
from libc.stdint cimport uint8_t, uint32_t

cdef struct neigh_entry:
    uint32_t addr               # host order; 0 marks an empty slot
    int ifindex
    uint8_t mac[6]
    uint8_t used                # set by a transmit loop, read and cleared by the refresher

cdef struct neigh_table:
    uint32_t mask               # slots - 1; slots a power of two, over twice the entries
    neigh_entry *e              # the slots, allocated with the table


cdef inline uint32_t neigh_slot(const neigh_table *t, uint32_t a) noexcept nogil:
    # Fibonacci hashing: neighbours on one subnet differ in the low bits only.
    return ((a * <uint32_t>2654435761U) >> 8) & t.mask


cdef inline neigh_entry *neigh_find(neigh_table *t, uint32_t a) noexcept nogil:
    """The entry for a, or NULL. There is always an empty slot, so the probe ends."""
    cdef uint32_t i
    if t == NULL:
        return NULL
    i = neigh_slot(t, a)
    while t.e[i].addr != 0:
        if t.e[i].addr == a:
            return &t.e[i]
        i = (i + 1) & t.mask
    return NULL
