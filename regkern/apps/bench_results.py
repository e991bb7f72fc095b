"""Reading pytest-benchmark JSON (``regkern bench``'s results.json): one flat dict per benchmark case."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Optional

__all__ = ["bench_cases", "git_commit"]


def git_commit() -> Optional[str]:
    """The short commit of the checkout regkern runs from, or None outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def bench_cases(results: dict) -> list[dict]:
    """Each benchmark's ``extra_info`` plus its ``name`` and ``median_s`` (seconds)."""
    cases = []
    for b in results.get("benchmarks", []):
        info = dict(b.get("extra_info", {}))
        info["name"] = b.get("name")
        info["median_s"] = b.get("stats", {}).get("median", info.get("median_s"))
        cases.append(info)
    return cases
