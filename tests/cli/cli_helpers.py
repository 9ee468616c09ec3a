"""What the command-line tests share: ``deftsim`` run as a subprocess, ``--set`` lists, and the
check that a bad setting exits 2 with a clear message.

The test files of this folder import it as ``from cli_helpers import ...``: pytest (import mode
``prepend``) puts the folder of a test file without ``__init__.py`` on ``sys.path``."""
from __future__ import annotations

import subprocess
import sys
from typing import Iterable, Sequence

# Runs ``python -m deftsim ARGS`` with an import hook that refuses the modules named in argv[1]
# (comma-separated): a run that imports one of them fails with an ImportError naming it.
_FORBIDDING_MAIN = """
import runpy, sys
names = [n for n in sys.argv[1].split(",") if n]
class Forbid:
    def find_spec(self, name, path=None, target=None):
        if any(name == n or name.startswith(n + ".") for n in names):
            raise ImportError(f"this test forbids importing {name}")
        return None
sys.meta_path.insert(0, Forbid())
sys.argv = ["deftsim", *sys.argv[2:]]
runpy.run_module("deftsim", run_name="__main__", alter_sys=True)
"""


def deftsim(*args, timeout: float = 300, forbid_imports: Sequence[str] = (), cwd=None) -> subprocess.CompletedProcess:
    """``python -m deftsim ARGS`` (each argument through ``str``) in folder ``cwd`` (None: this
    process's), text output captured.

    ``forbid_imports``: module names (a package forbids its submodules) the command must not
    import; importing one raises ImportError ("this test forbids importing NAME")."""
    argv = [str(a) for a in args]
    if forbid_imports:
        command = [sys.executable, "-c", _FORBIDDING_MAIN, ",".join(forbid_imports), *argv]
    else:
        command = [sys.executable, "-m", "deftsim", *argv]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=cwd)


def sets(assignments: Iterable[str]) -> list[str]:
    """``["a=1", "b=2"]`` -> ``["--set", "a=1", "--set", "b=2"]``."""
    return [a for s in assignments for a in ("--set", s)]


def assert_exit_2(res: subprocess.CompletedProcess, fragments: Iterable[str], where: str,
                  one_paragraph: bool = False) -> None:
    """``res`` failed the way a bad setting must: exit code 2, no traceback, stderr starting with
    ``error: `` and naming ``where`` (the scenario file or name) and every one of ``fragments``;
    with ``one_paragraph``, the message holds no empty line."""
    text = res.stderr + res.stdout
    assert res.returncode == 2, text
    assert "Traceback" not in text
    assert res.stderr.startswith("error: ") and where in res.stderr, res.stderr
    for fragment in fragments:
        assert fragment in res.stderr, (fragment, res.stderr)
    if one_paragraph:
        assert "\n\n" not in res.stderr.strip(), res.stderr
