"""The baseline a Python user would write: fanpkt's plumbing, but every packet handled
in Python by the tests' oracle (one read, one encap, one send per packet).

    ip netns exec NS python3 bench/pyforward.py 241.0.0.0/8 172.16.1.1/16
"""
import ipaddress
import os
import signal
import sys
import threading

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from fanpkt import plumbing  # noqa: E402
from fanpkt.config import FanSpec  # noqa: E402
from fanpkt.fanmap import FanMap  # noqa: E402
from fanpkt.engine import set_thread_name  # noqa: E402
from fanpkt.tun import Tun  # noqa: E402
from fanpkt.underlay import interface_of, open_socket  # noqa: E402
from oracle import Oracle  # noqa: E402


def named(name, f):
    set_thread_name(name)
    f()


def main(overlay, underlay):
    m = FanMap.parse(overlay, underlay)
    mtu = interface_of(m.host).mtu
    tun = Tun(m.device_name, mtu - 20, offload=False)
    os.set_blocking(tun.fd, True)
    plumbing.attach(FanSpec(m), tun.index, mtu - 20, "/tmp")
    sock = open_socket()
    tx, rx = Oracle([m], mtu=mtu), Oracle([m], mtu=mtu)

    def transmit():
        while True:
            pkt = os.read(tun.fd, 65535)
            verdict, _, out, dst = tx.encap(pkt)
            if verdict == "VERDICT_SEND":
                sock.sendto(out, (str(ipaddress.IPv4Address(dst)), 0))

    def receive():
        while True:
            verdict, _, inner, _ = rx.decap(sock.recv(65535))
            if verdict == "VERDICT_DELIVER":
                os.write(tun.fd, inner)

    for name, f in (("tx", transmit), ("rx", receive)):
        threading.Thread(target=named, args=(f"pyfwd-{name}", f), daemon=True).start()
    print("ready", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    main(*sys.argv[1:3])
