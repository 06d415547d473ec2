"""``k2eg-recorder run --config PATH``: the recorder daemon (systemd ``ExecStart``).

Connection settings come from the environment (``RECORDER_BOOTSTRAP_SERVERS``, SASL/TLS as
``RECORDER_KAFKA__SASL__MECHANISM=...``, see :mod:`recorder.settings`), daemon settings too
(``RECORDER_ADMIN_TOPIC``, ``RECORDER_ADMIN_SECRET``, ``RECORDER_METRICS_PORT``, ... see
:mod:`recorder.config.daemon`); options given here override them.

Exit codes: 0 after a clean stop (SIGTERM/SIGINT), 2 for invalid settings (also a Kafka setting
the Kafka client refuses) or run definitions.
"""

from __future__ import annotations

import argparse
import os
import sys

from recorder.cli.argtypes import given_path, not_empty, port

HELP = "run the recorder daemon"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=given_path, default=None, metavar="PATH",
                        help="run-definition file or directory of *.yaml/*.yml "
                             "(default: $RECORDER_CONFIG_PATH or /etc/k2eg-recorder/runs.d)")
    parser.add_argument("--state-dir", type=given_path, default=None, metavar="DIR",
                        help="where resume state is kept (default: $RECORDER_STATE_DIR, "
                             "$STATE_DIRECTORY, else $XDG_STATE_HOME or ~/.local/state, "
                             "/k2eg-recorder)")
    parser.add_argument("--bootstrap", type=not_empty, default=None, metavar="HOST:PORT",
                        help="Kafka bootstrap servers (default: $RECORDER_BOOTSTRAP_SERVERS)")
    parser.add_argument("--log-format", choices=("auto", "json", "console"), default=None,
                        help="log format (default: $RECORDER_LOG_FORMAT or auto: console on a "
                             "terminal, JSON lines otherwise)")
    parser.add_argument("--log-level", type=str.upper, default=None,
                        choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
                        help="DEBUG, INFO, WARNING, ... (default: $RECORDER_LOG_LEVEL or INFO)")
    parser.add_argument("--metrics-port", type=port, default=None, metavar="PORT",
                        help="serve Prometheus metrics on this port (default: "
                             "$RECORDER_METRICS_PORT, else off)")


def settings_from_args(args: argparse.Namespace) -> tuple[object, object]:
    """(DaemonSettings, KafkaSettings) from the environment plus the options given."""
    from recorder.config.daemon import DaemonSettings
    from recorder.settings import KafkaSettings

    overrides: dict[str, object] = {}
    if args.config is not None:
        overrides["config_path"] = args.config
    if args.log_format is not None:
        overrides["log_format"] = args.log_format
    if args.log_level is not None:
        overrides["log_level"] = args.log_level
    if args.metrics_port is not None:
        overrides["metrics_port"] = args.metrics_port
    daemon = DaemonSettings(**overrides)  # type: ignore[arg-type]
    kafka_overrides = {} if args.bootstrap is None else {"bootstrap_servers": args.bootstrap}
    kafka = KafkaSettings.from_env(**kafka_overrides)
    return daemon, kafka


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from recorder.config.daemon import DaemonSettings
    from recorder.logging import configure_logging
    from recorder.service import Service
    from recorder.settings import KafkaSettings, settings_problems, unknown_variables

    try:
        daemon, kafka = settings_from_args(args)
    except ValidationError as exc:
        print(f"k2eg-recorder run: invalid settings:\n{settings_problems(exc)}",
              file=sys.stderr)
        return 2
    assert isinstance(daemon, DaemonSettings) and isinstance(kafka, KafkaSettings)
    configure_logging(daemon.log_format, daemon.log_level)
    unknown = unknown_variables(os.environ, DaemonSettings, KafkaSettings)
    if unknown:  # a misspelt name would be ignored without a word
        import structlog

        structlog.get_logger("recorder.cli").warning(
            "environment variables no setting takes (misspelt?); ignored", variables=unknown)
    from recorder.config.loader import check_runs

    # before the check, which takes seconds for a large file: a SIGHUP meanwhile killed the
    # daemon (its default action), a SIGTERM ended it without its exit code 0
    service = Service(daemon, kafka, state_dir=args.state_dir)
    service.install_signal_handlers()
    _loaded, problems = check_runs(daemon.config_path)
    if problems:
        print(f"k2eg-recorder run: {len(problems)} error(s) in the run definitions, not "
              "starting:", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    code = service.run()
    if service.refusal is not None:  # the run definitions, or a Kafka setting
        print(f"k2eg-recorder run: {service.refusal}", file=sys.stderr)
    return code
