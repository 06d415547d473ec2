"""The admin client (``k2eg-recorder start|stop|trigger|status|reload``) against a Kafka
that refuses its command (the adapter replaced: no broker needed)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future

import pytest

from recorder.admin.status import DaemonState, StatusDocument
from recorder.daemon import adminclient
from recorder.errors import ServiceError, TransportError
from recorder.settings import KafkaSettings


class RefusingAdapter:
    """Topics there, the reply topic read, and every produce refused by the broker."""

    def __init__(self, *_args: object, **_kwargs: object) -> None:
        pass

    def ensure_topic(self, *_args: object, **_kwargs: object) -> int:
        return 1

    def start(self, *_args: object) -> None:
        pass

    def add_topic(self, *_args: object, **_kwargs: object) -> Future[dict[int, int]]:
        done: Future[dict[int, int]] = Future()
        done.set_result({0: 0})
        return done

    def produce(self, topic: str, _value: bytes, *, on_delivery: object = None,
                **_kwargs: object) -> None:
        if callable(on_delivery):  # as KafkaAdapter.produce reports it, from flush()
            on_delivery(TransportError(
                f"delivery to {topic!r} failed: Broker: Topic authorization failed"))

    def flush(self, *_args: object) -> int:
        return 0

    def close(self, *_args: object) -> None:
        pass


def test_a_command_kafka_refused_is_said_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A command Kafka refused (an ACL without write access to the admin topic) never
    reaches a daemon: the CLI says so at once, with Kafka's reason (exit 3), instead of
    waiting out --timeout to say "no reply ... the command stays on the topic"."""
    monkeypatch.setattr(adminclient, "KafkaAdapter", RefusingAdapter)
    kafka = KafkaSettings(bootstrap_servers="127.0.0.1:9")
    with adminclient.AdminClient(kafka, "admin", "replies") as client:
        t0 = time.monotonic()
        with pytest.raises(TransportError, match="Topic authorization failed") as info:
            client.request("status", timeout_s=3.0)
    assert not isinstance(info.value, ServiceError)
    assert time.monotonic() - t0 < 2


class ForgingAdapter(RefusingAdapter):
    """The admin topic as a daemon with a secret reads it: someone who saw the operator's
    command sends a copy without its signature (same request_id) first; the daemon answers
    both, and the replies reach the client (its reply topic)."""

    client: adminclient.AdminClient | None = None

    def produce(self, topic: str, value: bytes, *, on_delivery: object = None,
                **_kwargs: object) -> None:
        import json

        from recorder.admin.protocol import CommandPolicy
        from recorder.client.wire import Record
        from recorder.daemon.admin import AdminHandler

        replies: list[bytes] = []
        handler = AdminHandler(CommandPolicy(max_age_s=30, secret=SECRET), "replies",
                               lambda _topic, payload: replies.append(payload))
        forged = {k: v for k, v in json.loads(value).items() if k != "signature"}

        class Target:
            def status_document(self, kind: str = "status") -> StatusDocument:
                return StatusDocument("i", DaemonState.RUNNING, 1, 0, kind=kind)

        for payload in (json.dumps(forged).encode(), value):
            handler.handle(Record(topic, 0, 0, payload, None, None), Target())  # type: ignore[arg-type]
        if callable(on_delivery):
            on_delivery(None)
        assert self.client is not None
        self.client._on_records([Record("replies", 0, i, r, None, None)
                                 for i, r in enumerate(replies)], True)


SECRET = b"0123456789abcdef0123"


def test_a_reply_caused_by_a_forged_copy_of_the_command_is_passed_over(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With a secret, a forged unsigned copy of the operator's command (same request_id)
    made the daemon send a signed ``unauthorized`` reply with that request_id, and the CLI
    took it for the answer to its own command (it said "unauthorized" while the real command
    was carried out). Signed replies now name the command they answer."""
    monkeypatch.setattr(adminclient, "KafkaAdapter", ForgingAdapter)
    kafka = KafkaSettings(bootstrap_servers="127.0.0.1:9")
    with adminclient.AdminClient(kafka, "admin", "replies", secret=SECRET) as client:
        ForgingAdapter.client = client
        reply = client.request("status", timeout_s=3.0)
    assert reply.ok and reply.code.value == "ok"


class FakeDaemon:
    """A daemon's admin handler and what it acts on: ``runs``, a start of one answered
    ``start_s`` later (a start waits for the gateway)."""

    def __init__(self, name: str, runs: tuple[str, ...], send: Callable[[str, bytes], None],
                 lock: threading.RLock, start_s: float) -> None:
        from recorder.admin.protocol import CommandPolicy
        from recorder.daemon.admin import AdminHandler

        self.name, self.runs, self.lock, self.start_s = name, runs, lock, start_s
        self.handler = AdminHandler(CommandPolicy(max_age_s=30, secret=SECRET), "replies",
                                    send, instance=name)

    def run_handle(self, run: str) -> FakeDaemon | None:
        self._run = run
        return self if run in self.runs else None

    def start(self) -> Future[str]:
        done: Future[str] = Future()
        run = self._run

        def answer() -> None:
            done.set_result(f"run {run!r} recording into /d/{run}.h5")
            with self.lock:
                self.handler.poll()

        threading.Timer(self.start_s, answer).start()
        return done

    def status_document(self, kind: str = "status") -> StatusDocument:
        from recorder.admin.status import RunState, RunStatus

        return StatusDocument(self.name, DaemonState.RUNNING, 1, 0, kind=kind, runs=tuple(
            RunStatus(r, RunState.IDLE, r, r, "periodic normal", True) for r in self.runs))


class TwoDaemonsAdapter(RefusingAdapter):
    """Two daemons that read one admin topic: ``rec-a`` has run ``x``, whose start it
    answers ``START_S`` later; ``rec-b`` has run ``y`` only. With ``SOLO`` only ``rec-b``
    is there. Their replies reach the client as from its reply topic."""

    client: adminclient.AdminClient | None = None
    START_S = 1.0
    SOLO = False
    NAMES = ("rec-a", "rec-b")

    def __init__(self, *_args: object, **_kwargs: object) -> None:
        self.lock = threading.RLock()
        self.offset = 0
        daemons = [(self.NAMES[1], ("y",))]
        if not self.SOLO:
            daemons.insert(0, (self.NAMES[0], ("x",)))
        self.daemons = [FakeDaemon(name, runs, self.reply, self.lock, self.START_S)
                        for name, runs in daemons]

    def reply(self, _topic: str, payload: bytes) -> None:
        from recorder.client.wire import Record

        self.offset += 1
        assert self.client is not None
        self.client._on_records([Record("replies", 0, self.offset, payload, None, None)], True)

    def produce(self, topic: str, value: bytes, *, on_delivery: object = None,
                **_kwargs: object) -> None:
        from recorder.client.wire import Record

        with self.lock:
            for daemon in self.daemons:
                daemon.handler.handle(Record(topic, 0, 0, value, None, None), daemon)  # type: ignore[arg-type]
        if callable(on_delivery):
            on_delivery(None)


@pytest.fixture
def two_daemons(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[TwoDaemonsAdapter]]:
    """``k2eg-recorder`` (in this process, logging left as it is, the daemons' logs held
    back) against :class:`TwoDaemonsAdapter`, signed with SECRET."""
    import structlog

    import recorder.logging

    real = adminclient.AdminClient.__init__

    def init(client: adminclient.AdminClient, *args: object, **kwargs: object) -> None:
        TwoDaemonsAdapter.client = client
        real(client, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(adminclient, "KafkaAdapter", TwoDaemonsAdapter)
    monkeypatch.setattr(adminclient.AdminClient, "__init__", init)
    monkeypatch.setattr(recorder.logging, "configure_logging", lambda *a, **k: None)
    monkeypatch.setenv("RECORDER_ADMIN_SECRET", SECRET.decode())
    monkeypatch.setenv("RECORDER_BOOTSTRAP_SERVERS", "127.0.0.1:9")
    with structlog.testing.capture_logs():
        yield TwoDaemonsAdapter


def test_two_daemons_on_one_admin_topic_the_cli_takes_the_ok_of_the_one_with_the_run(
        two_daemons: type[TwoDaemonsAdapter], capsys: pytest.CaptureFixture[str]) -> None:
    """Both daemons answer: ``rec-b`` at once ``unknown_run``, ``rec-a`` (which has the run)
    ``ok`` a second later. The CLI said "no run named 'x'" (exit 1) although rec-a started
    it; it now exits 0 with rec-a's reply, and says on stderr who answered what and that
    each daemon wants its own admin topic."""
    from recorder.cli import main

    assert main(["start", "x"]) == 0
    out = capsys.readouterr()
    assert out.out == "ok: run 'x' recording into /d/x.h5\n"
    assert out.err.splitlines() == [
        "rec-b: unknown_run no run named 'x'; its runs: y",
        "rec-a: ok run 'x' recording into /d/x.h5",
        "several daemons read this admin topic and each answered: give each daemon its own "
        "RECORDER_ADMIN_TOPIC (they may share the status, files and reply topics)",
    ]
    # a command both answer at once: one line each, the first reply's outcome
    assert main(["status"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("daemon rec-")
    assert sorted(line.split(":")[0] for line in out.err.splitlines()[:2]) == ["rec-a",
                                                                              "rec-b"]
    # neither has the run: the first reply's code, both named
    assert main(["start", "z"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("unknown_run: no run named 'z'")
    assert sorted(line.split(":")[0] for line in err[1:3]) == ["rec-a", "rec-b"]


def test_one_daemon_the_cli_prints_as_before_within_the_grace(
        two_daemons: type[TwoDaemonsAdapter], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """One daemon: the reply alone, as before, and at most the grace later."""
    from recorder.cli import admin, main

    monkeypatch.setattr(two_daemons, "SOLO", True)
    t0 = time.monotonic()
    assert main(["start", "x"]) == 1
    took = time.monotonic() - t0
    assert capsys.readouterr().err == "unknown_run: no run named 'x'; its runs: y\n"
    assert took < admin.REPLY_GRACE_S + 0.4, took
    assert main(["status", "--json"]) == 0
    out = capsys.readouterr()
    assert out.err == "" and '"instance": "rec-b"' in out.out


def test_two_daemons_of_one_name_are_both_shown(
        two_daemons: type[TwoDaemonsAdapter], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two daemons on one host both named by default after it: neither reply is taken for a
    repeat of the other."""
    from recorder.cli import main

    monkeypatch.setattr(two_daemons, "NAMES", ("daq-3", "daq-3"))
    monkeypatch.setattr(two_daemons, "START_S", 0.05)
    assert main(["start", "x"]) == 0
    out = capsys.readouterr()
    assert out.out == "ok: run 'x' recording into /d/x.h5\n"
    assert sorted(out.err.splitlines()[:2]) == ["daq-3: ok run 'x' recording into /d/x.h5",
                                                "daq-3: unknown_run no run named 'x'; its runs: y"]


@pytest.mark.parametrize(("skew_s", "said"), [(-90.0, "behind"), (20.0, "ahead of")])
def test_a_command_expired_by_the_clocks_of_two_hosts_says_so(
        two_daemons: type[TwoDaemonsAdapter], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch, skew_s: float, said: str) -> None:
    """The CLI ran on a host whose clock is 90 s behind the daemon's (or 20 s ahead). With
    RECORDER_ADMIN_SECRET set, the daemon's signed "expired" reply names no command, so the
    CLI passed it over as if a forged copy had caused it and, after --timeout, said "no
    reply ... is the daemon running?" (exit 3); without a secret it printed "expired:
    command is 90.0 s old" for a command sent a moment ago, and nothing said why. The CLI
    now takes that reply when no other came (exit 1) and says that this host's clock is
    that far behind (ahead of) the daemon's, from the reply's replied_at."""
    import types

    from recorder.admin import protocol
    from recorder.cli import main

    monkeypatch.setattr(two_daemons, "SOLO", True)
    here = types.SimpleNamespace(time_ns=lambda: time.time_ns() + int(skew_s * 1e9),
                                 monotonic=time.monotonic)
    monkeypatch.setattr(protocol, "time", here)  # the CLI host's clock: its issued_at...
    monkeypatch.setattr(adminclient, "time", here)  # ...and when it reads the reply
    t0 = time.monotonic()
    assert main(["status", "--timeout", "3"]) == 1  # not "no reply" (3)
    assert time.monotonic() - t0 < 5
    err = capsys.readouterr().err
    assert err.startswith("expired: command is"), err
    assert f"this host's clock is about {abs(skew_s):.0f} s {said} the daemon's" in err, err
    # clocks in step: nothing said about them
    monkeypatch.setattr(protocol, "time", time)
    monkeypatch.setattr(adminclient, "time", time)
    assert main(["status"]) == 0
    assert "clock" not in capsys.readouterr().err
