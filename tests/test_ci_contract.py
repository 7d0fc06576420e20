"""The CI contract: `.ci/run` installs what the browser test needs, and under CI=true a test whose machine
lacks something fails instead of skipping (a clean CI machine would otherwise pass without running it)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from index.redis_server import find_redis_server

REPO = Path(__file__).resolve().parents[1]
CI_RUN = REPO / ".ci" / "run"


def test_ci_run_installs_chromium_and_its_driver_then_runs_make_test():
    script = CI_RUN.read_text()
    commands = [line.strip() for line in script.splitlines() if line.strip() and not line.strip().startswith("#")]
    install = next(c for c in commands if "apt-get install" in c)
    assert {"chromium", "chromium-driver", "-y"} <= set(install.split())
    assert any(c.startswith("apt-get update") for c in commands)
    assert "DEBIAN_FRONTEND=noninteractive" in script
    # only where missing: a machine that has both skips the install
    assert re.search(r"command -v chromium\b", script) and re.search(r"command -v chromedriver\b", script)
    assert commands[-1] == "make test"


def test_without_a_browser_the_page_test_fails_under_ci(tmp_path):
    """tests/test_web_page.py run with CI=true on a PATH holding no chromium: every browser test fails, none
    is skipped."""
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    env = {**os.environ, "CI": "true", "PATH": str(empty_bin), "REID_REDIS_SERVER": find_redis_server()}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfs", "-p", "no:cacheprovider",
                          "tests/test_web_page.py"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    out = run.stdout + run.stderr
    assert run.returncode == 1, out
    assert " failed" in out and "skipped" not in out and " passed" not in out, out
    assert "chromium" in out and "CI" in out, out
