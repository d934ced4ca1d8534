// SPDX-License-Identifier: MIT
/* The floor of any fan built on a flow-based vxlan device, for bench/e2e.py's mode
 * `vxlan-flow`: a tc egress program that sets the tunnel key to one fixed remote and does
 * nothing else (no map, no check, no counter, no ingress program). What fanpkt's kernel
 * path (_fast/fan_vxlan.bpf.c) costs beyond this is its own; what this costs beyond a
 * static vxlan device is the flow-based device's (a route lookup per packet sent, a
 * metadata dst per packet received). Built by the benchmark with -DLOCAL=.. -DREMOTE=..
 * (host byte order). */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

SEC("tc")
int floor_tx(struct __sk_buff *skb)
{
	struct bpf_tunnel_key key = {};

	key.tunnel_id = 42;
	key.remote_ipv4 = REMOTE;
	key.local_ipv4 = LOCAL;
	if (bpf_skb_set_tunnel_key(skb, &key, sizeof(key), 0) < 0)
		return TC_ACT_SHOT;
	return TC_ACT_OK;
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
