"""The one way benchmarks write their results JSON: parent folders made, written beside, then renamed, so an
interrupted run never leaves half a results file (a re-run of one script must not corrupt another's figures)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_results(path: str | Path, payload: Any, indent: int = 2) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=indent) + "\n")
    tmp.replace(path)
    return path
