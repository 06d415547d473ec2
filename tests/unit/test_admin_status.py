"""The status/heartbeat document: JSON layout, round trip, refusal of bad documents."""

from __future__ import annotations

import json

import pytest

from recorder.admin.status import (
    STATUS_SCHEMA,
    DaemonState,
    DiskStatus,
    RunState,
    RunStatus,
    StatusDocument,
)
from recorder.errors import AdminCommandError

RUN = RunStatus(
    name="bpm-10hz",
    state=RunState.RECORDING,
    snapshot="bpm_10hz",
    topic="bpm_10hz",
    mode="periodic normal",
    autostart=True,
    current_file="/data/bpm-10hz_20241121T120000Z_0000.h5.partial",
    recording_started_at=1_000,
    last_iteration=41,
    last_iteration_at=5_000,
    iterations_complete=40,
    iterations_incomplete=2,
    values_written=120,
    lag=3,
    errors=1,
    last_error="iteration 12 incomplete: timeout",
)
DOC = StatusDocument(
    instance="daq-3",
    state=DaemonState.RUNNING,
    time=6_500,
    started_at=500,
    runs=(RUN, RunStatus("wf", RunState.IDLE, "wf", "wf", "triggered normal", False)),
    pid=1234,
    version="0.1.0",
    config_path="/etc/k2eg-recorder/runs.d",
    config_errors=("a.yaml:3: name: bad",),
    seq=9,
)


def test_json_layout() -> None:
    obj = json.loads(DOC.encode())
    assert obj["schema"] == STATUS_SCHEMA
    assert obj["kind"] == "heartbeat"
    assert obj["seq"] == 9
    assert obj["daemon"] == {
        "instance": "daq-3",
        "state": "running",
        "pid": 1234,
        "version": "0.1.0",
        "started_at": 500,
        "uptime_s": 6.0,
        "config_path": "/etc/k2eg-recorder/runs.d",
        "config_errors": ["a.yaml:3: name: bad"],
        "disks": [],
    }
    run = obj["runs"]["bpm-10hz"]
    assert run["state"] == "recording"
    assert run["current_file"].endswith(".h5.partial")
    assert run["iterations"] == {"complete": 40, "incomplete": 2}
    assert (run["last_iteration"], run["lag"], run["errors"]) == (41, 3, 1)
    assert obj["runs"]["wf"]["current_file"] is None
    assert list(obj["runs"]) == ["bpm-10hz", "wf"]


def test_round_trip() -> None:
    again = StatusDocument.decode(DOC.encode())
    assert again == DOC
    assert again.run("bpm-10hz") == RUN
    assert again.run("missing") is None


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"[]",
        b"{}",
        json.dumps({**json.loads(DOC.encode()), "schema": "other/1"}).encode(),
        json.dumps({**json.loads(DOC.encode()), "time": "late"}).encode(),
        json.dumps({**json.loads(DOC.encode()), "runs": []}).encode(),
        json.dumps(
            {**json.loads(DOC.encode()), "runs": {"x": {**RUN.to_json_obj(), "state": "zzz"}}}
        ).encode(),
    ],
)
def test_bad_documents(payload: bytes) -> None:
    with pytest.raises(AdminCommandError) as info:
        StatusDocument.decode(payload)
    assert info.value.code == "malformed"


def test_bridge_entry_round_trips_and_shows_in_the_admin_table() -> None:
    from dataclasses import replace

    from recorder.cli.admin import status_table

    bridge = {"status": "serving", "reason": "", "subscribers": True,
              "endpoints": {"rep": "tcp://127.0.0.1:4545", "pub": "tcp://127.0.0.1:4546"},
              "iterations": 9, "served": 9, "published": 8, "dropped_iterations": 0}
    doc = replace(DOC, runs=(replace(RUN, bridge=bridge), DOC.runs[1]))
    obj = json.loads(doc.encode())
    assert obj["runs"]["bpm-10hz"]["bridge"] == bridge
    assert obj["runs"]["wf"]["bridge"] is None
    back = StatusDocument.decode(doc.encode())
    assert back.run("bpm-10hz") is not None and back.run("bpm-10hz").bridge == bridge  # type: ignore[union-attr]
    table = status_table(obj)
    assert ("  bridge serving pub tcp://127.0.0.1:4546 rep tcp://127.0.0.1:4545 served 9 "
            "published 8 (subscribed)") in table
    with pytest.raises(AdminCommandError):
        StatusDocument.decode(json.dumps(
            {**obj, "runs": {"x": {**obj["runs"]["wf"], "bridge": [1]}}}).encode())


def test_silence_fields_round_trip_show_in_the_table_and_default_for_old_documents() -> None:
    from dataclasses import replace

    from recorder.cli.admin import status_table

    silent = replace(RUN, silent_since=1_795_291_545_000, snapshot_restarts=2)
    doc = replace(DOC, runs=(silent, DOC.runs[1]))
    obj = json.loads(doc.encode())
    assert obj["runs"]["bpm-10hz"]["silent_since"] == 1_795_291_545_000
    assert obj["runs"]["bpm-10hz"]["snapshot_restarts"] == 2
    assert StatusDocument.decode(doc.encode()).run("bpm-10hz") == silent
    table = status_table(obj)
    assert ("  silent since 2026-11-21 20:05:45 UTC: no data from the gateway; its snapshot "
            "start is re-sent with backoff") in table
    assert table.count("silent since") == 1  # not for the run that hears its gateway
    older = json.loads(DOC.encode())  # a document from a daemon without these fields
    for run in older["runs"].values():
        del run["silent_since"], run["snapshot_restarts"]
        del run["writer_behind_since"], run["backpressure_pauses"]
    back = StatusDocument.decode(json.dumps(older).encode()).run("bpm-10hz")
    assert back is not None and back.silent_since is None and back.snapshot_restarts == 0
    assert back.writer_behind_since is None and back.backpressure_pauses == 0


def test_writing_behind_round_trips_and_shows_in_the_table() -> None:
    from dataclasses import replace

    from recorder.cli.admin import status_table

    behind = replace(RUN, writer_behind_since=1_795_291_545_000, backpressure_pauses=4)
    doc = replace(DOC, runs=(behind, DOC.runs[1]))
    obj = json.loads(doc.encode())
    assert obj["runs"]["bpm-10hz"]["writer_behind_since"] == 1_795_291_545_000
    assert StatusDocument.decode(doc.encode()).run("bpm-10hz") == behind
    table = status_table(obj)
    assert ("  writing behind since 2026-11-21 20:05:45 UTC: its topic is paused until the "
            "writer catches up (paused 4 time(s) so far)") in table
    assert table.count("writing behind") == 1


def test_attention_lists_what_needs_a_look_and_nothing_when_all_is_well() -> None:
    from dataclasses import replace

    from recorder.cli.admin import attention

    assert attention(json.loads(DOC.encode())) == ["reload refused: a.yaml:3: name: bad"]
    healthy = replace(DOC, config_errors=())
    assert attention(json.loads(healthy.encode())) == []
    runs = (
        replace(RUN, name="a", state=RunState.FAILED, last_error="disk full"),
        replace(RUN, name="b", state=RunState.RETRYING, last_error=None),
        replace(RUN, name="c", silent_since=1_795_291_545_000),
        replace(RUN, name="d"),
    )
    doc = json.loads(replace(healthy, runs=runs).encode())
    assert attention(doc) == [
        "run a is failed: disk full (k2eg-recorder start a tries again; k2eg-recorder stop a "
        "ends its recording)",
        "run b is retrying",
        "run c gets no data from the gateway since 2026-11-21 20:05:45 UTC",
    ]
    assert attention(doc, "d") == [] and attention(doc, "c") == [attention(doc)[2]]


GIB = 1024**3
DISKS = (
    DiskStatus(path="/data", directories=("/data/bpm", "/data/wf"), runs=("bpm-10hz", "wf"),
               free_bytes=812 * GIB, total_bytes=1000 * GIB, min_free_bytes=50 * GIB,
               full_in_s=81_234.5, warning=None, checked_at=6_000),
    DiskStatus(path="/scratch", directories=("/scratch/x",), runs=("x",), free_bytes=GIB,
               total_bytes=100 * GIB, min_free_bytes=5 * GIB, full_in_s=None,
               warning="1.0 GiB free (1.0%), below the minimum of 5%", checked_at=6_000),
    DiskStatus(path="/nfs/hung", directories=("/nfs/hung",),
               warning="storage not answering: checking /nfs/hung has not returned for 31 s"),
)


def test_disks_round_trip_show_in_the_table_and_need_attention_when_warned() -> None:
    from dataclasses import replace

    from recorder.cli.admin import attention, status_table

    doc = replace(DOC, config_errors=(), disks=DISKS)
    obj = json.loads(doc.encode())
    assert obj["daemon"]["disks"][0] == {
        "path": "/data", "directories": ["/data/bpm", "/data/wf"], "runs": ["bpm-10hz", "wf"],
        "free_bytes": 812 * GIB, "total_bytes": 1000 * GIB, "min_free_bytes": 50 * GIB,
        "full_in_s": 81_234.5, "warning": None, "checked_at": 6_000,
    }
    assert StatusDocument.decode(doc.encode()) == doc
    table = status_table(obj).splitlines()
    assert "disk /data: 812.0 GiB free of 1000.0 GiB (81.2%), full in ~22 h 34 min " \
           "(runs bpm-10hz, wf)" in table
    assert "disk /scratch: 1.0 GiB free of 100.0 GiB (1.0%) (run x)" in table
    assert "  ! 1.0 GiB free (1.0%), below the minimum of 5%" in table
    assert "disk /nfs/hung: free space unknown" in table
    assert attention(obj) == [
        "disk /scratch: 1.0 GiB free (1.0%), below the minimum of 5%",
        "disk /nfs/hung: storage not answering: checking /nfs/hung has not returned for 31 s",
    ]
    # one run's view: only the disks it writes to
    assert attention(obj, "bpm-10hz") == []
    assert attention(obj, "x") == [attention(obj)[0]]
    assert not any(line.startswith("disk /data") for line in status_table(obj, "x").splitlines())
    older = json.loads(DOC.encode())  # a daemon from before the disk checks
    del older["daemon"]["disks"]
    assert StatusDocument.decode(json.dumps(older).encode()).disks == ()
    with pytest.raises(AdminCommandError):
        StatusDocument.decode(json.dumps(
            {**obj, "daemon": {**obj["daemon"], "disks": [{"path": "/d", "full_in_s": "1"}]}}
        ).encode())


def test_a_reply_prints_its_files_and_problems_once() -> None:
    """`k2eg-recorder stop` printed each file twice: in the message and listed below it."""
    from recorder.admin.protocol import AdminReply, ReplyCode
    from recorder.cli.admin import reply_text

    stop = AdminReply("r1", "stop", ReplyCode.OK,
                      "run 'a' stopped (complete); files: /d/a_0000.h5, /d/a_0000_s0001.h5",
                      "a", {"files": ["/d/a_0000.h5", "/d/a_0000_s0001.h5"]}, 1)
    assert reply_text(stop) == ("ok: run 'a' stopped (complete)\n"
                                "  /d/a_0000.h5\n  /d/a_0000_s0001.h5")
    none = AdminReply("r2", "stop", ReplyCode.OK, "run 'a' stopped (aborted); files: none",
                      "a", {"files": []}, 1)
    assert reply_text(none) == "ok: run 'a' stopped (aborted); files: none"
    reload = AdminReply("r3", "reload", ReplyCode.INVALID_CONFIG,
                        "reload refused, the previous definitions stay in force: 2 problem(s): "
                        "a.yaml:1: x; b.yaml:2: y", None, {"problems": ["a.yaml:1: x",
                                                                        "b.yaml:2: y"]}, 1)
    assert reply_text(reload) == ("invalid_config: reload refused, the previous definitions "
                                  "stay in force: 2 problem(s)\n  a.yaml:1: x\n  b.yaml:2: y")


def test_a_disk_many_runs_write_to_is_one_readable_line_in_the_table() -> None:
    """200 runs on one filesystem: ``k2eg-recorder status`` named all of them on the disk's
    line (~1,800 characters, before the table it is there to head); it names the first
    few and how many there are (``status RUN`` shows that run's)."""
    from dataclasses import replace

    from recorder.cli.admin import status_table

    names = tuple(f"run{i:03d}" for i in range(200))
    disk = DiskStatus(path="/data", directories=("/data/k2eg",), runs=names,
                      free_bytes=812 * GIB, total_bytes=1000 * GIB)
    obj = json.loads(replace(DOC, config_errors=(), disks=(disk,)).encode())
    (line,) = [x for x in status_table(obj).splitlines() if x.startswith("disk /data")]
    assert len(line) < 200, line
    assert line.endswith("(runs run000, run001, run002, run003, run004, ... 200 in all)"), line
    obj["runs"]["run150"] = obj["runs"][next(iter(obj["runs"]))]
    (line,) = [x for x in status_table(obj, "run150").splitlines() if x.startswith("disk ")]
    assert line.endswith("(runs run150, ... 200 in all)"), line


def _many(n: int) -> StatusDocument:
    from dataclasses import replace

    runs = tuple(replace(RUN, name=f"run-{i:04d}", current_file=f"/data/run-{i:04d}_0000.h5",
                         last_error=None) for i in range(n))
    return replace(DOC, runs=runs)


def test_a_document_too_large_for_one_kafka_message_keeps_the_runs_that_need_a_look_first(
) -> None:
    """~450 to 850 bytes a run: 1,200 to 2,200 runs passed Kafka's default 1 MB limit and
    the producer refused every heartbeat and every status reply (the CLI waited for its
    timeout)."""
    from dataclasses import replace

    from recorder.admin.status import STATUS_MAX_BYTES
    from recorder.cli.admin import attention, status_table

    doc = _many(3_000)
    runs = list(doc.runs)
    runs[2_998] = replace(runs[2_998], state=RunState.FAILED, last_error="disk full")
    runs[2_999] = replace(runs[2_999], last_error="iteration 7 incomplete")
    doc = replace(doc, runs=tuple(runs))
    assert len(doc.encode()) > 1_000_000

    fitted = doc.fitted()
    encoded = fitted.encode()
    assert STATUS_MAX_BYTES - 1_000 < len(encoded) <= STATUS_MAX_BYTES
    obj = json.loads(encoded)
    assert list(obj["runs"])[-2:] == ["run-2998", "run-2999"]  # needing a look, then errors
    assert len(obj["runs"]) + obj["runs_left_out"]["count"] == 3_000
    assert obj["runs_left_out"]["needing_a_look"] == 0
    assert "k2eg-recorder status RUN" in obj["runs_left_out"]["why"]
    again = StatusDocument.decode(encoded)
    assert again.runs_left_out == obj["runs_left_out"]["count"]
    table = status_table(obj)
    assert table.endswith(f"... {again.runs_left_out} more run(s) not shown: the status is kept "
                          "to one Kafka message (k2eg-recorder status RUN shows one)")
    assert attention(obj)[1:] == ["run run-2998 is failed: disk full (k2eg-recorder start run-2998 "
                              "tries again; k2eg-recorder stop run-2998 ends its recording)"]

    # more runs needing a look than fit: the count says so, and --check too
    failing = replace(doc, runs=tuple(replace(r, state=RunState.RETRYING) for r in doc.runs))
    left = failing.fitted()
    assert left.runs_left_out == left.runs_left_out_needing_a_look > 0
    assert attention(json.loads(left.encode()))[-1].startswith(
        f"{left.runs_left_out} more run(s) failed, retrying or silent, left out")
    # a document that fits is sent as it is
    assert _many(10).fitted() == _many(10)
    assert json.loads(_many(10).encode())["runs_left_out"] is None


def test_long_texts_are_cut_in_the_document() -> None:
    from dataclasses import replace

    from recorder.admin.status import MAX_TEXT_CHARS

    long = "x" * 100_000
    doc = replace(DOC, runs=(replace(RUN, last_error=long,
                                     bridge={"status": "failed", "reason": long}),),
                  config_errors=(long,))
    obj = json.loads(doc.encode())
    run = obj["runs"]["bpm-10hz"]
    for text in (run["last_error"], run["bridge"]["reason"], obj["daemon"]["config_errors"][0]):
        assert text.startswith("x" * MAX_TEXT_CHARS)
        assert text.endswith(f"... ({100_000 - MAX_TEXT_CHARS:,} more characters in the "
                             "daemon's log)")
    assert len(doc.encode()) < 4 * MAX_TEXT_CHARS
