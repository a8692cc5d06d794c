"""pyvene 0.1.8's own offline behaviour is the same with pyvene_patchscopes imported as without it.

`pyvene_suite/suite_pyvene.py` re-checks, on tiny random models, what pyvene's own random-config tests check
(save/load file layout and round trips, interchange against hand-written hooks, constant sources, trainable
interventions, generation). It runs here three times in fresh processes: plainly, with the plugin imported
first, and with the plugin's safe serialization installed (`install_safe_serialization`); every run must pass
every test.
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

SUITE = Path(__file__).parent / "pyvene_suite" / "suite_pyvene.py"


def _outcomes(tmp_path: Path, plugin: str) -> dict[str, str]:
    """Each test's outcome with PYVENE_SUITE_WITH_PLUGIN=`plugin` ('0': none, '1': imported, 'safe': opted in)."""
    report = tmp_path / f"suite-{plugin}.xml"
    env = {**os.environ, "PYVENE_SUITE_WITH_PLUGIN": plugin}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--noconftest",
            f"--junitxml={report}",
            str(SUITE),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    cases = ElementTree.parse(report).getroot().iter("testcase")
    outcomes = {case.get("name"): next((child.tag for child in case), "passed") for case in cases}
    assert outcomes, done.stdout[-2000:] + done.stderr[-2000:]
    return outcomes


def test_pyvenes_offline_behaviour_is_unchanged_by_importing_the_plugin(tmp_path):
    plain, plugged = _outcomes(tmp_path, "0"), _outcomes(tmp_path, "1")
    assert len(plain) >= 30
    assert set(plain.values()) == {"passed"}, {k: v for k, v in plain.items() if v != "passed"}
    assert plugged == plain, {k: v for k, v in plugged.items() if v != "passed"}


def test_pyvenes_offline_behaviour_is_kept_under_the_safe_serialization(tmp_path):
    safe = _outcomes(tmp_path, "safe")
    assert len(safe) >= 30
    assert set(safe.values()) == {"passed"}, {k: v for k, v in safe.items() if v != "passed"}
