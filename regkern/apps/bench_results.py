"""Reading pytest-benchmark JSON (``regkern bench``'s results.json): one flat dict per benchmark case."""

from __future__ import annotations

__all__ = ["bench_cases"]


def bench_cases(results: dict) -> list[dict]:
    """Each benchmark's ``extra_info`` plus its ``name`` and ``median_s`` (seconds)."""
    cases = []
    for b in results.get("benchmarks", []):
        info = dict(b.get("extra_info", {}))
        info["name"] = b.get("name")
        info["median_s"] = b.get("stats", {}).get("median", info.get("median_s"))
        cases.append(info)
    return cases
