"""DaemonSettings from RECORDER_* variables, next to KafkaSettings."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from recorder.config.daemon import DaemonSettings
from recorder.settings import KafkaSettings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("RECORDER_"):
            monkeypatch.delenv(key)


def test_defaults() -> None:
    s = DaemonSettings()
    assert s.config_path == Path("/etc/k2eg-recorder/runs.d")
    assert s.admin_topic == "k2eg-recorder-admin"
    assert s.admin_secret is None
    assert s.metrics_port is None
    assert s.metrics_addr == "127.0.0.1"
    policy = s.command_policy()
    assert (policy.max_age_s, policy.secret) == (30.0, None)


def test_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "RECORDER_CONFIG_PATH": "/srv/runs.yaml",
        "RECORDER_ADMIN_TOPIC": "ops-admin",
        "RECORDER_STATUS_TOPIC": "ops-status",
        "RECORDER_HEARTBEAT_INTERVAL_S": "2.5",
        "RECORDER_COMMAND_MAX_AGE_S": "10",
        "RECORDER_ADMIN_SECRET": "0123456789abcdef-long",
        "RECORDER_METRICS_PORT": "9464",
        "RECORDER_LOG_LEVEL": "debug",
        "RECORDER_LOG_FORMAT": "json",
        "RECORDER_BOOTSTRAP_SERVERS": "kafka:9092",
        "RECORDER_KAFKA__SASL__MECHANISM": "PLAIN",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    s = DaemonSettings()
    assert s.config_path == Path("/srv/runs.yaml")
    assert (s.admin_topic, s.status_topic) == ("ops-admin", "ops-status")
    assert s.heartbeat_interval_s == 2.5
    assert s.metrics_port == 9464
    assert s.log_level == "DEBUG"
    assert s.log_format == "json"
    assert s.secret_bytes == b"0123456789abcdef-long"
    assert "0123456789abcdef" not in repr(s)  # SecretStr never printed
    assert s.command_policy().max_age_s == 10
    # the two settings classes share the environment without tripping over each other
    kafka = KafkaSettings.from_env()
    assert kafka.bootstrap_servers == "kafka:9092"
    assert kafka.kafka == {"sasl.mechanism": "PLAIN"}


def test_empty_secret_means_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECORDER_ADMIN_SECRET", "")
    assert DaemonSettings().admin_secret is None


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("RECORDER_ADMIN_SECRET", "short", "at least 16"),
        ("RECORDER_ADMIN_TOPIC", "bad topic", "not a valid Kafka topic"),
        ("RECORDER_STATUS_TOPIC", "k2eg-recorder-admin", "must differ"),
        ("RECORDER_METRICS_PORT", "70000", "less than or equal"),
        ("RECORDER_HEARTBEAT_INTERVAL_S", "0", "greater than 0"),
        ("RECORDER_LOG_FORMAT", "xml", "auto"),
        ("RECORDER_SHUTDOWN_TIMEOUT_S", "inf", "finite number"),
        ("RECORDER_COMMAND_MAX_AGE_S", "nan", "finite number"),
        ("RECORDER_CONFIG_PATH", "", "must not be empty"),  # not the working directory
        ("RECORDER_CONFIG_PATH", "  ", "must not be empty"),
    ],
)
def test_invalid(monkeypatch: pytest.MonkeyPatch, key: str, value: str, needle: str) -> None:
    monkeypatch.setenv(key, value)
    with pytest.raises(ValidationError, match=needle):
        DaemonSettings()


def test_settings_problems_name_the_variable_and_never_echo_the_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from recorder.settings import settings_problems

    monkeypatch.setenv("RECORDER_ADMIN_SECRET", "hunter2-short")
    monkeypatch.setenv("RECORDER_METRICS_PORT", "70000")
    with pytest.raises(ValidationError) as info:
        DaemonSettings()
    text = settings_problems(info.value)
    assert "hunter2" not in text and "70000" not in text and "pydantic.dev" not in text
    lines = text.splitlines()
    assert any(line.startswith("RECORDER_ADMIN_SECRET: ") and "at least 16" in line
               for line in lines), lines
    assert any(line.startswith("RECORDER_METRICS_PORT: ") for line in lines), lines



def test_kafka_settings_from_an_explicit_mapping_ignore_the_process_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``from_env(mapping)`` reads the mapping only. It read ``os.environ`` too: `k2eg-recorder
    demo` run in a shell holding the unit's recorder.env (RECORDER_CREATE_REPLY_TOPIC=false,
    as where topics are pre-created) never became ready on its embedded broker, and a bad
    value there was a pydantic traceback."""
    monkeypatch.setenv("RECORDER_CREATE_REPLY_TOPIC", "false")
    monkeypatch.setenv("RECORDER_REPLY_TOPIC", "production-reply")
    monkeypatch.setenv("RECORDER_COMMAND_TIMEOUT_S", "0")
    kafka = KafkaSettings.from_env({"RECORDER_APP_NAME": "demo"},
                                   bootstrap_servers="127.0.0.1:1")
    assert kafka.create_reply_topic is True
    assert kafka.effective_reply_topic == "demo-reply"
    assert kafka.command_timeout_s == 10.0
    assert kafka.bootstrap_servers == "127.0.0.1:1"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("RECORDER_CMD_TOPIC", "cmd in topic"),
        ("RECORDER_REPLY_TOPIC", "recorder/reply"),
        ("RECORDER_APP_NAME", "recorder a"),  # names the reply topic "recorder a-reply"
    ],
)
def test_kafka_topic_settings_kafka_cannot_have_are_refused(
    monkeypatch: pytest.MonkeyPatch, key: str, value: str,
) -> None:
    """Kafka refuses such a topic: the daemon retried 'cannot connect to Kafka' for ever (the
    reply topic) or every gateway command failed (the command topic). Now refused at start
    (exit 2), naming the variable, as the daemon's own topics are."""
    from recorder.settings import settings_problems

    monkeypatch.setenv(key, value)
    with pytest.raises(ValidationError) as info:
        KafkaSettings.from_env()
    text = settings_problems(info.value)
    assert key in text and "not a valid Kafka topic name" in text, text


def test_app_name_with_its_own_reply_topic_need_not_be_a_topic_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RECORDER_APP_NAME", "recorder a")
    monkeypatch.setenv("RECORDER_REPLY_TOPIC", "recorder-a-reply")
    assert KafkaSettings.from_env().effective_reply_topic == "recorder-a-reply"


def test_a_topic_clash_names_the_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """The clash has no single field, so the line carried no RECORDER_ name: 'admin_topic
    must differ from ...' for an operator who had set RECORDER_FILES_TOPIC."""
    from recorder.settings import settings_problems

    monkeypatch.setenv("RECORDER_FILES_TOPIC", "k2eg-recorder-admin")
    with pytest.raises(ValidationError) as info:
        DaemonSettings()
    text = settings_problems(info.value)
    assert text.startswith("RECORDER_ADMIN_TOPIC ") and "RECORDER_FILES_TOPIC" in text, text


def test_admin_topic_colliding_in_kafka_with_another_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """k2eg.recorder.admin and k2eg_recorder.admin are one topic name to Kafka, which refuses
    to create the second (its topic-name collision rule), so the daemon could not set up its
    topics; it is refused at start (exit 2) with the variables named, as equal names are."""
    from recorder.settings import settings_problems

    monkeypatch.setenv("RECORDER_ADMIN_TOPIC", "k2eg.recorder.admin")
    monkeypatch.setenv("RECORDER_STATUS_TOPIC", "k2eg_recorder.admin")
    with pytest.raises(ValidationError) as info:
        DaemonSettings()
    text = settings_problems(info.value)
    assert "RECORDER_STATUS_TOPIC" in text and "'_'" in text, text


def test_a_misspelt_variable_is_named_at_start(tmp_path: Path) -> None:
    """``RECORDER_BOOTSTRAP_SERVER`` (no S) or ``RECORDER_KAFKA_SASL__USERNAME`` (one
    underscore) was ignored without a word: the daemon then used the default. ``run`` now
    logs the variables no setting takes."""
    import os
    import subprocess
    import sys

    from recorder.config.daemon import DaemonSettings
    from recorder.settings import KafkaSettings, unknown_variables

    env = {"RECORDER_BOOTSTRAP_SERVER": "x:1", "RECORDER_KAFKA_SASL__USERNAME": "u",
           "RECORDER_KAFKA__SASL__USERNAME": "u", "RECORDER_STATE_DIR": "/x",
           "RECORDER_LOG_LEVEL": "INFO", "RECORDER_COMMAND_TIMEOUT_S": "5", "HOME": "/root"}
    assert unknown_variables(env, DaemonSettings, KafkaSettings) == [
        "RECORDER_BOOTSTRAP_SERVER", "RECORDER_KAFKA_SASL__USERNAME"]
    bad = tmp_path / "runs.yaml"
    bad.write_text("name: r\n")  # refused: the daemon stops before Kafka
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RECORDER_")}
    out = subprocess.run(
        [sys.executable, "-m", "recorder.cli", "run", "--config", str(bad),
         "--log-format", "json"],
        env={**clean, "RECORDER_BOOTSTRAP_SERVER": "x:1"},
        capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 2, out.stderr
    assert "misspelt" in out.stdout and "RECORDER_BOOTSTRAP_SERVER" in out.stdout, out.stdout
