"""Shared fixtures, and the `root` marker. The helper modules beside this file (lab,
traffic, oracle, packets, vectors, engine_impl) are importable by name: pyproject.toml puts
tests/ on pytest's pythonpath.

A test that needs root (network namespaces, TUN devices, raw sockets, LXC, qemu) is marked
`root` here, by what it uses, so that `pytest -m 'not root'` runs the rest anywhere, as
any user; CI runs as root and runs everything."""
from __future__ import annotations

import pytest

from fanpkt.fanmap import FanMap

from engine_impl import EngineImpl
from oracle import Oracle


class NoResolver:
    """For maps given by address: looking up an interface or the default route fails."""

    def interface_address(self, name):
        raise AssertionError(name)

    def default_interface(self):
        raise AssertionError


def classic_maps():
    """The announcement's fan plus an unaligned second one, as seen from 172.16.3.4."""
    return [FanMap.parse("241.0.0.0/8", "172.16.3.4/16"),
            FanMap.parse("100.64.0.0/10", "172.16.3.4/20")]


@pytest.fixture(params=["oracle", "engine"])
def impl_factory(request):
    """Builds the implementation under test: every data-path test runs against both."""
    return {"oracle": Oracle, "engine": EngineImpl}[request.param]


@pytest.fixture
def impl(impl_factory):
    return impl_factory(classic_maps())


@pytest.fixture
def lab(request):
    """A fresh underlay for one test; namespaces and forwarders always removed after."""
    import os
    import zlib

    from lab import Lab, require_root
    require_root()
    tag = zlib.crc32(request.node.nodeid.encode()) % 100000
    # FANPKT_TEST_NS keeps two suites running at once (two checkouts) out of each other's
    # namespaces.
    lab = Lab(f"{os.environ.get('FANPKT_TEST_NS', 'fpt')}{tag}-")
    try:
        yield lab
    finally:
        lab.close()


# What makes a test need root: a fixture it uses (`lab`: namespaces, devices, forwarders),
# or, for the few that need it without one, its name (module::function). Found by running
# `pytest -m 'not root'` as a normal user: everything else passes there.
ROOT_FIXTURES = {"lab"}
ROOT_TESTS = {"test_plumbing::test_nft_accepts_the_ruleset"}    # nft -c talks to netlink


def pytest_collection_modifyitems(config, items):
    for item in items:
        name = f"{item.module.__name__}::{getattr(item, 'originalname', item.name)}"
        if ROOT_FIXTURES & set(getattr(item, "fixturenames", ())) or name in ROOT_TESTS:
            item.add_marker(pytest.mark.root)
