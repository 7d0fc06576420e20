"""`reid demo --once` (what `make demo ARGS=--once` runs): embedded Redis, bundled model, a ranked answer."""

import os
import subprocess
import sys
from pathlib import Path

from index.redis_server import free_port

ROOT = Path(__file__).resolve().parents[1]


def test_demo_once_prints_a_ranked_answer_and_the_url(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("REID_")}
    done = subprocess.run([sys.executable, "-m", "scripts.cli", "demo", "--once", "--port", str(free_port()),
                           "--data-dir", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    out = done.stdout
    assert "service ready at http://127.0.0.1:" in out
    assert "top 10:" in out and out.count("\n") > 12
    assert "/docs for the API" in out
    assert (tmp_path / "service" / "redis").is_dir()  # its own redis-server kept its AOF there
    # the server and its redis-server are gone
    left = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True)
    assert left.stdout.strip() == ""
