# -*- test-case-name: tests.test_service -*-
"""
Putting the daemon together: the model manager, the idle reaper, the HTTP
server and the backend HTTP client, as one C{IService}.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from attrs import frozen
from treq.client import HTTPClient
from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    TCP6ServerEndpoint,
)
from twisted.internet.error import CannotListenError
from twisted.logger import globalLogPublisher
from twisted.web.client import Agent
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from dynllm import guard, logs, torchinfo
from dynllm.config import Config, ConfigError, loadConfig
from dynllm.connections import autoMaxConnections
from dynllm.cors import CORSPolicy
from dynllm.interfaces import IModelManager, IStateStore
from dynllm.pool import BackendPool
from dynllm.reload import ConfigChanges, compare
from dynllm.routes import DynLLMRoutes
from dynllm.scheduler import ModelManager
from dynllm.site import DynLLMSite
from dynllm.startup import listenFailed
from dynllm.store import MemoryStateStore, SQLiteStateStore, StateInUse, StateUnavailable


class DynLLMService(MultiService):
    """
    A running dynllm: serve it under twistd, or start it inside any Twisted
    program.

    @ivar config: The configuration it runs.
    @ivar manager: The models, as an L{IModelManager}: its C{acquire(name)}
        gives a lease on a ready model to code in the same process.
    @ivar routes: The HTTP API (its C{resource()} can be mounted elsewhere).
    @ivar http: A C{treq} client for backends (it shares the connection
        pool of the relay).
    @ivar site: The HTTP site, when it listens.
    @ivar exitOnStartError: When the state database cannot be used at
        start-up, have the process end with one line naming C{db_path} and
        the cause rather than a traceback: set for the twistd plugin.
        Either way, L{StateInUse} or L{StateUnavailable} is raised.
    """

    exitOnStartError = False

    def __init__(
        self,
        config: Config,
        reactor: Any,
        manager: IModelManager,
        routes: DynLLMRoutes,
        http: HTTPClient,
        pool: BackendPool,
    ) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.manager = manager
        self.routes = routes
        self.http = http
        self._pool = pool
        self.site: DynLLMSite | None = None
        self._privileged = False
        # From now, so that /admin/logs has the start-up lines too.
        routes.daemonLog.setLevel(config.log_level)
        globalLogPublisher.addObserver(routes.daemonLog)

    def reload(self, config: Config | None = None) -> ConfigChanges:
        """
        Run a new configuration without a restart (C{SIGHUP},
        C{POST /admin/reload}): see L{ModelManager.reconfigure} for the
        models; keys, CORS origins, the body limit, timeouts, the budget and
        C{log_level} apply from the next request.

        @param config: The new configuration; by default the file the
            running one came from is read again.
        @return: what changed.
        @raise ConfigError: if the file is unusable (nothing is changed).
        @raise dynllm.reload.RestartRequired: if it changes what only a
            restart can (nothing is changed).
        """
        if config is None:
            if self.config.source is None:
                raise ConfigError("this dynllm was not started from a configuration file: nothing to read again")
            config = loadConfig(self.config.source)
        changes = compare(self.config, config)
        self.config = config
        self.manager.reconfigure(config)
        self.routes.config = config
        logs.setLevel(config.log_level)
        self.routes.daemonLog.setLevel(config.log_level)
        logs.setFormat(config.log_format)
        if self.site is not None:
            for name, value in siteSettings(config).items():
                setattr(self.site, name, value)
        reaper = self.getServiceNamed("idle-reaper")
        if isinstance(reaper, TimerService) and reaper.step != config.idle_check_interval_seconds:
            reaper.step = config.idle_check_interval_seconds
            if reaper._loop.running:
                reaper._loop.stop()
                reaper._loop.start(reaper.step, now=False)
        return changes

    def privilegedStartService(self) -> None:
        """
        Open the state database and bind the API's port (under twistd,
        before privileges are shed).

        @raise dynllm.startup.StartupError: if the port cannot be bound
            (taken, say): one line naming C{server.host}, C{server.port}
            and why.
        @raise StateInUse: if another daemon holds the state database.
        @raise StateUnavailable: if it cannot be used (see
            L{_startErrors}).
        """
        with self._startErrors():
            try:
                super().privilegedStartService()
            except CannotListenError as e:
                raise listenFailed(self.config.server.host, self.config.server.port, e) from e
        self._privileged = True

    def startService(self) -> None:
        """
        Start the models, the reaper and the API; the port is bound first
        (if L{privilegedStartService} has not been), so that a port that is
        taken stops start-up before any model starts.

        @raise dynllm.startup.StartupError: if the port cannot be bound.
        """
        if not self._privileged:
            self.privilegedStartService()
        with self._startErrors():
            super().startService()
        self.torchProbe = torchinfo.startLogging(self.reactor, self.config)

    @contextmanager
    def _startErrors(self) -> Iterator[None]:
        """
        Have a state database that cannot be used end the process with one
        line and status 1, if L{exitOnStartError} says so.

        The error stays an exception, not C{SystemExit}: a daemonizing
        twistd reports an C{Exception} from start-up to the process that
        waits for it (and that one waits for ever for anything else); only
        the way Python prints it, uncaught, is changed to the one line.
        """
        try:
            yield
        except (StateInUse, StateUnavailable):
            if self.exitOnStartError:
                sys.excepthook = _oneLine(sys.excepthook)
            raise

    def stopService(self) -> defer.Deferred[None]:
        self.routes.closeStreams()
        probe = getattr(self, "torchProbe", None)
        if probe is not None and not probe.called:
            probe.cancel()
        d = defer.maybeDeferred(super().stopService)
        if probe is not None:
            # Wait for the probe's child to be gone too.
            d.addBoth(lambda r: probe.addBoth(lambda _: r))
        d.addBoth(lambda r: self._pool.closeCachedConnections().addCallback(lambda _: r))

        def unobserve(result: object) -> object:
            globalLogPublisher.removeObserver(self.routes.daemonLog)
            return result

        return d.addBoth(unobserve)


def _oneLine(hook: Callable[..., object]) -> Callable[..., object]:
    """
    @return: an C{excepthook} that prints L{StateInUse} and
        L{StateUnavailable} as one line, C{dynllm: MESSAGE}, and passes any
        other exception to C{hook}.
    """

    def excepthook(kind: type[BaseException], value: BaseException, tb: Any) -> object:
        if isinstance(value, (StateInUse, StateUnavailable)):
            sys.stderr.write(f"dynllm: {value}\n")
            sys.stderr.flush()
            return None
        return hook(kind, value, tb)

    return excepthook


@implementer(IAgentEndpointFactory)
@frozen
class LoopbackEndpoints:
    """
    Connects to backends with plain TCP endpoints. Agent's default,
    C{HostnameEndpoint}, reports a refused connection only at its next
    attempt, 300 ms later: a readiness probe sent before the backend has
    bound its port would hold up the detection of its readiness that long.

    @ivar reactor: Makes the connections.
    """

    reactor: Any

    def endpointForURI(self, uri: Any) -> TCP4ClientEndpoint:
        return TCP4ClientEndpoint(self.reactor, uri.host.decode("ascii"), uri.port, timeout=10)


def makeAgent(reactor: Any) -> tuple[Agent, BackendPool]:
    """
    @return: an agent for backends on 127.0.0.1, with a pool of persistent
        connections that never loses a request to a connection the backend
        closed (L{dynllm.pool}), and the pool (to close it when stopping).
    """
    pool = BackendPool(reactor)
    return Agent.usingEndpointFactory(reactor, LoopbackEndpoints(reactor), pool=pool), pool


def siteSettings(config: Config) -> dict[str, Any]:
    """
    @return: the settings of the API's L{DynLLMSite} that C{config} gives,
        by the names of its attributes (and of its constructor's
        arguments): what the site is made with, and what a reload sets
        again.
    """
    server = config.server
    return {
        "maxBodyBytes": int(config.max_request_body_mb * 1024 * 1024),
        "cors": CORSPolicy(frozenset(server.cors_origins)),
        "guard": guard.announce(config),
        "requestTimeout": server.request_timeout_seconds,
        "idleTimeout": server.request_timeout_seconds,
        "maxConnections": autoMaxConnections() if server.max_connections is None else server.max_connections,
    }


def makeService(config: Config, reactor: Any = None, listen: bool = True, persist: bool = True) -> DynLLMService:
    """
    Build a dynllm daemon from a configuration.

    @param config: A L{Config}, e.g. from L{dynllm.config.loadConfig}.
    @param reactor: The reactor; the global one by default.
    @param listen: Serve the HTTP API on C{server.host:server.port}. Turn off
        to use only L{IModelManager.acquire} or to mount
        C{service.routes.resource()} in a site of your own.
    @param persist: Keep state in C{db_path}; off keeps it in memory.
    @return: a L{DynLLMService}, not yet started.
    """
    if reactor is None:
        from twisted.internet import reactor
    agent, pool = makeAgent(reactor)
    http = HTTPClient(agent)
    store: IStateStore = SQLiteStateStore(config.db_path, reactor) if persist else MemoryStateStore()
    manager = ModelManager(config=config, reactor=reactor, http=http, store=store)
    routes = DynLLMRoutes(config=config, manager=manager, agent=agent, clock=reactor)
    service = DynLLMService(config, reactor, manager, routes, http, pool)
    routes.reload = service.reload
    manager.setName("models")
    manager.setServiceParent(service)
    reaper = TimerService(config.idle_check_interval_seconds, manager.reapIdle)
    reaper.clock = reactor
    reaper.setName("idle-reaper")
    reaper.setServiceParent(service)
    if listen:
        host = config.server.host
        endpointType = TCP6ServerEndpoint if ":" in host else TCP4ServerEndpoint
        endpoint = endpointType(reactor, config.server.port, interface=host)
        site = DynLLMSite(routes.resource(), **siteSettings(config))
        service.site = site
        http_service = StreamServerEndpointService(endpoint, site)
        http_service._raiseSynchronously = True
        http_service.setName("http")
        http_service.setServiceParent(service)
    return service
