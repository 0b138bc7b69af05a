"""
Tests for L{dynllm.placeholders}: the placeholders of a command backend's
command lines, and the refusal of a listen address given other than by
them.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from dynllm.placeholders import PlaceholderError, addressProblems, expand, expandAll, placeholdersIn

VALUES = {"port": "9100", "host": "127.0.0.1", "name": "m", "path": "/models/m", "api_key": "k"}


class PlaceholdersInTests(SynchronousTestCase):
    """
    Tests for L{placeholdersIn}.
    """

    def test_known(self) -> None:
        """
        Every placeholder a template uses is given, in order.
        """
        self.assertEqual(placeholdersIn("{host}:{port}/{name}{path}{api_key}"), ["host", "port", "name", "path", "api_key"])

    def test_doubledBracesAreLiteral(self) -> None:
        """
        C{{{} and C{}}} are literal braces, not placeholders.
        """
        self.assertEqual(placeholdersIn('{{"port": 1}}'), [])

    def test_unknownRefused(self) -> None:
        """
        An unknown placeholder is refused, naming it and the known ones.
        """
        e = self.assertRaises(PlaceholderError, placeholdersIn, "--port={prt}")
        self.assertIn("unknown placeholder {prt}", str(e))
        self.assertIn("{port}", str(e))

    def test_loneBraceRefused(self) -> None:
        """
        A lone brace is refused, with the way to write a literal one.
        """
        e = self.assertRaises(PlaceholderError, placeholdersIn, "{port")
        self.assertIn("{{ and }}", str(e))
        self.assertRaises(PlaceholderError, placeholdersIn, "a}b")

    def test_formatSpecRefused(self) -> None:
        """
        A placeholder with a format specification or a conversion is
        refused: a value is put in as it is.
        """
        self.assertRaises(PlaceholderError, placeholdersIn, "{port:05}")
        self.assertRaises(PlaceholderError, placeholdersIn, "{name!r}")

    def test_attributeRefused(self) -> None:
        """
        A placeholder with an attribute or an index is not a known one.
        """
        self.assertRaises(PlaceholderError, placeholdersIn, "{name.upper}")
        self.assertRaises(PlaceholderError, placeholdersIn, "{name[0]}")


class ExpandTests(SynchronousTestCase):
    """
    Tests for L{expand} and L{expandAll}.
    """

    def test_expand(self) -> None:
        """
        Placeholders are replaced by their values and doubled braces made
        single.
        """
        self.assertEqual(expand('{host}:{port} {{"n": "{name}"}}', VALUES), '127.0.0.1:9100 {"n": "m"}')

    def test_expandAll(self) -> None:
        """
        Each argument is expanded on its own.
        """
        self.assertEqual(expandAll(["serve", "{path}", "--port", "{port}"], VALUES), ["serve", "/models/m", "--port", "9100"])

    def test_valueNotExpandedAgain(self) -> None:
        """
        A value holding braces is put in as it is, not read as a template.
        """
        self.assertEqual(expand("{name}", {**VALUES, "name": "{port}"}), "{port}")


class AddressProblemsTests(SynchronousTestCase):
    """
    Tests for L{addressProblems}: dynllm owns the listen address.
    """

    def test_placeholdersAccepted(self) -> None:
        """
        Port and host options whose values hold C{{port}} and C{{host}}, in
        both forms, are accepted, as is a C{{host}:{port}} argument.
        """
        args = ["--host", "{host}", "--port={port}", "--listen", "{host}:{port}", "-p", "{host}:{port}:8000"]
        self.assertEqual(addressProblems(args), [])

    def test_literalPortRefused(self) -> None:
        """
        A port option with a literal value is refused, at the value's index.
        """
        [(index, why)] = addressProblems(["serve", "--port", "8080"])
        self.assertEqual(index, 2)
        self.assertIn("--port '8080' sets the listen port", why)
        self.assertIn("{port}", why)

    def test_literalPortInlineRefused(self) -> None:
        """
        C{--port=8080} is refused at its own index.
        """
        [(index, why)] = addressProblems(["serve", "--port=8080"])
        self.assertEqual(index, 1)

    def test_shortPortRefused(self) -> None:
        """
        C{-p 8000} (Docker's publish, many servers' port) is refused.
        """
        self.assertEqual(len(addressProblems(["-p", "8000"])), 1)

    def test_literalHostRefused(self) -> None:
        """
        A host option with a literal value is refused: C{--host 0.0.0.0},
        C{--listen 0.0.0.0}.
        """
        self.assertEqual([i for i, _ in addressProblems(["--host", "0.0.0.0", "--listen", "0.0.0.0"])], [1, 3])

    def test_optionWithoutValueRefused(self) -> None:
        """
        A port option at the end of the line, with no value, is refused.
        """
        self.assertEqual(len(addressProblems(["serve", "--port"])), 1)

    def test_literalAddressRefused(self) -> None:
        """
        A literal C{HOST:PORT} anywhere is refused: C{0.0.0.0:8000}, a URL
        on C{localhost}, an IPv6 address.
        """
        args = ["0.0.0.0:8000", "http://localhost:8080/x", "[::1]:9000", "{host}:{port}", "model:v1", "1.5:2"]
        self.assertEqual([i for i, _ in addressProblems(args)], [0, 1, 2])

    def test_shortPortAttachedRefused(self) -> None:
        """
        C{-p8080} (a short option with its value attached, as getopt reads
        it) is refused like C{-p 8080}; C{-p{port}} is accepted, and so is
        a one-dash long option that merely starts with C{-p}.
        """
        [(index, why)] = addressProblems(["serve", "-p8080"])
        self.assertEqual(index, 1)
        self.assertIn("-p '8080' sets the listen port", why)
        self.assertEqual(addressProblems(["-p{port}", "-preload"]), [])

    def test_longOptionSpellings(self) -> None:
        """
        Long options are matched whatever their case and with C{_} for
        C{-} (C{--listen_port}, C{--PORT}, C{--Host}), as argparse-based
        servers often accept; short options keep their case (Docker's
        C{-P} takes no value).
        """
        args = ["--listen_port", "8080", "--PORT=1", "--Host", "0.0.0.0"]
        problems = addressProblems(args)
        self.assertEqual([i for i, _ in problems], [1, 2, 4])
        self.assertIn("--listen_port '8080'", problems[0][1])
        self.assertEqual(addressProblems(["run", "-P", "image"]), [])

    def test_listenAllRefused(self) -> None:
        """
        An argument that is an address meaning "every interface"
        (C{0.0.0.0}, C{::}, C{[::]}) is refused wherever it is (after
        C{-H}, alone): it would open the server to the network.
        """
        args = ["-H", "0.0.0.0", "::", "[::]", "--other", "10.0.0.1"]
        self.assertEqual([i for i, _ in addressProblems(args)], [1, 2, 3])

    def test_shellStringChecked(self) -> None:
        """
        An argument that is a command line of its own (C{sh -c "server
        --port 8080"}) has its words checked, and is refused at its index.
        """
        [(index, why)] = addressProblems(["sh", "-c", "exec server --port 8080 --host {host}"])
        self.assertEqual(index, 2)
        self.assertIn("--port '8080'", why)
        self.assertEqual(addressProblems(["sh", "-c", "exec server --port {port} --host {host}"]), [])
        self.assertEqual(len(addressProblems(["sh", "-c", "server --port=8080 'unclosed"])), 1)

    def test_shellVariableAccepted(self) -> None:
        """
        In a shell command, a port or host option whose value is a shell
        variable (C{sh -c 'exec server --port "$1"' sh {port}}) is
        accepted; outside one, C{$1} is no port.
        """
        self.assertEqual(addressProblems(["sh", "-c", 'exec server --port "$1" --host $2', "sh", "{port}", "{host}"]), [])
        self.assertEqual(len(addressProblems(["server", "--port", "$1"])), 1)


class PublishTests(SynchronousTestCase):
    """
    A container's published port must be dynllm's address: C{-p} without
    an address publishes on every interface.
    """

    def test_containerPublish(self) -> None:
        """
        For C{docker}, C{podman} and C{nerdctl}, C{-p}/C{--publish} must begin
        C{{host}:{port}:}; C{-P} (every port, every interface) is refused.
        """
        for args in (
            ["docker", "run", "-p", "{port}:8000", "img"],
            ["docker", "run", "--publish={port}:8000", "img"],
            ["/usr/bin/podman", "run", "-p", "{port}", "img"],
            ["nerdctl", "run", "-p", "8000:8000", "img"],
            ["docker", "run", "-P", "img"],
            ["docker", "run", "--publish-all", "img"],
        ):
            [(_, why)] = addressProblems(args)
            self.assertIn("{host}:{port}:CONTAINER_PORT", why, args)
        self.assertEqual(addressProblems(["docker", "run", "-p", "{host}:{port}:8000", "img"]), [])

    def test_otherServers(self) -> None:
        """
        Another server's C{-p} may be the port alone, or C{{host}:{port}};
        a mapping that does not begin with dynllm's address is refused.
        """
        self.assertEqual(addressProblems(["srv", "-p", "{port}"]), [])
        self.assertEqual(addressProblems(["srv", "-p", "{host}:{port}"]), [])
        self.assertEqual(len(addressProblems(["srv", "-p", "{port}:80"])), 1)
