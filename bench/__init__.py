"""`reid bench` / `make bench`: the service measured against the machine's limits and against the peers'
way, in one run. One module per section; each section's figures are measured side by side in that run.

    machine     CPU model, cores, memory, library versions; matmul rate and memory bandwidth (the limits)
    encoder     ONNX Runtime vs torch eager, vs the limits (roofline); opt levels, threads, batch; profile;
                a random-weight ResNet-50 for the dense-convolution goal
    quantize    INT8 static (QDQ, per-channel) speed-up and rank-1 / mAP change on the shared protocols
    ingest      images/s through the HTTP API (real `reid serve`, 4+ clients) vs the encoder alone
    search      p50/p99 and recall@10 per index type and gallery size, in process and over HTTP
    refinement  NFormer local (K) and joint (N) vs k-reciprocal, reid-strong-baseline layout and scalable
    accuracy    CMC of every refine mode on PRID450S split 0
    restart     restart from snapshot vs rebuild from Redis
    scale       IVF-PQ at 10M vectors of the real feature distribution (bench/scale.py; its saved result is
                reported, a fresh run only when there is none or with cfg.scale_fresh: 30-60 min at 10M)

Writes `<out>/<date>-<host>.json`, `.md` and PNGs; `goals` checks the issue's targets (met / missed, by
how much); with `readme` the summary replaces the README's `## Benchmarks` block between markers.
"""

from __future__ import annotations

import datetime as dt
import json
import time
import traceback
from pathlib import Path

from index.blas_threads import limit_blas_threads

from . import accuracy, encoder, goals, ingest, machine, plots, quantize, refinement, report, restart, scale, search
from .config import FULL, QUICK, BenchConfig

SECTIONS = ("encoder", "int8", "ingest", "search", "refinement", "accuracy", "restart", "scale")

__all__ = ["run_bench", "BenchConfig", "FULL", "QUICK", "SECTIONS"]


def _limits(cfg: BenchConfig) -> dict:
    return {**machine.matmul_rate(cfg.matmul_size), **machine.memory_bandwidth(cfg.bandwidth_mb)}


def _best_limits(a: dict, b: dict) -> dict:
    """Measured before and after the sections: a shared machine only ever lowers a limit, so keep the higher."""
    return {k: max(a[k], b[k]) if isinstance(a[k], float) else a[k] for k in a}


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items() if not str(k).startswith("_")}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "item"):  # numpy scalars
        return x.item()
    return x


def _as_served(section, *args):
    """Run an in-process section with the serving process's thread pools (index/blas_threads.py)."""
    with limit_blas_threads():
        return section(*args)


def _run_sections(bundle_dir: Path, cfg: BenchConfig, limits: dict, only, log,
                  out_dir: Path) -> tuple[dict, dict]:
    jobs = {
        "encoder": lambda: encoder.run(bundle_dir, limits, cfg),
        # at the largest batch (bulk ingest, where throughput counts): the fp32 best batch flips with noise
        "int8": lambda: quantize.run(bundle_dir, max(cfg.batches), cfg),
        "ingest": lambda: ingest.run(bundle_dir, cfg),
        "search": lambda: search.run(bundle_dir, cfg),
        "refinement": lambda: _as_served(refinement.run, bundle_dir, cfg),
        "accuracy": lambda: _as_served(accuracy.run, bundle_dir, cfg),
        "restart": lambda: restart.run(cfg.restart_n, bundle_dir, out=lambda s: None),
        "scale": lambda: scale.section(bundle_dir, cfg, out_dir, log),
    }
    out, seconds = {}, {}
    for name in SECTIONS:
        if only and name not in only:
            continue
        log(f"bench: {name} ...")
        started = time.perf_counter()
        try:
            out[name] = jobs[name]()
        except Exception as e:  # one broken section must not lose the others' figures
            out[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
        seconds[name] = time.perf_counter() - started
        log(f"bench: {name} done in {seconds[name]:.0f} s")
    return out, seconds


def _plots(r: dict, out_dir: Path, stem: str) -> dict[str, str]:
    made = {}
    todo = (("throughput_vs_batch", "encoder", plots.throughput), ("latency_vs_gallery", "search", plots.search_latency),
            ("refinement_cost", "refinement", plots.refinement_cost),
            ("scale_recall_vs_latency", "scale", plots.scale_curve))
    for name, key, fn in todo:
        body = r.get(key)
        if body and "error" not in body and "skipped" not in body:
            made[name] = fn(body, out_dir / f"{stem}-{name}.png").name
    acc = r.get("accuracy", {})
    if "_metrics" in acc:
        made["cmc_refine_modes"] = plots.cmc(acc["_metrics"], out_dir / f"{stem}-cmc_refine_modes.png").name
    return made


def run_bench(bundle_dir: str | Path, out_dir: str | Path = "bench/results", quick: bool = False,
              readme: str | Path | None = None, only: tuple[str, ...] = (), cfg: BenchConfig | None = None,
              log=print) -> str:
    """Run every section (or ``only`` those), write JSON, markdown and PNGs into ``out_dir``, and with
    ``readme`` copy the summary into it. Returns the markdown."""
    bundle_dir, out_dir = Path(bundle_dir), Path(out_dir)
    cfg = cfg or (QUICK if quick else FULL)
    started = time.perf_counter()
    desc = machine.describe()
    log("bench: machine limits ...")
    limits = _limits(cfg)
    sections, seconds = _run_sections(bundle_dir, cfg, limits, only, log, out_dir)
    limits = _best_limits(limits, _limits(cfg))
    r = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "quick": cfg.quick,
         "machine": desc, "limits": limits, "bundle": str(bundle_dir), **sections, "section_seconds": seconds}
    if "encoder" in r and "by_batch" in r["encoder"]:  # fractions against the final (best) limits
        for rows in (r["encoder"]["by_batch"], r["encoder"]["resnet50"]["by_batch"]):
            for b, row in rows.items():
                row.update(encoder.against_limits(r["encoder"]["cost"] if rows is r["encoder"]["by_batch"]
                                                  else r["encoder"]["resnet50"]["cost"], row["onnxruntime"], b, limits))
        res = r["encoder"]["resnet50"]
        res["matmul_fraction"] = res["by_batch"][res["best_batch"]]["matmul_fraction"]
    r["goals"] = goals.check(r)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{dt.date.today().isoformat()}-{desc['host']}"
    made = _plots(r, out_dir, stem)
    r["total_s"] = time.perf_counter() - started
    r["plots"] = made
    md = report.markdown(r, made)
    (out_dir / f"{stem}.json").write_text(json.dumps(_jsonable(r), indent=2) + "\n")
    (out_dir / f"{stem}.md").write_text(md)
    if readme:
        readme = Path(readme)
        try:
            rel = (out_dir / f"{stem}.md").resolve().relative_to(readme.resolve().parent)
        except ValueError:
            rel = out_dir / f"{stem}.md"
        report.update_readme(readme, report.readme_summary(r, str(rel)))
    return md
