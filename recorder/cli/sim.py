"""``k2eg-recorder sim``: run the k2eg gateway simulator until SIGINT/SIGTERM.

Examples::

    k2eg-recorder sim --embedded-broker                       # Tansu on a free loopback port
    k2eg-recorder sim --bootstrap 127.0.0.1:9092 --cmd-topic cmd-in-topic
    k2eg-recorder sim --bootstrap 127.0.0.1:9092 --protocol legacy \\
        --faults drop-tail=every:10,reorder-data=p:0.05,stall=every:10000/1500

PV names are described in :mod:`recorder.sim.pvs` (``pva://SIM:AI:DOUBLE:1`` ...); fault
syntax in :mod:`recorder.sim.faults`.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from types import FrameType

from recorder.cli.argtypes import count

HELP = "run the k2eg gateway simulator"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--bootstrap",
        default=os.environ.get("RECORDER_BOOTSTRAP_SERVERS", "127.0.0.1:9092"),
        help="Kafka bootstrap servers (default: $RECORDER_BOOTSTRAP_SERVERS or 127.0.0.1:9092)",
    )
    parser.add_argument(
        "--cmd-topic",
        default=os.environ.get("RECORDER_CMD_TOPIC", "cmd-in-topic"),
        help="the gateway command topic (created with 1 partition if missing)",
    )
    parser.add_argument(
        "--protocol",
        choices=("sequenced", "legacy"),
        default="sequenced",
        help="snapshot stream generation: sequenced (msg_seq..., k2eg>=0.3.2) or legacy "
        "(gateway main, no sequence keys)",
    )
    parser.add_argument(
        "--faults",
        default="",
        metavar="SPEC",
        help="fault injection, e.g. drop-tail=every:5,duplicate-data=p:0.1,delay-data=every:3,"
        "delay-ms=300,reorder-data=every:4,drop-header=every:7,drop-data=p:0.01,"
        "stall=every:5000/800,seed=1",
    )
    parser.add_argument(
        "--default-period-ms",
        type=int,
        default=100,
        help="update period of simulated PVs whose name has no P<ms> option (default 100)",
    )
    parser.add_argument(
        "--get-timeout",
        type=float,
        default=10.0,
        help="seconds before a get of a never-connecting PV answers -3 (default 10, as k2eg)",
    )
    parser.add_argument(
        "--from-offset",
        type=count,
        default=None,
        help="read the command topic from this offset instead of its end",
    )
    parser.add_argument(
        "--embedded-broker",
        action="store_true",
        help="start an embedded Tansu broker on a free loopback port (ignores --bootstrap)",
    )


def run(args: argparse.Namespace) -> int:
    import structlog

    from recorder.broker import EmbeddedBroker
    from recorder.errors import RecorderError
    from recorder.sim import FaultConfig, GatewaySimulator, Protocol, SimConfig

    log = structlog.get_logger("recorder.sim")
    try:
        faults = FaultConfig.parse(args.faults)
    except RecorderError as exc:
        print(f"k2eg-recorder sim: {exc}", file=sys.stderr)
        return 2
    config = SimConfig(
        protocol=Protocol(args.protocol),
        default_period_ms=args.default_period_ms,
        get_timeout_s=args.get_timeout,
        faults=faults,
    )
    broker: EmbeddedBroker | None = None
    bootstrap = args.bootstrap
    try:
        if args.embedded_broker:
            broker = EmbeddedBroker().start()
            bootstrap = broker.bootstrap_servers
            print(f"embedded broker: {bootstrap} (pid {broker.pid})", flush=True)
        sim = GatewaySimulator(bootstrap, args.cmd_topic, config, start_offset=args.from_offset)

        received: list[int] = []

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            received.append(signum)  # no logging here: a handler must take no lock
            sim.request_stop()

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        print(
            f"k2eg gateway simulator: bootstrap={bootstrap} cmd-topic={args.cmd_topic} "
            f"protocol={args.protocol}" + (f" faults={args.faults}" if args.faults else ""),
            flush=True,
        )
        sim.run()
        for signum in received[:1]:
            log.info("sim.signal", signal=signal.Signals(signum).name)
        return 0
    except RecorderError as exc:
        print(f"k2eg-recorder sim: {exc}", file=sys.stderr)
        return 1
    finally:
        if broker is not None:
            broker.stop()
