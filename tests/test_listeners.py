"""
Tests for L{dynllm.listeners}: which addresses listen on a port, read from
the kernel's real tables with real sockets.
"""

from __future__ import annotations

import os
import socket

from twisted.trial.unittest import SynchronousTestCase

from dynllm.listeners import exposed, listeningAddresses


class ListenersTests(SynchronousTestCase):
    """
    L{listeningAddresses} and L{exposed} tell loopback listeners from those
    open to the network.
    """

    def listen(self, family: socket.AddressFamily, address: str) -> int:
        s = socket.socket(family)
        self.addCleanup(s.close)
        s.bind((address, 0))
        s.listen()
        return int(s.getsockname()[1])

    def test_loopback(self) -> None:
        """
        A socket on 127.0.0.1 or ::1 listens, and is not exposed.
        """
        for family, address in [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")]:
            port = self.listen(family, address)
            self.assertEqual(listeningAddresses(port), [address])
            self.assertEqual(exposed(port), [])

    def test_everyInterface(self) -> None:
        """
        A socket on 0.0.0.0 or :: is exposed.
        """
        for family, address in [(socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")]:
            port = self.listen(family, address)
            self.assertEqual(exposed(port), [address])

    def test_connectedNotListening(self) -> None:
        """
        Only listening sockets count: a port nobody listens on has none,
        though a client is bound to it.
        """
        client = socket.socket()
        self.addCleanup(client.close)
        client.bind(("0.0.0.0", 0))
        self.assertEqual(listeningAddresses(client.getsockname()[1]), [])

    def test_tableByteOrder(self) -> None:
        """
        Addresses are read in the kernel's byte order, from a table as
        proc(5) writes it; a file that cannot be read is no listener.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("  sl  local_address rem_address   st tx_queue rx_queue\n")
            f.write("   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000\n")
            f.write("   1: 0501A8C0:1F90 00000000:0000 0A 00000000:00000000\n")
            f.write("   2: 00000000:1F90 0100007F:D431 01 00000000:00000000\n")
        tables = ((path, 4), (os.path.join(path, "missing"), 16))
        self.assertEqual(listeningAddresses(8080, tables), ["127.0.0.1", "192.168.1.5"])
        self.assertEqual(exposed(8080, tables), ["192.168.1.5"])
