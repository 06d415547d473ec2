"""Admin topic protocol: commands, replies and status documents as JSON (pure code, no I/O).

Command (one Kafka message, a UTF-8 JSON object)::

    {"command": "trigger",            # start | stop | trigger | status | reload
     "request_id": "7f3c...",         # 1..128 printable ASCII chars, echoed in the reply
     "run": "wf-triggered",           # start/stop/trigger: required; status: optional; reload: none
     "reply_topic": "ops-replies",    # optional: where the reply goes (else the daemon's default)
     "tags": {"shot": "42"},          # trigger only, optional: string -> string, recorded
     "issued_at": 1732212345678,      # ms since the Unix epoch; optional unless signing is on
     "signature": "9c0f..."}          # hex HMAC-SHA256, required when a secret is configured

Reply (always exactly one per command, on ``reply_topic`` or the default reply topic)::

    {"request_id": "7f3c...", "command": "trigger", "run": "wf-triggered",
     "ok": true, "code": "ok", "message": "run 'wf-triggered' triggered",
     "data": {...}, "replied_at": 1732212345702,
     "instance": "rec-bpm",           # the answering daemon's RECORDER_INSTANCE (optional)
     "answers": "9c0f...", "signature": "..."}  # with a secret: see Signature

Several daemons that read one admin topic each answer every command; ``instance`` tells their
replies apart (a reply of an older daemon has none).

Error codes (:class:`ReplyCode`): ``unknown_run``, ``not_running``, ``already_running``,
``wrong_mode`` (trigger on a periodic run), ``malformed``, ``expired``, ``unauthorized``,
``duplicate`` (request_id seen within the max age: a replay or a redelivery),
``invalid_config`` (a reload found bad definitions and kept the old ones), ``start_failed``
(the run could not start recording, e.g. its output directory cannot be created; the reason
says why), ``internal``.

**Signature.** ``signature = hex(HMAC-SHA256(key=secret as UTF-8, msg=canonical))`` where
``canonical`` is the JSON object *without* its ``signature`` member, encoded as
``json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)``:
keys sorted by code point, no whitespace, non-ASCII escaped as ``\\uXXXX`` (lower-case hex),
integers in decimal. Commands hold only strings, integers and string maps, so the form is easy
to reproduce in any language. Verification is constant-time (:func:`hmac.compare_digest`);
``issued_at`` is required in signed commands so a captured command cannot be replayed after it
expires. Replies are signed the same way when a secret is configured, and then carry
``answers``: the signature of the command they answer, ``null`` for a command that was
rejected before it was acted on (unsigned, badly signed, malformed, expired, duplicate).
Anyone who can write to the admin topic can make the daemon answer (``unauthorized``) a
``request_id`` they saw; a client therefore takes as its reply only one whose ``answers`` is
its own command's signature (:func:`answers_command`).

**Age.** A command is *expired* when ``now - issued_at`` (or the Kafka message timestamp when
there is no ``issued_at``) exceeds the configured max age, or when it claims to be issued more
than the allowed clock skew in the future. It is answered, never acted on.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import math
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from recorder.errors import AdminCommandError

__all__ = [
    "MAX_COMMAND_BYTES",
    "AdminCommand",
    "AdminReply",
    "CommandKind",
    "CommandPolicy",
    "CommandRejectedError",
    "ReplayGuard",
    "ReplyCode",
    "answers_command",
    "build_command",
    "canonical_json",
    "decode_command",
    "decode_or_reject",
    "decode_reply",
    "encode_command",
    "files_text",
    "reply_files",
    "sign",
    "verify",
]

MAX_COMMAND_BYTES = 64 * 1024
OVERSIZE_READ = 16  # a command up to this many times too large is read for its reply address
MAX_TAGS = 64
MAX_TAG_CHARS = 1024
REPLY_FILES_CHARS = 200_000
"""File paths listed in a reply, at most (a stop reply lists them twice: its message and its
``files``): a reply is one Kafka message, at most ~1 MB (librdkafka's default). A run holds
the newest :data:`recorder.newest.FILES_KEPT` of its files only (and how many there are)."""
MAX_ISSUED_AT = 2**63 - 1  # Kafka's timestamps are int64 ms; beyond, an age overflows a float
# \Z, not $ (which also matches before a final newline: "replies\n" passed, and Kafka
# refuses that topic name, as it does "." and "..": the reply was lost)
REQUEST_ID_RE = re.compile(r"^[\x21-\x7e]{1,128}\Z")
TOPIC_RE = re.compile(r"^(?!\.\.?\Z)[A-Za-z0-9._\-]{1,249}\Z")
TOPIC_RULE = "not a valid Kafka topic name ([A-Za-z0-9._-]{1,249})"  # what TOPIC_RE refuses


def topic_collision_key(topic: str) -> str:
    """What Kafka compares topic names by when it refuses a new topic that collides with an
    existing one: ``.`` and ``_`` taken for the same character."""
    return topic.replace(".", "_")


RUN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}\Z")  # as recorder.config.models
SIGNATURE_RE = re.compile(r"^[0-9a-f]{64}\Z")
COMMAND_KEYS = frozenset(
    {"command", "request_id", "run", "reply_topic", "tags", "issued_at", "signature"}
)


class CommandKind(enum.StrEnum):
    START = "start"
    STOP = "stop"
    TRIGGER = "trigger"
    STATUS = "status"
    RELOAD = "reload"


RUN_REQUIRED = frozenset({CommandKind.START, CommandKind.STOP, CommandKind.TRIGGER})


class ReplyCode(enum.StrEnum):
    OK = "ok"
    UNKNOWN_RUN = "unknown_run"
    NOT_RUNNING = "not_running"
    ALREADY_RUNNING = "already_running"
    WRONG_MODE = "wrong_mode"
    MALFORMED = "malformed"
    EXPIRED = "expired"
    UNAUTHORIZED = "unauthorized"
    DUPLICATE = "duplicate"
    INVALID_CONFIG = "invalid_config"
    START_FAILED = "start_failed"
    INTERNAL = "internal"


# --- canonical form and HMAC ---------------------------------------------------------------
def reply_files(files: Sequence[str]) -> list[str]:
    """The newest of ``files`` (oldest first) whose paths add up to at most
    :data:`REPLY_FILES_CHARS`: a long recording has tens of thousands of segment files."""
    total = 0
    for i in range(len(files) - 1, -1, -1):
        total += len(files[i]) + 4
        if total > REPLY_FILES_CHARS:
            return list(files[i + 1 :])
    return list(files)


def files_text(files: Sequence[str], total: int | None = None) -> str:
    """``files: a, b`` for a reply's message (the newest: :func:`reply_files`, after how many
    there are: ``total``, when ``files`` are only the newest of them). Ends with
    ``"; files: " + ", ".join(reply_files(files))`` after a ``;``."""
    shown = reply_files(files)
    total = len(files) if total is None else max(total, len(files))
    if len(shown) == total:
        return f"files: {', '.join(files) or 'none'}"
    return f"{total} files, the last {len(shown)} listed; files: {', '.join(shown)}"


def canonical_json(obj: Mapping[str, Any]) -> bytes:
    """The signed bytes: ``obj`` without ``signature``, sorted keys, compact, ASCII."""
    body = {k: v for k, v in obj.items() if k != "signature"}
    return json.dumps(
        body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def sign(obj: Mapping[str, Any], secret: bytes | str) -> str:
    """Hex HMAC-SHA256 of the canonical form of ``obj``."""
    key = secret.encode("utf-8") if isinstance(secret, str) else secret
    return hmac.new(key, canonical_json(obj), hashlib.sha256).hexdigest()


def verify(obj: Mapping[str, Any], secret: bytes | str) -> bool:
    """True when ``obj["signature"]`` is the HMAC of the rest (constant-time comparison)."""
    signature = obj.get("signature")
    if not isinstance(signature, str) or not SIGNATURE_RE.match(signature):
        return False
    try:
        expected = sign(obj, secret)
    except (TypeError, ValueError, RecursionError):  # not encodable: cannot be genuine
        return False
    return hmac.compare_digest(expected, signature)


# --- commands ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class CommandPolicy:
    """What the daemon accepts: max age, allowed clock skew, optional shared secret."""

    max_age_s: float = 30.0
    max_future_skew_s: float = 5.0
    secret: bytes | None = None
    max_bytes: int = MAX_COMMAND_BYTES


@dataclass(frozen=True, slots=True)
class AdminCommand:
    """A valid, authenticated, fresh admin command."""

    command: CommandKind
    request_id: str
    run: str | None = None
    reply_topic: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)
    issued_at: int | None = None  # ms since the epoch
    signature: str | None = None

    def to_json_obj(self) -> dict[str, Any]:
        obj: dict[str, Any] = {"command": self.command.value, "request_id": self.request_id}
        if self.run is not None:
            obj["run"] = self.run
        if self.reply_topic is not None:
            obj["reply_topic"] = self.reply_topic
        if self.tags:
            obj["tags"] = dict(self.tags)
        if self.issued_at is not None:
            obj["issued_at"] = self.issued_at
        if self.signature is not None:
            obj["signature"] = self.signature
        return obj


class CommandRejectedError(AdminCommandError):
    """A command that cannot be acted on, with what is known to address the reply."""

    def __init__(
        self,
        code: ReplyCode,
        message: str,
        *,
        request_id: str | None = None,
        command: str | None = None,
        run: str | None = None,
        reply_topic: str | None = None,
    ) -> None:
        super().__init__(code.value, message)
        self.reply_code = code
        self.request_id = request_id
        self.command = command
        self.run = run
        self.reply_topic = reply_topic

    def reply(self, *, now_ms: int, secret: bytes | None = None) -> AdminReply:
        return AdminReply(
            request_id=self.request_id,
            command=self.command,
            run=self.run,
            code=self.reply_code,
            message=self.message,
            replied_at=now_ms,
        ).signed(secret)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _parse_json(payload: bytes, max_bytes: int) -> Any:
    if len(payload) > max_bytes:
        raise ValueError(f"command is {len(payload)} bytes, more than {max_bytes}")
    text = payload.decode("utf-8")
    return json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_reject_constant)


def _peek_str(obj: Mapping[str, Any], key: str, pattern: re.Pattern[str]) -> str | None:
    value = obj.get(key)
    return value if isinstance(value, str) and pattern.match(value) else None


def decode_command(
    payload: bytes,
    policy: CommandPolicy,
    *,
    now_ms: int,
    message_timestamp_ms: int | None = None,
) -> AdminCommand:
    """Parse, authenticate, validate and age-check a command; raise
    :class:`CommandRejectedError` (with what is known of request_id/reply_topic) otherwise."""
    too_large = len(payload) > policy.max_bytes
    try:  # one too large is still read (up to a bound) for where its refusal goes
        obj = _parse_json(payload, policy.max_bytes * (OVERSIZE_READ if too_large else 1))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        why = (f"command is {len(payload)} bytes, more than {policy.max_bytes}" if too_large
               else str(exc))
        raise CommandRejectedError(ReplyCode.MALFORMED, f"not a JSON command: {why}") from None
    if not isinstance(obj, dict):
        raise CommandRejectedError(ReplyCode.MALFORMED, "a command is a JSON object")

    address = {
        "request_id": _peek_str(obj, "request_id", REQUEST_ID_RE),
        "command": _kind(obj.get("command")),
        "run": _peek_str(obj, "run", RUN_RE),
        "reply_topic": _peek_str(obj, "reply_topic", TOPIC_RE),
    }

    def reject(code: ReplyCode, message: str) -> CommandRejectedError:
        return CommandRejectedError(code, message, **address)

    if too_large:
        raise reject(ReplyCode.MALFORMED,
                     f"command is {len(payload)} bytes, more than {policy.max_bytes} (fewer "
                     "or shorter tags)")

    if policy.secret is not None:
        if "signature" not in obj:
            raise reject(ReplyCode.UNAUTHORIZED, "commands must be signed (signature missing)")
        if not verify(obj, policy.secret):
            raise reject(ReplyCode.UNAUTHORIZED, "bad signature")
        if "issued_at" not in obj:
            raise reject(ReplyCode.UNAUTHORIZED, "signed commands must carry issued_at")

    problems = _problems(obj)
    if problems:
        raise reject(ReplyCode.MALFORMED, "; ".join(problems))

    issued_at: int | None = obj.get("issued_at")
    reference = issued_at if issued_at is not None else message_timestamp_ms
    if reference is None:
        raise reject(ReplyCode.MALFORMED, "no issued_at and no message timestamp: age unknown")
    age_ms = now_ms - reference
    if age_ms > policy.max_age_s * 1000:
        raise reject(
            ReplyCode.EXPIRED,
            f"command is {age_ms / 1000:.1f} s old, older than the {policy.max_age_s:g} s allowed",
        )
    if -age_ms > policy.max_future_skew_s * 1000:
        raise reject(
            ReplyCode.EXPIRED,
            f"command is issued {-age_ms / 1000:.1f} s in the future "
            f"(clock skew above {policy.max_future_skew_s:g} s)",
        )
    return AdminCommand(
        command=CommandKind(obj["command"]),
        request_id=obj["request_id"],
        run=obj.get("run"),
        reply_topic=obj.get("reply_topic"),
        tags=dict(obj.get("tags") or {}),
        issued_at=issued_at,
        signature=obj.get("signature"),
    )


_KIND_VALUES = frozenset(k.value for k in CommandKind)


def _kind(value: Any) -> CommandKind | None:
    return CommandKind(value) if isinstance(value, str) and value in _KIND_VALUES else None


def _problems(obj: Mapping[str, Any]) -> list[str]:
    out: list[str] = []
    unknown = sorted(str(k) for k in obj if k not in COMMAND_KEYS)
    if unknown:
        out.append(
            f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(COMMAND_KEYS))}"
        )
    command = _kind(obj.get("command"))
    if command is None:
        allowed = ", ".join(k.value for k in CommandKind)
        out.append(f"command must be one of {allowed} (got {_show(obj.get('command'))})")
    request_id = obj.get("request_id")
    if not isinstance(request_id, str) or not REQUEST_ID_RE.match(request_id):
        out.append(
            f"request_id must be 1..128 printable ASCII characters (got {_show(request_id)})"
        )
    run = obj.get("run")
    if "run" in obj and (not isinstance(run, str) or not RUN_RE.match(run)):
        out.append(f"run must be a run name (got {_show(run)})")
    if command in RUN_REQUIRED and "run" not in obj:
        out.append(f"{command} needs a run")
    if command == CommandKind.RELOAD and "run" in obj:
        out.append("reload takes no run: it reloads every definition")
    if "reply_topic" in obj:
        topic = obj["reply_topic"]
        if not isinstance(topic, str) or not TOPIC_RE.match(topic):
            out.append(f"reply_topic must be a Kafka topic name (got {_show(topic)})")
    if "tags" in obj:
        out.extend(_tag_problems(obj["tags"], command))
    if "issued_at" in obj:
        issued_at = obj["issued_at"]
        if (isinstance(issued_at, bool) or not isinstance(issued_at, int)
                or not 0 <= issued_at <= MAX_ISSUED_AT):
            out.append(
                f"issued_at must be integer ms since the Unix epoch (got {_show(issued_at)})"
            )
    if "signature" in obj:
        signature = obj["signature"]
        if not isinstance(signature, str) or not SIGNATURE_RE.match(signature):
            out.append("signature must be 64 lower-case hex digits")
    return out


RESERVED_TAG_PREFIX = "k2eg-recorder."
"""Trigger-tag names the recorder sets itself (``k2eg-recorder.cause``); commands may not."""


def _tag_problems(tags: Any, command: CommandKind | None) -> list[str]:
    if command != CommandKind.TRIGGER:
        return ["tags are only allowed with trigger"]
    if not isinstance(tags, dict):
        return [f"tags must be an object of strings (got {_show(tags)})"]
    if len(tags) > MAX_TAGS:
        return [f"at most {MAX_TAGS} tags"]
    out = []
    for key, value in tags.items():
        if not key or len(key) > MAX_TAG_CHARS:
            out.append("tag names must be 1..1024 characters")
        elif key.startswith(RESERVED_TAG_PREFIX):
            out.append(f"tag {key!r}: names starting with {RESERVED_TAG_PREFIX!r} are the "
                       "recorder's own (e.g. the tag of a stop's last iteration)")
        if not isinstance(value, str) or len(value) > MAX_TAG_CHARS:
            out.append(f"tag {key!r} must be a string of at most 1024 characters")
        elif not (_unicode(key) and _unicode(value)):  # the gateway command is UTF-8 JSON
            out.append(f"tag {key!r} is not valid Unicode (a lone surrogate, or a byte "
                       "that is not UTF-8)")
    return out


def _unicode(text: str) -> bool:
    """``text`` has no lone surrogate (JSON's "\\ud800", argv's escape of a non-UTF-8 byte)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def decode_or_reject(
    payload: bytes,
    policy: CommandPolicy,
    *,
    now_ms: int,
    message_timestamp_ms: int | None = None,
) -> AdminCommand | AdminReply:
    """The command, or the error reply to send instead. Never raises for any input."""
    try:
        return decode_command(
            payload, policy, now_ms=now_ms, message_timestamp_ms=message_timestamp_ms
        )
    except CommandRejectedError as exc:
        return exc.reply(now_ms=now_ms, secret=policy.secret)


# --- replies -------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class AdminReply:
    """The one reply to a command (``ok`` or an error code)."""

    request_id: str | None
    command: str | None
    code: ReplyCode
    message: str
    run: str | None = None
    data: Mapping[str, Any] | None = None
    replied_at: int = 0  # ms since the epoch
    signature: str | None = None
    # signed replies: the signature of the command answered (None: a rejected command);
    # ``bound`` says the reply has the field (replies of an older daemon do not)
    answers: str | None = None
    bound: bool = False
    instance: str | None = None  # the answering daemon's RECORDER_INSTANCE (older: none)

    @property
    def ok(self) -> bool:
        return self.code is ReplyCode.OK

    @classmethod
    def success(
        cls,
        command: AdminCommand,
        message: str,
        *,
        now_ms: int,
        data: Mapping[str, Any] | None = None,
        secret: bytes | None = None,
    ) -> AdminReply:
        return cls(
            command.request_id,
            command.command.value,
            ReplyCode.OK,
            message,
            command.run,
            data,
            now_ms,
            answers=command.signature,
        ).signed(secret)

    @classmethod
    def failure(
        cls,
        command: AdminCommand,
        error: AdminCommandError,
        *,
        now_ms: int,
        data: Mapping[str, Any] | None = None,
        secret: bytes | None = None,
    ) -> AdminReply:
        """The reply for an :class:`AdminCommandError` raised while acting on ``command``
        (an unknown ``error.code`` becomes ``internal``)."""
        try:
            code = ReplyCode(error.code)
        except ValueError:
            code = ReplyCode.INTERNAL
        if code is ReplyCode.OK:
            code = ReplyCode.INTERNAL
        return cls(
            command.request_id,
            command.command.value,
            code,
            error.message,
            command.run,
            data,
            now_ms,
            answers=command.signature,
        ).signed(secret)

    def to_json_obj(self) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "request_id": self.request_id,
            "command": self.command,
            "run": self.run,
            "ok": self.ok,
            "code": self.code.value,
            "message": self.message,
            "replied_at": self.replied_at,
        }
        if self.data is not None:
            obj["data"] = _json_safe(self.data)
        if self.instance is not None:
            obj["instance"] = self.instance
        if self.bound:
            obj["answers"] = self.answers
        if self.signature is not None:
            obj["signature"] = self.signature
        return obj

    def signed(self, secret: bytes | None) -> AdminReply:
        if secret is None:
            return self
        bound = replace(self, bound=True, signature=None)
        return replace(bound, signature=sign(bound.to_json_obj(), secret))

    def from_instance(self, instance: str, secret: bytes | None) -> AdminReply:
        """This reply naming the daemon that sends it (signed again: the signature covers
        ``instance`` as every other field)."""
        return replace(self, instance=instance, signature=None).signed(secret)

    def encode(self) -> bytes:
        return json.dumps(self.to_json_obj(), separators=(",", ":"), allow_nan=False).encode()


def _json_safe(value: Any) -> Any:
    """Plain JSON values; non-finite floats become null (JSON has no NaN)."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def decode_reply(payload: bytes, *, secret: bytes | None = None) -> AdminReply:
    """Client side: parse a reply (and check its signature when a secret is given)."""
    try:
        obj = _parse_json(payload, 16 * 1024 * 1024)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise AdminCommandError(ReplyCode.MALFORMED.value, f"not a JSON reply: {exc}") from None
    if not isinstance(obj, dict):
        raise AdminCommandError(ReplyCode.MALFORMED.value, "a reply is a JSON object")
    if secret is not None and not verify(obj, secret):
        raise AdminCommandError(ReplyCode.UNAUTHORIZED.value, "reply signature missing or bad")
    try:
        code = ReplyCode(obj["code"])
        message = obj["message"]
        replied_at = obj["replied_at"]
        if not isinstance(message, str) or not isinstance(replied_at, int):
            raise TypeError("message/replied_at")
        for key in ("request_id", "command", "run"):
            if obj.get(key) is not None and not isinstance(obj[key], str):
                raise TypeError(key)
        data = obj.get("data")
        if data is not None and not isinstance(data, dict):
            raise TypeError("data")
        answers = obj.get("answers")
        if answers is not None and not isinstance(answers, str):
            raise TypeError("answers")
        instance = obj.get("instance")
        if instance is not None and not isinstance(instance, str):
            raise TypeError("instance")
    except (KeyError, ValueError, TypeError) as exc:
        raise AdminCommandError(ReplyCode.MALFORMED.value, f"bad reply: {exc}") from None
    return AdminReply(
        obj.get("request_id"),
        obj.get("command"),
        code,
        message,
        obj.get("run"),
        data,
        replied_at,
        obj.get("signature"),
        answers,
        "answers" in obj,
        instance,
    )


def answers_command(reply: AdminReply, command: AdminCommand) -> bool:
    """Is ``reply`` (of ``command``'s ``request_id``) the answer to ``command`` itself? A
    signed reply names the command it answers (``answers``); one that names no command, or
    another one, was caused by someone else's command with the same ``request_id``. A reply
    without the field (an older daemon, or no secret) is taken as before."""
    if not reply.bound:
        return True
    return reply.answers is not None and reply.answers == command.signature


# --- client side ---------------------------------------------------------------------------
def build_command(
    command: CommandKind | str,
    *,
    run: str | None = None,
    tags: Mapping[str, str] | None = None,
    reply_topic: str | None = None,
    request_id: str | None = None,
    issued_at_ms: int | None = None,
    secret: bytes | str | None = None,
) -> AdminCommand:
    """A command as the CLI sends it: fresh request_id and issued_at, signed when a secret is
    given. Raises :class:`CommandRejectedError` (malformed) for what the daemon would refuse."""
    obj: dict[str, Any] = {
        "command": str(command),
        "request_id": request_id if request_id is not None else uuid.uuid4().hex,
        "issued_at": issued_at_ms if issued_at_ms is not None else time.time_ns() // 1_000_000,
    }
    if run is not None:
        obj["run"] = run
    if reply_topic is not None:
        obj["reply_topic"] = reply_topic
    if tags:
        obj["tags"] = dict(tags)
    problems = _problems(obj)
    if problems:
        raise CommandRejectedError(ReplyCode.MALFORMED, "; ".join(problems))
    if secret is not None:
        obj["signature"] = sign(obj, secret)
    size = len(json.dumps(obj, separators=(",", ":"), allow_nan=False).encode())
    if size > MAX_COMMAND_BYTES:  # as encode_command sends it: the daemon would refuse it
        raise CommandRejectedError(ReplyCode.MALFORMED, f"command is {size} bytes, more than "
                                   f"{MAX_COMMAND_BYTES} (fewer or shorter tags)")
    return AdminCommand(
        command=CommandKind(obj["command"]),
        request_id=obj["request_id"],
        run=run,
        reply_topic=reply_topic,
        tags=dict(tags or {}),
        issued_at=obj["issued_at"],
        signature=obj.get("signature"),
    )


def encode_command(command: AdminCommand) -> bytes:
    """The Kafka message value of a command."""
    return json.dumps(command.to_json_obj(), separators=(",", ":"), allow_nan=False).encode()


# --- replay protection ---------------------------------------------------------------------
class ReplayGuard:
    """Remembers request_ids for ``window_s`` (the max age plus the skew): a command seen again
    inside the window is a replay or a redelivery and is answered ``duplicate``."""

    def __init__(self, window_s: float, *, max_entries: int = 100_000) -> None:
        self.window_ms = int(window_s * 1000)
        self.max_entries = max_entries
        self._seen: OrderedDict[str, int] = OrderedDict()

    def check(self, command: AdminCommand, *, now_ms: int) -> None:
        """Record ``command``; raise :class:`CommandRejectedError` (duplicate) when seen."""
        self._expire(now_ms)
        if command.request_id in self._seen:
            raise CommandRejectedError(
                ReplyCode.DUPLICATE,
                f"request_id {command.request_id!r} was already received; not acted on again",
                request_id=command.request_id,
                command=command.command.value,
                run=command.run,
                reply_topic=command.reply_topic,
            )
        self._seen[command.request_id] = now_ms
        while len(self._seen) > self.max_entries:
            self._seen.popitem(last=False)

    def remembered(self, now_ms: int) -> dict[str, int]:
        """The request_ids inside the window, each with when it was seen (ms): what a
        restarted daemon needs to go on refusing them (:meth:`restore`)."""
        self._expire(now_ms)
        return dict(self._seen)

    def restore(self, seen: Mapping[str, int], *, now_ms: int) -> None:
        """Remember ``seen`` (request_id -> ms, from :meth:`remembered` of an earlier process)
        as far as still inside the window; call before any :meth:`check`."""
        for request_id, at in sorted(seen.items(), key=lambda item: item[1]):
            if now_ms - at <= self.window_ms and request_id not in self._seen:
                self._seen[request_id] = at
        while len(self._seen) > self.max_entries:
            self._seen.popitem(last=False)

    def _expire(self, now_ms: int) -> None:
        while self._seen:
            request_id, seen_at = next(iter(self._seen.items()))
            if now_ms - seen_at <= self.window_ms:
                break
            del self._seen[request_id]

    def __len__(self) -> int:
        return len(self._seen)
