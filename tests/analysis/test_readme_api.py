"""The README's "Python API" section lists exactly analysis.__all__, each with its real parameters,
and its example runs."""
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

import analysis

ROOT = Path(__file__).resolve().parents[2]


def _section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Python API")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def test_readme_lists_every_public_analysis_function_with_its_parameters():
    entries = re.findall(r"^- `(\w+)(?:\(([^)]*)\))?`: ", _section(), flags=re.M)
    names = [name for name, _ in entries]
    assert sorted(names) == sorted(analysis.__all__)
    assert len(names) == len(set(names))
    for name, params in entries:
        obj = getattr(analysis, name)
        if inspect.isclass(obj):
            continue
        listed = [p.strip() for p in params.split(",") if p.strip()]
        real = [p.name for p in inspect.signature(obj).parameters.values()]
        assert listed == real, (name, listed, real)


@pytest.mark.slow
def test_readme_example_runs(tmp_path):
    code = re.search(r"```python\n(.*?)```", _section(), flags=re.S).group(1)
    code = code.replace('"scenarios/', f'"{ROOT}/scenarios/')
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert "latency_s" in res.stdout and (tmp_path / "runs" / "api" / "summary.json").is_file()
