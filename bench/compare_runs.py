"""Compare the run folders of two deftsim versions, bit for bit.

    python bench/compare_runs.py OLD_ROOT NEW_ROOT

Each root holds one folder per run (``deftsim run SCENARIO --out ROOT/NAME``, the same
scenario, seed and ``--threads`` in both). For every run present in both, the event logs are
compared on the columns both have (exact equality, NaN equal to NaN), columns only the new log
has must hold their "not applicable" value (-1 or empty), and the ``summary.json`` keys both
have must be equal (host timings excluded). One RESULT line per run; exit status 1 if any
differs. This is how a protocol rewrite is shown to leave the shipped scenarios' timelines
unchanged.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

IGNORED_SUMMARY_KEYS = ("timings", "wall_s", "host")


def compare(old: Path, new: Path) -> tuple[bool, str]:
    a = pd.read_parquet(old / "events.parquet")
    b = pd.read_parquet(new / "events.parquet")
    shared = [c for c in a.columns if c in b.columns]
    extra = [c for c in b.columns if c not in a.columns]
    same_events = len(a) == len(b) and a[shared].reset_index(drop=True).equals(b[shared].reset_index(drop=True))
    extra_default = all(b[c].isin([-1, ""]).all() for c in extra)
    sa = json.loads((old / "summary.json").read_text())
    sb = json.loads((new / "summary.json").read_text())
    differing = [k for k in sa if k in sb and k not in IGNORED_SUMMARY_KEYS and sa[k] != sb[k]]
    ok = same_events and extra_default and not differing
    return ok, (f"rows={len(a)} events_identical={int(same_events)} new_columns={','.join(extra) or '-'} "
                f"new_columns_default={int(extra_default)} summary_keys_differing={','.join(differing) or '-'}")


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__)
        return 2
    old_root, new_root = Path(argv[0]), Path(argv[1])
    status = 0
    for old in sorted(p for p in old_root.iterdir() if (p / "events.parquet").exists()):
        new = new_root / old.name
        if not (new / "events.parquet").exists():
            print(f"RESULT run={old.name} missing_in_new=1")
            status = 1
            continue
        ok, detail = compare(old, new)
        print(f"RESULT run={old.name} identical={int(ok)} {detail}")
        status |= 0 if ok else 1
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
