"""Command-line arguments refused (or defaulted) before anything runs: exit 2 and a line
that says what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from recorder.cli import main

pytestmark = pytest.mark.usefixtures("logging_untouched")


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["start", "bad name!"], "run must be a run name"),
        (["start", ""], "run must be a run name"),
        (["trigger", "shots", "--tag", "k=" + "x" * 5000], "at most 1024 characters"),
        (["trigger", "shots", "--tag", "novalue"], "expected KEY=VALUE"),
        (["trigger", "shots", "--tag", "shot=1", "--tag", "shot=2"], "'shot' is given twice"),
        # a byte that is not UTF-8 in a tag (argv's surrogate escape): the gateway command
        # could not be encoded; the daemon answered internal "trigger failed" and kept an error
        (["trigger", "shots", "--tag", "shot=\udcff"], "not valid Unicode"),
        # within the tag limits, but more than an admin command may be (the daemon refused it
        # without its request_id: no reply came, exit 3 after the timeout)
        (["trigger", "shots", *(a for i in range(64) for a in ("--tag", f"t{i}=" + "x" * 1024))],
         "more than 65536"),
    ],
)
def test_admin_cli_refuses_a_malformed_command_before_sending_it(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Exit 2 (bad arguments), with nothing sent: no broker listens at this address, and the
    answer is immediate."""
    monkeypatch.setenv("RECORDER_BOOTSTRAP_SERVERS", "127.0.0.1:9")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Kafka" not in err, err


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
def test_admin_cli_timeout_must_be_positive(
    value: str, capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["stop", "run-a", "--timeout", value])
    assert info.value.code == 2
    assert "--timeout" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "needle"), [
    (["--seconds", "-1"], "--seconds: '-1': must be more than 0 seconds"),
    (["--seconds", "0"], "--seconds: '0': must be more than 0 seconds"),
    (["--triggers", "-2"], "--triggers: '-2': must be 0 or more"),
    (["--triggers", "two"], "--triggers: 'two' is not a whole number"),
])
def test_demo_refuses_what_it_cannot_run(argv: list[str], needle: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["demo", *argv])
    assert info.value.code == 2
    assert needle in capsys.readouterr().err


def test_demo_output_that_is_a_file_is_one_line(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    taken = tmp_path / "notes.h5"
    taken.write_text("x")
    assert main(["demo", "--output", str(taken)]) == 2
    assert capsys.readouterr().err == (f"k2eg-recorder demo: --output {taken}: cannot use it "
                                       "as a directory: File exists\n")


def test_recover_names_a_path_that_does_not_exist(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["recover", str(tmp_path / "nope.h5.partial")]) == 1
    assert capsys.readouterr().out == f"{tmp_path / 'nope.h5.partial'}: no such file or directory\n"


def test_validate_without_path_checks_what_the_daemon_would_load(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    runs = tmp_path / "runs.d"
    runs.mkdir()
    (runs / "a.yaml").write_text(
        "name: a\nsnapshot: {snapshot_name: a, pv_uri_list: [pva://X]}\n"
        f"output: {{directory: {tmp_path}/data}}\n"
    )
    monkeypatch.setenv("RECORDER_CONFIG_PATH", str(runs))
    assert main(["validate"]) == 0
    assert str(runs) in capsys.readouterr().out
    monkeypatch.setenv("RECORDER_CONFIG_PATH", str(tmp_path / "missing"))
    assert main(["validate", "-q"]) == 1
    assert "no such file or directory" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "needle"), [
    (["--from-offset", "-5"], "--from-offset: '-5': must be 0 or more"),
    (["--from-offset", "end"], "--from-offset: 'end' is not a whole number"),
])
def test_sim_refuses_what_it_cannot_run(argv: list[str], needle: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """A negative offset was a librdkafka traceback once the simulator had connected."""
    with pytest.raises(SystemExit) as info:
        main(["sim", "--bootstrap", "127.0.0.1:9", *argv])
    assert info.value.code == 2
    assert needle in capsys.readouterr().err


@pytest.mark.parametrize("topic", ["", "bad topic", "a/b", ".", "x" * 250])
def test_replay_refuses_a_topic_name_kafka_cannot_have(
    topic: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """README: replay exits 2 for a usage problem (file, selection, topic), before Kafka is
    asked (it used to try to create the topic and exit 1, after 10 s without a broker)."""
    with pytest.raises(SystemExit) as info:
        main(["replay", str(tmp_path / "rec.h5"), "--topic", topic,
              "--bootstrap", "127.0.0.1:9"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--topic" in err and "not a valid Kafka topic name" in err, err


@pytest.mark.parametrize("value", ["inf", "1e12"])
def test_run_refuses_a_command_timeout_kafka_cannot_take(
    value: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """RECORDER_COMMAND_TIMEOUT_S becomes the producer's message.timeout.ms (at most
    2147483647 ms): inf was an OverflowError traceback (exit 1, restarted by systemd in a
    loop), 1e12 was blamed on the RECORDER_KAFKA__* settings."""
    monkeypatch.setenv("RECORDER_BOOTSTRAP_SERVERS", "127.0.0.1:9")
    monkeypatch.setenv("RECORDER_COMMAND_TIMEOUT_S", value)
    examples = Path(__file__).parents[2] / "recorder" / "examples"
    assert main(["run", "--config", str(examples / "triggered.yaml")]) == 2
    err = capsys.readouterr().err
    assert "RECORDER_COMMAND_TIMEOUT_S" in err and "RECORDER_KAFKA__" not in err, err


@pytest.mark.parametrize("option", ["--config", "--state-dir"])
def test_run_refuses_an_empty_path_option(
    option: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """``--config ""`` (an empty shell variable in ExecStart=) was Path(".") to argparse: the
    daemon loaded whatever YAML files the working directory held, as an empty
    RECORDER_CONFIG_PATH did before it was refused; ``--state-dir ""`` kept the resume state
    there."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "stray.yaml").write_text("name: [unclosed\n")
    with pytest.raises(SystemExit) as info:
        main(["run", "--config", str(tmp_path / "none.yaml"), option, ""])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: must not be empty" in err, err


@pytest.mark.parametrize(("argv", "needle"), [
    (["--log-level", "loud"], "argument --log-level: invalid choice: 'LOUD'"),
    (["--metrics-port", "70000"], "argument --metrics-port: '70000': must be 0 to 65535"),
    (["--metrics-port", "-1"], "argument --metrics-port: '-1': must be 0 to 65535"),
    (["--bootstrap", " "], "argument --bootstrap: must not be empty"),
])
def test_run_names_the_option_it_refuses(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bad option was reported as the RECORDER_* variable of that setting ('invalid
    settings: RECORDER_METRICS_PORT: ...'), which the operator had not set."""
    for key in ("RECORDER_LOG_LEVEL", "RECORDER_METRICS_PORT", "RECORDER_BOOTSTRAP_SERVERS"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(SystemExit) as info:
        main(["run", "--config", "/nonexistent/runs.d", *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "RECORDER_" not in err, err


@pytest.mark.parametrize("argv", [["status"], ["replay", "x.h5", "--topic", "t"]])
def test_bootstrap_option_refused_under_its_own_name(
    argv: list[str], capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as info:
        main([*argv, "--bootstrap", ""])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --bootstrap: must not be empty" in err and "RECORDER_" not in err, err


def test_run_log_level_option_is_case_insensitive() -> None:
    from recorder.cli import build_parser

    assert build_parser().parse_args(["run", "--log-level", "debug"]).log_level == "DEBUG"
