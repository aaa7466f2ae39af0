"""The SSRF guard over every way an IPv6 address can carry an IPv4 one (IPv4-mapped, IPv4-compatible,
NAT64, 6to4, Teredo): the IPv4 address inside decides, by the same rules as when it is named
plainly. Properties over address forms (hypothesis); then the real Sender refusing such targets,
inside a network namespace with loopback only (`unshare -n`), so nothing can leave if it fails."""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
import sys
import textwrap

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.delivery import AddressPolicy

ipv4 = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)
# Addresses a guard must refuse, drawn often: hypothesis alone would rarely hit them.
SPECIAL = [
    "127.0.0.1",
    "10.1.2.3",
    "172.16.0.1",
    "192.168.1.1",
    "169.254.169.254",
    "100.64.0.1",
    "0.0.0.0",
    "8.8.8.8",
    "1.1.1.1",
]
v4s = st.one_of(ipv4, st.sampled_from(SPECIAL).map(ipaddress.IPv4Address))
POLICIES = [AddressPolicy([]), AddressPolicy([ipaddress.ip_network("127.0.0.0/8")])]


def mapped(v4: ipaddress.IPv4Address) -> str:
    return f"::ffff:{v4}"


def compatible(v4: ipaddress.IPv4Address) -> str:
    return str(ipaddress.IPv6Address(int(v4)))


def nat64(v4: ipaddress.IPv4Address) -> str:
    return str(ipaddress.IPv6Address((0x64FF9B << 96) | int(v4)))


def sixtofour(v4: ipaddress.IPv4Address) -> str:
    return str(ipaddress.IPv6Address((0x2002 << 112) | (int(v4) << 80) | 1))


def teredo(server: ipaddress.IPv4Address, client: ipaddress.IPv4Address) -> str:
    value = (
        (0x20010000 << 96)
        | (int(server) << 64)
        | (0x8000 << 48)
        | (0xFFFF << 32)
        | (int(client) ^ 0xFFFFFFFF)
    )
    return str(ipaddress.IPv6Address(value))


@given(v4=v4s, form=st.sampled_from([mapped, nat64, sixtofour]))
def test_an_embedded_ipv4_address_is_judged_as_itself(v4: ipaddress.IPv4Address, form: object) -> None:
    assert callable(form)
    for policy in POLICIES:
        assert policy.allows(form(v4)) == policy.allows(str(v4)), form(v4)


@given(v4=v4s)
def test_an_ipv4_compatible_address_is_judged_as_its_ipv4_address(v4: ipaddress.IPv4Address) -> None:
    if int(v4) <= 1:  # :: and ::1 are IPv6's own unspecified and loopback addresses
        return
    for policy in POLICIES:
        assert policy.allows(compatible(v4)) == policy.allows(str(v4)), compatible(v4)


@given(server=v4s, client=v4s)
def test_a_teredo_address_needs_both_of_its_ipv4_addresses_allowed(
    server: ipaddress.IPv4Address, client: ipaddress.IPv4Address
) -> None:
    address = teredo(server, client)
    assert ipaddress.IPv6Address(address).teredo == (server, client)
    for policy in POLICIES:
        assert policy.allows(address) == (policy.allows(str(server)) and policy.allows(str(client)))


def test_the_forms_found_in_review_are_refused() -> None:
    policy = AddressPolicy([])
    for address in (
        "64:ff9b::7f00:1",  # NAT64 loopback
        "64:ff9b::a9fe:a9fe",  # NAT64 metadata
        "64:ff9b::a00:1",  # NAT64 private
        "2002:7f00:1::1",  # 6to4 loopback
        "2002:a9fe:a9fe::1",  # 6to4 metadata
        "::7f00:1",  # IPv4-compatible loopback
        "::a9fe:a9fe",  # IPv4-compatible metadata
        "::ffff:127.0.0.1",
        "64:ff9b:1::7f00:1",  # local-use NAT64: refused whatever it embeds
    ):
        assert not policy.allows(address), address
    for address in ("64:ff9b::808:808", "2002:808:808::1", "2606:4700:4700::1111"):
        assert policy.allows(address), address


INNER = textwrap.dedent(
    """
    import asyncio, socket, sys
    from gateway.delivery import AddressPolicy, ErrorKind, Sender

    async def main() -> None:
        # A listener on loopback that counts connections: the guard must leave it untouched.
        accepted = []
        server = await asyncio.start_server(lambda r, w: accepted.append(w.close()), "::1", 0)
        port = server.sockets[0].getsockname()[1]
        sender = Sender(AddressPolicy([]), 10)
        await sender.start()
        kinds = []
        for host in ("[64:ff9b::7f00:1]", "[::7f00:1]", "[2002:7f00:1::1]", "[::ffff:127.0.0.1]", "[::1]"):
            result = await sender.send("POST", f"http://{host}:{port}/x", [], b"{}", 2.0)
            kinds.append(result.error)
        await sender.close()
        server.close()
        assert kinds == [ErrorKind.BLOCKED] * 5, kinds
        assert accepted == [], "a blocked target was connected to"
        print("blocked", len(kinds))

    asyncio.run(main())
    """
)


@pytest.mark.skipif(shutil.which("unshare") is None, reason="unshare (util-linux) is not installed")
def test_the_sender_refuses_them_without_connecting_inside_a_loopback_only_namespace() -> None:
    command = [
        "unshare",
        "-n",
        "sh",
        "-c",
        f'ip link set lo up 2>/dev/null; exec "{sys.executable}" -c "$0"',
        INNER,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    if done.returncode != 0 and "unshare failed" in done.stderr:
        pytest.skip(f"no network namespaces here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "blocked 5"
