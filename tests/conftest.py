"""Shared fixtures: a real Kafka-protocol broker for the whole test session.

By default the session starts Tansu (``recorder.broker.EmbeddedBroker``) on a free loopback
port and kills it by PID at the end. Set ``RECORDER_TEST_BOOTSTRAP=host:port`` to run the same
tests against another broker instead (for example a real Apache Kafka in a facility's CI).
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Iterator

import pytest
import structlog
from hypothesis import settings

from recorder.broker import EmbeddedBroker

# Property tests: "ci" (what scripts/test and .ci/run use) draws the same examples on every run,
# so a red CI run is reproducible and never a roll of the dice; plain pytest draws new ones
# each run ("default"), and "explore" draws 1,000 per test (where a test does not set its own
# count), to hunt for new failures.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("explore", max_examples=1000, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def pytest_configure(config: pytest.Config) -> None:
    """Log lines of this process (the in-process simulator, client and sinks) from INFO up:
    a failing test's captured output then shows what happened, not one debug line per
    simulated iteration (the daemons the tests start log as configured for them)."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    external = os.environ.get("RECORDER_TEST_BOOTSTRAP")
    if external:
        yield external
        return
    log = tmp_path_factory.mktemp("broker") / "tansu.log"
    broker = EmbeddedBroker(log_path=log).start()
    try:
        yield broker.bootstrap_servers
    finally:
        broker.stop()


@pytest.fixture
def unique_name(request: pytest.FixtureRequest) -> Callable[[str], str]:
    """Names (topics, snapshots, apps) unique to this test, so tests never see each other."""
    token = uuid.uuid4().hex[:8]

    def make(prefix: str) -> str:
        base = "".join(c if c.isalnum() else "-" for c in request.node.name)[:40].strip("-")
        return f"{prefix}-{base}-{token}".lower()

    return make


@pytest.fixture
def logging_untouched() -> Iterator[None]:
    """For commands that must refuse bad input before they configure logging (which would
    change the logging of every later test in this process): checked, and undone if it
    happens. Use with ``pytestmark = pytest.mark.usefixtures("logging_untouched")``."""
    before = structlog.get_config()
    yield
    root = logging.getLogger()
    for handler in list(root.handlers):
        if type(handler).__name__ == "_FlushingHandler":
            root.removeHandler(handler)
            structlog.configure(**before)
            raise AssertionError("a refused command configured logging")
