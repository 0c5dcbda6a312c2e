"""The real operator (kopf, the production handlers) against the emulator, for tests.

    with OperatorHarness() as h:
        h.kubectl.create(pool)          # talk to the API like kubectl
        wait_for(lambda: h.kubectl.get_or_none("apps/v1", "statefulsets", ns, "x-agent"))

kopf runs cluster-wide in its own thread (kopf.testing.KopfRunner) with the handlers that
`kunserve operator` registers, plus one test-only @kopf.on.login handler pointing it at the emulator.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import kopf
from kopf.testing import KopfRunner

from kunserve.operator.config import OperatorConfig
from kunserve.operator.handlers import ANNOTATION_PREFIX, register
from tests.operator.emulator import EmulatorThread
from tests.operator.kubectl import Kubectl, wait_for

TEST_CONFIG = OperatorConfig(agent_image="registry.test/kunserve:1.0", redis_url="redis://redis.test:6379/0")
_namespaces = itertools.count(1)


class OperatorHarness:
    def __init__(self, config: OperatorConfig = TEST_CONFIG, emulator: EmulatorThread | None = None,
                 agent_endpoint: Callable[[str, str, str], str] | None = None,
                 exit_timeout_s: float | None = None) -> None:
        """agent_endpoint: (namespace, pool, replica) -> host:port of that agent (fake agents in tests);
        exit_timeout_s: how long kopf lets running handlers finish when it stops (then cancels them)."""
        self.config = config
        self.agent_endpoint = agent_endpoint
        self.exit_timeout_s = exit_timeout_s
        self._own_emulator = emulator is None
        self.emulator = emulator or EmulatorThread()
        self.runner: KopfRunner | None = None
        self.output = ""

    def __enter__(self) -> OperatorHarness:
        if self._own_emulator:
            self.emulator.__enter__()
        self.kubectl = Kubectl(self.emulator.url)
        registry = kopf.OperatorRegistry()
        ctx = register(registry, self.config)
        if self.agent_endpoint is not None:
            ctx.agent_endpoint = self.agent_endpoint
        server = self.emulator.url

        @kopf.on.login(registry=registry)
        def login_to_emulator(**_: Any) -> kopf.ConnectionInfo:  # test-only: the operator's API is the emulator
            return kopf.ConnectionInfo(server=server, insecure=True)

        settings = kopf.OperatorSettings()
        # kopf keeps an idle per-object worker for this long, and waits for such workers when it stops:
        # keep it short so that stopping the operator takes milliseconds, not 5 s.
        settings.queueing.idle_timeout = 0.2
        if self.exit_timeout_s is not None:
            settings.queueing.exit_timeout = self.exit_timeout_s
        self.runner = KopfRunner(["run", "--all-namespaces", "--standalone", "--verbose"], registry=registry,
                                 settings=settings, timeout=30)
        self.runner.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            if self.runner is not None:
                self.runner.__exit__(*exc)
                self.output = self.runner.output
        finally:
            if self._own_emulator:
                self.emulator.__exit__(*exc)

    def settle(self, namespace: str, name: str) -> None:
        """Wait until kopf has finished handling the pool's latest spec (its handler recorded it and the
        status describes it), so that stopping the operator interrupts no handler (kopf waits 5 s for one)."""
        def settled() -> bool:
            body = self.kubectl.get_or_none("kunserve.io/v1alpha1", "servingpools", namespace, name) or {}
            meta = body.get("metadata") or {}
            handled = f"{ANNOTATION_PREFIX}/last-handled-configuration" in (meta.get("annotations") or {})
            return handled and (body.get("status") or {}).get("observedGeneration") == meta.get("generation")

        wait_for(settled, what=f"pool {namespace}/{name} handled")

    @staticmethod
    def new_namespace(prefix: str = "t") -> str:
        """A namespace no other test uses. (Only a name: kmock 0.8 cannot parse /api/v1/namespaces for a
        create, and namespaced objects do not need their Namespace object there.)"""
        return f"{prefix}-{next(_namespaces)}"
