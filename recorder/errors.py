"""The project's one exception hierarchy.

Every error the recorder raises on purpose derives from :class:`RecorderError`, so callers
(the daemon's main loop, the CLI) can tell "our" failures from bugs with one ``except``.
"""

from __future__ import annotations

import errno
import json


class RecorderError(Exception):
    """Base class of every error raised on purpose by k2eg-recorder."""


# --- configuration -------------------------------------------------------------------------
class ConfigError(RecorderError):
    """Settings or run definitions are invalid."""


# --- the k2eg client -----------------------------------------------------------------------
class ClientError(RecorderError):
    """Base class of errors raised by the embedded k2eg client."""


class ClientClosedError(ClientError):
    """The client was used after :meth:`close`."""


class TransportError(ClientError):
    """Kafka could not be reached, a produce failed, or a topic could not be created."""


class GatewayTimeoutError(ClientError):
    """The gateway did not answer a command before its deadline."""

    def __init__(self, command: str, reply_id: str, timeout_s: float) -> None:
        super().__init__(f"no reply to {command!r} (reply_id={reply_id}) within {timeout_s:g} s")
        self.command = command
        self.reply_id = reply_id
        self.timeout_s = timeout_s


class GatewayError(ClientError):
    """The gateway answered a command with a non-zero error code."""

    def __init__(self, command: str, code: int, message: str, reply_id: str = "") -> None:
        text = f"k2eg {command!r} failed with error {code}"
        if message:
            text += f": {message}"
        super().__init__(text)
        self.command = command
        self.code = code
        self.message = message
        self.reply_id = reply_id


class InvalidSnapshotPropertiesError(ClientError, ValueError):
    """SnapshotProperties that the gateway would reject (checked before sending)."""


class ProtocolError(ClientError):
    """A message from the gateway could not be understood (counted and skipped by the client)."""


# --- the HDF5 sink -------------------------------------------------------------------------
class SinkError(RecorderError):
    """Base class of errors raised by output sinks."""


class FileFormatError(SinkError):
    """A file is not a k2eg-recorder file, has an unsupported format version, or is damaged."""


class NotInFileError(SinkError, KeyError):
    """What was asked for (a PV, a table) is not in the file: a KeyError, as a mapping's."""

    def __str__(self) -> str:  # KeyError's would show the message quoted
        return str(self.args[0]) if self.args else ""


class DamagedFileError(FileFormatError, ValueError):
    """What a file holds does not read back whole (a checksum, impossible values): it is
    reported, never "repaired" by guessing. A ValueError too, as h5py's own words for such
    files were before."""


class HeapLoopError(DamagedFileError, OSError):
    """A global-heap collection of the file is damaged in the way HDF5 loops on for ever
    (:mod:`recorder.sinks.globalheap`): the file is refused before HDF5 reads it. An OSError
    too, as the other reasons a file cannot be opened are."""


class NothingToRecoverError(SinkError):
    """A ``.partial`` file left by a writer killed while it created it holds nothing but its
    superblock: no data, nothing to finalize; recovery removed it."""


DAMAGED_VALUE_ERRORS: tuple[type[Exception], ...] = (
    KeyError, IndexError, UnicodeDecodeError, json.JSONDecodeError)
"""What reading a damaged file's values raises in our code (a code or row out of range,
text that does not decode, JSON that does not parse), besides h5py's own errors."""


class FileBusyError(SinkError, BlockingIOError):
    """A running writer holds the file (its writer lock): it is not to be recovered now.
    An OSError (EAGAIN) too, so callers that retry busy files catch it as one."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EAGAIN, message)

    def __str__(self) -> str:
        return str(self.strerror)


# --- the daemon ----------------------------------------------------------------------------
class ServiceError(RecorderError):
    """The daemon could not carry out an operation."""


class AdminCommandError(ServiceError):
    """An admin command was rejected; ``code`` is the error code sent in the reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class UnverifiedReplyError(ServiceError):
    """A reply to our request came, but its signature does not verify with our secret (the
    daemon uses another admin secret, or none): ``text`` is what it said, unauthenticated."""

    def __init__(self, request_id: str, text: str) -> None:
        super().__init__(
            f"the daemon answered request {request_id} ({text}), but the reply's signature "
            "does not verify with RECORDER_ADMIN_SECRET: the daemon has another admin secret "
            "(or none)"
        )
        self.request_id = request_id
        self.text = text
