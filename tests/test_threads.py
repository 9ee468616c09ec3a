"""The thread policy (deftsim.threads): count resolution, OpenMP wait policy set before torch is
imported, the record for timing.json. Policy tests run in a fresh interpreter (the wait policy
is read when torch is imported); no wall-clock assertions."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deftsim import threads as dt

ROOT = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter: records the OpenMP wait setting at the moment torch is first imported,
# applies the policy, prints the record, torch's thread count and the environment as JSON.
_CHILD = """
import builtins, json, os, sys
seen = {}
_import = builtins.__import__
def _hook(name, *args, **kwargs):
    if name.split(".")[0] == "torch" and "torch" not in sys.modules and "policy" not in seen:
        seen["policy"] = os.environ.get("OMP_WAIT_POLICY") or (
            "GOMP_SPINCOUNT=" + os.environ["GOMP_SPINCOUNT"] if os.environ.get("GOMP_SPINCOUNT") else None)
    return _import(name, *args, **kwargs)
builtins.__import__ = _hook
if sys.argv[1] == "torch-first":
    import torch
from deftsim import threads
imported_at_module_load = "torch" in sys.modules
requested = None if sys.argv[2] == "none" else int(sys.argv[2])
record = threads.configure_threads(requested)
import torch
print(json.dumps({"record": record, "seen_at_torch_import": seen.get("policy"),
                  "torch_at_module_load": imported_at_module_load,
                  "get_num_threads": torch.get_num_threads(),
                  "env_threads": os.environ.get("DEFTSIM_TORCH_THREADS"),
                  "default": threads.default_threads()}))
"""


def child(order: str, requested: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items()
             if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", dt.THREADS_ENV, "OMP_NUM_THREADS")}
    res = subprocess.run([sys.executable, "-c", _CHILD, order, requested], cwd=ROOT, env={**clean, **env},
                         capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_default_sets_a_short_spin_before_torch_and_applies_the_default_count() -> None:
    out = child("policy-first", "none")
    assert out["torch_at_module_load"] is False  # deftsim.threads does not import torch
    assert out["seen_at_torch_import"] == "GOMP_SPINCOUNT=300" == dt.DEFAULT_WAIT_POLICY
    rec = out["record"]
    assert rec["omp_wait_policy"] == dt.DEFAULT_WAIT_POLICY and rec["wait_policy_applied"] is True
    assert rec["note"] == ""
    assert rec["source"] == "default"
    assert rec["torch_threads"] == out["get_num_threads"] == out["default"]
    assert out["default"] == min(rec["available_cores"], dt.DEFAULT_MAX_THREADS)
    assert out["env_threads"] == str(out["default"])  # the trainer, built later, applies the same
    assert rec["interop_threads"] == 1


def test_threads_flag_wins_over_the_environment() -> None:
    out = child("policy-first", "1", DEFTSIM_TORCH_THREADS="3")
    rec = out["record"]
    assert rec["source"] == "--threads" and rec["torch_threads"] == out["get_num_threads"] == 1
    assert out["env_threads"] == "1"


def test_environment_count_is_honoured() -> None:
    out = child("policy-first", "none", DEFTSIM_TORCH_THREADS="1")
    assert out["record"]["source"] == dt.THREADS_ENV
    assert out["record"]["torch_threads"] == out["get_num_threads"] == 1


def test_a_wait_policy_from_the_environment_is_kept() -> None:
    out = child("policy-first", "1", OMP_WAIT_POLICY="active")
    assert out["seen_at_torch_import"] == "active"
    assert out["record"]["omp_wait_policy"] == "ACTIVE" and out["record"]["note"] == ""
    out = child("policy-first", "1", GOMP_SPINCOUNT="5000")
    assert out["seen_at_torch_import"] == "GOMP_SPINCOUNT=5000"
    assert out["record"]["omp_wait_policy"] == "GOMP_SPINCOUNT=5000"


def test_torch_imported_first_is_reported_not_hidden() -> None:
    out = child("torch-first", "1")
    rec = out["record"]
    assert out["seen_at_torch_import"] is None  # torch started with OpenMP's default policy
    assert rec["wait_policy_applied"] is False and rec["omp_wait_policy"] == "ACTIVE"
    assert "torch was imported before" in rec["note"] and "GOMP_SPINCOUNT=300" in rec["note"]
    assert rec["torch_threads"] == out["get_num_threads"] == 1  # the count still applies
    assert "torch was imported before" in dt.describe(rec)


@pytest.mark.parametrize("value", [0, -1, True, 2.5, "two", "", dt.MAX_THREADS + 1])
def test_bad_counts_name_the_flag_and_the_range(value: object) -> None:
    with pytest.raises(dt.ThreadPolicyError, match=r"--threads=.*(from 1 to|whole number)"):
        dt.resolve_threads(value)  # type: ignore[arg-type]


def test_bad_environment_count_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(dt.THREADS_ENV, "lots")
    with pytest.raises(dt.ThreadPolicyError, match="DEFTSIM_TORCH_THREADS='lots'"):
        dt.resolve_threads(None)
    monkeypatch.setenv(dt.THREADS_ENV, " 2 ")
    assert dt.resolve_threads(None) == 2 and dt.thread_source(None) == dt.THREADS_ENV


def test_default_depends_on_the_machine_not_its_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(dt.THREADS_ENV, raising=False)
    monkeypatch.setattr(dt, "available_cores", lambda: 64)
    assert dt.resolve_threads(None) == dt.DEFAULT_MAX_THREADS
    monkeypatch.setattr(dt, "available_cores", lambda: 1)
    assert dt.resolve_threads(None) == 1
    monkeypatch.setattr(os, "getloadavg", lambda: (50.0, 50.0, 50.0), raising=False)
    assert dt.resolve_threads(None) == 1


def _fake_cpu(root: Path, cpu: int, package: int, core: int) -> None:
    topo = root / f"cpu{cpu}" / "topology"
    topo.mkdir(parents=True)
    (topo / "physical_package_id").write_text(f"{package}\n")
    (topo / "core_id").write_text(f"{core}\n")


def test_physical_cores_count_smt_siblings_once(tmp_path: Path) -> None:
    for cpu, (package, core) in enumerate([(0, 0), (0, 1), (0, 0), (0, 1), (1, 0), (1, 0)]):
        _fake_cpu(tmp_path, cpu, package, core)
    assert dt._physical_cores([0, 1, 2, 3, 4, 5], tmp_path) == 3
    assert dt._physical_cores([0, 2], tmp_path) == 1  # two hyperthreads of one core
    assert dt._physical_cores([0, 9], tmp_path) == 2  # topology unreadable: logical CPUs


@pytest.mark.parametrize("text, cpus", [("200000 100000\n", 2), ("150000 100000", 2), ("50000 100000", 1),
                                        ("max 100000", None), ("garbage", None), ("0 100000", None)])
def test_cgroup_quota(tmp_path: Path, text: str, cpus: object) -> None:
    path = tmp_path / "cpu.max"
    path.write_text(text)
    assert dt._cgroup_cpu_quota(path) == cpus
    assert dt._cgroup_cpu_quota(tmp_path / "absent") is None


def test_available_cores_is_capped_by_the_quota(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dt, "_affinity_cpus", lambda: list(range(32)))
    monkeypatch.setattr(dt, "_physical_cores", lambda cpus: 16)
    monkeypatch.setattr(dt, "_cgroup_cpu_quota", lambda: 3)
    assert dt.available_cores() == 3
    monkeypatch.setattr(dt, "_cgroup_cpu_quota", lambda: None)
    assert dt.available_cores() == 16


def test_describe_names_the_count_its_origin_and_the_policy() -> None:
    rec = {"torch_threads": 2, "omp_wait_policy": "PASSIVE", "source": "default", "available_cores": 2, "note": ""}
    assert dt.describe(rec) == "torch threads: 2 (default: 2 cores available), OpenMP wait policy PASSIVE"
    assert "(--threads)" in dt.describe({**rec, "source": "--threads"})


def test_sweep_workers_share_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dt, "available_cores", lambda: 16)
    assert [dt.sweep_threads(w) for w in (1, 2, 3, 16, 40)] == [dt.DEFAULT_MAX_THREADS, 8, 5, 1, 1]
    with pytest.raises(dt.ThreadPolicyError, match="--workers=0"):
        dt.sweep_threads(0)
