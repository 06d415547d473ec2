"""Set-up of the OFFICIAL k2eg client (PyPI k2eg 0.3.2) for our test peers and benchmarks.

Imported by scripts that run under the official client's own interpreter (``.venv-k2eg``):
``tests/interop/k2eg_driver.py`` and ``benchmarks/e2e_official.py``. Standard library only.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any


def configure_official_client(bootstrap: str, cmd_topic: str, environment_id: str) -> None:
    """Point k2eg at ``bootstrap``/``cmd_topic`` and shorten its consumer-group session.

    k2eg reads ``<K2EG_PYTHON_CONFIGURATION_PATH_FOLDER>/<environment_id>.ini``. Its
    consumer joins a group; on Tansu a join takes half of ``session.timeout.ms`` and the client
    waits only 10 s for it (kafka-test-broker.md), hence the 6 s session.
    """
    folder = tempfile.mkdtemp(prefix="k2eg-ini-")
    with open(os.path.join(folder, f"{environment_id}.ini"), "w") as f:
        f.write(f"[DEFAULT]\nkafka_broker_url={bootstrap}\nk2eg_cmd_topic={cmd_topic}\n")
    os.environ["K2EG_PYTHON_CONFIGURATION_PATH_FOLDER"] = folder

    import k2eg.broker

    base_consumer = k2eg.broker.Consumer

    class ShortSessionConsumer(base_consumer):  # type: ignore[misc, valid-type]
        def __init__(self, conf: dict[str, Any]) -> None:
            super().__init__({**conf, "session.timeout.ms": 6000, "heartbeat.interval.ms": 500})

    k2eg.broker.Consumer = ShortSessionConsumer
