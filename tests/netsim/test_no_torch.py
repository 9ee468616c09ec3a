"""netsim must import and run without torch (torch blocked in a fresh interpreter)."""
import subprocess
import sys
import textwrap


def test_netsim_runs_with_torch_blocked():
    code = textwrap.dedent("""
        import sys
        for name in ("torch", "transformers", "peft", "fomo"):
            sys.modules[name] = None   # any import of these now raises ImportError
        import netsim, analysis
        from netsim import FakeTrainer, FedAvgSimulation, Scenario
        sc = Scenario.model_validate({"trainer": "fake", "devices": [{"count": 5}], "training": {"rounds": 2}})
        out = FedAvgSimulation(sc, 0, FakeTrainer(sc, 0)).run()
        assert out.rounds_completed == 2
        assert "torch" not in sys.modules or sys.modules["torch"] is None
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


def test_public_names_are_exported():
    import netsim

    for name in netsim.__all__:
        assert hasattr(netsim, name), name
