"""``k2eg-recorder demo``, the README's first command, end to end in its own process: its
embedded broker, the simulator, the daemon with the example runs, a trigger through the admin
topic, a clean stop; the files it reports are read back here (another process)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from recorder.reader import open_file


@pytest.mark.timeout(240)
def _demo(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``k2eg-recorder demo ARGS`` in its own process, run to its end."""
    return subprocess.run([sys.executable, "-m", "recorder.cli", "demo", *args],
                          capture_output=True, text=True, timeout=200, check=False, env=env)


def test_demo_records_every_example_run_and_prints_only_its_report(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    # in a shell holding the unit's recorder.env: none of it is the demo's (it read them: a
    # short secret was a traceback, a reply topic not created a demo never ready)
    env = {**os.environ, "RECORDER_ADMIN_SECRET": "short", "RECORDER_FILES_TOPIC": "ops-files",
           "RECORDER_CREATE_REPLY_TOPIC": "false", "RECORDER_BOOTSTRAP_SERVERS": "kafka-1:9092"}
    proc = _demo("--seconds", "4", "--triggers", "2", "--output", str(out), env=env)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-3000:]
    # the terminal gets the report only: no librdkafka reconnection noise after the broker
    # stopped, no log lines of the writer processes (they go to the daemon's log file)
    noise = [line for line in text.splitlines() if line.startswith(("%", "{"))]
    assert not noise, noise[:5]
    assert "trigger sim-triggered-images shot=2: ok" in proc.stdout
    files = re.findall(r"^(sim-[\w-]+): (/\S+\.h5)$", proc.stdout, re.MULTILINE)
    assert {name for name, _ in files} == {"sim-normal-10hz", "sim-timedbuffered",
                                           "sim-triggered-images"}, proc.stdout
    for name, path in files:
        assert Path(path).is_relative_to(out / "data")
        with open_file(path) as f:
            assert f.status == "complete", (name, f.status)
            its = f.iterations()
            assert len(its["iter_index"]) >= (2 if name == "sim-triggered-images" else 3)
            assert f.pv_names and all(len(f.values(pv)) for pv in f.pv_names)
    # each PV's line: count, kind, storage dtype and shape as `inspect` gives them
    assert re.search(r"^    SIM:SI:STRING:1 +\d+ values  string +utf-8 +scalar +last='msg-",
                     proc.stdout, re.MULTILINE), proc.stdout
    assert re.search(r"^    SIM:IMG:UBYTE:1:S64x48 +\d+ values  ndarray +uint8 +48x64 +last=",
                     proc.stdout, re.MULTILINE), proc.stdout
    assert re.search(r"^    SIM:TABLE:1 +\d+ values  table +table +(varies|\d+) +last=",
                     proc.stdout, re.MULTILINE), proc.stdout
    assert not list((out / "data").rglob("*.partial"))
    # the demo checks its own files against the format spec, data included
    assert "k2eg-recorder verify --data: 3 of 3 file(s) match docs/file-format.md" \
        in proc.stdout.splitlines(), proc.stdout
    assert f"list them: k2eg-recorder ls {out / 'data'}/*; read one: k2eg-recorder " \
        "inspect FILE" in proc.stdout.splitlines(), proc.stdout
    log = (out / "daemon.log").read_text()
    # written by the writer processes (isolated recordings), into the daemon's log file
    assert log.count('"segment finalized"') == 3, log[-2000:]
    # one file event per file on the files topic, and the disk the runs write to
    assert "  files topic k2eg-recorder-files: 3 file event(s), one per file finalized" \
        in proc.stdout.splitlines(), proc.stdout
    assert re.search(r"^  status disk /\S*: [\d.]+ \w+ free of [\d.]+ \w+ \([\d.]+%\)",
                     proc.stdout, re.MULTILINE), proc.stdout


@pytest.mark.timeout(240)
def test_demo_interrupted_while_recording_stops_at_once_and_says_so(tmp_path: Path) -> None:
    """Ctrl-C during the recording: the daemon stops the way SIGTERM does, the demo reports
    the files it finalized, says it was interrupted and exits 130; it does not wait for the
    rest of ``--seconds`` or talk to the stopped daemon (log lines after its log closed)."""
    out = tmp_path / "demo"
    proc = subprocess.Popen(
        [sys.executable, "-m", "recorder.cli", "demo", "--seconds", "120", "--output", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        log = out / "daemon.log"
        deadline = time.monotonic() + 90
        while not (log.exists() and '"daemon ready"' in log.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        time.sleep(1.5)
        proc.send_signal(signal.SIGINT)
        sent = time.monotonic()
        stdout, stderr = proc.communicate(timeout=60)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = stdout + stderr
    assert "Traceback" not in text and "Logging error" not in text, stderr[-3000:]
    assert proc.returncode == 130, text[-3000:]
    assert "interrupted" in stderr, stderr
    assert took < 8, (took, text[-3000:])
    broker_pid = int(re.findall(r"embedded Kafka broker +\S+ \(pid (\d+)\)", stdout)[0])
    with pytest.raises(ProcessLookupError):
        os.kill(broker_pid, 0)
    assert not list((out / "data").rglob("*.partial"))
    assert "k2eg-recorder verify --data: 3 of 3 file(s) match docs/file-format.md" \
        in stdout.splitlines(), stdout


@pytest.mark.timeout(240)
def test_demo_whose_runs_could_not_record_fails_and_says_why(tmp_path: Path) -> None:
    """Runs that started but recorded nothing (here: their output directory cannot be
    created) are a failed demo, with the reason; not "not started", "0 of 0 file(s) match"
    and exit 0."""
    out = tmp_path / "demo"
    out.mkdir()
    (out / "data").write_text("a file where the data directory goes\n")
    proc = _demo("--seconds", "2", "--triggers", "1", "--output", str(out))
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    for run in ("sim-normal-10hz", "sim-timedbuffered", "sim-triggered-images"):
        assert re.search(rf"^  {run}: recorded no file: .*cannot be created", proc.stderr,
                         re.MULTILINE), proc.stderr
        assert f"{run}: no file (not started)" not in proc.stdout, proc.stdout
    assert "sim-triggered-lookback: no file (not started)" in proc.stdout.splitlines()


@pytest.mark.timeout(240)
def test_demo_verbose_says_where_the_log_really_goes(tmp_path: Path) -> None:
    """``--verbose``: the daemon's log is on the terminal, and the demo says so; it does not
    name a daemon.log that is never written."""
    out = tmp_path / "demo"
    proc = _demo("--seconds", "1", "--triggers", "0", "--verbose", "--output", str(out))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "segment finalized" in proc.stdout  # the writers' log, on the terminal
    assert not (out / "daemon.log").exists()
    assert str(out / "daemon.log") not in proc.stdout + proc.stderr, proc.stdout[:2000]
    assert f"runs from {out / 'runs.d'}, log on this terminal" in proc.stdout, proc.stdout[:2000]


def _start_demo(out: Path, seconds: str) -> subprocess.Popen[str]:
    """A demo in its own process, returned once its daemon is ready."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "recorder.cli", "demo", "--seconds", seconds, "--output",
         str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    log = out / "daemon.log"
    deadline = time.monotonic() + 90
    while not (log.exists() and '"daemon ready"' in log.read_text()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(proc.communicate())
        time.sleep(0.1)
    return proc


@pytest.mark.timeout(240)
def test_demo_run_again_after_a_killed_one_records_from_its_own_broker(tmp_path: Path) -> None:
    """A demo killed (kill -9) leaves its runs active in DIR/state, with the Kafka offsets of
    a broker that died with it. The next demo in the same --output finalizes the files it
    left and records from the start of its own (empty) broker's topics, not from those
    offsets (it recorded nothing until its broker's topic reached them)."""
    out = tmp_path / "demo"
    first = _start_demo(out, "120")
    time.sleep(6)
    first.kill()
    first.communicate()
    left = sorted((out / "data").rglob("*.partial"))
    assert len(left) == 3, left
    proc = _demo("--seconds", "3", "--triggers", "1", "--output", str(out))
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-3000:]
    assert "finalized 3 file(s)" in proc.stdout, proc.stdout
    assert not list((out / "data").rglob("*.partial"))
    for p in left:  # recovered, as `k2eg-recorder recover` does
        with open_file(str(p)[: -len(".partial")]) as f:
            assert f.status == "aborted"
    files = dict(re.findall(r"^(sim-[\w-]+): (/\S+\.h5)$", proc.stdout, re.MULTILINE))
    with open_file(files["sim-normal-10hz"]) as f:  # 10 Hz for 3 s
        assert f.status == "complete"
        assert len(f.iterations()["iter_index"]) >= 10, proc.stdout
