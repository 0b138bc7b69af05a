# -*- test-case-name: tests.test_listeners -*-
"""
Which addresses listen on a TCP port, as Linux tells in C{/proc/net/tcp}
and C{/proc/net/tcp6} (proc(5): one socket per line, C{local_address} as
hexadecimal C{ADDRESS:PORT}, the address in the kernel's byte order, C{st}
C{0A} for C{LISTEN}).

dynllm gives every backend C{127.0.0.1} to listen on, but a server run by a
C{command} may not take it (vLLM and SGLang listen on every interface unless
told otherwise), and would then be open to the network, outside dynllm's
keys. L{exposed} finds such a listener once the server is ready, so that it
is stopped instead of served.
"""

from __future__ import annotations

import ipaddress
import struct

__all__ = ["exposed", "listeningAddresses"]

#: The files that list the TCP sockets, and the size of their addresses.
TABLES = (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16))

#: C{st} of a listening socket.
LISTEN = "0A"


def _address(hexAddress: str, size: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """
    @param hexAddress: An address as the table writes it: each 32-bit word
        in hexadecimal, in the host's byte order.
    """
    raw = bytes.fromhex(hexAddress)
    packed = b"".join(struct.pack("!I", struct.unpack("=I", raw[i : i + 4])[0]) for i in range(0, size, 4))
    return ipaddress.ip_address(packed)


def listeningAddresses(port: int, tables: tuple[tuple[str, int], ...] = TABLES) -> list[str]:
    """
    @param port: A TCP port.
    @param tables: The files to read, each with the size of its addresses.
    @return: the addresses that listen on C{port}, as text (C{0.0.0.0},
        C{::}, C{127.0.0.1}, ...); none when the files cannot be read (not
        Linux).
    """
    found = []
    for path, size in tables:
        try:
            with open(path) as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 4 or fields[3] != LISTEN:
                continue
            hexAddress, _, hexPort = fields[1].partition(":")
            if int(hexPort, 16) == port:
                found.append(str(_address(hexAddress, size)))
    return found


def _loopback(text: str) -> bool:
    address = ipaddress.ip_address(text)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def exposed(port: int, tables: tuple[tuple[str, int], ...] = TABLES) -> list[str]:
    """
    @return: the addresses other than loopback ones that listen on C{port}:
        every interface (C{0.0.0.0}, C{::}) or a network's address.
    """
    return [text for text in listeningAddresses(port, tables) if not _loopback(text)]

