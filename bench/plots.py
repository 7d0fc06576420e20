"""The report's figures (matplotlib, Agg): each one compares things measured side by side in the run."""

from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    _plt().close(fig)
    return path


def throughput(encoder: dict, path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    rows = encoder["by_batch"]
    bs = sorted(rows, key=int)
    ax.plot(bs, [rows[b]["onnxruntime"] for b in bs], marker="o", label="ONNX Runtime")
    if "torch_eager" in rows[bs[0]]:
        ax.plot(bs, [rows[b]["torch_eager"] for b in bs], marker="s", label="torch eager")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("images / s")
    ax.set_title(f"encoder throughput ({encoder['backbone']})")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def search_latency(search: dict, path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    sizes = sorted(search["in_process"], key=int)
    types = sorted({t for n in sizes for t in search["in_process"][n]})
    for t in types:
        pts = [(int(n), search["in_process"][n][t]) for n in sizes if t in search["in_process"][n]]
        ax.plot([n for n, _ in pts], [m["p99_ms"] for _, m in pts], marker="o",
                label=f"{t} p99 (recall@10 {pts[-1][1]['recall@10']:.2f})")
    ax.axhline(5.0, color="grey", ls="--", lw=1, label="goal 5 ms")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("gallery size")
    ax.set_ylabel("ms per query (p99)")
    ax.set_title("search latency in process")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def refinement_cost(ref: dict, path: Path) -> Path:
    plt = _plt()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    lat = ref["latency_ms"]
    ks = sorted(int(k.split("@")[1]) for k in lat if k.startswith("local@"))
    restricted = ref["restricted_kreciprocal_ms"]
    left.plot(ks, [lat[f"local@{k}"] for k in ks], marker="o", label="NFormer local")
    left.plot(ks, [restricted[k]["dense_ms"] for k in ks], marker="s",
              label="k-reciprocal, reid-strong-baseline layout")
    left.plot(ks, [restricted[k]["scalable_ms"] for k in ks], marker="^", label="k-reciprocal, scalable")
    if all(f"local_kreciprocal@{k}" in lat for k in ks):  # results from before the mode existed lack it
        left.plot(ks, [lat[f"local_kreciprocal@{k}"] for k in ks], marker="D",
                  label="NFormer local, then k-reciprocal")
    left.set_xlabel("K candidates per query")
    left.set_ylabel("ms per query")
    left.set_title("refinement of K candidates")
    joint = ref.get("joint", {})
    ns = sorted(int(n) for n in joint if "seconds" in joint[n]) if "skipped" not in joint else []
    if ns:
        right.plot(ns, [joint[n]["seconds"] for n in ns], marker="o", label="NFormer joint")
    full = ref["kreciprocal_full"]
    fn = sorted(n for n in full if "seconds" in full[n])
    right.plot(fn, [full[n]["seconds"] for n in fn], marker="^", label="k-reciprocal full, scalable")
    dense = ref["kreciprocal_dense"]
    dn = sorted(n for n in dense if "seconds" in dense[n])
    right.plot(dn, [dense[n]["seconds"] for n in dn], marker="s",
               label="k-reciprocal full, reid-strong-baseline layout")
    ext = ref.get("kreciprocal_dense_at_max_n", {})
    if ext.get("extrapolated") and "seconds" in ext and dn:
        right.plot([dn[-1], ref["max_n"]], [dense[dn[-1]]["seconds"], ext["seconds"]], ls=":", color="grey",
                   label="reid-strong-baseline layout, extrapolated")
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("N = queries + gallery")
    right.set_ylabel("seconds")
    right.set_title("refinement of N features together")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def cmc(metrics: dict, path: Path) -> Path:
    from models.evaluate import plot_cmc

    return plot_cmc(metrics, path)


def scale_curve(scale: dict, path: Path) -> Path:
    """Recall@10 against p50 and p99 latency over nprobe at N, one line per re-ranking factor (p50 beside p99:
    on a busy machine p99 is mostly other processes' time slices)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=110, sharey=True)
    t = scale["targets"]
    for ax, key in zip(axes, ("p50_ms", "p99_ms")):
        for r in sorted({p["refine"] for p in scale["grid"]}):
            pts = [p for p in scale["grid"] if p["refine"] == r]
            ax.plot([p[key] for p in pts], [p["recall@10"] for p in pts], marker="o",
                    label=f"re-rank {r} x k" if r else "PQ scores only")
            for p in pts:
                ax.annotate(str(p["nprobe"]), (p[key], p["recall@10"]), fontsize=6, alpha=0.7)
        ax.axhline(t["recall@10"], color="grey", ls="--", lw=1, label=f"recall@10 {t['recall@10']}")
        if key == "p99_ms":
            ax.axvline(t["p99_ms"], color="grey", ls=":", lw=1, label=f"p99 {t['p99_ms']:g} ms")
        ax.set_xscale("log")
        ax.set_xlabel(f"{key[:3]} ms per query (labels: nprobe)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("recall@10 vs exact")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"IVF-PQ at {scale['n']:,} (nlist {scale['index']['nlist']}, {scale['index']['pq_m']}-byte codes)")
    return _save(fig, path)
