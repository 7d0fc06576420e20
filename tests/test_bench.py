"""`reid bench --quick` runs end to end and writes its JSON and markdown report (figures not asserted:
speed goals live in the benchmark, not in tests)."""

import json

from models.bench import run_bench
from service.settings import DEFAULT_BUNDLE_DIR


def test_quick_bench_writes_report(tmp_path):
    markdown = run_bench(DEFAULT_BUNDLE_DIR, tmp_path, quick=True)
    [report_file] = tmp_path.glob("*.json")
    report = json.loads(report_file.read_text())
    rates = report["encoder_images_per_second"]
    assert set(rates["onnxruntime"]) == set(rates["torch_eager"]) == {"1", "8", "32"}
    assert all(v > 0 for v in rates["onnxruntime"].values())
    assert report["search_exact_latency"]["10000"]["p99_ms"] > 0
    assert "ONNX Runtime img/s" in markdown and (tmp_path / report_file.name.replace(".json", ".md")).exists()
