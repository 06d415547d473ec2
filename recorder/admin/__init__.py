"""The admin topic: command/reply codec, HMAC signing and the status document (pure code).

The daemon consumes commands from its admin topic, decodes them with
:func:`~recorder.admin.protocol.decode_or_reject`, acts, and produces exactly one
:class:`~recorder.admin.protocol.AdminReply`; it publishes a
:class:`~recorder.admin.status.StatusDocument` heartbeat on the status topic.
"""

from recorder.admin.protocol import (
    AdminCommand,
    AdminReply,
    CommandKind,
    CommandPolicy,
    CommandRejectedError,
    ReplayGuard,
    ReplyCode,
    build_command,
    decode_command,
    decode_or_reject,
    decode_reply,
    encode_command,
)
from recorder.admin.status import DaemonState, RunState, RunStatus, StatusDocument

__all__ = [
    "AdminCommand",
    "AdminReply",
    "CommandKind",
    "CommandPolicy",
    "CommandRejectedError",
    "DaemonState",
    "ReplayGuard",
    "ReplyCode",
    "RunState",
    "RunStatus",
    "StatusDocument",
    "build_command",
    "decode_command",
    "decode_or_reject",
    "decode_reply",
    "encode_command",
]
