"""`reid demo --once` (what `make demo ARGS=--once` runs): embedded Redis, bundled model, a ranked answer
with its true match marked, and the demo gallery's rank-1 / mAP over all its queries."""

import os
import re
import subprocess
import sys
from pathlib import Path

from index.redis_server import EmbeddedRedis, free_port
from index.store import RedisStore
from scripts.demo import GALLERY

ROOT = Path(__file__).resolve().parents[1]


def run_demo(data_dir: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REID_")}
    done = subprocess.run([sys.executable, "-m", "scripts.cli", "demo", "--once", "--port", str(free_port()),
                           "--data-dir", str(data_dir)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def test_demo_once_prints_a_ranked_answer_and_the_url(tmp_path):
    done = run_demo(tmp_path)
    out = done.stdout
    assert "service ready at http://127.0.0.1:" in out
    assert "top 10:" in out and out.count("\n") > 12
    # the first screen judges the model, not one query: the true match is marked, or its rank beyond the top 10
    # is given, and rank-1 / mAP over every query of the demo gallery follow
    table = out.split("top 10:", 1)[1]
    assert "<- true match" in table or re.search(r"true match \(person \S+ from another camera\) is at rank "
                                                 r"\d+, beyond the top 10", table), table
    quality = re.search(r"demo gallery quality over all (\d+) queries.*rank-1 ([\d.]+)%, mAP ([\d.]+)%", out)
    assert quality, out
    assert int(quality[1]) >= 60 and 0 <= float(quality[2]) <= 100 and 0 < float(quality[3]) <= 100
    assert "/docs for the API" in out
    assert (tmp_path / "service" / "redis").is_dir()  # its own redis-server kept its AOF there
    # the server and its redis-server are gone
    left = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True)
    assert left.stdout.strip() == ""

    # run again after an upgrade that replaced the default model: the sample gallery is ingested again rather
    # than searched with another model's features (or the demo waiting on a service that is not ready)
    with EmbeddedRedis(tmp_path / "service" / "redis") as srv:
        RedisStore(srv.url).r.hset(RedisStore.k_gallery(GALLERY), "model", "reid-default:old")
    again = run_demo(tmp_path).stdout
    assert "holds vectors of model reid-default:old from an earlier run" in again and "top 10:" in again
