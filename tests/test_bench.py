"""The benchmark's script, run for one short round so that it cannot rot unnoticed.

Its figures are read in the README, never asserted: timings belong to the benchmark.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parent.parent / "bench"
sys.path.insert(0, str(BENCH))
from run import missing_tools  # noqa: E402  (bench/ is scripts, not a package)


@pytest.mark.skipif(
    bool(missing_tools()),
    reason=f"the benchmark needs {', '.join(missing_tools())} (Debian: nginx-light wrk curl); "
    "scripts/test-tools installs them",
)
@pytest.mark.timeout(240)
def test_one_short_round_measures_every_target(tmp_path: Path) -> None:
    results_file = tmp_path / "results.json"
    done = subprocess.run(
        [
            sys.executable,
            str(BENCH / "run.py"),
            "--rounds=1",
            "--duration=1",
            "--rate=200",
            "--size-mib=2",
            "--no-huge",
            f"--json={results_file}",
        ],
        capture_output=True,
        text=True,
        timeout=220,
        check=False,
    )
    assert done.returncode == 0, done.stderr

    results = json.loads(results_file.read_text())
    targets = {"direct", "nginx", "bare", "bare-uvloop", "proxy", "proxy-asyncio"}
    for metric in ("wrk_rps", "rate_p50_ms", "download_mb_s", "upload_mb_s"):
        assert set(results["rounds"][metric]) == targets, metric
        assert all(value[0] > 0 for value in results["rounds"][metric].values()), metric
    for metric in ("cpu_us_per_request", "rate_cpu_us_per_request"):
        assert set(results["rounds"][metric]) == targets - {"direct"}, metric
    assert set(results["ratios"]["cpu_us_per_request"]) >= {
        "proxy/bare-uvloop",
        "proxy-asyncio/bare",
    }
    assert results["once"]["proxy_startup_ms"] > 0
    assert results["once"]["proxy_idle_rss_mib"] > 0
    assert "| CPU per small request at 64 connections (µs) |" in done.stdout
