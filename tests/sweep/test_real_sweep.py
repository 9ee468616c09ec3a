"""One short sweep with the real trainer: real PEFT runs give identical numbers on 1 and 2 workers."""
import json
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_real_trainer_sweep_same_on_1_and_2_workers(tmp_path, deftsim):
    sweep = tmp_path / "real.yaml"
    sweep.write_text(f"""
scenario: {ROOT / 'scenarios' / 'quickstart.yaml'}
set: {{training.rounds: 1, training.local_steps: 2, data.max_test_examples: 32}}
vary: {{grid: {{training.devices_per_round: [2, 4]}}}}
seeds: 1
""")
    for workers in (1, 2):
        res = deftsim("sweep", sweep, "--out", tmp_path / f"w{workers}", "--workers", workers, "--quiet",
                      timeout=600)
        assert res.returncode == 0, res.stderr
        assert "2 ok, 0 failed" in res.stdout
    runs = sorted(p.name for p in (tmp_path / "w1" / "runs").iterdir())
    assert runs == sorted(p.name for p in (tmp_path / "w2" / "runs").iterdir()) and len(runs) == 2
    for run_id in runs:
        a, b = (tmp_path / w / "runs" / run_id for w in ("w1", "w2"))
        assert json.loads((a / "summary.json").read_text()) == json.loads((b / "summary.json").read_text())
        ev_a, ev_b = pd.read_parquet(a / "events.parquet"), pd.read_parquet(b / "events.parquet")
        pd.testing.assert_frame_equal(ev_a, ev_b, check_exact=True)
        assert ev_a["flops"].sum() > 0 and (ev_a["kind"] == "compute").sum() >= 2
