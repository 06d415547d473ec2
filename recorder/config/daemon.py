"""Daemon settings from the environment (prefix ``RECORDER_``), next to
:class:`recorder.settings.KafkaSettings` (how to reach Kafka and the gateway).

Both classes read the same environment and ignore each other's variables. Examples::

    RECORDER_CONFIG_PATH=/etc/k2eg-recorder/runs.d
    RECORDER_ADMIN_TOPIC=k2eg-recorder-admin
    RECORDER_ADMIN_SECRET=...                # HMAC-SHA256 key; commands must then be signed
    RECORDER_STATUS_TOPIC=k2eg-recorder-status
    RECORDER_FILES_TOPIC=k2eg-recorder-files  # an event per finalized file
    RECORDER_HEARTBEAT_INTERVAL_S=5
    RECORDER_METRICS_PORT=9464               # unset: no metrics endpoint
    RECORDER_DISK_MIN_FREE=5%                # or a size: 200G
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from recorder.admin.protocol import TOPIC_RE, TOPIC_RULE, CommandPolicy, topic_collision_key
from recorder.daemon.diskspace import MinFree

if TYPE_CHECKING:
    from recorder.settings import KafkaSettings

__all__ = ["DaemonSettings", "own_topics"]



class DaemonSettings(BaseSettings):
    """How the daemon runs: where run definitions live, the admin/status topics, metrics,
    shutdown and logging."""

    model_config = SettingsConfigDict(env_prefix="RECORDER_", extra="ignore", allow_inf_nan=False)

    config_path: Path = Field(
        default=Path("/etc/k2eg-recorder/runs.d"),
        description="run-definition file or directory of *.yaml/*.yml files",
    )
    instance: str = Field(
        default_factory=socket.gethostname,
        min_length=1,
        description="this daemon's name in status documents (default: host name)",
    )
    admin_topic: str = Field(
        default="k2eg-recorder-admin", description="topic the daemon reads commands from"
    )
    admin_reply_topic: str = Field(
        default="k2eg-recorder-admin-reply",
        description="where replies go when a command names no reply_topic",
    )
    status_topic: str = Field(default="k2eg-recorder-status", description="heartbeat/status topic")
    files_topic: str = Field(
        default="k2eg-recorder-files",
        description="a JSON event per finalized file (path, status, iterations...), key = run",
    )
    heartbeat_interval_s: float = Field(default=5.0, gt=0, le=3600)
    command_max_age_s: float = Field(
        default=30.0, gt=0, description="older commands are answered 'expired', never acted on"
    )
    command_max_future_skew_s: float = Field(
        default=5.0, ge=0, description="allowed clock skew for commands issued 'in the future'"
    )
    admin_secret: SecretStr | None = Field(
        default=None, description="shared HMAC-SHA256 secret; when set, commands must be signed"
    )
    metrics_port: int | None = Field(default=None, ge=0, le=65535, description="unset: no /metrics")
    metrics_addr: str = Field(
        default="127.0.0.1", description="address the metrics endpoint binds to"
    )
    shutdown_timeout_s: float = Field(
        default=60.0, gt=0, description="budget for stopping runs and flushing files on shutdown"
    )
    silence_after_s: float = Field(
        default=30.0,
        ge=0,
        description="a periodic run whose snapshot topic stays silent this long (and at least "
        "5 time windows) reports it and re-sends the snapshot start (a restarted gateway has "
        "forgotten it); 0 turns this off",
    )
    leftover_timeout_s: float = Field(
        default=300.0,
        gt=0,
        description="the .partial file a crash left is recovered at a restart in a child "
        "process, ended after this many seconds plus one per 20 MB of the file (HDF5 loops "
        "for ever on some damaged files); the file is then left for k2eg-recorder recover",
    )
    disk_check_interval_s: float = Field(
        default=10.0,
        ge=0,
        description="how often the free space of the runs' output filesystems is checked "
        "(status, metrics, warnings before a disk fills); 0 turns the checks off",
    )
    disk_min_free: str = Field(
        default="5%",
        description="warn when a filesystem the runs write to has less free space than this: "
        "a share of its size (5%) or a size (200G; K/M/G/T/P are powers of 1024)",
    )
    disk_full_warning_s: float = Field(
        default=3600.0,
        ge=0,
        description="warn when, at the rate its free space fell over the last minutes, a "
        "filesystem would be full within this many seconds; 0 turns this warning off",
    )
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"

    @field_validator("admin_topic", "admin_reply_topic", "status_topic", "files_topic")
    @classmethod
    def _topic(cls, value: str) -> str:
        if not TOPIC_RE.match(value):
            raise ValueError(f"{value!r} is {TOPIC_RULE}")
        return value

    @field_validator("config_path", mode="before")
    @classmethod
    def _config_path_given(cls, value: object) -> object:
        # Path("") is the working directory: an empty RECORDER_CONFIG_PATH= would load
        # whatever YAML files happen to be there
        if isinstance(value, str | Path) and not str(value).strip():
            raise ValueError("must not be empty (unset it for /etc/k2eg-recorder/runs.d)")
        return value

    @field_validator("disk_min_free")
    @classmethod
    def _min_free(cls, value: str) -> str:
        MinFree.parse(value)  # ValueError says what is accepted
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("admin_secret")
    @classmethod
    def _secret_not_blank(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            return None  # RECORDER_ADMIN_SECRET= (empty) in an env file means "no secret"
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("admin_secret must be at least 16 characters")
        return value

    @model_validator(mode="after")
    def _distinct_topics(self) -> DaemonSettings:
        others = (self.admin_reply_topic, self.status_topic, self.files_topic)
        if topic_collision_key(self.admin_topic) in map(topic_collision_key, others):
            raise ValueError("RECORDER_ADMIN_TOPIC must differ from RECORDER_ADMIN_REPLY_TOPIC, "
                             "RECORDER_STATUS_TOPIC and RECORDER_FILES_TOPIC (Kafka takes '.' "
                             "and '_' in topic names for the same)")
        return self

    @property
    def secret_bytes(self) -> bytes | None:
        return None if self.admin_secret is None else self.admin_secret.get_secret_value().encode()

    def command_policy(self) -> CommandPolicy:
        """The admin codec's acceptance policy built from these settings."""
        return CommandPolicy(
            max_age_s=self.command_max_age_s,
            max_future_skew_s=self.command_max_future_skew_s,
            secret=self.secret_bytes,
        )


def own_topics(settings: DaemonSettings, kafka: KafkaSettings) -> dict[str, str]:
    """The daemon's own topics and the gateway's command topic, each with the setting that
    names it: no snapshot may publish into one (the daemon refuses such a run, and so does
    ``validate``), no admin reply goes to one but the admin reply topic (a reply there would
    reach the daemon's own consumers or the gateway)."""
    return {settings.admin_topic: "RECORDER_ADMIN_TOPIC", settings.admin_reply_topic:
            "RECORDER_ADMIN_REPLY_TOPIC", settings.status_topic: "RECORDER_STATUS_TOPIC",
            settings.files_topic: "RECORDER_FILES_TOPIC", kafka.cmd_topic: "RECORDER_CMD_TOPIC",
            kafka.effective_reply_topic: "the k2eg reply topic (RECORDER_REPLY_TOPIC)"}
