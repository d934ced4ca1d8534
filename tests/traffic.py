"""Traffic endpoints run inside test namespaces (`ip netns exec NS python3 traffic.py ...`).

  tcp-sink PORT                 accept one connection, print "<bytes> <sha256>"
  tcp-send HOST PORT NBYTES     send NBYTES of seeded data, print "<bytes> <sha256>"
  udp-echo PORT                 echo datagrams until killed
  udp-sizes HOST PORT MAX       send every size 1..MAX, print the sizes that came back intact
  udp-flows HOST PORT FLOWS N   send N numbered datagrams on each of FLOWS sockets, in turn
  udp-burst HOST PORT N SIZE    send N numbered datagrams of SIZE bytes from one socket,
                                back to back (one flow, as a receiver merges them)
  udp-flows-sink PORT IDLE      count each flow's datagrams and those that came out of
                                order; print JSON once IDLE seconds pass without one
"""
import hashlib
import json
import random
import socket
import struct
import sys
import time


def tcp_sink(port):
    srv = socket.create_server(("0.0.0.0", int(port)))
    print("listening", flush=True)
    conn, _ = srv.accept()
    h, n = hashlib.sha256(), 0
    while True:
        b = conn.recv(1 << 16)
        if not b:
            break
        h.update(b)
        n += len(b)
    print(n, h.hexdigest(), flush=True)


def tcp_send(host, port, nbytes):
    nbytes = int(nbytes)
    rng = random.Random(nbytes)
    s = socket.create_connection((host, int(port)), timeout=30)
    h, left = hashlib.sha256(), nbytes
    while left:
        chunk = rng.randbytes(min(left, 1 << 16))
        s.sendall(chunk)
        h.update(chunk)
        left -= len(chunk)
    s.shutdown(socket.SHUT_WR)
    s.recv(1)
    print(nbytes, h.hexdigest(), flush=True)


def udp_echo(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", int(port)))
    print("listening", flush=True)
    while True:
        data, peer = s.recvfrom(65535)
        s.sendto(data, peer)


def udp_sizes(host, port, maximum):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IP, 10, 2)          # IP_PMTUDISC_DO: no fragmentation
    s.settimeout(1.0)
    ok = []
    for size in range(1, int(maximum) + 1):
        payload = bytes((size + i) & 0xFF for i in range(size))
        for _ in range(3):                          # UDP may drop; retry a lost one
            s.sendto(payload, (host, int(port)))
            try:
                data = s.recv(65535)
            except socket.timeout:
                continue
            if data == payload:
                ok.append(size)
                break
    print(len(ok), min(ok, default=0), max(ok, default=0), flush=True)


def udp_flows(host, port, flows, n):
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(int(flows))]
    for seq in range(int(n)):
        for s in socks:
            s.sendto(struct.pack("!I", seq) + bytes(60), (host, int(port)))
        if seq % 50 == 49:
            time.sleep(0.002)                       # paced: a test of order, not of loss
    print("sent", flush=True)


def udp_burst(host, port, n, size):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, 32, 4 << 20)    # SO_SNDBUFFORCE: never blocks here
    s.connect((host, int(port)))
    for seq in range(int(n)):
        s.send(struct.pack("!I", seq) + bytes(int(size) - 4))
    print("sent", flush=True)


def udp_flows_sink(port, idle):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)   # SO_RCVBUFFORCE: Python reads slowly
    s.bind(("0.0.0.0", int(port)))
    print("listening", flush=True)
    last, got, reordered = {}, {}, 0
    s.settimeout(float(idle) * 10)                  # the first datagram may take a while
    while True:
        try:
            data, peer = s.recvfrom(2048)
        except socket.timeout:
            break
        s.settimeout(float(idle))
        seq = struct.unpack_from("!I", data)[0]
        flow = f"{peer[0]}:{peer[1]}"
        if seq <= last.get(flow, -1):
            reordered += 1
        last[flow] = max(seq, last.get(flow, -1))
        got[flow] = got.get(flow, 0) + 1
    print(json.dumps({"flows": got, "reordered": reordered}), flush=True)


if __name__ == "__main__":
    {"tcp-sink": tcp_sink, "tcp-send": tcp_send, "udp-echo": udp_echo,
     "udp-sizes": udp_sizes, "udp-flows": udp_flows, "udp-burst": udp_burst,
     "udp-flows-sink": udp_flows_sink}[sys.argv[1]](*sys.argv[2:])
