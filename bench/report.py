"""The markdown report of one run, and its summary copied into the README between markers."""

from __future__ import annotations

import re
from pathlib import Path

from index.bundle import NFORMER_FILE

START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def _f(v, digits=1) -> str:
    return "n/a" if v is None else f"{v:,.{digits}f}"


def machine_lines(r: dict) -> list[str]:
    m, lim = r["machine"], r["limits"]
    libs = ", ".join(f"{k} {m[k]}" for k in ("numpy", "torch", "onnxruntime", "onnx", "faiss") if m.get(k))
    return [f"Machine `{m['host']}`: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB, "
            f"GPU: {m['gpu'] or 'none (fp16 / CUDA / TensorRT providers skipped)'}; Python {m['python']}, {libs}.",
            f"Limits measured in this run: float32 matmul {_f(lim['limit_gflops'])} GFLOP/s "
            f"(sgemm {lim['size']}^2: torch {_f(lim['torch_gflops'])}, numpy {_f(lim['numpy_gflops'])}); "
            f"memory bandwidth {_f(lim['limit_gbs'])} GB/s (copy {_f(lim['copy_gbs'])}, triad {_f(lim['triad_gbs'])})."]


def goals_table(goals: list[dict]) -> list[str]:
    lines = ["| goal | target | measured | status | margin |", "|---|---|---|---|---|"]
    for g in goals:
        note = f" ({g['note']})" if g["note"] else ""
        lines.append(f"| {g['goal']} | {g['target']} | {g['measured'] or ''}{note} | **{g['status']}** | "
                     f"{g['margin']} |")
    return lines


def encoder_lines(e: dict) -> list[str]:
    c = e["cost"]
    lines = [f"Bundle `{e['bundle']}` ({e['backbone']}, input {e['input']['height']}x{e['input']['width']}), "
             f"{e['images']}: {c['gflops']:.3f} GFLOP per image, weights {c['weight_bytes'] / 1e6:.1f} MB, "
             f"activations {c['activation_bytes'] / 1e6:.1f} MB per image.", "",
             "| batch | ONNX Runtime img/s | torch eager img/s | ORT / eager | GFLOP/s | of matmul limit | GB/s | "
             "of bandwidth |", "|---|---|---|---|---|---|---|---|"]
    for b, row in e["by_batch"].items():
        lines.append(f"| {b} | {row['onnxruntime']:.1f} | {_f(row.get('torch_eager'))} | "
                     f"{_f(row.get('ratio'), 2)}x | {row['gflops_per_s']:.1f} | {row['matmul_fraction']:.0%} | "
                     f"{row['gbytes_per_s']:.2f} | {row['bandwidth_fraction']:.0%} |")
    b = e["best_batch"]
    lines += ["", f"At batch {b}: graph optimisation level " + ", ".join(
        f"{lv} {v:.0f}" for lv, v in e["optimization_levels"].items()) + " img/s; intra-op threads " + ", ".join(
        f"{t}: {v:.0f}" for t, v in e["intra_op_threads"].items()) + " img/s.", ""]
    p = e["profile"]
    lines += [f"ONNX Runtime profile (batch {p['batch']}, {p['runs']} runs), top operators:", "",
              "| op | ms per run | share |", "|---|---|---|"]
    lines += [f"| {o['op']} | {o['ms_per_run']:.2f} | {o['share']:.0%} |" for o in p["top_ops"]]
    r = e["resnet50"]
    lines += ["", f"ResNet-50 (random weights, input {r['input']['height']}x{r['input']['width']}, "
                  f"{r['cost']['gflops']:.2f} GFLOP per image): " + ", ".join(
                      f"batch {bb} {row['onnxruntime']:.1f} img/s = {row['matmul_fraction']:.0%} of matmul"
                      for bb, row in r["by_batch"].items()) + "."]
    return lines


def int8_lines(q: dict) -> list[str]:
    s = q["speed"]
    lines = [f"{q['format']}; calibration: {q['calibration']}. Batch {s['batch']}: fp32 {s['fp32']:.1f} img/s, "
             f"int8 {s['int8']:.1f} img/s ({s['speedup']:.2f}x).", "",
             "| protocol | fp32 rank-1 | int8 rank-1 | change | fp32 mAP | int8 mAP | change |",
             "|---|---|---|---|---|---|---|"]
    for name, a in q["accuracy"].items():
        lines.append(f"| {name} | {100 * a['fp32']['rank1']:.1f} | {100 * a['int8']['rank1']:.1f} | "
                     f"{a['rank1_change_points']:+.1f} | {100 * a['fp32']['mAP']:.1f} | {100 * a['int8']['mAP']:.1f} | "
                     f"{a['mAP_change_points']:+.1f} |")
    if q["skipped_protocols"]:
        lines.append(f"\nSkipped (not in the shared data): {', '.join(q['skipped_protocols'])}.")
    return lines


def ingest_lines(i: dict) -> list[str]:
    enc, formats = i["encoder_only_images_per_s"], i["formats"]
    runs = next(iter(formats.values()))["http"]
    h = next(iter(runs.values()))
    lines = [f"{i['images']}, as shipped (PNG) and re-encoded as JPEG q90; {h['clients']} clients x "
             f"{h['requests_per_client']} requests of {h['images_per_request']} images (batch upload endpoint, "
             f"embedded Redis, REID_ORT_THREADS={i['server_ort_threads']}). REID_EMBED_WORKERS: encoder runs in "
             "flight (1, the default: one run on all cores; 2: two runs, a core each).", "",
             "| path | " + " | ".join(f"{f.upper()} images/s | vs encoder" for f in formats) + " |",
             "|---|" + "---|---|" * len(formats),
             "| encoder alone (ORT, preprocessed batch) | " + " | ".join(f"{enc:.1f} | 100%" for _ in formats) + " |"]
    for key, label in (("decode_images_per_s", "decode alone (one thread)"),
                       ("decode_and_encode_images_per_s", "decode + preprocess + encode in process, in turn")):
        lines.append(f"| {label} | " + " | ".join(f"{f[key]:.1f} | {f[key] / enc:.0%}" for f in formats.values()) + " |")
    for w in runs:
        lines.append(f"| HTTP API, REID_EMBED_WORKERS={w} | " + " | ".join(
            f"{f['http'][w]['images_per_s']:.1f} | {f['http_over_encoder'][w]:.0%}" for f in formats.values()) + " |")
    enc_ms = i["encoder_core_ms_per_image"]
    lines += ["", f"CPU per image: the encoder alone uses {enc_ms:.2f} core-ms. The server (API process and its "
              "redis-server, over the same window) uses more: its decoding, preprocessing, HTTP and storage share "
              "the cores, and the encoder's share of the server's CPU bounds HTTP / encoder when the cores are busy.",
              "", "| server | " + " | ".join(f"{f.upper()} core-ms / image | encoder's share" for f in formats) + " |",
              "|---|" + "---|---|" * len(formats)]
    for w in runs:
        lines.append(f"| REID_EMBED_WORKERS={w} | " + " | ".join(
            f"{f['http'][w]['server_core_ms_per_image']:.2f} | {enc_ms / f['http'][w]['server_core_ms_per_image']:.0%}"
            for f in formats.values()) + " |")
    lines += ["", "Where the server's CPU per image goes (best REID_EMBED_WORKERS; decode and preprocess timed alone "
              "in this process, the rest is HTTP, multipart parsing, Redis writes, index updates and Python):", "",
              "| format | server core-ms | encoder | decode | preprocess (resize, normalise) | rest |", "|---|---|---|---|---|---|"]
    for fmt, f in formats.items():
        lines.append(f"| {fmt.upper()} | " + " | ".join(f"{v:.2f}" for v in cpu_split(f, enc_ms).values()) + " |")
    lines += ["", "Bytes per image: " + ", ".join(f"{k.upper()} {f['bytes_per_image'] / 1024:.1f} KB"
                                                 for k, f in formats.items()) + "."]
    return lines


def cpu_split(f: dict, enc_ms: float) -> dict:
    """A format's server core-ms per image (at its best REID_EMBED_WORKERS) split into its parts."""
    total = f["http"][f["best_workers"]]["server_core_ms_per_image"]
    parts = {"encoder": enc_ms, "decode": f["decode_core_ms_per_image"], "preprocess": f["preprocess_core_ms_per_image"]}
    return {"server": total, **parts, "rest": total - sum(parts.values())}


def search_lines(s: dict) -> list[str]:
    tuned = (f" ivf_flat's nprobe: the fewest cells reaching recall@10 {s['tune_recall']} on a second query set "
             "(ivf_pq probes as many)." if "tune_recall" in s else "")
    lines = [f"Vectors: {s['vectors']}; k = 10; one query per call; recall@10 against exact search. HNSW up to "
             f"{s['hnsw_max']:,} vectors.{tuned}", "",
             "| gallery | index | params | build s | bytes/vector | p50 ms | p99 ms | recall@10 |",
             "|---|---|---|---|---|---|---|---|"]
    for n, by_type in s["in_process"].items():
        for t, m in by_type.items():
            params = ", ".join(f"{k}={v}" for k, v in m["params"].items()) or "-"
            lines.append(f"| {int(n):,} | {t} | {params} | {m['build_s']:.1f} | {m['bytes_per_vector']:.0f} | "
                         f"{m['p50_ms']:.2f} | {m['p99_ms']:.2f} | {m['recall@10']:.3f} |")
    h = s["http"]
    lines += ["", f"Over HTTP (`POST /search`, top_k 10, refine none, {h['index_type']} "
                  f"{', '.join(f'{k}={v}' for k, v in h['params'].items())}, {h['n']:,} vectors, Redis fill "
                  f"{h['fill_s']} s, ready {h['ready_s']} s):", "",
              "| measure | p50 ms | p99 ms |", "|---|---|---|"]
    for key, label in (("wall", "wall time per request"), ("excluding_embedding", "wall minus decode and embed"),
                       ("server_search_stage", "server's search stage")):
        lines.append(f"| {label} | {h[key]['p50_ms']:.2f} | {h[key]['p99_ms']:.2f} |")
    return lines


def refinement_lines(r: dict) -> list[str]:
    lat, fp32 = r["latency_ms"], r.get("fp32", {})
    graph = r.get("nformer") or NFORMER_FILE
    lines = [f"Per query ({r['features']} features; `local@K` = exact FAISS candidates from a {r['gallery']:,} "
             f"gallery + {graph}, the graph that serves; k-reciprocal on each query's same top-K; "
             f"local_kreciprocal = both in turn, the serving path):", "",
             "| K | NFormer local ms | NFormer local fp32 ms | k-reciprocal reid-strong-baseline layout ms | "
             "k-reciprocal scalable ms | local_kreciprocal ms |", "|---|---|---|---|---|---|"]
    for k, v in r["restricted_kreciprocal_ms"].items():
        lines.append(f"| {k} | {lat.get(f'local@{k}', float('nan')):.1f} | "
                     f"{fp32.get('latency_ms', {}).get(f'local@{k}', float('nan')):.1f} | {v['dense_ms']:.1f} | "
                     f"{v['scalable_ms']:.1f} | {lat.get(f'local_kreciprocal@{k}', float('nan')):.1f} |")
    lines += ["", f"Joint over N features (fresh process each; seconds, peak RSS; NFormer = {graph}):", "",
              "| N | NFormer joint | NFormer joint fp32 | k-reciprocal scalable | "
              "k-reciprocal reid-strong-baseline layout |",
              "|---|---|---|---|---|"]
    joint = r.get("joint", {})
    ns = sorted({*map(int, r["kreciprocal_full"]), *map(int, r["kreciprocal_dense"])})

    def cell(d, n):
        v = d.get(n, {})
        return f"{v['seconds']:.2f} s, {v['peak_rss_mb']:.0f} MB" if "seconds" in v else v.get("error", "-")

    for n in ns:
        lines.append(f"| {n:,} | {cell(joint, n) if 'skipped' not in joint else 'skipped'} | "
                     f"{cell(fp32.get('joint', {}), n)} | {cell(r['kreciprocal_full'], n)} | "
                     f"{cell(r['kreciprocal_dense'], n)} |")
    d = r.get("kreciprocal_dense_at_max_n", {})
    if d.get("extrapolated") and "seconds" in d:
        lines.append(f"| {r['max_n']:,} (extrapolated from N={d['from_n']}) | | | | {d['seconds']:.1f} s, "
                     f"{d['peak_rss_mb']:.0f} MB |")
    p = r.get("nformer_profile")
    if p:
        lines += ["", f"ONNX Runtime profile of {graph} on {p['tokens']} tokens (one query and its candidates, "
                      f"{p['runs']} runs; profiling adds per-node overhead), top operators:", "",
                  "| op | ms per run | share |", "|---|---|---|"]
        lines += [f"| {o['op']} | {o['ms_per_run']:.2f} | {o['share']:.0%} |" for o in p["top_ops"]]
    return lines


def restart_lines(x: dict) -> list[str]:
    lines = [f"N={x['n']:,} vectors of dim {x['dim']} in Redis (filled in {x['fill_s']} s).", "",
             "| start | ready after s | index load s | RSS MB | peak RSS MB |", "|---|---|---|---|---|"]
    for name, key in (("from snapshot + 5 replayed changes", "from_snapshot"), ("rebuild from Redis", "rebuild_from_redis")):
        f = x[key]
        lines.append(f"| {name} | {f['ready_s']} | {f['index_load_s']} | {f['rss_mb']} | {f['peak_rss_mb']} |")
    return lines


def accuracy_lines(a: dict) -> list[str]:
    graph = f"; NFormer modes on {a['nformer']}, `(fp32)` rows on nformer.onnx" if a.get("nformer") else ""
    lines = [f"{a['protocol']}: {a['queries']} queries, {a['gallery']} gallery{graph}.", "",
             "| mode | rank-1 | rank-5 | mAP |", "|---|---|---|---|"]
    lines += [f"| {k} | {100 * m['rank1']:.1f} | {100 * m['rank5']:.1f} | {100 * m['mAP']:.1f} |"
              for k, m in a["modes"].items()]
    return lines


def _gb(b: float) -> str:
    return f"{b / 2 ** 30:.2f} GB" if b >= 2 ** 30 else f"{b / 2 ** 20:,.0f} MB"


def scale_lines(s: dict) -> list[str]:
    ix, fin, sw = s["index"], s["final"], s["sweep"]
    mem = ix["memory"]
    m = s.get("machine")
    where = f", measured on {m['cpu']} ({m['cores']} cores, {m['memory_gb']} GB)" if m else ""
    cached = f" Saved result `{s['cached']}` of {s['date'][:10]}{where}, not re-run." if s.get("cached") else ""
    look = s["resemblance"]
    lines = [f"{s['n']:,} vectors of dim {s['dim']} in IVF-PQ, synthesised from {s['source']} "
             f"({s['generator']}).{cached}", "",
             f"Real features vs a synthetic set of as many persons ({look['synthetic_persons']}, 10 images each):", "",
             "| statistic | real | synthetic |", "|---|---|---|"]
    for key, name in (("same_person_cosine", "same-person cosine p5 / p50 / p95"),
                      ("different_person_cosine", "different-person cosine p5 / p50 / p95"),
                      ("nearest_neighbour_cosine", "nearest-neighbour cosine p5 / p50 / p95")):
        cells = [" / ".join(f"{look[w][key][p]:.2f}" for p in ("p5", "p50", "p95")) for w in ("real", "synthetic")]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    for key, name in (("nearest_neighbour_same_person", "nearest neighbour is the same person"),
                      ("variance_top10_directions", "variance in the top 10 principal directions"),
                      ("variance_top64_directions", "variance in the top 64 principal directions")):
        lines.append(f"| {name} | {look['real'][key]:.3f} | {look['synthetic'][key]:.3f} |")
    lines += ["", f"Sweep at {sw['n']:,} vectors (lists as long as at N; {sw['queries']} queries; best = lowest p50 "
                  f"reaching recall@10 {s['tune_recall']}):", "",
              "| nlist (at N) | PQ bytes | bytes/vector | index at N (est.) | best refine x k | nprobe | p50 ms | "
              "p99 ms | recall@10 |", "|---|---|---|---|---|---|---|---|---|"]
    for c in sw["configs"]:
        b = c["best"]
        tail = (f"{b['refine']} | {b['nprobe']} | {b['p50_ms']:.2f} | {b['p99_ms']:.2f} | {b['recall@10']:.3f}" if b
                else f"- | - | - | - | max {max(p['recall@10'] for p in c['curve']):.3f}")
        lines.append(f"| {c['nlist']} ({c['nlist_at_n']}) | {c['pq_m']} | {c['bytes_per_vector']:.0f} | "
                     f"{_gb(c['memory_at_n_bytes'])} | {tail} |")
    lines += ["", f"Chosen: nlist {sw['chosen']['nlist_at_n']}, {sw['chosen']['pq_m']}-byte codes "
                  f"({sw['chosen']['why']}).", "",
              f"Build at N: vectors generated in {ix['generate_s']:.0f} s; training {ix['train_s']:.0f} s on "
              f"{ix['train_vectors']:,} vectors; adding {ix['add_s']:.0f} s; exact top-10 of "
              f"{2 * s['tune_queries']} queries by brute force {ix['exact_top10_s']:.0f} s. Index memory "
              f"{_gb(ix['index_bytes'])} = {ix['index_bytes_per_million'] / 1e6:.0f} MB per million (the larger of "
              f"FAISS's structures {_gb(mem['faiss_estimate_bytes'])}: codes and list ids "
              f"{_gb(mem['codes_and_ids_bytes'])}, id hash map ~{_gb(mem['id_hash_map_bytes_estimate'])}; and the "
              f"process's anonymous RSS growth {_gb(mem['rss_anon_growth_bytes'])}). Exact vectors for re-ranking: "
              f"float16 on disk, {_gb(ix['exact_vectors_float16_disk_bytes'])} (page cache, not index memory).", "",
              f"At N, {fin['queries']} held-out queries (new images of gallery persons), one per call, FAISS threads "
              f"{fin['faiss_threads']}; nprobe and re-ranking chosen on {s['tune_queries']} other queries:", "",
              "| re-ranking by exact vectors | nprobe | p50 ms | p99 ms | recall@10 |", "|---|---|---|---|---|"]
    for key, r in (("with_rerank", f"{fin['refine']} x k candidates"), ("without_rerank", "off (PQ scores)")):
        m = fin[key]
        lines.append(f"| {r} | {fin['nprobe']} | {m['p50_ms']:.2f} | {m['p99_ms']:.2f} | {m['recall@10']:.3f} |")
    d = s["density"]
    lines += ["", f"Crowding at N: exact top-1 cosine p50 {d['top1_cosine']['p50']:.2f}, "
                  f"10th {d['top10th_cosine']['p50']:.2f}; "
                  f"{d['own_person_images_in_top10_mean']:.1f} of the query person's 10 images in its exact top-10."]
    return lines


SECTIONS = (("encoder", "Encoder throughput", encoder_lines), ("int8", "INT8 static quantisation", int8_lines),
            ("ingest", "Ingest end to end", ingest_lines), ("search", "Search", search_lines),
            ("refinement", "Refinement cost", refinement_lines), ("accuracy", "Refine modes (CMC)", accuracy_lines),
            ("restart", "Restart", restart_lines), ("scale", "Scale (IVF-PQ, the 10M goal)", scale_lines))


def _section(r: dict, key: str, title: str, fn, level: str) -> list[str]:
    body = r.get(key)
    if body is None:
        return []
    if "error" in body or "skipped" in body:
        return [f"{level} {title}", "", f"Not measured: {body.get('error') or body.get('skipped')}", ""]
    return [f"{level} {title}", "", *fn(body), ""]


def markdown(r: dict, plots: dict[str, str]) -> str:
    mode = "quick (tiny sizes: not comparable with the goals)" if r["quick"] else "full"
    lines = [f"# Benchmark {r['date']} ({mode}, {r['total_s']:.0f} s)", "", *machine_lines(r), "", "## Goals", "",
             *goals_table(r["goals"]), ""]
    for key, title, fn in SECTIONS:
        lines += _section(r, key, title, fn, "##")
    if plots:
        lines += ["## Figures", ""] + [f"![{name}]({p})" for name, p in plots.items()] + [""]
    lines += ["Section times: " + ", ".join(f"{k} {v:.0f} s" for k, v in r["section_seconds"].items()), ""]
    return "\n".join(lines)


def readme_summary(r: dict, report_path: str) -> str:
    lines = [f"`make bench` on {r['machine']['cpu']} ({r['machine']['cores']} cores, "
             f"{r['machine']['memory_gb']} GB, no GPU), {r['date'][:10]}; full report `{report_path}`. "
             "Every ratio below was measured side by side in that one run.", "", *machine_lines(r)[1:], "",
             *goals_table(r["goals"]), ""]
    for key, title, fn, n in (("encoder", "Encoder", encoder_lines, 14), ("search", "Search", search_lines, 40),
                              ("scale", "Scale (IVF-PQ, the 10M goal)", _scale_summary, 40)):
        lines += _section(r, key, title, lambda b, fn=fn, n=n: _head(fn(b), n), "####")
    return "\n".join(lines).rstrip() + "\n"


def _scale_summary(s: dict) -> list[str]:
    """The README's excerpt of the scale section: its first paragraph and the result at N."""
    lines = scale_lines(s)
    at_n = next(i for i, line in enumerate(lines) if line.startswith("Build at N"))
    return lines[:1] + [""] + lines[at_n:]


def _head(lines: list[str], n: int) -> list[str]:
    """At most ``n`` lines, cut at a blank line so that no table or paragraph is left half, nor a sentence
    introducing (with ':') what was cut."""
    if len(lines) <= n:
        return lines
    blanks = [i for i, line in enumerate(lines[:n + 1]) if not line.strip()]
    while blanks and lines[blanks[-1] - 1].rstrip().endswith(":"):
        blanks.pop()
    return lines[:blanks[-1]] if blanks else lines[:n]


def update_readme(readme: Path, summary: str) -> None:
    """Replace what lies between the markers; the first time, the body of `## Benchmarks`."""
    text = readme.read_text()
    block = f"{START}\n{summary}{END}"
    if START in text and END in text:
        text = re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        m = re.search(r"^## Benchmarks\n(.*?)(?=^## )", text, flags=re.S | re.M)
        if m is None:
            text = text.rstrip() + "\n\n## Benchmarks\n\n" + block + "\n"
        else:
            text = text[:m.start(1)] + "\n" + block + "\n\n" + text[m.end(1):]
    readme.write_text(text)
