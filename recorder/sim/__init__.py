"""k2eg gateway simulator: an independent implementation of the gateway's Kafka protocol.

It checks our client (and the official one) without a real gateway or EPICS: commands arrive as
JSON on the command topic, replies and snapshot streams go out as msgpack, exactly as the
gateway code does (see :mod:`recorder.sim.engine`). PVs are simulated (catalogue and naming
scheme in :mod:`recorder.sim.pvs`); faults can be injected (:mod:`recorder.sim.faults`).

Use from Python (tests, the demo)::

    from recorder.sim import GatewaySimulator, SimConfig, Protocol, FaultConfig

    with GatewaySimulator("127.0.0.1:9092", "cmd-in-topic",
                          SimConfig(protocol=Protocol.SEQUENCED)) as sim:
        ...  # drive it with a k2eg client; sim.engine.stats counts commands and messages

or from the command line: ``k2eg-recorder sim --bootstrap 127.0.0.1:9092`` (see
``k2eg-recorder sim --help``).
"""

from recorder.sim.engine import Protocol, SimConfig, SimEngine, normalize_snapshot_name
from recorder.sim.faults import FaultConfig, FaultRule
from recorder.sim.gateway import GatewaySimulator
from recorder.sim.pvs import PVSpec, parse_pv, pv_structure

Simulator = GatewaySimulator

__all__ = [
    "FaultConfig",
    "FaultRule",
    "GatewaySimulator",
    "PVSpec",
    "Protocol",
    "SimConfig",
    "SimEngine",
    "Simulator",
    "normalize_snapshot_name",
    "parse_pv",
    "pv_structure",
]
