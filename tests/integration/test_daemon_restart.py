"""A daemon killed (SIGKILL) while the gateway keeps publishing loses nothing: the restarted
daemon recovers the leftover file and resumes the recording from the last durably written
offset into a new segment, without duplicates."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from daemon_support import (
    DaemonEnv,
    DaemonProcess,
    complete_iterations,
    crash_with_leftover,
    h5_files,
    partial_files,
    read_files,
    read_published,
    request,
    run_state,
    simulator,
    wait_for,
)

from recorder.admin.protocol import build_command

pytestmark = [pytest.mark.integration, pytest.mark.slow]
MAX_AGE_S = 30  # RECORDER_COMMAND_MAX_AGE_S of the admin-command test



@pytest.mark.parametrize(("autostart", "recover_first"), [(True, False), (False, False),
                                                         (True, True)],
                         ids=["autostart", "admin-started", "recovered-by-operator"])
def test_restart_after_kill_resumes_without_loss_or_duplicates(  # noqa: PLR0917
    tmp_path: Path, kafka_bootstrap: str, unique_name: Callable[[str], str],
    daemons: list[DaemonProcess], autostart: bool, recover_first: bool,
) -> None:
    """Also a run an admin command started: after a crash it records on, as an autostart
    run does (its state file says it was recording). And when an operator ran `k2eg-recorder
    recover` on the leftover before the restart, the daemon resumes after what that file
    holds, not after the offsets of its state file, which lag it (here made to lag by 6
    records; the writer flushes what it received after the daemon's last state save)."""
    snap = unique_name("resume").replace("-", "_")
    data = tmp_path / "data"
    config = tmp_path / "runs.yaml"
    config.write_text(f"""
name: resume
autostart: {str(autostart).lower()}
snapshot:
  snapshot_name: {snap}
  pv_uri_list: [pva://SIM:AI:DOUBLE:1, pva://SIM:WF:DOUBLE:2:N4]
  time_window: 100
output: {{directory: {data}, flush_interval_s: 0.3}}
""")
    denv = DaemonEnv.in_dir(tmp_path, kafka_bootstrap, unique_name, config)
    with simulator(denv.bootstrap, denv.cmd_topic) as sim, denv.admin() as admin:
        first = DaemonProcess(denv, "first")
        daemons.append(first)
        if not autostart:
            wait_for(lambda: run_state(admin, "resume") is not None, 40, "the daemon to answer")
            reply = request(admin, "start", "resume", timeout=40)
            assert reply.code.value == "ok", reply
        wait_for(lambda: complete_iterations(admin, "resume") >= 12, 40, "12 iterations")
        first.signal(signal.SIGKILL)
        first.wait(10)
        state = json.loads((denv.state_dir / "resume.json").read_text())
        assert state["active"]["offsets"], state
        # one segment file opened so far: the resumed recording's next one is number 1
        assert state["active"]["segments"] == 1 and state["active"]["started_at_ns"] > 0
        started_at_ns = state["active"]["started_at_ns"]
        assert sim.engine is not None
        published_before = sim.engine.stats["iterations"]
        time.sleep(1.5)  # the gateway keeps publishing while no recorder runs
        assert sim.engine.stats["iterations"] > published_before + 5
        if recover_first:
            state["active"]["offsets"] = {p: max(-1, o - 6)
                                          for p, o in state["active"]["offsets"].items()}
            (denv.state_dir / "resume.json").write_text(json.dumps(state))
            out = subprocess.run([sys.executable, "-m", "recorder.cli", "recover", str(data)],
                                 capture_output=True, text=True, timeout=120, check=False)
            assert out.returncode == 0, out.stdout + out.stderr
            assert partial_files(data) == [] and len(h5_files(data)) == 1, out.stdout

        second = DaemonProcess(denv, "second")
        daemons.append(second)
        wait_for(lambda: complete_iterations(admin, "resume") >= 20, 40, "the resumed recording")
        if not autostart:
            assert "resuming it" in second.log_text()
        if recover_first:
            assert "the leftover file was finalized before this start" in second.log_text()
        resumed_state = json.loads((denv.state_dir / "resume.json").read_text())["active"]
        assert resumed_state["segments"] == 2 and resumed_state["started_at_ns"] == started_at_ns
        second.signal(signal.SIGTERM)
        assert second.wait(60) == 0, second.log_text()[-3000:]
    assert '"next_segment": 1' in second.log_text()
    assert json.loads((denv.state_dir / "resume.json").read_text())["active"] is None
    assert partial_files(data) == []
    files = read_files(h5_files(data))
    assert len(files) == 2, [f["path"] for f in files]
    files.sort(key=lambda f: f["attrs"]["segment_start_time"])
    crashed, resumed = files
    assert crashed["status"] == "aborted" and resumed["status"] == "complete"
    # the crashed segment says it was recovered (and, by the daemon, where it went on)
    assert crashed["attrs"]["recovered"]
    if not recover_first:
        assert "resumed the recording in the next segment" in crashed["attrs"]["status_reason"]
    # one recording in numbered segments: same start in the name, segment 0 then 1, no "-1"
    assert crashed["attrs"]["segment"] == 0 and resumed["attrs"]["segment"] == 1
    assert crashed["attrs"]["start_time"] == resumed["attrs"]["start_time"]
    first_name, second_name = Path(crashed["path"]).name, Path(resumed["path"]).name
    assert second_name == first_name.replace(".h5", "_s0001.h5"), (first_name, second_name)
    assert crashed["attrs"]["recording_uid"] == resumed["attrs"]["recording_uid"]

    published = read_published(denv.bootstrap, snap.lower())
    first_it = crashed["iterations"][0]
    last_it = resumed["iterations"][-1]
    assert last_it == max(published.tails)
    # value by value: the two files together hold each published value exactly once
    for pv in ("SIM:AI:DOUBLE:1", "SIM:WF:DOUBLE:2:N4"):
        got: dict[int, list[object]] = {}
        for f in files:
            col = f["pvs"][pv]
            for it, value in zip(col["iters"], col["values"], strict=True):
                got.setdefault(it, []).append(value)
        for it in range(first_it, last_it + 1):
            assert got.get(it) == published.data[it][pv], (pv, it)
    # every iteration is complete in exactly one file, except at most the one the kill cut
    complete = [i for f in files
                for i, s in zip(f["iterations"], f["iteration_status"], strict=True)
                if s == "complete"]
    assert len(complete) == len(set(complete))
    missing = set(range(first_it, last_it + 1)) - set(complete)
    assert len(missing) <= 1, sorted(missing)


@pytest.mark.parametrize("damage", ["checksum", "heap-loop"])
def test_a_damaged_leftover_is_left_for_the_operator_and_the_recording_goes_on(
    tmp_path: Path, kafka_bootstrap: str, unique_name: Callable[[str], str],
    daemons: list[DaemonProcess], damage: str,
) -> None:
    """The leftover of a killed daemon, damaged: the restarted daemon says it cannot recover
    it, leaves it byte for byte for the operator, and records on in the next segment.
    ``checksum``: the name of a root attribute (read only when the file is finalized);
    HDF5's SWMR read retries (100, doubling a sleep) held that start for good (decision
    0013). ``heap-loop``: the global-heap block of the root's strings zero-filled, as a
    power loss can leave it; HDF5 2.0 loops for ever on it holding the GIL, which froze the
    whole daemon (every run, the watchdog) until the recovery moved to a child process with
    a deadline (RECORDER_LEFTOVER_TIMEOUT_S, 3 s here); the child now finds the collection
    before HDF5 reads it (recorder.sinks.globalheap) and says where it is."""
    snap = unique_name("damaged").replace("-", "_")
    data = tmp_path / "data"
    config = tmp_path / "runs.yaml"
    config.write_text(f"""
name: damaged
snapshot:
  snapshot_name: {snap}
  pv_uri_list: [pva://SIM:AI:DOUBLE:1]
  time_window: 100
output: {{directory: {data}, flush_interval_s: 0.3}}
""")
    denv = DaemonEnv.in_dir(tmp_path, kafka_bootstrap, unique_name, config,
                            extra={"RECORDER_LEFTOVER_TIMEOUT_S": "3"})
    with simulator(denv.bootstrap, denv.cmd_topic), denv.admin() as admin:
        leftover = crash_with_leftover(denv, admin, "damaged", data, daemons)
        whole = bytearray(leftover.read_bytes())
        if damage == "checksum":
            assert whole.count(b"pv_uri_map") == 1
            at = whole.find(b"pv_uri_map")
            whole[at : at + 10] = b"XXXXXXXXXX"  # the checksum of its heap block fails
        else:  # the first global-heap collection: "GCOL", version, 3 reserved, its size
            at = whole.find(b"GCOL\x01\x00\x00\x00")
            size = int.from_bytes(whole[at + 8 : at + 16], "little")
            assert at > 0 and 16 < size <= 65536, (at, size)
            whole[at + 16 : at + size] = bytes(size - 16)
        leftover.write_bytes(whole)

        second = DaemonProcess(denv, "second")
        daemons.append(second)
        wait_for(lambda: complete_iterations(admin, "damaged") >= 14, 40,
                 "the resumed recording")
        assert "could not recover a leftover file" in second.log_text()
        if damage == "heap-loop":
            assert "damaged global-heap collection at byte" in second.log_text()
            assert "the process was killed" not in second.log_text()
        second.signal(signal.SIGTERM)
        assert second.wait(60) == 0, second.log_text()[-3000:]
    assert leftover.read_bytes() == whole
    (resumed,) = read_files(h5_files(data))
    assert resumed["status"] == "complete" and resumed["attrs"]["segment"] == 1
    assert resumed["iterations"], resumed


def _all_replies(bootstrap: str, topic: str) -> list[tuple[str | None, str]]:
    """(request_id, code) of every reply on ``topic``, read from its beginning."""
    from confluent_kafka import Consumer, TopicPartition

    from recorder.admin.protocol import decode_reply

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"check-{topic}",
                         "enable.auto.commit": False})
    out: list[tuple[str | None, str]] = []
    try:
        high = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=5)[1]
        consumer.assign([TopicPartition(topic, 0, 0)])
        position = 0
        deadline = time.monotonic() + 15
        while position < high and time.monotonic() < deadline:
            for msg in consumer.consume(100, 0.2):
                if msg.error():
                    continue
                position = msg.offset() + 1
                reply = decode_reply(msg.value() or b"")
                out.append((reply.request_id, reply.code.value))
    finally:
        consumer.close()
    return out


def test_admin_commands_sent_while_the_daemon_is_down_are_answered_after_a_restart(
    tmp_path: Path, kafka_bootstrap: str, unique_name: Callable[[str], str],
    daemons: list[DaemonProcess],
) -> None:
    token = unique_name("adm").replace("-", "_")
    config = tmp_path / "runs.yaml"
    config.write_text(f"""
runs:
  - name: early
    autostart: false
    snapshot: {{snapshot_name: early_{token}, pv_uri_list: [pva://SIM:AI:DOUBLE:1]}}
    output: {{directory: {tmp_path}/data/early}}
  - name: late
    autostart: false
    snapshot: {{snapshot_name: late_{token}, pv_uri_list: [pva://SIM:AI:DOUBLE:2]}}
    output: {{directory: {tmp_path}/data/late}}
""")
    denv = DaemonEnv.in_dir(tmp_path, kafka_bootstrap, unique_name, config,
                            {"RECORDER_COMMAND_MAX_AGE_S": str(MAX_AGE_S)})
    with simulator(denv.bootstrap, denv.cmd_topic), denv.admin() as admin:
        first = DaemonProcess(denv, "first")
        daemons.append(first)
        wait_for(lambda: (run_state(admin, "early") or {}).get("state") == "idle", 40,
                 "the first daemon to answer")
        handled = admin.build("status")
        admin.send(handled)
        assert admin.wait_reply(handled.request_id, 20).ok
        first.signal(signal.SIGTERM)
        assert first.wait(60) == 0, first.log_text()[-3000:]
        saved = json.loads((denv.state_dir / ".admin-offsets.json").read_text())
        assert saved["topic"] == denv.admin_topic and saved["offsets"]["0"] >= 2

        # the daemon is down: one command has aged past the max age by the time it is read
        # (issued MAX_AGE_S + 10 s ago: the age the daemon judges is now - issued_at), one is
        # fresh at restart (the max age is far above a daemon's start-up on a busy machine)
        stale = build_command("start", run="early", reply_topic=admin.reply_topic,
                              issued_at_ms=time.time_ns() // 1_000_000 - (MAX_AGE_S + 10) * 1000)
        admin.send(stale)
        fresh = admin.build("start", "late")
        admin.send(fresh)
        second = DaemonProcess(denv, "second")
        daemons.append(second)
        assert admin.wait_reply(stale.request_id, 40).code.value == "expired"
        reply = admin.wait_reply(fresh.request_id, 40)
        assert reply.ok, reply
        assert (run_state(admin, "late") or {}).get("state") == "recording"
        assert (run_state(admin, "early") or {}).get("state") == "idle"
        second.signal(signal.SIGTERM)
        assert second.wait(60) == 0, second.log_text()[-3000:]
    # every command was answered exactly once over both daemons (nothing replayed)
    replies = _all_replies(denv.bootstrap, denv.reply_topic)
    ids = [rid for rid, _code in replies]
    assert len(ids) == len(set(ids)), replies
    assert {handled.request_id, stale.request_id, fresh.request_id} <= set(ids)
    assert '"admin topic resumed from the saved offsets"' in second.log_text()


def test_commands_on_an_admin_topic_created_again_while_the_daemon_is_down_are_answered(
    tmp_path: Path, kafka_bootstrap: str, unique_name: Callable[[str], str],
    daemons: list[DaemonProcess],
) -> None:
    """The admin topic deleted and created again while the daemon is down: its offsets start
    at 0 again, below the saved read position. Everything it holds was sent after the daemon
    stopped: it is read from its beginning (the position was clamped to its end, so the
    commands sent meanwhile were never read, never answered)."""
    from confluent_kafka.admin import AdminClient as KafkaAdmin
    from confluent_kafka.admin import NewTopic

    token = unique_name("adm").replace("-", "_")
    config = tmp_path / "runs.yaml"
    config.write_text(f"""
name: late
autostart: false
snapshot: {{snapshot_name: late_{token}, pv_uri_list: [pva://SIM:AI:DOUBLE:2]}}
output: {{directory: {tmp_path}/data/late}}
""")
    denv = DaemonEnv.in_dir(tmp_path, kafka_bootstrap, unique_name, config)
    with simulator(denv.bootstrap, denv.cmd_topic):
        with denv.admin() as admin:
            first = DaemonProcess(denv, "first")
            daemons.append(first)
            wait_for(lambda: run_state(admin, "late") is not None, 40, "the daemon to answer")
            for _ in range(4):
                assert request(admin, "status", timeout=20).ok
            first.signal(signal.SIGTERM)
            assert first.wait(60) == 0, first.log_text()[-3000:]
        saved = json.loads((denv.state_dir / ".admin-offsets.json").read_text())
        assert saved["offsets"]["0"] >= 4, saved

        kafka = KafkaAdmin({"bootstrap.servers": denv.bootstrap})
        for future in kafka.delete_topics([denv.admin_topic], operation_timeout=10).values():
            future.result(15)
        deadline = time.monotonic() + 15
        while True:
            try:
                for future in kafka.create_topics([NewTopic(denv.admin_topic, 1, 1)]).values():
                    future.result(15)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

        with denv.admin() as admin:
            fresh = admin.build("start", "late")
            admin.send(fresh)
            second = DaemonProcess(denv, "second")
            daemons.append(second)
            reply = admin.wait_reply(fresh.request_id, 40)
            assert reply.ok, reply
            assert (run_state(admin, "late") or {}).get("state") == "recording"
            second.signal(signal.SIGTERM)
            assert second.wait(60) == 0, second.log_text()[-3000:]
