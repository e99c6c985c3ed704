"""experiments/reproduce.py: the stage list (fast) and the whole smoke pipeline (slow)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "experiments", "reproduce.py")


def test_local_stages_cover_every_study_at_local_size(experiment_file):
    stages = dict(experiment_file("reproduce").stages("local", "/r", "/f", python="py"))
    assert list(stages) == ["quickstart", "mismatch_anatomy", "icepop", "stability",
                            "c3po_parity", "c3po_parity_v2"]
    assert "--trained_workdir=/r/quickstart" in stages["mismatch_anatomy"]
    assert "--size=local" in stages["mismatch_anatomy"]
    assert any(a.endswith("icepop.py:local") for a in stages["icepop"])
    assert any(a.endswith("c3po.py:parity") for a in stages["c3po_parity"])
    assert any(a.endswith("c3po.py:parity_v2") for a in stages["c3po_parity_v2"])
    assert not any(a.endswith("c3po.py:local") for c in stages.values() for a in c)  # withdrawn
    assert any(a.endswith("stability.py:local") for a in stages["stability"])
    # No seed or arm filter at local size: every run of every study.
    assert not any(a.startswith(("--seeds", "--arms")) for c in stages.values() for a in c)


@pytest.mark.slow
def test_smoke_pipeline_writes_every_study(tmp_path):
    root, figures = tmp_path / "runs", tmp_path / "figures"
    out = subprocess.run([sys.executable, SCRIPT, "--size=smoke", f"--root={root}",
                          f"--figures={figures}"], cwd=ROOT, capture_output=True, text=True,
                         timeout=1800)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert set(json.load(open(root / "reproduce_timings.json"))) == {
        "mismatch_anatomy", "icepop", "stability", "c3po_parity_v2"}
    assert (figures / "mismatch_anatomy" / "results.json").exists()
    tables = {study: (figures / path / "table.md").read_text()
              for study, path in (("stability", "stability/stability"),
                                  ("sensitivity", "stability/sensitivity"),
                                  ("parity_v2", "c3po_parity_v2/parity_v2"),
                                  ("stability_v2", "stability_v2/vs_control"))}
    assert "| none | 1 |" in tables["stability"] and "| icepop | 1 |" in tables["stability"]
    assert "| icepop_masked_removed | 1 |" in tables["sensitivity"]
    assert "| none | 1 |" in tables["stability_v2"]
    assert "| sync | 1 |" in tables["parity_v2"] and "| paced | 1 |" in tables["parity_v2"]
    assert "Equivalence to sync" in tables["parity_v2"]
