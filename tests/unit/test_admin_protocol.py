"""Admin command/reply codec: validation, expiry, HMAC, replay guard, garbage never raises."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recorder.admin.protocol import (
    MAX_COMMAND_BYTES,
    AdminCommand,
    AdminReply,
    CommandKind,
    CommandPolicy,
    CommandRejectedError,
    ReplayGuard,
    ReplyCode,
    build_command,
    canonical_json,
    decode_command,
    decode_or_reject,
    decode_reply,
    encode_command,
    sign,
    verify,
)
from recorder.errors import AdminCommandError

NOW = 1_732_212_345_678
SECRET = b"s3cret-key"
OPEN = CommandPolicy(max_age_s=30, max_future_skew_s=5)
SIGNED = CommandPolicy(max_age_s=30, max_future_skew_s=5, secret=SECRET)


def raw(**fields: Any) -> bytes:
    base: dict[str, Any] = {"command": "start", "request_id": "r-1", "run": "bpm", "issued_at": NOW}
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not DROP}).encode()


DROP: Any = object()


def rejected(payload: bytes, policy: CommandPolicy = OPEN, **kw: Any) -> CommandRejectedError:
    with pytest.raises(CommandRejectedError) as info:
        decode_command(payload, policy, now_ms=kw.pop("now_ms", NOW), **kw)
    return info.value


# --- valid commands --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, AdminCommand(CommandKind.START, "r-1", "bpm", issued_at=NOW)),
        ({"command": "stop"}, AdminCommand(CommandKind.STOP, "r-1", "bpm", issued_at=NOW)),
        (
            {"command": "trigger", "tags": {"shot": "42", "beam": "on"}, "reply_topic": "ops.r"},
            AdminCommand(
                CommandKind.TRIGGER, "r-1", "bpm", "ops.r", {"shot": "42", "beam": "on"}, NOW
            ),
        ),
        (
            {"command": "status", "run": DROP},
            AdminCommand(CommandKind.STATUS, "r-1", issued_at=NOW),
        ),
        ({"command": "status"}, AdminCommand(CommandKind.STATUS, "r-1", "bpm", issued_at=NOW)),
        (
            {"command": "reload", "run": DROP},
            AdminCommand(CommandKind.RELOAD, "r-1", issued_at=NOW),
        ),
    ],
)
def test_valid_commands(fields: dict[str, Any], expected: AdminCommand) -> None:
    assert decode_command(raw(**fields), OPEN, now_ms=NOW) == expected


# --- malformed -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        (b"", "not a JSON command"),
        (b"\xff\xfe", "not a JSON command"),
        (b"{", "not a JSON command"),
        (b"[1, 2]", "JSON object"),
        (b'"start"', "JSON object"),
        (b"null", "JSON object"),
        (b'{"command": "start", "command": "stop"}', "duplicate key 'command'"),
        (b'{"command": "start", "request_id": "a", "run": "b", "issued_at": NaN}', "NaN"),
        (raw(command="launch"), "command must be one of"),
        (raw(command=["start"]), "command must be one of"),
        (raw(command=DROP), "command must be one of"),
        (raw(request_id=DROP), "request_id"),
        (raw(request_id=""), "request_id"),
        (raw(request_id="has space"), "request_id"),
        (raw(request_id="x" * 129), "request_id"),
        (raw(request_id=7), "request_id"),
        (raw(run=DROP), "start needs a run"),
        (raw(command="stop", run=DROP), "stop needs a run"),
        (raw(command="trigger", run=DROP), "trigger needs a run"),
        (raw(run="../etc"), "run must be a run name"),
        (raw(run=None), "run must be a run name"),
        (raw(command="reload"), "reload takes no run"),
        (raw(reply_topic="bad topic!"), "reply_topic"),
        (raw(reply_topic=""), "reply_topic"),
        (raw(tags={"a": "b"}), "tags are only allowed with trigger"),
        (raw(command="trigger", tags=["a"]), "tags must be an object"),
        (raw(command="trigger", tags={"a": 1}), "tag 'a' must be a string"),
        (raw(command="trigger", tags={"": "x"}), "tag names"),
        (raw(command="trigger", tags={"k2eg-recorder.cause": "x"}), "the recorder's own"),
        (raw(command="trigger", tags={str(i): "v" for i in range(65)}), "at most 64 tags"),
        # a lone surrogate (JSON "\ud800"; a CLI argument with a byte that is not UTF-8)
        (raw(command="trigger", tags={"shot": "\ud800"}), "tag 'shot' is not valid Unicode"),
        (raw(command="trigger", tags={"\udcff": "1"}), "is not valid Unicode"),
        (raw(issued_at=True), "issued_at must be integer"),
        (raw(issued_at=float(NOW)), "issued_at must be integer"),
        (raw(issued_at=-1), "issued_at must be integer"),
        (raw(issued_at="now"), "issued_at must be integer"),
        (raw(signature="abc"), "signature must be 64"),
        (raw(extra=1, more=2), "unknown field(s) extra, more"),
        (b" " * 70_000, "more than 65536"),
    ],
)
def test_malformed(payload: bytes, needle: str) -> None:
    error = rejected(payload)
    assert error.reply_code is ReplyCode.MALFORMED
    assert error.code == "malformed"
    assert needle in error.message
    assert isinstance(error, AdminCommandError)


def test_a_command_too_large_is_refused_under_its_request_id() -> None:
    """A trigger within the tag limits can be larger than a command may be: refused, but
    answered under its request_id on its reply_topic (the sender waits for that reply)."""
    payload = raw(command="trigger", request_id="big-1", reply_topic="ops",
                  tags={f"t{i}": "x" * 1024 for i in range(64)})
    assert len(payload) > MAX_COMMAND_BYTES
    error = rejected(payload)
    assert error.reply_code is ReplyCode.MALFORMED and "more than 65536" in error.message
    assert (error.request_id, error.reply_topic, error.run) == ("big-1", "ops", "bpm")
    with pytest.raises(CommandRejectedError, match="more than 65536"):
        build_command("trigger", run="bpm", tags={f"t{i}": "x" * 1024 for i in range(64)})


def test_all_problems_are_listed_at_once() -> None:
    error = rejected(raw(command="trigger", run=DROP, reply_topic="a b", issued_at=True))
    for needle in ("trigger needs a run", "reply_topic", "issued_at"):
        assert needle in error.message


def test_error_reply_keeps_what_can_be_addressed() -> None:
    error = rejected(raw(command="trigger", request_id="req-9", reply_topic="ops", tags=[1]))
    reply = error.reply(now_ms=NOW + 1)
    assert reply.to_json_obj() == {
        "request_id": "req-9",
        "command": "trigger",
        "run": "bpm",
        "ok": False,
        "code": "malformed",
        "message": error.message,
        "replied_at": NOW + 1,
    }
    assert error.reply_topic == "ops"
    # unusable address fields are not echoed
    bad = rejected(raw(request_id="two words", reply_topic="a b", run="../x", command="go"))
    assert (bad.request_id, bad.reply_topic, bad.run, bad.command) == (None, None, None, None)


# --- expiry ------------------------------------------------------------------------------------
def test_expired_and_future_commands() -> None:
    assert decode_command(raw(issued_at=NOW - 30_000), OPEN, now_ms=NOW).issued_at == NOW - 30_000
    old = rejected(raw(issued_at=NOW - 30_001))
    assert old.reply_code is ReplyCode.EXPIRED
    assert "30.0 s old" in old.message
    assert decode_command(raw(issued_at=NOW + 5_000), OPEN, now_ms=NOW).run == "bpm"
    future = rejected(raw(issued_at=NOW + 5_001))
    assert future.reply_code is ReplyCode.EXPIRED
    assert "future" in future.message


def test_message_timestamp_is_the_fallback_age() -> None:
    payload = raw(issued_at=DROP)
    assert decode_command(payload, OPEN, now_ms=NOW, message_timestamp_ms=NOW - 1000).run == "bpm"
    error = rejected(payload, message_timestamp_ms=NOW - 60_000)
    assert error.reply_code is ReplyCode.EXPIRED
    assert rejected(payload).reply_code is ReplyCode.MALFORMED  # no way to know its age
    # issued_at wins over the message timestamp
    error = rejected(raw(issued_at=NOW - 60_000), message_timestamp_ms=NOW)
    assert error.reply_code is ReplyCode.EXPIRED


# --- HMAC ------------------------------------------------------------------------------------
def test_canonical_form_is_documented_json() -> None:
    obj = {
        "run": "b\u00e9",
        "command": "start",
        "issued_at": 5,
        "signature": "x",
        "tags": {"z": "1", "a": "2"},
    }
    assert (
        canonical_json(obj)
        == b'{"command":"start","issued_at":5,"run":"b\\u00e9","tags":{"a":"2","z":"1"}}'
    )
    expected = hmac.new(SECRET, canonical_json(obj), hashlib.sha256).hexdigest()
    assert sign(obj, SECRET) == expected
    assert sign(obj, SECRET.decode()) == expected


def test_signed_round_trip_and_key_order_independence() -> None:
    command = build_command(
        "trigger", run="wf", tags={"shot": "1"}, secret=SECRET, issued_at_ms=NOW
    )
    payload = encode_command(command)
    assert decode_command(payload, SIGNED, now_ms=NOW) == command
    # the same object re-serialized with other key order and whitespace still verifies
    obj = json.loads(payload)
    shuffled = json.dumps(dict(reversed(list(obj.items()))), indent=2).encode()
    assert decode_command(shuffled, SIGNED, now_ms=NOW) == command


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda o: o.pop("signature"), "signature missing"),
        (lambda o: o.update(run="other"), "bad signature"),
        (lambda o: o.update(issued_at=o["issued_at"] + 1), "bad signature"),
        (lambda o: o.update(tags={"shot": "2"}), "bad signature"),
        (lambda o: o.update(signature="0" * 64), "bad signature"),
        (lambda o: o.update(signature=o["signature"].upper()), "bad signature"),
        (lambda o: o.update(signature=17), "bad signature"),
    ],
)
def test_unauthorized(mutate: Any, needle: str) -> None:
    obj = build_command("trigger", run="wf", tags={"shot": "1"}, secret=SECRET, issued_at_ms=NOW)
    data = obj.to_json_obj()
    mutate(data)
    error = rejected(json.dumps(data).encode(), SIGNED)
    assert error.reply_code is ReplyCode.UNAUTHORIZED
    assert needle in error.message


def test_wrong_secret_and_unsigned_issued_at() -> None:
    other = encode_command(build_command("stop", run="bpm", secret=b"other", issued_at_ms=NOW))
    assert rejected(other, SIGNED).reply_code is ReplyCode.UNAUTHORIZED
    data = {"command": "stop", "run": "bpm", "request_id": "r"}
    data["signature"] = sign(data, SECRET)
    error = rejected(json.dumps(data).encode(), SIGNED, message_timestamp_ms=NOW)
    assert error.reply_code is ReplyCode.UNAUTHORIZED
    assert "issued_at" in error.message


def test_unauthorized_is_checked_before_content() -> None:
    # an unauthenticated sender learns nothing about which fields are wrong
    error = rejected(raw(command="launch", extra=1), SIGNED)
    assert error.reply_code is ReplyCode.UNAUTHORIZED


def test_build_command_refuses_what_the_daemon_would() -> None:
    with pytest.raises(CommandRejectedError, match="start needs a run"):
        build_command("start")
    with pytest.raises(CommandRejectedError, match="tags are only allowed"):
        build_command("stop", run="a", tags={"x": "y"})
    command = build_command(CommandKind.STATUS)
    assert command.signature is None
    assert len(command.request_id) == 32
    assert command.issued_at is not None
    assert abs(command.issued_at - time.time_ns() // 1_000_000) < 5_000


def test_verify_rejects_non_hex_and_nan() -> None:
    assert not verify({"a": 1}, SECRET)
    assert not verify({"a": float("nan"), "signature": "0" * 64}, SECRET)
    good = {"a": 1}
    good["signature"] = sign(good, SECRET)  # type: ignore[assignment]
    assert verify(good, SECRET)


# --- replies -----------------------------------------------------------------------------------
def test_success_and_failure_replies_round_trip() -> None:
    command = decode_command(raw(command="trigger", tags={"k": "v"}), OPEN, now_ms=NOW)
    ok = AdminReply.success(command, "armed", now_ms=NOW + 3, data={"iteration": 7}, secret=SECRET)
    assert ok.ok
    decoded = decode_reply(ok.encode(), secret=SECRET)
    assert decoded == ok
    assert json.loads(ok.encode())["data"] == {"iteration": 7}

    error = AdminCommandError("wrong_mode", "run 'bpm' is periodic; trigger needs triggered: true")
    failure = AdminReply.failure(command, error, now_ms=NOW)
    assert failure.code is ReplyCode.WRONG_MODE
    assert not failure.ok
    assert decode_reply(failure.encode()) == failure


def test_every_error_code_round_trips() -> None:
    command = decode_command(raw(), OPEN, now_ms=NOW)
    for code in ReplyCode:
        if code is ReplyCode.OK:
            continue
        reply = AdminReply.failure(command, AdminCommandError(code.value, "m"), now_ms=NOW)
        assert decode_reply(reply.encode()).code is code


def test_unknown_error_code_becomes_internal() -> None:
    command = decode_command(raw(), OPEN, now_ms=NOW)
    for code in ("boom", "ok"):
        reply = AdminReply.failure(command, AdminCommandError(code, "m"), now_ms=NOW)
        assert reply.code is ReplyCode.INTERNAL


def test_reply_data_non_finite_becomes_null() -> None:
    command = decode_command(raw(command="status"), OPEN, now_ms=NOW)
    reply = AdminReply.success(command, "ok", now_ms=NOW, data={"lag": float("inf"), "t": (1, 2)})
    assert json.loads(reply.encode())["data"] == {"lag": None, "t": [1, 2]}


def test_tampered_or_unsigned_reply_is_refused_by_a_client_with_a_secret() -> None:
    command = decode_command(raw(), OPEN, now_ms=NOW)
    reply = AdminReply.success(command, "started", now_ms=NOW, secret=SECRET)
    obj = json.loads(reply.encode())
    obj["message"] = "stopped"
    with pytest.raises(AdminCommandError) as info:
        decode_reply(json.dumps(obj).encode(), secret=SECRET)
    assert info.value.code == "unauthorized"
    unsigned = AdminReply.success(command, "started", now_ms=NOW)
    with pytest.raises(AdminCommandError):
        decode_reply(unsigned.encode(), secret=SECRET)


def test_client_names_a_reply_to_its_request_signed_with_another_secret() -> None:
    """The admin CLI with the wrong secret: the daemon's answer to *its* request fails the
    signature check and is reported at once (not waited for until the timeout); replies to
    other requests and garbage are still just skipped."""
    from recorder.daemon.adminclient import AdminClient
    from recorder.errors import UnverifiedReplyError

    command = decode_command(raw(), OPEN, now_ms=NOW)
    reply = AdminReply.failure(command, AdminCommandError("unauthorized", "bad signature"),
                               now_ms=NOW, secret=b"the-daemons-own-secret")
    assert command.request_id is not None
    with pytest.raises(UnverifiedReplyError) as info:
        AdminClient._unverified(reply.encode(), command.request_id)
    assert "unauthorized: bad signature" in str(info.value)
    assert "RECORDER_ADMIN_SECRET" in str(info.value)
    AdminClient._unverified(reply.encode(), "someone-elses-request")  # not ours: no error
    AdminClient._unverified(b"\xff junk", command.request_id)


@pytest.mark.parametrize(
    "payload",
    [
        b"nope",
        b"[]",
        b'{"code": "ok"}',
        b'{"code": "weird", "message": "", "replied_at": 1}',
        b'{"code": "ok", "message": 1, "replied_at": 1}',
        b'{"code": "ok", "message": "", "replied_at": 1, "data": [1]}',
        b'{"code": "ok", "message": "", "replied_at": 1, "run": 5}',
    ],
)
def test_bad_replies(payload: bytes) -> None:
    with pytest.raises(AdminCommandError):
        decode_reply(payload)


# --- replay guard ------------------------------------------------------------------------------
def test_replay_guard() -> None:
    guard = ReplayGuard(window_s=35)
    command = decode_command(raw(), OPEN, now_ms=NOW)
    guard.check(command, now_ms=NOW)
    with pytest.raises(CommandRejectedError) as info:
        guard.check(command, now_ms=NOW + 35_000)
    assert info.value.reply_code is ReplyCode.DUPLICATE
    assert info.value.request_id == "r-1"
    guard.check(command, now_ms=NOW + 35_001)  # forgotten after the window: would be expired
    assert len(guard) == 1


def test_replay_guard_is_bounded() -> None:
    guard = ReplayGuard(window_s=1000, max_entries=3)
    for i in range(5):
        guard.check(AdminCommand(CommandKind.STATUS, f"r{i}"), now_ms=NOW)
    assert len(guard) == 3


def test_replay_guard_carries_its_window_over_to_a_new_process() -> None:
    first = ReplayGuard(window_s=35)
    for i, at in enumerate((NOW - 40_000, NOW - 20_000, NOW)):
        first.check(AdminCommand(CommandKind.STATUS, f"r{i}"), now_ms=at)
    kept = first.remembered(NOW)
    assert kept == {"r1": NOW - 20_000, "r2": NOW}  # r0 is out of the window
    second = ReplayGuard(window_s=35)
    second.restore({**kept, "r0": NOW - 40_000}, now_ms=NOW + 10_000)
    with pytest.raises(CommandRejectedError):
        second.check(AdminCommand(CommandKind.STATUS, "r2"), now_ms=NOW + 10_000)
    second.check(AdminCommand(CommandKind.STATUS, "r0"), now_ms=NOW + 10_000)  # forgotten
    second.check(AdminCommand(CommandKind.STATUS, "r1"), now_ms=NOW + 16_000)  # expired now


# --- garbage never raises ------------------------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
command_like = st.fixed_dictionaries(
    {},
    optional={
        "command": st.sampled_from([*CommandKind, "x"]) | json_values,
        "request_id": st.text(max_size=10) | json_values,
        "run": st.sampled_from(["bpm", ""]) | json_values,
        "reply_topic": st.text(max_size=10) | json_values,
        "tags": st.dictionaries(st.text(max_size=4), st.text(max_size=4)) | json_values,
        "issued_at": st.integers(NOW - 60_000, NOW + 60_000) | json_values,
        "signature": st.text(alphabet="0123456789abcdef", min_size=64, max_size=64) | json_values,
        "other": json_values,
    },
)


def _check_outcome(result: AdminCommand | AdminReply) -> None:
    if isinstance(result, AdminReply):
        assert result.code is not ReplyCode.OK
        assert result.message
        json.loads(result.encode())  # always encodable
    else:
        assert isinstance(result.command, CommandKind)


@settings(max_examples=400, deadline=None)
@given(payload=st.binary(max_size=300))
def test_random_bytes_always_give_an_error_reply(payload: bytes) -> None:
    for policy in (OPEN, SIGNED):
        result = decode_or_reject(payload, policy, now_ms=NOW, message_timestamp_ms=NOW)
        _check_outcome(result)


@settings(max_examples=400, deadline=None)
@given(obj=command_like | json_values)
def test_random_json_never_raises(obj: Any) -> None:
    payload = json.dumps(obj).encode()
    for policy in (OPEN, SIGNED):
        for timestamp in (None, NOW):
            result = decode_or_reject(payload, policy, now_ms=NOW, message_timestamp_ms=timestamp)
            _check_outcome(result)
            if isinstance(result, AdminCommand):  # a valid command survives re-encoding
                again = decode_command(
                    encode_command(result), policy, now_ms=NOW, message_timestamp_ms=timestamp
                )
                assert again == result


@settings(max_examples=200, deadline=None)
@given(
    kind=st.sampled_from(list(CommandKind)),
    tags=st.dictionaries(st.text(min_size=1, max_size=10), st.text(max_size=10), max_size=5),
    request_id=st.text(
        alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=40
    ),
)
def test_built_commands_always_decode(
    kind: CommandKind, tags: dict[str, str], request_id: str
) -> None:
    run = None if kind in (CommandKind.RELOAD, CommandKind.STATUS) else "run-1"
    command = build_command(
        kind,
        run=run,
        tags=tags if kind is CommandKind.TRIGGER else None,
        request_id=request_id,
        issued_at_ms=NOW,
        secret=SECRET,
    )
    assert decode_command(encode_command(command), SIGNED, now_ms=NOW) == command


def test_an_issued_at_beyond_any_clock_is_answered_not_raised() -> None:
    """JSON integers have no bound: ``issued_at`` 10**400 passed validation, and formatting
    its age (``age_ms / 1000``) raised OverflowError out of decode_or_reject ("never raises")
    and out of the daemon's main loop; the admin offset was not saved past it, so every
    restart read the same command again and died again."""
    for value in (10**400, 2**63):
        result = decode_or_reject(raw(issued_at=value), OPEN, now_ms=NOW)
        assert isinstance(result, AdminReply)
        assert result.code in (ReplyCode.MALFORMED, ReplyCode.EXPIRED)
        json.loads(result.encode())


def test_reply_topics_kafka_refuses_are_malformed() -> None:
    """Kafka refuses the topic names "." and ".." and names with a newline (they passed the
    pattern, whose ``$`` also matches before a final newline): the command was acted on and
    its reply, produced there, was lost."""
    for topic in (".", "..", "ops-replies\n"):
        error = rejected(raw(reply_topic=topic))
        assert error.reply_code is ReplyCode.MALFORMED and error.reply_topic is None
    assert decode_command(raw(reply_topic="a..b"), OPEN, now_ms=NOW).reply_topic == "a..b"
    for field in ("run", "request_id"):  # neither are the other patterns fooled
        assert rejected(raw(**{field: "bpm\n"})).reply_code is ReplyCode.MALFORMED


def test_signed_replies_name_the_command_they_answer() -> None:
    from recorder.admin.protocol import (
        AdminReply,
        CommandPolicy,
        CommandRejectedError,
        ReplyCode,
        answers_command,
        build_command,
        decode_reply,
    )

    secret = b"0123456789abcdef0123"
    cmd = build_command("status", issued_at_ms=1, secret=secret)
    ok = AdminReply.success(cmd, "fine", now_ms=2, secret=secret)
    assert ok.to_json_obj()["answers"] == cmd.signature
    got = decode_reply(ok.encode(), secret=secret)
    assert got.bound and got.answers == cmd.signature and answers_command(got, cmd)
    # a rejected command (here: someone's unsigned copy with the same request_id)
    rejected = CommandRejectedError(ReplyCode.UNAUTHORIZED, "bad signature",
                                    request_id=cmd.request_id).reply(now_ms=3, secret=secret)
    got = decode_reply(rejected.encode(), secret=secret)
    assert got.bound and got.answers is None and "answers" in rejected.to_json_obj()
    assert not answers_command(got, cmd)
    other = build_command("status", issued_at_ms=5, secret=secret, request_id=cmd.request_id)
    assert not answers_command(decode_reply(
        AdminReply.success(other, "x", now_ms=2, secret=secret).encode(), secret=secret), cmd)
    # without a secret the reply is as before (no "answers"), and taken as before
    plain = AdminReply.success(build_command("status", issued_at_ms=1), "fine", now_ms=2)
    assert "answers" not in plain.to_json_obj()
    assert answers_command(decode_reply(plain.encode()), cmd)
    assert CommandPolicy(max_age_s=30).secret is None


def test_a_reply_names_the_daemon_that_sent_it_and_its_signature_covers_the_name() -> None:
    """Several daemons that read one admin topic each answer every command: a reply carries
    the answering daemon's RECORDER_INSTANCE (``instance``), signed as every other field;
    a reply without it (an older daemon) still parses and verifies."""
    from recorder.admin.status import DaemonState, StatusDocument
    from recorder.client.wire import Record
    from recorder.daemon.admin import AdminHandler

    cmd = build_command("trigger", run="wf", issued_at_ms=NOW, secret=SECRET)
    old = AdminReply.success(cmd, "armed", now_ms=NOW + 1, secret=SECRET)
    assert "instance" not in old.to_json_obj()
    got = decode_reply(old.encode(), secret=SECRET)
    assert got.instance is None and got.ok  # an older daemon's reply: as before

    named = old.from_instance("rec-bpm", SECRET)
    obj = json.loads(named.encode())
    assert obj["instance"] == "rec-bpm" and obj["answers"] == cmd.signature
    assert obj["signature"] == sign(obj, SECRET) != old.signature  # the name is signed
    got = decode_reply(named.encode(), secret=SECRET)
    assert got.instance == "rec-bpm" and got == named
    obj["instance"] = "rec-other"  # someone renames the answering daemon
    with pytest.raises(AdminCommandError) as info:
        decode_reply(json.dumps(obj).encode(), secret=SECRET)
    assert info.value.code == "unauthorized"
    # without a secret: named, unsigned
    plain = AdminReply.success(cmd, "armed", now_ms=NOW).from_instance("rec-bpm", None)
    assert plain.signature is None and decode_reply(plain.encode()).instance == "rec-bpm"
    with pytest.raises(AdminCommandError, match="instance"):
        decode_reply(b'{"code": "ok", "message": "", "replied_at": 1, "instance": 7}')

    # the daemon names itself in every reply it sends, signed or not, and rejections too
    for secret in (SECRET, None):
        sent: list[bytes] = []
        handler = AdminHandler(CommandPolicy(max_age_s=30, secret=secret), "replies",
                               lambda _topic, payload, out=sent: out.append(payload),
                               clock_ms=lambda: NOW, instance="rec-bpm")

        class Target:
            def run_handle(self, name: str) -> None:
                return None

            def status_document(self, kind: str = "status") -> StatusDocument:
                return StatusDocument("rec-bpm", DaemonState.RUNNING, 1, 0, kind=kind)

        good = build_command("start", run="wf", issued_at_ms=NOW, secret=secret)
        for payload in (encode_command(good), b"junk"):
            handler.handle(Record("admin", 0, 0, payload, None, NOW), Target())  # type: ignore[arg-type]
        replies = [decode_reply(p, secret=secret) for p in sent]
        assert [(r.code.value, r.instance) for r in replies] == [
            ("unknown_run", "rec-bpm"), ("malformed", "rec-bpm")]
        assert secret is None or replies[0].answers == good.signature
