// SPDX-License-Identifier: MIT
/* The VXLAN fan in the kernel: two tc programs around a stock flow-based vxlan device
 * (`ip link add fanvx-PORT type vxlan external dstport PORT`), loaded and configured by
 * fanpkt/kernelpath.py. They apply the rules the userspace engine applies (docs: the
 * VXLAN transmit rules X1-X3 and receive rules V1-V6), count under the same counter
 * names, and leave the wire format to the kernel's vxlan driver, which is the fan's.
 *
 * Devices. Per UDP port, one flow-based vxlan device, `fanvx-PORT`. The first fan on a
 * port has that device itself as its bridge's port, as the kernel's own bridged vxlan
 * does: the programs only steer, check and count, and return TC_ACT_OK, so a frame
 * crosses no device the kernel's own layout would not. Each further fan on the port has
 * a veth pair whose end `fan-O` is its bridge's port, and the programs redirect between
 * that end and the shared vxlan device by VNI.
 *
 *   fan_tx   tc egress of the fan's port (the vxlan device or fan-O): a frame the bridge
 *            sends toward the fan -> the key (the IPv4 destination or the ARP target) ->
 *            X1-X2 -> tunnel key (VNI, fan(key), our underlay address) -> on into the
 *            vxlan driver (redirected to it from fan-O), which encapsulates it (UDP
 *            source port from the flow hash, TTL from the route, DF clear, UDP checksum,
 *            ECN as RFC 6040): X3 is the kernel's own.
 *   fan_rx   tc ingress of the vxlan device: a decapsulated frame with its tunnel key ->
 *            the fan of its VNI (V1) -> V2 (outer source in the underlay, outer
 *            destination our address) -> V3 (a well-formed IPv4 or ARP frame, not from
 *            our bridge's MAC nor any local MAC, no DHCP) -> V4 (for our slice) -> V5 (the
 *            sender speaks for its own slice) -> on to the bridge the vxlan device is a
 *            port of, or redirected into fan-O as if received there. V6 (ECN) is the
 *            vxlan driver's, before us.
 *
 * Every drop is counted first (count(), then TC_ACT_SHOT), in a per-CPU array: one row
 * of N_KCOUNTERS per fan slot, and a last row for what belongs to no fan. Configuration
 * lives in maps that kernelpath.py fills before it attaches the programs and rewrites
 * in one update each when a fan's underlay address moves.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#define MAX_FANS 32

/* The counters these programs keep. kernelpath.KERNEL_COUNTERS names them in this
 * order (tests/test_kernelpath.py checks the two agree); the names are the userspace
 * engine's. */
enum kcounter {
	TX_PACKETS,
	TX_BYTES,
	DROP_TX_MALFORMED,
	DROP_TX_ETHERTYPE,
	DROP_TX_NO_MAP,
	DROP_TX_UNROUTABLE,
	DROP_TX_TO_SELF,
	DROP_TX_SEND_ERROR,
	RX_PACKETS,
	RX_BYTES,
	DROP_RX_BAD_VXLAN,
	DROP_RX_UNKNOWN_VNI,
	DROP_RX_SRC_NOT_UNDERLAY,
	DROP_RX_OUTER_DST,
	DROP_RX_BAD_INNER,
	DROP_RX_BAD_INNER_CSUM,
	DROP_RX_OWN_MAC,
	DROP_RX_LOCAL_MAC,
	DROP_RX_DHCP,
	DROP_RX_NOT_LOCAL,
	DROP_RX_SPOOFED_SRC,
	N_KCOUNTERS
};
_Static_assert(TX_BYTES == TX_PACKETS + 1 && RX_BYTES == RX_PACKETS + 1, "count_pass");

/* One fan, addresses in host byte order (struct fan_map of _fast/fanmap.pxd, the part
 * these programs need). */
struct fan_conf {
	__u32 overlay, overlay_mask;
	__u32 underlay, underlay_mask;
	__u32 local;            /* this host's underlay address */
	__u32 slice_net, slice_mask;
	__u32 shift;            /* u - o */
	__u32 vni;
	__u32 vxlan_ifindex;    /* the port's vxlan device, where fan_tx sends */
	__u32 port_ifindex;     /* the fan's bridge port: the vxlan device itself, or fan-O */
	__u32 check_spoof;
	__u8 bridge_mac[ETH_ALEN];
	__u8 pad[2];
};

struct vni_key {
	__u32 ifindex;          /* the vxlan device (one per UDP port) */
	__u32 vni;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_FANS);
	__type(key, __u32);
	__type(value, struct fan_conf);
} fan_conf SEC(".maps");

/* the fan's bridge port's ifindex -> its fan's slot, for fan_tx */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_FANS);
	__type(key, __u32);
	__type(value, __u32);
} fan_by_port SEC(".maps");

/* (vxlan device, VNI) -> the fan's slot, for fan_rx */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_FANS);
	__type(key, struct vni_key);
	__type(value, __u32);
} fan_by_vni SEC(".maps");

/* This host's MACs on its fan bridges (their ports' and what the bridges learnt from
 * local ports), as the forwarder reads them from the bridges' forwarding databases: a
 * frame from the wire must not claim one. The key is the MAC in its first 6 bytes. */
#define MAX_LOCAL_MACS 65536
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_LOCAL_MACS);
	__uint(map_flags, BPF_F_NO_PREALLOC);   /* a few entries in use, not 64 K allocated */
	__type(key, __u64);
	__type(value, __u8);
} local_macs SEC(".maps");

/* A row of counters: one per fan slot, and one more for what belongs to no fan. A
 * packet's counting is one lookup of its row, whatever it adds to. */
struct counter_row {
	__u64 n[N_KCOUNTERS];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MAX_FANS + 1);
	__type(key, __u32);
	__type(value, struct counter_row);
} fan_counters SEC(".maps");

#define NO_FAN MAX_FANS         /* the counter row of what belongs to no fan */
#define ARP_LEN 28
#define ARP_OFF_SPA 14
#define ARP_OFF_TPA 24
#define DHCP_SERVER_PORT 67
#define DHCP_CLIENT_PORT 68

static __always_inline void count(__u32 row, enum kcounter k, __u64 n)
{
	struct counter_row *c = bpf_map_lookup_elem(&fan_counters, &row);

	if (c)
		c->n[k] += n;
}

/* A packet that goes on: its packets and bytes counters, with one lookup. */
static __always_inline void count_pass(__u32 row, enum kcounter packets, __u64 n,
				       __u64 bytes)
{
	struct counter_row *c = bpf_map_lookup_elem(&fan_counters, &row);

	if (c) {
		c->n[packets] += n;
		c->n[packets + 1] += bytes;     /* X_BYTES follows X_PACKETS */
	}
}

static __always_inline int drop(__u32 row, enum kcounter k)
{
	count(row, k, 1);
	return TC_ACT_SHOT;
}

/* Underlay packets this skb stands for: a GSO superpacket is many. */
static __always_inline __u64 segments(struct __sk_buff *skb)
{
	return skb->gso_segs > 1 ? skb->gso_segs : 1;
}

static __always_inline __u32 fan_dest(const struct fan_conf *f, __u32 a)
{
	return f->underlay | ((a & ~f->overlay_mask) >> f->shift);
}

/* Host bits neither all zero nor all one: an address a packet may be sent to. */
static __always_inline int host_ok(__u32 a, __u32 mask)
{
	__u32 hb = a & ~mask;

	return hb != 0 && hb != ~mask;
}

/* The IPv4 header at ip, whole and consistent with the frame's skb->len bytes (which
 * may be padded after it, and of which only the head is in the linear data a program
 * reads: a GSO superpacket is mostly in pages): its length in bytes, or 0. */
static __always_inline __u32 ipv4_ok(const struct iphdr *ip, const void *data_end, __u32 len)
{
	__u32 ihl, tot;

	if ((const void *)(ip + 1) > data_end || ip->version != 4)
		return 0;
	ihl = ip->ihl * 4;
	tot = bpf_ntohs(ip->tot_len);
	if (ihl < sizeof(*ip) || tot < ihl || tot > len - sizeof(struct ethhdr))
		return 0;
	return ihl;
}

/* The first bytes fan_tx and fan_rx read directly: Ethernet, then an ARP body or an
 * IPv4 header without options (what lies beyond, they read with bpf_skb_load_bytes). */
#define HEAD_LEN (sizeof(struct ethhdr) + ARP_LEN)

/* Make the frame's first HEAD_LEN bytes (or all of it, if shorter) linear, where a
 * program reads them; they nearly always are already, and only then is nothing done: a
 * pull unclones the skb (a TCP segment its socket still holds for retransmission), which
 * copies its head. Packet pointers must be loaded after it. */
static __always_inline void pull_headers(struct __sk_buff *skb)
{
	__u32 want = skb->len < HEAD_LEN ? skb->len : HEAD_LEN;

	if ((long)skb->data + want > (long)skb->data_end)
		bpf_skb_pull_data(skb, want);
}

/* Ethernet/IPv4 ARP, whole: the pointer to its body, or NULL. */
static __always_inline const __u8 *arp_ok(const void *body, const void *data_end)
{
	const __u8 *a = body;

	if ((const void *)(a + ARP_LEN) > data_end)
		return NULL;
	if (a[0] != 0 || a[1] != 1 || a[2] != 0x08 || a[3] != 0 || a[4] != ETH_ALEN || a[5] != 4)
		return NULL;
	return a;
}

static __always_inline int same_mac(const __u8 *a, const __u8 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3] && a[4] == b[4]
	       && a[5] == b[5];
}

static __always_inline __u32 load_be32(const __u8 *p)
{
	return ((__u32)p[0] << 24) | ((__u32)p[1] << 16) | ((__u32)p[2] << 8) | p[3];
}

/* Is the IPv4 header checksum right? The header (ihl bytes at offset off of the skb,
 * checked whole by ipv4_ok) is copied into a zeroed buffer and summed whole: the zeros
 * past ihl add nothing, and every access has a constant offset. */
static __always_inline int ipv4_csum_ok(struct __sk_buff *skb, __u32 off, __u32 ihl)
{
	__u16 w[30] = {};
	__u32 sum = 0;
	int i;

	if (ihl < sizeof(struct iphdr) || ihl > sizeof(w)
	    || bpf_skb_load_bytes(skb, off, w, ihl) < 0)
		return 0;
#pragma unroll
	for (i = 0; i < 30; i++)
		sum += w[i];
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return sum == 0xffff;
}

SEC("tc")
int fan_tx(struct __sk_buff *skb)
{
	void *data, *data_end;
	struct ethhdr *eth;
	struct bpf_tunnel_key key = {};
	const struct fan_conf *f;
	__u32 ifindex = skb->ifindex, row, k, under;
	__u32 *slot;
	const __u8 *arp;

	slot = bpf_map_lookup_elem(&fan_by_port, &ifindex);
	if (!slot)
		return drop(NO_FAN, DROP_TX_NO_MAP);
	row = *slot;
	f = bpf_map_lookup_elem(&fan_conf, &row);
	if (!f || row >= MAX_FANS)
		return drop(NO_FAN, DROP_TX_NO_MAP);
	/* On a vxlan device that is a fan's port and shared with further fans, frames those
	 * fans' fan_tx steered here arrive with their key set (their VNIs), and go on as they
	 * are. A frame from this fan's own bridge may carry a key of the fan's VNI: the
	 * host's ARP reply to a request that came over the fan has the request's key mirrored
	 * back (iptunnel_metadata_reply), which is not the fan's steering (its outer source
	 * would be the route's, not the fan's address): it is steered like any other. */
	if (ifindex == f->vxlan_ifindex && bpf_skb_get_tunnel_key(skb, &key, sizeof(key), 0) == 0
	    && key.tunnel_id != f->vni)
		return TC_ACT_OK;
	pull_headers(skb);
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	eth = data;
	if ((void *)(eth + 1) > data_end)
		return drop(row, DROP_TX_MALFORMED);
	/* X1: the key is the inner IPv4 destination, or the ARP target address */
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);

		if (!ipv4_ok(ip, data_end, skb->len))
			return drop(row, DROP_TX_MALFORMED);
		k = bpf_ntohl(ip->daddr);
	} else if (eth->h_proto == bpf_htons(ETH_P_ARP)) {
		arp = arp_ok(eth + 1, data_end);
		if (!arp)
			return drop(row, DROP_TX_MALFORMED);
		k = load_be32(arp + ARP_OFF_TPA);
	} else {
		return drop(row, DROP_TX_ETHERTYPE);
	}
	if ((k & f->overlay_mask) != f->overlay)
		return drop(row, DROP_TX_NO_MAP);
	/* X2: the underlay host; the bridge floods frames for local containers here too */
	under = fan_dest(f, k);
	if (!host_ok(under, f->underlay_mask) || !host_ok(k, f->slice_mask))
		return drop(row, DROP_TX_UNROUTABLE);
	if (under == f->local)
		return drop(row, DROP_TX_TO_SELF);
	/* X3, by the vxlan driver: TTL 0 takes the route's hop limit, TOS 0 with the inner
	 * ECN, flags 0 a UDP checksum and DF clear; the source is our underlay address */
	__builtin_memset(&key, 0, sizeof(key));
	key.tunnel_id = f->vni;
	key.remote_ipv4 = under;
	key.local_ipv4 = f->local;
	if (bpf_skb_set_tunnel_key(skb, &key, sizeof(key), 0) < 0)
		return drop(row, DROP_TX_SEND_ERROR);
	/* bytes as sent: with the outer IPv4, UDP and VXLAN headers of each segment */
	count_pass(row, TX_PACKETS, segments(skb), skb->len + 36 * segments(skb));
	if (ifindex == f->vxlan_ifindex)
		return TC_ACT_OK;
	return bpf_redirect(f->vxlan_ifindex, 0);
}

SEC("tc")
int fan_rx(struct __sk_buff *skb)
{
	void *data, *data_end;
	struct ethhdr *eth;
	struct bpf_tunnel_key key = {};
	struct vni_key vk = {};
	const struct fan_conf *f;
	__u32 row, k, ksrc, osrc, ihl;
	__u64 mac;
	__u32 *slot;
	const __u8 *arp;

	/* V1: the vxlan driver checked the flags and reserved bits; the VNI must be a fan's
	 * (a flow-based device takes every VNI) */
	if (bpf_skb_get_tunnel_key(skb, &key, sizeof(key), 0) < 0)
		return drop(NO_FAN, DROP_RX_BAD_VXLAN);
	vk.ifindex = skb->ifindex;
	vk.vni = key.tunnel_id;
	slot = bpf_map_lookup_elem(&fan_by_vni, &vk);
	if (!slot)
		return drop(NO_FAN, DROP_RX_UNKNOWN_VNI);
	row = *slot;
	f = bpf_map_lookup_elem(&fan_conf, &row);
	if (!f || row >= MAX_FANS)
		return drop(NO_FAN, DROP_RX_UNKNOWN_VNI);
	/* V2: from a host of the underlay, to our own underlay address (a datagram to a
	 * broadcast or to another address of this host is not the fan's) */
	osrc = key.remote_ipv4;
	if ((osrc & f->underlay_mask) != f->underlay)
		return drop(row, DROP_RX_SRC_NOT_UNDERLAY);
	if (key.local_ipv4 != f->local)
		return drop(row, DROP_RX_OUTER_DST);
	/* V3: IPv4 (well-formed) or Ethernet/IPv4 ARP, not from our bridge's MAC, no DHCP */
	pull_headers(skb);
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	eth = data;
	if ((void *)(eth + 1) > data_end)
		return drop(row, DROP_RX_BAD_INNER);
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);

		ihl = ipv4_ok(ip, data_end, skb->len);
		if (!ihl)
			return drop(row, DROP_RX_BAD_INNER);
		if (!ipv4_csum_ok(skb, sizeof(*eth), ihl))
			return drop(row, DROP_RX_BAD_INNER_CSUM);
		k = bpf_ntohl(ip->daddr);
		ksrc = bpf_ntohl(ip->saddr);
		if (ip->protocol == IPPROTO_UDP && !(ip->frag_off & bpf_htons(0x1fff))) {
			const struct udphdr *udp = (const void *)ip + ihl;
			__be16 dport = 0;

			/* DHCP never crosses a fan: a peer must not lease from our dnsmasq. The
			 * port is in the linear head but for IP options or a short frame. */
			if ((const void *)(udp + 1) <= data_end)
				dport = udp->dest;
			else
				bpf_skb_load_bytes(skb, sizeof(*eth) + ihl +
						   offsetof(struct udphdr, dest), &dport, sizeof(dport));
			if (dport == bpf_htons(DHCP_SERVER_PORT) || dport == bpf_htons(DHCP_CLIENT_PORT))
				return drop(row, DROP_RX_DHCP);
		}
	} else if (eth->h_proto == bpf_htons(ETH_P_ARP)) {
		arp = arp_ok(eth + 1, data_end);
		if (!arp)
			return drop(row, DROP_RX_BAD_INNER);
		k = load_be32(arp + ARP_OFF_TPA);
		ksrc = load_be32(arp + ARP_OFF_SPA);
	} else {
		return drop(row, DROP_RX_BAD_INNER);
	}
	if (same_mac(eth->h_source, f->bridge_mac))
		return drop(row, DROP_RX_OWN_MAC);
	mac = 0;
	__builtin_memcpy(&mac, eth->h_source, ETH_ALEN);
	if (bpf_map_lookup_elem(&local_macs, &mac))
		return drop(row, DROP_RX_LOCAL_MAC);
	/* V4: for this host's slice, and not its network or broadcast address */
	if ((k & f->slice_mask) != f->slice_net || !host_ok(k, f->slice_mask))
		return drop(row, DROP_RX_NOT_LOCAL);
	/* V5: the sender may only speak for its own slice */
	if (f->check_spoof
	    && ((ksrc & f->overlay_mask) != f->overlay || fan_dest(f, ksrc) != osrc))
		return drop(row, DROP_RX_SPOOFED_SRC);
	count_pass(row, RX_PACKETS, segments(skb), skb->len);
	if (f->port_ifindex == skb->ifindex)
		return TC_ACT_OK;
	return bpf_redirect(f->port_ifindex, BPF_F_INGRESS);
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
