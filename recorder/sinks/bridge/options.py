"""``BridgeOptions``: the optional ``output.bridge`` block of a run definition (pure code).

Example (YAML)::

    output:
      directory: /data/k2eg
      bridge:
        rep: 4545                   # = tcp://127.0.0.1:4545; karabo_bridge.Client(..., "REQ")
        pub: tcp://0.0.0.0:4546     # fan-out; karabo_bridge.Client(..., "SUB")
        protocol_version: "2.2"     # or "1.0"
        queue_size: 2
        pub_hwm: 4
        serve_incomplete: true

A bare port number binds on the loopback interface only; serving other hosts needs an
explicit ``tcp://<interface-address>:<port>`` (or ``tcp://*:<port>``).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_TCP_RE = re.compile(r"^tcp://(\*|[A-Za-z0-9_.\-]+|\[[0-9A-Fa-f:.]+\]):(\d{1,5})$")
_IPC_RE = re.compile(r"^ipc:///?[^\x00\s]+$")
MAX_PORT = 65535
IPC_PATH_MAX_BYTES = 107  # sockaddr_un.sun_path (108) less its NUL: zmq.IPC_PATH_MAX_LEN


_WILDCARD_HOSTS = frozenset({"*", "0.0.0.0", "[::]"})


def endpoints_clash(a: str, b: str) -> bool:
    """Whether binding the normalized endpoint ``b`` fails while ``a`` is bound: one ipc
    path, or one tcp port (not 0: any free port) on one address or on all of them."""
    tcp_a, tcp_b = _TCP_RE.match(a), _TCP_RE.match(b)
    if tcp_a is None or tcp_b is None:
        return a == b
    (host_a, port_a), (host_b, port_b) = tcp_a.groups(), tcp_b.groups()
    if int(port_a) != int(port_b) or int(port_a) == 0:
        return False
    return host_a == host_b or host_a in _WILDCARD_HOSTS or host_b in _WILDCARD_HOSTS


def normalize_endpoint(value: Any) -> Any:
    """A port number -> ``tcp://127.0.0.1:<port>``; an endpoint string is checked."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value <= MAX_PORT:
            raise ValueError(f"port {value} is out of range 0..{MAX_PORT}")
        return f"tcp://127.0.0.1:{value}"
    if not isinstance(value, str):
        return value  # let pydantic report the type error
    text = value.strip()
    if text.isdigit():
        return normalize_endpoint(int(text))
    match = _TCP_RE.match(text)
    if match:
        if int(match.group(2)) > MAX_PORT:
            raise ValueError(f"port {match.group(2)} is out of range 0..{MAX_PORT}")
        return text
    if _IPC_RE.match(text):
        path = text[len("ipc://"):]
        if len(path.encode("utf-8", "surrogateescape")) > IPC_PATH_MAX_BYTES:
            raise ValueError(
                f"endpoint {value!r}: an ipc path is a Unix socket's, at most "
                f"{IPC_PATH_MAX_BYTES} bytes (the bridge could not bind it)"
            )
        return text
    raise ValueError(
        f"endpoint {value!r} must be a port number, tcp://<host>:<port> or ipc://<path>"
    )


class BridgeOptions(BaseModel):
    """Serve each iteration live over ZeroMQ with the Karabo bridge protocol (see
    docs/bridge.md). Needs the optional extra ``k2eg-recorder[bridge]``."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    rep: str | None = Field(
        default=None,
        description="Request/reply endpoint (port number = tcp://127.0.0.1:<port>, or "
        "tcp://<host>:<port>, ipc://<path>). Answers each 'next' from a karabo_bridge REQ "
        "client with the latest closed iteration that client has not had yet, waiting for the "
        "next one when it already has the latest. Port 0 picks a free port.",
    )
    pub: str | None = Field(
        default=None,
        description="Publish endpoint (same forms as rep): every closed iteration is sent to "
        "all karabo_bridge SUB clients; a subscriber that does not keep up loses iterations.",
    )
    protocol_version: Literal["2.2", "1.0"] = Field(
        default="2.2", description="Karabo bridge protocol version: 2.2 (default) or 1.0."
    )
    queue_size: int = Field(
        default=2,
        ge=1,
        le=1000,
        description="Closed iterations waiting for the serving thread. When it is full the "
        "oldest is dropped (latest wins); recording is never slowed down.",
    )
    pub_hwm: int = Field(
        default=4,
        ge=1,
        le=1000,
        description="ZeroMQ send high-water mark per subscriber (iterations); more are "
        "dropped for that subscriber.",
    )
    serve_incomplete: bool = Field(
        default=True,
        description="Also serve iterations closed as incomplete (their recorder source "
        "says so). false: only complete iterations.",
    )

    @field_validator("rep", "pub", mode="before")
    @classmethod
    def _endpoint(cls, value: Any) -> Any:
        return normalize_endpoint(value)

    @field_validator("protocol_version", mode="before")
    @classmethod
    def _version(cls, value: Any) -> Any:
        # YAML reads an unquoted 2.2 as a float
        if isinstance(value, float):
            return f"{value:.1f}"
        return value

    @model_validator(mode="after")
    def _check(self) -> BridgeOptions:
        if self.rep is None and self.pub is None:
            raise ValueError("bridge: set rep and/or pub")
        if self.rep is not None and self.pub is not None and endpoints_clash(self.rep, self.pub):
            raise ValueError("bridge: rep and pub must be different endpoints")
        return self

    @property
    def endpoints(self) -> dict[str, str]:
        """The configured endpoints by role (``rep``/``pub``)."""
        out: dict[str, str] = {}
        if self.rep is not None:
            out["rep"] = self.rep
        if self.pub is not None:
            out["pub"] = self.pub
        return out
