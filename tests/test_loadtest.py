"""`reid loadtest` against a real server: short and small here (the 60 s figures come from running it), but
the same code: mixed search/ingest traffic, no errors, latencies and server memory reported."""

from pathlib import Path

from bench import load

BUNDLE = Path(__file__).resolve().parents[1] / "service" / "default_bundle"


def test_load_test_runs_mixed_traffic_without_errors():
    result = load.run(BUNDLE, duration=3.0, concurrencies=(2,), gallery_size=24, search_share=0.5)
    (phase,) = result["phases"]
    assert phase["errors"] == 0, phase["error_samples"]
    assert phase["search"]["count"] > 0 and phase["ingest"]["count"] > 0
    assert 0 < phase["search"]["p50_ms"] <= phase["search"]["p99_ms"]
    assert phase["rss_mb"]["max"] >= phase["rss_mb"]["start"] > 0
    table = load.markdown(result)
    assert "| 2 |" in table and "errors" in table
