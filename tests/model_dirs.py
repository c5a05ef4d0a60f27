"""Saved-model directories for tests."""
from __future__ import annotations

import json
import shutil
from pathlib import Path


def copy_with_views(model_dir: str | Path, dest: str | Path, views: str) -> str:
    """A copy of a saved model whose features are declared to be made with ``views``
    (the head stays the same, so predictions differ only by the views)."""
    dest = Path(dest)
    shutil.copytree(model_dir, dest)
    cfg = json.loads((dest / "config.json").read_text())
    cfg["preprocess"]["views"] = views
    (dest / "config.json").write_text(json.dumps(cfg))
    return str(dest)
