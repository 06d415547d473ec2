"""Daemon and client settings from the environment (prefix ``RECORDER_``).

Run definitions (what to record) live in YAML files, see :mod:`recorder.config`; this module
holds only *how to connect*: Kafka bootstrap, k2eg topics, identity, and any librdkafka option
a facility cluster needs (SASL, TLS, ...).

Examples::

    RECORDER_BOOTSTRAP_SERVERS=kafka-1:9092,kafka-2:9092
    RECORDER_CMD_TOPIC=lcls-k2eg-cmd-topic
    RECORDER_APP_NAME=recorder-a          # reply topic is "<app_name>-reply" unless set
    RECORDER_KAFKA__SECURITY__PROTOCOL=SASL_SSL   # any librdkafka option: '__' for '.'
    RECORDER_KAFKA__SASL__MECHANISM=SCRAM-SHA-512
    RECORDER_KAFKA__SASL__USERNAME=recorder
    RECORDER_KAFKA__SASL__PASSWORD=...
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from recorder.admin.protocol import TOPIC_RE, TOPIC_RULE

_KAFKA_PREFIX = "RECORDER_KAFKA__"


def _kafka_options_from_env(environ: Mapping[str, str]) -> dict[str, str]:
    """``RECORDER_KAFKA__SASL__MECHANISM=PLAIN`` -> ``{"sasl.mechanism": "PLAIN"}``."""
    options: dict[str, str] = {}
    for key, value in environ.items():
        if key.upper().startswith(_KAFKA_PREFIX):
            name = key[len(_KAFKA_PREFIX) :].lower().replace("__", ".")
            if name:
                options[name] = value
    return options


def settings_problems(exc: ValidationError) -> str:
    """A settings error as the operator sets it: one ``RECORDER_<NAME>: message`` line per
    problem, *without* the value given (it may be a secret or a password)."""
    lines = []
    for error in exc.errors(include_url=False, include_input=False):
        name = "__".join(str(part) for part in error.get("loc", ())).upper()
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        lines.append(f"RECORDER_{name}: {message}" if name else message)
    return "\n".join(lines)


def unknown_variables(environ: Mapping[str, str], *settings: type[BaseSettings]) -> list[str]:
    """The ``RECORDER_*`` variables of ``environ`` that no field of ``settings`` (all with the
    ``RECORDER_`` prefix), no ``RECORDER_KAFKA__*`` option and not ``RECORDER_STATE_DIR``
    take: a misspelt name (``RECORDER_BOOTSTRAP_SERVER``) is otherwise silently ignored."""
    known = {"RECORDER_STATE_DIR"} | {
        f"RECORDER_{name.upper()}" for cls in settings for name in cls.model_fields}
    return sorted(k for k in environ if k.startswith("RECORDER_") and k not in known
                  and not k.startswith(_KAFKA_PREFIX))


_S = TypeVar("_S", bound=BaseSettings)


def without_environment(cls: type[_S], **values: Any) -> _S:
    """``cls`` from ``values`` and its defaults only: pydantic-settings reads ``os.environ``
    for every field not given, so each one is given (the demo, an explicit mapping)."""
    for name, info in cls.model_fields.items():
        if name not in values:
            values[name] = info.get_default(call_default_factory=True)
    return cls(**values)


class KafkaSettings(BaseSettings):
    """How the embedded k2eg client reaches Kafka and the gateway."""

    model_config = SettingsConfigDict(env_prefix="RECORDER_", extra="ignore", allow_inf_nan=False)

    bootstrap_servers: str = "127.0.0.1:9092"
    cmd_topic: str = Field("cmd-in-topic", description="the gateway's command topic")
    app_name: str = Field("k2eg-recorder", description="names our reply topic: <app_name>-reply")
    reply_topic: str | None = Field(None, description="overrides <app_name>-reply")
    client_id: str = Field(default_factory=lambda: f"k2eg-recorder@{socket.gethostname()}")
    # also the command producer's message.timeout.ms, at most 2147483647 ms
    command_timeout_s: float = Field(10.0, gt=0, le=2_147_483,
                                     description="deadline for a gateway reply")
    create_reply_topic: bool = Field(True, description="create the reply topic if it is missing")
    kafka: dict[str, str] = Field(
        default_factory=dict,
        description="extra librdkafka options (security.protocol, sasl.*, ssl.*, ...)",
    )

    @field_validator("bootstrap_servers")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value.strip()

    @field_validator("cmd_topic", "reply_topic")
    @classmethod
    def _topic(cls, value: str | None) -> str | None:
        if value and not TOPIC_RE.match(value):  # reply_topic "" (or unset): <app_name>-reply
            raise ValueError(f"{value!r} is {TOPIC_RULE}")
        return value

    @model_validator(mode="after")
    def _reply_topic(self) -> KafkaSettings:
        if not TOPIC_RE.match(self.effective_reply_topic):
            raise ValueError(f"RECORDER_APP_NAME: makes the reply topic "
                             f"{self.effective_reply_topic!r}, {TOPIC_RULE}; change it or set "
                             "RECORDER_REPLY_TOPIC")
        return self

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> KafkaSettings:
        """Build settings from ``environ`` (default ``os.environ``) plus explicit overrides."""
        env = dict(os.environ if environ is None else environ)
        extra = _kafka_options_from_env(env)
        kafka = {**extra, **overrides.pop("kafka", {})}
        if environ is None:
            return cls(kafka=kafka, **overrides)
        fields: dict[str, Any] = {}
        for name in cls.model_fields:
            env_key = f"RECORDER_{name.upper()}"
            if env_key in env and name != "kafka":
                fields[name] = env[env_key]
        fields.update(overrides)
        return without_environment(cls, kafka=kafka, **fields)

    @property
    def effective_reply_topic(self) -> str:
        return self.reply_topic or f"{self.app_name}-reply"

    def librdkafka_config(self) -> dict[str, str]:
        """Common librdkafka configuration (bootstrap, client id and pass-through options)."""
        conf = {
            "bootstrap.servers": self.bootstrap_servers,
            "client.id": self.client_id,
            # brokers close idle connections; librdkafka would log each close to stderr
            "log.connection.close": "false",
        }
        conf.update(self.kafka)
        return conf
