"""`reid bench --quick` runs every section end to end into a tmp dir and writes well-formed JSON, markdown,
PNGs and a README block (a copy, never the real README). Figures are not asserted: speed goals live in the
benchmark's report, not in tests; this keeps the benchmark code from rotting."""

import json

import pytest
from PIL import Image

from bench import SECTIONS, run_bench
from bench.report import END, START
from models.data.datasets import shared_data_dir
from service.settings import DEFAULT_BUNDLE_DIR
from tests.ci import missing


@pytest.mark.slow
def test_quick_bench_writes_report(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n## Benchmarks\n\nold table\n\n## Layout\n\nkept\n")
    markdown = run_bench(DEFAULT_BUNDLE_DIR, tmp_path / "out", quick=True, readme=readme, log=lambda s: None)

    # the run's report; beside it the scale section keeps its own saved measurement (scale-<n>.json)
    [report_file] = [p for p in (tmp_path / "out").glob("*.json") if not p.name.startswith("scale-")]
    report = json.loads(report_file.read_text())
    # the scale section follows real features: without ../shared it says so (and the test ends as skipped, or
    # failed under CI=true, once the rest is checked)
    no_shared = shared_data_dir() is None
    if no_shared:
        assert "shared data absent" in report["scale"]["skipped"]
    else:
        assert (tmp_path / "out" / "scale-50k.json").exists()
    assert report["quick"] is True
    failed = {s: report[s]["error"] for s in SECTIONS if "error" in report.get(s, {})}
    assert not failed, failed
    assert report["limits"]["limit_gflops"] > 0 and report["limits"]["limit_gbs"] > 0
    enc = report["encoder"]
    assert all(row["onnxruntime"] > 0 and 0 < row["matmul_fraction"] for row in enc["by_batch"].values())
    assert enc["cost"]["flops"] > 0 and enc["resnet50"]["cost"]["flops"] > enc["cost"]["flops"]
    assert report["int8"]["speed"]["int8"] > 0
    for fmt in ("png", "jpeg"):
        runs = report["ingest"]["formats"][fmt]["http"]
        assert set(runs) == {"1", "2"}  # REID_EMBED_WORKERS
        assert all(h["images_per_s"] > 0 and h["server_core_ms_per_image"] > 0 and not h["errors"]
                   for h in runs.values())
    assert all(0 <= m["recall@10"] <= 1 for by in report["search"]["in_process"].values() for m in by.values())
    assert report["search"]["http"]["excluding_embedding"]["p99_ms"] > 0
    assert {g["status"] for g in report["goals"]} <= {"met", "missed", "info", "not measured"}

    assert markdown == report_file.with_suffix(".md").read_text()
    assert "## Goals" in markdown and "Encoder throughput" in markdown
    assert set(report["plots"]) >= {"throughput_vs_batch", "latency_vs_gallery", "refinement_cost"}
    for name in report["plots"].values():
        with Image.open(tmp_path / "out" / name) as im:
            assert im.format == "PNG" and im.size[0] > 100

    text = readme.read_text()
    assert text.count(START) == text.count(END) == 1 and "old table" not in text and "kept" in text
    run_bench(DEFAULT_BUNDLE_DIR, tmp_path / "out", quick=True, readme=readme, only=("encoder",), log=lambda s: None)
    assert readme.read_text().count(START) == 1  # re-running replaces the block
    if no_shared:
        missing("../shared/data is absent: the scale section was skipped", "CI must run the scale section")


def test_readme_excerpts_end_at_a_whole_paragraph():
    from bench.report import _head

    lines = ["intro", "", "| a |", "|---|", "| 1 |", "", "profile, top operators:", "", "| op |", "|---|", "| x |"]
    assert _head(lines, 9) == ["intro", "", "| a |", "|---|", "| 1 |"]  # no half table, no dangling intro
    assert _head(lines, 20) == lines
