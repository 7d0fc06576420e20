"""A restart loads the FAISS snapshot and replays the changes made meanwhile: no re-embedding, no rebuild.

``bench/restart.py`` does the work (and raises ``RestartCheckFailed`` when the restarted service lost or kept the
wrong images); the 100,000-vector figures come from ``python -m bench.restart --n 100000`` (or the restart section
of ``reid bench``).
"""

from __future__ import annotations

import pytest

from bench.restart import run

N = 20_000


@pytest.mark.slow
def test_restart_from_snapshot_reconciles_without_rebuild(tmp_path, tiny_bundle):
    res = run(N, tiny_bundle, tmp_path, out=lambda s: print(s))
    first, snap, rebuild = res["first_start"], res["from_snapshot"], res["rebuild_from_redis"]
    assert first["rebuilds"] == 1 and first["snapshot_loads"] == 0  # nothing on disk yet
    assert snap["snapshot_loads"] == 1 and snap["rebuilds"] == 0  # loaded, not rebuilt
    assert snap["replayed"] == 5  # 2 deletes + 3 puts made while it was down
    assert rebuild["rebuilds"] == 1 and rebuild["snapshot_loads"] == 0
    assert snap["index_load_s"] < rebuild["index_load_s"]
