"""What the README states that the code can check quickly: its environment variables and their
defaults, its run definition, the examples it points to, its JSON messages, its metric names
and its admin reply codes. A README that drifts from the code fails here."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from recorder.admin.files import FileEvent
from recorder.admin.protocol import CommandPolicy, ReplyCode, decode_command, decode_reply
from recorder.config.daemon import DaemonSettings
from recorder.config.loader import check_runs, parse_runs
from recorder.metrics import RecorderMetrics
from recorder.reader import SUPPORTED_MAJORS
from recorder.settings import KafkaSettings
from recorder.sinks.final_layout import FORMAT_VERSION

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(\w*)\n(.*?)```", README, re.S)

# read by code outside the two settings classes (service, tests), documented where they are
NOT_SETTINGS = {"RECORDER_STATE_DIR", "RECORDER_TEST_BOOTSTRAP", "RECORDER_K2EG_PYTHON"}


def _blocks(lang: str) -> list[str]:
    return [text for kind, text in BLOCKS if kind == lang]


def _fields() -> set[str]:
    return {f"RECORDER_{name.upper()}" for name in
            (*KafkaSettings.model_fields, *DaemonSettings.model_fields) if name != "kafka"}


def test_every_environment_variable_the_readme_names_is_read() -> None:
    named = set(re.findall(r"\bRECORDER_[A-Z0-9_]*[A-Z0-9]", README))
    named = {n for n in named if not n.startswith("RECORDER_KAFKA")}  # RECORDER_KAFKA__<OPTION>
    assert named - _fields() - NOT_SETTINGS == set()


def test_the_readme_table_of_variables_gives_the_code_s_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in _fields():
        monkeypatch.delenv(name, raising=False)
    kafka, daemon = KafkaSettings(), DaemonSettings()
    rows = re.findall(r"^\| `(RECORDER_[A-Z_]+)` \| `([^`]+)` \|", README, re.M)
    assert len(rows) >= 10
    for name, default in rows:
        field = name.removeprefix("RECORDER_").lower()
        settings = kafka if field in KafkaSettings.model_fields else daemon
        value = getattr(settings, field)
        if isinstance(value, float):
            assert value == float(default), name
        else:
            assert str(value) == default, name


def test_the_readme_run_definition_is_valid() -> None:
    (run_yaml, *_) = _blocks("yaml")
    loaded, problems = parse_runs([("README.md", run_yaml)])
    assert problems == ()
    assert list(loaded.runs) == ["bpm-10hz"]


@pytest.mark.parametrize("example", sorted((ROOT / "recorder/examples").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_the_example_run_definitions_are_valid(example: Path) -> None:
    loaded, problems = check_runs(example)
    assert problems == () and loaded.runs


def test_the_readme_json_messages_are_what_the_codecs_read() -> None:
    command, reply, event = _blocks("json")
    policy = CommandPolicy(max_age_s=30, max_future_skew_s=5, secret=None)
    issued = json.loads(command)["issued_at"]
    cmd = decode_command(command.encode(), policy, now_ms=issued + 12)
    assert (cmd.command, cmd.run, cmd.tags) == ("trigger", "shots", {"shot": "42"})
    assert decode_reply(reply.encode()).code == ReplyCode.OK
    obj = json.loads(event)
    assert FileEvent.decode(event.encode()).to_json_obj() == obj


def test_the_metrics_the_readme_lists_exist() -> None:
    section = README[README.index("- Metrics (`RECORDER_METRICS_PORT`"):]
    section = section[:section.index("\n- Processes")]
    names = set(re.findall(r"`([a-z]+_[a-z_]+)(?:\{[^}]*\})?`", section))  # not labels
    exported = {family.name.removeprefix("k2eg_recorder_")
                for family in RecorderMetrics().registry.collect()}
    exported |= {f"{n}_total" for n in exported}
    assert names and names - exported == set()
    # and every metric exported is listed
    assert {n.removesuffix("_total") for n in exported} - {
        n.removesuffix("_total") for n in names} == set()


def test_the_reply_codes_the_readme_lists_exist() -> None:
    section = README[README.index("Error codes: "):]
    section = section[:section.index("\n\n")]
    codes = set(re.findall(r"`([a-z_]+)`", section))
    assert {c.value for c in ReplyCode} - {"ok"} <= codes


def test_decision_0001_states_the_current_format_version_and_what_readers_accept() -> None:
    """docs/decisions/0001 is where the format's versioning rule is stated: the version it
    calls current is the one the writer writes, and it says readers take the older MAJORs
    (``recorder.reader.SUPPORTED_MAJORS``), not only their own."""
    text = (ROOT / "docs/decisions/0001-file-format-version-and-libver.md").read_text()
    assert re.findall(r"\(now `([0-9.]+)`", text) == [FORMAT_VERSION]
    assert "Readers accept the same MAJOR" not in text
    assert tuple(str(m) for m in range(1, int(FORMAT_VERSION[0]) + 1)) == SUPPORTED_MAJORS
