"""pyvene 0.1.8's own offline behaviour is the same with pyvene_patchscopes imported as without it.

`pyvene_suite/suite_pyvene.py` re-checks, on tiny random models, what pyvene's own random-config tests check
(save/load file layout and round trips, interchange against hand-written hooks, constant sources, trainable
interventions, generation). It runs here twice in fresh processes, plainly and with the plugin imported first,
and both runs must pass every test.
"""
from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

SUITE = Path(__file__).parent / "pyvene_suite" / "suite_pyvene.py"


def _outcomes(tmp_path: Path, with_plugin: bool) -> dict[str, str]:
    report = tmp_path / f"suite-{int(with_plugin)}.xml"
    env = {**os.environ, "PYVENE_SUITE_WITH_PLUGIN": "1" if with_plugin else "0"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--noconftest",
                           f"--junitxml={report}", str(SUITE)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    cases = ElementTree.parse(report).getroot().iter("testcase")
    outcomes = {case.get("name"): next((child.tag for child in case), "passed") for case in cases}
    assert outcomes, done.stdout[-2000:] + done.stderr[-2000:]
    return outcomes


def test_pyvenes_offline_behaviour_is_unchanged_by_importing_the_plugin(tmp_path):
    plain, plugged = _outcomes(tmp_path, False), _outcomes(tmp_path, True)
    assert len(plain) >= 30
    assert set(plain.values()) == {"passed"}, {k: v for k, v in plain.items() if v != "passed"}
    assert plugged == plain, {k: v for k, v in plugged.items() if v != "passed"}
