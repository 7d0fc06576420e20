"""`reid`: one command, sub-commands for every job. Thin: each one parses arguments and calls a room."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

# index/refine.py's MODES, spelled out so that building the parser imports no numpy (tests/test_cli.py keeps
# the two in step); the modes that refine each query's K candidates are the ones refine=auto can apply
REFINE_MODES = ["none", "joint", "local", "kreciprocal", "local_kreciprocal"]
CANDIDATE_MODES = ["local", "kreciprocal", "local_kreciprocal"]


def _write(path: str, text: str) -> None:
    """An output file named on the command line, its folder created if needed."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)

def cmd_train(args) -> int:
    if args.method == "gracl":
        return train_unsupervised(args)
    if args.method == "nformer" and args.encoder:
        return train_stage2(args, args.encoder)  # stage 2 on an existing encoder checkpoint
    from models.train import TrainConfig, train

    cfg = TrainConfig()
    for key in ("epochs", "backbone", "height", "width", "p", "k", "lr", "seed", "split", "last_stride",
                "eval_every", "threads", "max_batches_per_epoch", "freeze_backbone_epochs",
                "backbone_lr_factor", "warmup_epochs", "embedding_dim", "init", "frozen_stages", "pooling",
                "random_erasing", "color_jitter", "flip_average", "average_from"):
        value = getattr(args, key)
        if value is not None:
            setattr(cfg, key, value)
    if args.data:
        cfg.train_data = args.data
    if args.decay_epochs is not None:
        cfg.decay_epochs = args.decay_epochs
    if args.eval_data is not None:
        cfg.eval_data = args.eval_data
    if args.pretrained is not None:
        cfg.pretrained = parse_pretrained(args.pretrained)
    if cfg.init:
        cfg.init = init_checkpoint(cfg.init)
    results = train(cfg, args.run_dir, resume=not args.no_resume)
    print(json.dumps({name: {"mAP": m["mAP"], **m["ranks"]} for name, m in results.items()}, indent=2))
    if args.method == "nformer":
        return train_stage2(args, Path(args.run_dir) / "last.pt")
    return 0


def init_checkpoint(value: str) -> str:
    """`--init`: a bundle directory means its torch weights (weights.pt); a file is a checkpoint."""
    from index.bundle import WEIGHTS_FILE

    path = Path(value)
    if path.is_dir():
        if not (path / WEIGHTS_FILE).is_file():
            raise SystemExit(f"--init {value}: this bundle has no {WEIGHTS_FILE} (torch weights); "
                             "`reid export` writes it by default")
        return str(path / WEIGHTS_FILE)
    return value


def parse_pretrained(value: str) -> str | bool:
    """`--pretrained`: true (packaged ImageNet weights), false, or a state_dict path."""
    return {"true": True, "false": False}.get(value.lower(), value)


def train_unsupervised(args) -> int:
    from models.gracl.train import train_gracl

    cfg = gracl_train_config(args)
    results = train_gracl(cfg, args.run_dir, resume=not args.no_resume)
    print(json.dumps({name: {"mAP": m["mAP"], **m["ranks"]} for name, m in results.items()}, indent=2))
    return 0


def gracl_train_config(args):
    """`reid train --method gracl` arguments -> GRACLConfig (defaults where a flag is not given)."""
    from models.gracl.train import GRACLConfig

    cfg = GRACLConfig()
    if args.data:
        cfg.data = args.data
    if args.eval_data is not None:
        cfg.eval_data = args.eval_data
    if args.encoder:
        cfg.init_checkpoint = args.encoder
    # every GRACL flag the parser offers (GRACL_OPTIONS), so none is silently ignored
    for key in ("epochs", "backbone", "height", "width", "p", "k", "lr", "seed", "split", "threads",
                "eval_every", "embedding_dim") + GRACL_OPTIONS:
        value = getattr(args, key, None)
        if value is not None:
            setattr(cfg, key, value)
    if args.decay_epochs is not None:
        cfg.decay_epochs = args.decay_epochs
    if args.pretrained is not None:
        cfg.pretrained = parse_pretrained(args.pretrained)
    return cfg


def train_stage2(args, encoder_checkpoint) -> int:
    from models.nformer_train import NFormerTrainConfig, train_nformer

    cfg = NFormerTrainConfig()
    for key in ("nformer_epochs", "sequence_length", "steps_per_epoch", "nformer_lr", "input_norm", "seed",
                "threads", "landmarks", "topk", "served_share", "served_candidates", "singleton_share"):
        value = getattr(args, key, None)
        if value is not None:
            setattr(cfg, key.removeprefix("nformer_") if key.startswith("nformer_") else key, value)
    if args.eval_data is not None:
        cfg.eval_data = args.eval_data
    if getattr(args, "bank_augment", None) is not None:
        cfg.bank_augment = args.bank_augment
    results = train_nformer(encoder_checkpoint, args.run_dir, cfg, resume=not args.no_resume)
    print(json.dumps(results, indent=2))
    return 0


def cmd_adapt(args) -> int:
    from models.adapt import AdaptationError, adapt_bundle, adaptation_recipe

    overrides = {key: getattr(args, key) for key in GRACL_OPTIONS + ("epochs", "p", "k", "seed", "threads", "lr")
                 if getattr(args, key, None) is not None}
    cfg = adaptation_recipe(**overrides)

    events = sys.stdout  # with --progress-jsonl stdout carries only events; the trainers' logs go to stderr

    def emit(event: dict) -> None:
        print(json.dumps(event), file=events, flush=True)

    def progress(stage: str, fraction: float, message: str) -> None:
        if args.progress_jsonl:
            emit({"event": "progress", "stage": stage, "fraction": round(fraction, 4), "message": message})
        else:
            print(f"[{100 * fraction:5.1f}%] {stage}: {message}", file=sys.stderr, flush=True)

    try:
        with contextlib.redirect_stdout(sys.stderr if args.progress_jsonl else sys.stdout):
            card = adapt_bundle(args.bundle, args.images, args.out, cfg, nformer_epochs=args.nformer_epochs,
                                nformer_steps=args.nformer_steps, name=args.name, source=args.source,
                                work_dir=args.work_dir, progress=progress)
    except (AdaptationError, FileNotFoundError) as e:
        if args.progress_jsonl:
            emit({"event": "error", "message": str(e)})
        print(f"reid adapt: {e}", file=sys.stderr)
        return 2
    emit({"event": "done", "bundle": str(args.out), "name": card["name"], "version": card["version"],
          "adaptation": card["adaptation"]})
    return 0


def cmd_gracl_experiment(args) -> int:
    from dataclasses import replace

    from models.gracl.experiment import VARIANTS, cluster_timeline_markdown, results_markdown, run_experiment
    from models.gracl.train import GRACLConfig

    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        print(f"unknown variants {sorted(unknown)}; known: {list(VARIANTS)}", file=sys.stderr)
        return 2
    overrides = {key: getattr(args, key) for key in GRACL_OPTIONS + ("epochs", "p", "k", "threads", "lr", "split")
                 if getattr(args, key, None) is not None}
    if args.decay_epochs is not None:
        overrides["decay_epochs"] = args.decay_epochs
    if args.pretrained is not None:
        overrides["pretrained"] = parse_pretrained(args.pretrained)
    base = replace(GRACLConfig(), data=args.data, eval_data=[args.eval_data], init_checkpoint=args.source or "",
                   **overrides)
    rows = run_experiment(base, args.variants, args.seeds, args.out)
    table = results_markdown(rows, args.title) + "\n" + cluster_timeline_markdown(rows, seed=args.seeds[0])
    print(table)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        _write(args.markdown, table)
    return 0


def cmd_gracl_clusters(args) -> int:
    import numpy as np

    from models.features import extract_features
    from models.gracl.cluster_study import best, cluster_grid, sweep, sweep_markdown
    from models.gracl.pseudo_labels import pseudo_labels
    from models.gracl.train import GRACLConfig, training_samples
    from models.train import load_trained_model

    samples = training_samples(GRACLConfig(data=args.data, split=args.split, cameras=args.cameras or [],
                                           identities=args.identities or 0))
    model, spec, _ = load_trained_model(args.source)
    features = extract_features(model, samples, spec, desc="features")
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    true_ids = np.array([s.pid for s in samples])
    rows = sweep(features, true_ids, np.array([s.camid for s in samples]), args.eps, args.min_samples, args.k1, args.k2)
    table = sweep_markdown(rows, f"{args.title} ({len(samples)} images, {len(set(true_ids))} identities)")
    print(table)
    if args.markdown:
        _write(args.markdown, table)
    if args.grid:
        chosen = best(rows)
        labels = pseudo_labels(features, chosen["eps"], chosen["min_samples"], chosen["k1"], chosen["k2"])
        print(f"wrote {cluster_grid(samples, features, labels, args.grid)}")
    return 0


def cmd_adapt_walkthrough(args) -> int:
    from models.data.datasets import load_dataset
    from models.gracl.train import GRACLConfig, training_samples
    from service.client import ReidClient

    from scripts.adapt_walkthrough import run_walkthrough, smaller_protocol
    from scripts.local_service import local_service

    train = training_samples(GRACLConfig(data=[args.data], split=args.split, cameras=args.cameras or [],
                                         identities=args.identities or 0))
    test = smaller_protocol(load_dataset(args.data, args.split), args.test_identities)
    top_k = max(1000, len(test.gallery))  # every query ranks the whole test gallery
    env = {"REID_ADAPT_EXTRA_ARGS": json.dumps(args.adapt_args), "REID_MAX_TOP_K": str(top_k)}
    if args.model_dir:
        env["REID_MODEL_DIR"] = str(Path(args.model_dir).resolve())
    with local_service(Path(args.data_dir).resolve(), args.port, env) as (url, server), ReidClient(url) as client:
        client.wait_ready(timeout=180, process=server)
        print(f"service at {url}; adapting on {len(train)} {args.data} split-{args.split} training images, "
              f"testing on {len({s.pid for s in test.query})} identities; reid adapt {' '.join(args.adapt_args)}")
        result = run_walkthrough(client, train, test, epochs=args.epochs, max_top_k=top_k)
    print(result.summary())
    if args.json:
        _write(args.json, json.dumps({
            "data": args.data, "split": args.split, "images": result.images, "bundle_id": result.bundle_id,
            "adapt_s": round(result.adapt_s, 1), "activate_s": round(result.activate_s, 1),
            "adapt_args": args.adapt_args, "epochs": args.epochs,
            "before": result.before.metrics.as_dict(), "after": result.after.metrics.as_dict()}, indent=2))
    return 0


GRACL_OPTIONS = ("freeze_bn", "eps", "min_samples", "k1", "k2", "w_centroid", "w_inter", "w_intra", "inter_rule",
                 "intra_rule", "inter_update", "intra_update", "intra_loss", "batches_per_epoch", "proxy_momentum",
                 "inter_negatives", "cameras", "identities")


def add_gracl_arguments(p: argparse.ArgumentParser) -> None:
    """GRACL's options (models/gracl/train.py: GRACLConfig, whose defaults are quoted)."""
    for name, typ, text in (
            ("eps", float, "DBSCAN eps of the pseudo-labels (default 0.6)"),
            ("min-samples", int, "DBSCAN min_samples (default 4)"),
            ("k1", int, "k1 of the clustering's k-reciprocal distance (default 30)"),
            ("k2", int, "k2 of the clustering's k-reciprocal distance (default 6)"),
            ("w-centroid", float, "weight of the centroid (cluster-contrast) loss (default 0)"),
            ("w-inter", float, "weight of the inter-ID proxy loss (default 0.5)"),
            ("w-intra", float, "weight of the intra-ID proxy loss (default 0.5)"),
            ("batches-per-epoch", int, "batches per epoch (default 50)"),
            ("proxy-momentum", float, "momentum of the inter/intra memories (default: the centroid memory's 0.1)")):
        p.add_argument(f"--{name}", type=typ, help=f"GRACL: {text}")
    p.add_argument("--cameras", nargs="+", type=int,
                   help="GRACL: train on these cameras' images only (numbers as the data names them; default all)")
    p.add_argument("--identities", type=int, help="GRACL: train on the images of this many identities drawn at "
                                                  "random (labeled sets only; labels choose the subset, nothing else)")
    # the choices are models/gracl/memory.py's (INTER_RULES, INTRA_RULES, UPDATE_MODES, LOSS_FORMS), checked there
    for name, text in (("inter-rule", "hardest_negative (default), knn_mean or centroid"),
                       ("intra-rule", "mean_similarity (default) or farthest_pair"),
                       ("inter-negatives", "L_inter's negatives: proxies (default) or centroids"),
                       ("inter-update", "memory update: mean, hard, outward (default) or none"),
                       ("intra-update", "memory update: mean, hard (default), outward or none"),
                       ("intra-loss", "infonce (default) or pull")):
        p.add_argument(f"--{name}", help=f"GRACL {name.replace('-', ' ')}: {text}")
    p.add_argument("--freeze-bn", action=argparse.BooleanOptionalAction,
                   help="keep the initial model's BatchNorm statistics (adaptation)")


def cmd_export(args) -> int:
    from models.data.datasets import load_dataset
    from models.export import export_bundle

    dataset = load_dataset(args.check_data)
    check_images = [s.path for s in (dataset.query + dataset.gallery + dataset.train)[:8]]
    card = export_bundle(args.checkpoint, args.out, check_images, name=args.name, version=args.version,
                         nformer_checkpoint=args.nformer, query_flip=args.query_flip)
    print(f"wrote {args.out}: {card['name']} {card['version']}, dim {card['embedding_dim']}, "
          f"check {card['export_check']}")
    return 0


def cmd_quantize_nformer(args) -> int:
    from models.nformer_int8 import add_to_bundle

    entry = add_to_bundle(args.bundle)
    print(f"wrote {args.bundle}/{entry['file']}: {entry['method']}; cosine to fp32 {entry['check']}")
    return 0


def cmd_attach_nformer(args) -> int:
    from models.export import attach_nformer

    card = attach_nformer(args.bundle, args.nformer)
    entry = card["nformer"]
    print(f"wrote {args.bundle}/nformer.onnx (check {entry['export_check']})"
          + (f" and {entry['int8']['file']} (cosine to fp32 {entry['int8']['check']})" if "int8" in entry else ""))
    return 0


def cmd_evaluate(args) -> int:
    from models.data.datasets import load_dataset
    from models.evaluate import BundleEncoder, evaluate_bundle, plot_cmc

    encoder = BundleEncoder(args.bundle, threads=args.threads)
    if args.refine:
        return evaluate_refinement(args, encoder)
    results = {}
    for name in args.data:
        for split in args.splits:
            dataset = load_dataset(name, split)
            ranklist = Path(args.ranklists) / f"{dataset.name.replace('/', '-')}.png" if args.ranklists else None
            metrics = evaluate_bundle(args.bundle, dataset, encoder, ranklist=ranklist)
            results[dataset.name] = metrics
            print(f"{dataset.name}: {metrics.summary()}")
    if args.plot:
        print(f"CMC plot: {plot_cmc(results, args.plot)}")
    summary = {name: metrics_summary(m) for name, m in results.items()}
    if args.json:
        _write(args.json, json.dumps(summary, indent=2) + "\n")
    if args.write_card:
        from models.export import update_card_evaluation

        update_card_evaluation(args.bundle, summary)
        print(f"recorded in {Path(args.bundle) / 'model.json'}")
    return 0


def cmd_flip_study(args) -> int:
    import torch

    from models.flip_study import flip_study, study_markdown

    torch.set_num_threads(args.threads)
    results = {Path(c).parent.name + "/" + Path(c).name: flip_study(c, args.data, args.split) for c in args.encoder}
    table = study_markdown(results)
    print(table)
    if args.markdown:
        _write(args.markdown, table)
    return 0


def metrics_summary(m) -> dict:
    return {"mAP": m.mAP, "mINP": m.mINP, **m.ranks, "queries": m.evaluated_queries,
            "skipped_queries": m.skipped_queries}


def evaluate_refinement(args, encoder) -> int:
    """Every refine mode on every protocol (same split, same model), optionally per-query latency at
    several gallery sizes and the joint-refinement cost at large N; one markdown report."""
    import numpy as np

    from models.data.datasets import load_dataset
    from models.evaluate import embed_protocol
    from models.refine_eval import (bundle_refiner, evaluate_modes, joint_cost, latency_markdown,
                                    refinement_latency, results_markdown)

    refiner = bundle_refiner(args.bundle, threads=args.threads)
    results, real = {}, []
    for name in args.data:
        for split in args.splits:
            dataset = load_dataset(name, split)
            q, g = embed_protocol(encoder, dataset)
            real += [q, g]
            results[dataset.name] = evaluate_modes(refiner, dataset, q, g, args.refine, args.candidates)
            for label, m in results[dataset.name].items():
                print(f"{dataset.name} {label}: {m.summary()}")
    report = {"refinement": {name: {label: metrics_summary(m) for label, m in by.items()}
                             for name, by in results.items()}}
    markdown = ["## Refinement modes (rank-1 / mAP, %)", "", results_markdown(results)]
    if args.latency_sizes:
        latency = refinement_latency(refiner, np.concatenate(real), sizes=args.latency_sizes, candidates=args.candidates)
        report["refinement_latency_ms"] = latency
        markdown += ["## Per-query latency (p50; exact search + refinement; joint uses a cached gallery k-NN graph)",
                     "", latency_markdown(latency)]
    if args.joint_cost:
        cost = joint_cost(args.bundle, args.joint_cost, threads=args.threads or 2)
        report["joint_cost"] = {"n": args.joint_cost, **cost}
        markdown += [f"## Joint refinement of N = {args.joint_cost:,} features", "",
                     "| path | seconds | peak RSS |", "|---|---|---|"]
        markdown += [f"| {p} | {c.get('seconds', float('nan')):.1f} | {c.get('peak_rss_mb', float('nan')):.0f} MB |"
                     if "error" not in c else f"| {p} | failed: {c['error']} | |" for p, c in cost.items()]
    text = "\n".join(markdown) + "\n"
    print(text)
    if args.markdown:
        _write(args.markdown, text)
    if args.json:
        _write(args.json, json.dumps(report, indent=2) + "\n")
    if args.write_card:
        from models.export import update_card_evaluation

        update_card_evaluation(args.bundle, report)
    return 0


def cmd_serve(args) -> int:
    from service.server import run
    from service.settings import Settings

    overrides = {k: v for k, v in (("data_dir", args.data_dir), ("model_dir", args.model_dir),
                                   ("redis_url", args.redis_url)) if v is not None}
    run(Settings(**overrides), host=args.host, port=args.port, log_level=args.log_level)
    return 0


def cmd_ingest(args) -> int:
    from service.client import ReidClient, metadata_for_samples

    if args.dataset:
        from models.data.datasets import load_dataset

        part = getattr(load_dataset(args.dataset, args.split), args.part)
        paths, metadata = [s.path for s in part], metadata_for_samples(part)
    else:  # labelled as an import labels the same files (service/labels.py)
        from service.labels import folder_labels

        found = folder_labels(args.folder)
        default = {"camera_id": args.camera_id} if args.camera_id else {}
        paths, metadata = [str(p) for p, _ in found], [{**default, **labels} for _, labels in found]
    with ReidClient(args.url, args.api_key) as client:
        result = client.ingest(args.gallery, paths, metadata, batch_size=args.batch_size, progress=True)
    print(f"{len(result.items)} stored ({result.created} new), {len(result.errors)} errors")
    for error in result.errors[:20]:
        print(f"  {error.filename}: {error.code}: {error.message}")
    return 0 if not result.errors else 1


def cmd_search(args) -> int:
    from dataclasses import asdict

    from service.client import ReidClient

    with ReidClient(args.url, args.api_key) as client:
        answer = client.search(args.gallery, args.image, top_k=args.top_k, refine=args.refine,
                               candidates=args.candidates, exclude_camera_id=args.exclude_camera_id)
    if args.json:
        print(json.dumps(asdict(answer), indent=2))
    else:
        from scripts.demo import format_results

        print(format_results(answer))
    return 0


def cmd_jobs(args) -> int:
    from dataclasses import asdict

    from service.client import ReidClient

    with ReidClient(args.url, args.api_key) as client:
        page = client.jobs(gallery=args.gallery, kind=args.kind, status=args.status, limit=args.limit)
    if args.json:
        print(json.dumps([asdict(job) for job in page.jobs], indent=2))
        return 0
    print(f"{'id':32}  {'kind':8}  {'status':9}  {'progress':>8}  {'gallery':16}  created_at")
    for job in page.jobs:
        print(f"{job.id:32}  {job.kind:8}  {job.status:9}  {job.progress:8.0%}  {job.gallery or '-':16}  "
              f"{job.created_at}" + (f"  {job.message}" if job.message and job.status == "failed" else ""))
    if not page.jobs:
        print("no jobs (finished jobs are kept for a week)")
    return 0


def _maintenance_settings(args):
    from service.settings import Settings

    overrides = {k: v for k, v in (("data_dir", args.data_dir), ("redis_url", args.redis_url),
                                   ("blob_dir", args.blob_dir)) if v is not None}
    return Settings(**overrides)


def cmd_migrate_store(args) -> int:
    from index.store import LAYOUT
    from index.store_layout import migrate_layout
    from service.store_maintenance import migrate_bytes_to_disk, open_store

    settings = _maintenance_settings(args)
    with open_store(settings, migrate=False) as store:
        done = migrate_layout(store)
        print(f"key layout {LAYOUT}: " + ("already" if done is None else json.dumps(done.as_dict())))
        if not args.blobs:
            return 0
        problem = store.check_blob_dir()
        if problem:
            print(f"reid migrate-store: {problem}", file=sys.stderr)
            return 1
        results = migrate_bytes_to_disk(store)
    for gallery, r in results.items():
        print(f"{gallery}: {r.moved} image(s) moved to {settings.blob_path / gallery}, {r.dropped} of deleted images "
              f"dropped, {r.skipped} left in Redis (id not the content id of the bytes)")
    if not results:
        print("no image bytes left inside Redis")
    return 0


def cmd_compact_store(args) -> int:
    from service.store_maintenance import open_store

    with open_store(_maintenance_settings(args)) as store:
        for gallery in args.gallery or store.list_galleries():
            done = store.compact_vectors(gallery)
            print(f"{gallery}: {done.moved} image(s) moved, vector pages {done.pages_before} -> {done.pages_after}")
    return 0


def cmd_gc_blobs(args) -> int:
    from index.blob_gc import sweep_orphan_blobs
    from service.store_maintenance import open_store

    settings = _maintenance_settings(args)
    with open_store(settings) as store:
        problem = store.check_blob_dir()  # sweeping a folder the store does not reference would empty it
        if problem:
            print(f"reid gc-blobs: {problem}", file=sys.stderr)
            return 1
        report = sweep_orphan_blobs(store, grace_s=args.grace_s)
    print(json.dumps({"blob_dir": str(settings.blob_path), **report.to_dict()}, indent=2))
    return 0


def cmd_make_synthetic(args) -> int:
    from models.synthetic import make_synthetic

    summary = make_synthetic(args.out, n_train_ids=args.train_ids, n_test_ids=args.test_ids, seed=args.seed)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_bench(args) -> int:
    from dataclasses import replace

    from bench import FULL, QUICK, run_bench

    readme = None if args.no_readme else args.readme or (None if args.quick else "README.md")
    cfg = replace(QUICK if args.quick else FULL, scale_fresh=args.fresh_scale)
    report = run_bench(args.bundle, args.out, quick=args.quick, readme=readme, only=tuple(args.only or ()), cfg=cfg)
    print(report)
    return 0


def cmd_lever_study(args) -> int:
    from bench.lever_speed import measure_encoder_rates, plot_accuracy_vs_speed
    from models import lever_study as study

    out = Path(args.out)
    rates = study.measure_rates(out)
    chosen = [lv for i, lv in enumerate(study.LEVERS) if not args.rows or str(i) in args.rows]
    if not args.report_only:
        for lever in chosen:
            study.run_row(lever, out, args.budget_minutes, rates, args.threads)
    results = [json.loads(p.read_text()) for p in (out / study.slug(lv.name) / "result.json" for lv in study.LEVERS)
               if p.exists()]
    encoder_rates = measure_encoder_rates(out) if args.report_only else {}
    table = study.markdown(results, encoder_rates, args.budget_minutes)
    print(table)
    if args.markdown:
        _write(args.markdown, table)
    if args.plot and encoder_rates:
        plot_accuracy_vs_speed(results, encoder_rates, Path(args.plot))
    return 0


def _study_model(args):
    """(embed, refiner) of a study: a bundle's graphs, or an encoder checkpoint (+ NFormer stage 2) in torch."""
    import torch

    from models.evaluate import BundleEncoder
    from models.refine_eval import bundle_refiner

    torch.set_num_threads(args.threads)
    if args.bundle:
        encoder = BundleEncoder(args.bundle, threads=args.threads)
        return encoder.embed, bundle_refiner(args.bundle, threads=args.threads)
    from index.refine import Refiner
    from models.features import extract_features
    from models.nformer_train import load_trained_nformer, torch_refiner_function
    from models.train import load_trained_model

    model, spec, _ = load_trained_model(args.encoder)
    embed = lambda samples, desc="embedding": extract_features(model, samples, spec, desc=desc)  # noqa: E731
    nformer = torch_refiner_function(load_trained_nformer(args.nformer)) if args.nformer else None
    return embed, Refiner(nformer)


def _add_study_model(p) -> None:
    """The model a study runs: --bundle, or --encoder [--nformer] checkpoints (see _study_model)."""
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--bundle", help="a model bundle (its encoder and NFormer)")
    source.add_argument("--encoder", help="an encoder checkpoint (last.pt), e.g. one trained on split 1")
    p.add_argument("--nformer", help="with --encoder: an NFormer stage-2 checkpoint")


def cmd_refine_auto_study(args) -> int:
    from models import refine_auto_study as study

    embed, refiner = _study_model(args)
    modes = [("none", 0)] + [(m, args.candidates) for m in args.modes]
    rows = study.run_study(embed, args.data, args.split, refiner, modes)
    labels = [study.label(m, k) for m, k in modes]
    auto = study.label(args.auto_mode, args.candidates)
    threshold = study.choose_threshold(rows, auto, args.tolerance)
    table = study.markdown(rows, labels, auto, threshold)
    print(table + f"\nthreshold for {auto} (no gallery above it loses more than {args.tolerance} mAP): {threshold}")
    if args.markdown:
        _write(args.markdown, table)
    if args.plot:
        study.plot(rows, labels, threshold, args.plot)
    if args.json:
        study.save(rows, args.json, threshold=threshold, auto_mode=auto, split=args.split,
                   source=args.bundle or args.encoder, nformer=args.nformer)
    return 0


def cmd_refine_combinations(args) -> int:
    from models import refine_combinations as combos
    from models.data.datasets import load_dataset

    embed, refiner = _study_model(args)
    results = {}
    for name in args.data:
        ds = load_dataset(name, args.split)
        q, g = embed(ds.query, desc=f"{ds.name} query"), embed(ds.gallery, desc=f"{ds.name} gallery")
        results[ds.name] = combos.evaluate_variants(refiner, ds, q, g, args.candidates)
    table = combos.markdown(results, args.candidates)
    print(table)
    if args.markdown:
        _write(args.markdown, table)
    if args.json:
        figures = {n: {v: {"mAP": m.mAP, **m.ranks} for v, m in r.items()} for n, r in results.items()}
        _write(args.json, json.dumps(figures, indent=2))
    return 0


def cmd_train_speed(args) -> int:
    from models.training_speed import SpeedCase, markdown_table, training_throughput

    rows = []
    for size in args.sizes:
        height, width = (int(v) for v in size.split("x"))
        for pipeline, channels_last, frozen in (("pil", False, 0), ("tensor", False, 0), ("pil", True, 0),
                                                ("tensor", True, 0), ("tensor", True, 2)):
            case = SpeedCase(args.backbone, height, width, pipeline, channels_last, frozen_stages=frozen)
            rows.append(training_throughput(case, seconds=args.seconds, threads=args.threads))
            print(json.dumps(rows[-1]), flush=True)
    table = markdown_table(rows)
    print(table)
    if args.markdown:
        _write(args.markdown, table)
    return 0


def cmd_loadtest(args) -> int:
    from bench import load

    result = load.run(Path(args.bundle), duration=args.duration, concurrencies=args.concurrency,
                      gallery_size=args.gallery_size, search_share=args.search_share)
    table = load.markdown(result)
    print(table)
    if args.json:
        _write(args.json, json.dumps(result, indent=2))
    if args.markdown:
        _write(args.markdown, table)
    return 1 if any(p["errors"] for p in result["phases"]) else 0


def cmd_demo(args) -> int:
    from scripts.demo import run_demo

    return run_demo(port=args.port, once=args.once, data_dir=args.data_dir)


def add_service_arguments(p: argparse.ArgumentParser) -> None:
    """--url and --api-key of the commands that call a running service (defaults from the environment)."""
    from service.client import DEFAULT_URL

    p.add_argument("--url", default=os.environ.get("REID_URL") or DEFAULT_URL,
                   help=f"the service's base URL (default: $REID_URL, else {DEFAULT_URL})")
    p.add_argument("--api-key", default=os.environ.get("REID_API_KEY") or None,
                   help="sent as X-API-Key (default: $REID_API_KEY, the variable the server reads its key from)")


def add_training_arguments(p: argparse.ArgumentParser) -> None:
    """The encoder options `reid train` shares between its methods (defaults: the method's config)."""
    for name, typ, text in (
            ("epochs", int, "training epochs (default: supervised 12, gracl 10)"),
            ("backbone", str, "efficientnet_lite0 (default), efficientnet_lite1 or efficientnet_lite2"),
            ("height", int, "input height in pixels (default 128)"),
            ("width", int, "input width in pixels (default 64)"),
            ("p", int, "identities per P x K batch (default: supervised 8, gracl 16)"),
            ("k", int, "images per identity in a batch (default 4)"),
            ("embedding-dim", int, "embedding width (default 256; 0: the backbone's own)"),
            ("lr", float, "learning rate (default 3.5e-4)"),
            ("seed", int, "random seed (default 0)"),
            ("split", int, "the split whose training identities are used (default 0)"),
            ("last-stride", int, "stride of the backbone's last stage (default 1, the ReID convention)"),
            ("eval-every", int, "evaluate every N epochs (0: after the last one only)"),
            ("threads", int, "torch threads (default 2; 0: torch's own default)"),
            ("max-batches-per-epoch", int, "batches per epoch (default 0: full epochs)"),
            ("freeze-backbone-epochs", int, "first epochs that train the new head only (default 2)"),
            ("backbone-lr-factor", float, "backbone learning rate = lr x this once the head is warm (default 1)"),
            ("warmup-epochs", float, "linear learning-rate warm-up, in epochs (default 1)"),
            ("frozen-stages", int, "stem + this many backbone stages kept at ImageNet weights (default 0)"),
            ("random-erasing", float, "random-erasing probability per image (default 0.5)"),
            ("color-jitter", float, "brightness / contrast / saturation jitter strength (default 0: off)"),
            ("average-from", int, "average the weights of every epoch from this one on (SWA; meant for a "
                                  "constant --lr): saved as averaged.pt with BN statistics re-estimated "
                                  "(default 0: off)")):
        p.add_argument(f"--{name}", type=typ, help=text)


def add_nformer_arguments(p: argparse.ArgumentParser) -> None:
    for name, typ, text in (
            ("nformer-epochs", int, "epochs (default 4)"),
            ("sequence-length", int, "features per training sequence (default 1000)"),
            ("steps-per-epoch", int, "steps per epoch (default 50; 0: the official |bank| / 30 sequences)"),
            ("nformer-lr", float, "learning rate (default 3e-4)"),
            ("landmarks", int, "landmarks of the NFormer's attention (default 5)"),
            ("topk", int, "neighbours each feature attends to (default 20)"),
            ("served-share", float, "share of sequences drawn as refine=local serves: one query and its "
                                    "nearest features (default 0)"),
            ("served-candidates", int, "the nearest features of such a sequence (default 200)"),
            ("singleton-share", float, "share of each sequence's identities cut to one image, as single-shot "
                                       "galleries hold them (default 0)")):
        p.add_argument(f"--{name}", type=typ, help=f"NFormer stage 2: {text}")
    p.add_argument("--bank-augment", action=argparse.BooleanOptionalAction, default=None,
                   help="NFormer stage 2: the feature bank from augmented views drawn afresh each epoch (default) "
                        "or, with --no-bank-augment, from the plain test-time view")
    p.add_argument("--input-norm", choices=["l2", "raw"],
                   help="NFormer stage 2: train on L2-normalised features as served (l2, default) or raw ones as "
                        "the official code does")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reid", description="Person re-identification: train, export, serve, search.",
        epilog="Errors are one line on stderr, with exit status 1 (2: bad arguments). `reid COMMAND --help` "
               "describes each command's options.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train an embedding model (default recipe = the bundled model's)")
    p.add_argument("--method", default="supervised", choices=["supervised", "nformer", "gracl"],
                   help="supervised (default; the bundled model's recipe), nformer (supervised, then NFormer "
                        "stage 2) or gracl (unsupervised: pseudo-labels, no labels used)")
    p.add_argument("--data", nargs="+", help="training sets: cuhk03 prid450s prid2011 viper viper-all or folders")
    p.add_argument("--eval-data", nargs="*", help="test protocols evaluated during/after training")
    p.add_argument("--run-dir", default="runs/default",
                   help="checkpoints (last.pt), log.jsonl and evaluations (default runs/default)")
    p.add_argument("--no-resume", action="store_true", help="start over even if run-dir has a checkpoint")
    p.add_argument("--pretrained", help="true (packaged ImageNet weights), false, or a state_dict path")
    p.add_argument("--decay-epochs", nargs="*", type=int, help="epochs at which the learning rate drops 10x")
    p.add_argument("--encoder", help="--method nformer: run stage 2 only, on this encoder checkpoint; "
                                     "--method gracl: start from this encoder")
    add_gracl_arguments(p)
    add_nformer_arguments(p)
    add_training_arguments(p)
    p.add_argument("--init", help="warm restart from a bundle (its weights.pt) or a checkpoint: its weights, a fresh "
                                  "optimiser and schedule; the card's lineage records every cycle")
    p.add_argument("--pooling", choices=["avg", "gem"], help="global pooling: avg (default) or gem (generalised mean)")
    p.add_argument("--flip-average", action=argparse.BooleanOptionalAction, default=None,
                   help="embed image + mirror image (evaluation and the exported encoder; twice the cost)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("lever-study", help="issue 14's lever study: one change per row, same training budget, split 1")
    p.add_argument("--out", default="runs/levers", help="one resumable run per row here (default runs/levers)")
    p.add_argument("--budget-minutes", type=float, default=8.0,
                   help="training budget of every row, in minutes of the current recipe (default 8)")
    p.add_argument("--rows", nargs="*", help="row numbers to run (default: all); parallel processes may split them")
    p.add_argument("--threads", type=int, default=2, help="torch threads per row (default 2)")
    p.add_argument("--report-only", action="store_true", help="measure encoder speeds and write the table")
    p.add_argument("--markdown", help="write the table here")
    p.add_argument("--plot", help="with --report-only: CUHK03 mAP against encoder img/s (PNG)")
    p.set_defaults(func=cmd_lever_study)

    p = sub.add_parser("flip-study", help="flip averaging on neither side, the queries only (a bundle's query_flip) "
                                          "or both sides, for encoder checkpoints")
    p.add_argument("--encoder", nargs="+", required=True, help="encoder checkpoints (last.pt), e.g. trained on split 1")
    p.add_argument("--data", nargs="+", default=["cuhk03", "prid450s", "prid2011"],
                   help="protocols (default: cuhk03 prid450s prid2011)")
    p.add_argument("--split", type=int, default=1, help="protocol split (default 1)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--markdown", help="write the table here")
    p.set_defaults(func=cmd_flip_study)

    p = sub.add_parser("refine-auto-study", help="refine=auto's rule: the label-free gallery statistic beside "
                                                 "each mode's mAP gain, per protocol and gallery size")
    _add_study_model(p)
    p.add_argument("--data", nargs="+", default=["cuhk03", "prid450s", "prid2011", "cuhk01", "pku-reid"],
                   help="protocols studied (default: cuhk03 prid450s prid2011 cuhk01 pku-reid)")
    p.add_argument("--split", type=int, default=1, help="protocol split (default 1: unseen by the bundled model)")
    p.add_argument("--modes", nargs="+", default=["kreciprocal"], choices=CANDIDATE_MODES,
                   help="refine modes measured against none (default kreciprocal)")
    p.add_argument("--auto-mode", default="kreciprocal", choices=CANDIDATE_MODES,
                   help="the mode auto applies above the threshold (default kreciprocal)")
    p.add_argument("--candidates", type=int, default=200, help="K of the refined modes (default 200)")
    p.add_argument("--tolerance", type=float, default=0.5, help="mAP a refined gallery may lose")
    p.add_argument("--threads", type=int, default=2, help="threads of the model (default 2)")
    p.add_argument("--markdown", help="write the table here")
    p.add_argument("--plot", help="write the statistic-vs-gain plot here (PNG)")
    p.add_argument("--json", help="write the rows and the threshold here (the rule's data)")
    p.set_defaults(func=cmd_refine_auto_study)

    p = sub.add_parser("refine-combinations", help="k-reciprocal on NFormer-refined features, NFormer on "
                                                   "k-reciprocal candidates, score fusion: against each alone")
    _add_study_model(p)
    p.add_argument("--data", nargs="+", default=["cuhk03", "prid450s", "prid2011"],
                   help="protocols (default: cuhk03 prid450s prid2011)")
    p.add_argument("--split", type=int, default=1, help="protocol split (default 1)")
    p.add_argument("--candidates", type=int, default=200, help="K of the refined variants (default 200)")
    p.add_argument("--threads", type=int, default=2, help="threads of the model (default 2)")
    p.add_argument("--markdown", help="write the table here")
    p.add_argument("--json", help="write the figures here")
    p.set_defaults(func=cmd_refine_combinations)

    p = sub.add_parser("train-speed", help="training img/s: PIL vs in-memory tensor pipeline, NCHW vs channels_last")
    p.add_argument("--backbone", default="efficientnet_lite0", help="backbone timed (default efficientnet_lite0)")
    p.add_argument("--sizes", nargs="+", default=["128x64", "256x128"],
                   help="input sizes HEIGHTxWIDTH (default 128x64 256x128)")
    p.add_argument("--seconds", type=float, default=30.0, help="seconds timed per case (default 30)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--markdown", help="write the table here")
    p.set_defaults(func=cmd_train_speed)

    p = sub.add_parser("adapt", help="fine-tune a bundle on unlabeled images of new cameras (GRACL) into a new bundle",
                       epilog="Adaptation's own defaults (models/adapt.py: adaptation_recipe) differ from training's: "
                              "--k1 6 --k2 2 --eps 0.45 --min-samples 2 --p 32 --k 4 --lr 3.5e-5 --freeze-bn")
    p.add_argument("--bundle", default="service/default_bundle", help="parent bundle (must carry weights.pt)")
    p.add_argument("--images", required=True,
                   help="unlabeled images: a folder (one subfolder per camera, or <pid>_c<cam> names) or a shared set")
    p.add_argument("--out", required=True, help="new bundle directory (must not exist)")
    p.add_argument("--name", help="bundle name (default: the parent's + '-adapted')")
    p.add_argument("--source", help="how the card names the adaptation data (default: the --images path)")
    p.add_argument("--epochs", type=int, help="GRACL epochs (default: GRACLConfig's)")
    p.add_argument("--nformer-epochs", type=int, default=4, help="NFormer stage 2 on pseudo-labels (0: none)")
    p.add_argument("--nformer-steps", type=int, default=50, help="NFormer stage 2 steps per epoch")
    for name, text in (("p", "identities per P x K batch (default 32)"), ("k", "images per identity (default 4)"),
                       ("seed", "random seed (default 0)"), ("threads", "torch threads (default 2)")):
        p.add_argument(f"--{name}", type=int, help=text)
    p.add_argument("--lr", type=float, help="default 3.5e-5 (models/adapt.py: adaptation_recipe)")
    add_gracl_arguments(p)
    p.add_argument("--work-dir", help="keep the training runs here (resumable) instead of a temporary folder")
    p.add_argument("--progress-jsonl", action="store_true", help="progress as JSON lines on stdout (for the service)")
    p.set_defaults(func=cmd_adapt)

    p = sub.add_parser("gracl-experiment", help="GRACL variants x seeds on a protocol's training images: table")
    p.add_argument("--data", nargs="+", required=True, help="unlabeled training images (sets or folders)")
    p.add_argument("--eval-data", required=True, help="labeled protocol evaluated after training")
    p.add_argument("--source", help="encoder checkpoint to adapt (default: train from ImageNet weights)")
    p.add_argument("--pretrained", help="without --source: true (packaged ImageNet weights), false, or a path")
    p.add_argument("--variants", nargs="+", default=["cluster-contrast", "gracl"],
                   help="variants of models/gracl/experiment.py: VARIANTS (default cluster-contrast gracl)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds per variant (default 0 1 2)")
    p.add_argument("--out", required=True, help="folder for the runs (each resumable) and results.json")
    p.add_argument("--markdown", help="write the table here")
    p.add_argument("--title", default="GRACL experiment", help="the table's title")
    p.add_argument("--decay-epochs", nargs="*", type=int, help="epochs at which the learning rate drops 10x")
    for name, typ, text in (("epochs", int, "epochs per run"), ("p", int, "identities per P x K batch"),
                            ("k", int, "images per identity"), ("threads", int, "torch threads"),
                            ("lr", float, "learning rate"), ("split", int, "split of --data's training part")):
        p.add_argument(f"--{name}", type=typ, help=f"{text} (default: GRACLConfig's)")
    add_gracl_arguments(p)
    p.set_defaults(func=cmd_gracl_experiment)

    p = sub.add_parser("gracl-clusters", help="pseudo-label settings swept against the true identities (choose "
                                              "them on split 1), and a picture of clusters with their proxies")
    p.add_argument("--source", required=True, help="encoder checkpoint whose features are clustered")
    p.add_argument("--data", nargs="+", required=True, help="labeled training sets (labels only score the clusters)")
    p.add_argument("--split", type=int, default=1, help="split of --data's training part (default 1)")
    p.add_argument("--cameras", nargs="+", type=int, help="only these cameras' images (default all)")
    p.add_argument("--identities", type=int, help="only the images of this many identities drawn at random")
    p.add_argument("--eps", nargs="+", type=float, default=[0.4, 0.5, 0.6], help="DBSCAN eps values")
    p.add_argument("--min-samples", nargs="+", type=int, default=[2, 4], help="DBSCAN min_samples values")
    p.add_argument("--k1", nargs="+", type=int, default=[20, 30], help="k-reciprocal k1 values")
    p.add_argument("--k2", nargs="+", type=int, default=[6], help="k-reciprocal k2 values")
    p.add_argument("--markdown", help="write the table here")
    p.add_argument("--grid", help="draw clusters of the chosen setting (highest NMI) to this PNG")
    p.add_argument("--title", default="Pseudo-label settings", help="the table's title")
    p.set_defaults(func=cmd_gracl_clusters)

    p = sub.add_parser("adapt-walkthrough", help="the adaptation product path over HTTP on a labeled target: "
                                                 "gallery -> adapt -> activate, test identities searched before "
                                                 "and after (its own embedded service)")
    p.add_argument("--data", default="cuhk03", help="labeled set: its training images (labels dropped) are adapted "
                                                    "on, its test protocol is searched (default cuhk03)")
    p.add_argument("--split", type=int, default=0, help="protocol split (default 0)")
    p.add_argument("--cameras", nargs="+", type=int, help="adapt on these cameras' images only (default all)")
    p.add_argument("--identities", type=int, help="adapt on the images of N training identities drawn at random "
                                                  "(as gracl-experiment --identities)")
    p.add_argument("--test-identities", type=int, help="search the first N test identities only")
    p.add_argument("--epochs", type=int, help="adaptation epochs (POST .../adapt's epochs; default reid adapt's)")
    p.add_argument("--adapt-args", nargs=argparse.REMAINDER, default=[],
                   help="the rest of the line: reid adapt options the service passes (REID_ADAPT_EXTRA_ARGS)")
    p.add_argument("--model-dir", help="the bundle the service starts with (default: the bundled model)")
    p.add_argument("--port", type=int, default=8010, help="the embedded service's port (a free one if busy)")
    p.add_argument("--data-dir", default="runs/adapt-walkthrough/service", help="the embedded service's files")
    p.add_argument("--json", help="write the before/after figures here")
    p.set_defaults(func=cmd_adapt_walkthrough)

    p = sub.add_parser("export", help="export a checkpoint to a model bundle (checked against ONNX Runtime)")
    p.add_argument("--checkpoint", default="runs/default/last.pt",
                   help="encoder checkpoint (default runs/default/last.pt)")
    p.add_argument("--out", default="service/default_bundle", help="bundle directory (default service/default_bundle)")
    p.add_argument("--name", default="reid-default", help="model name in the card (default reid-default)")
    p.add_argument("--version", help="model version in the card (default: the export time, YYYYMMDD.HHMMSS)")
    p.add_argument("--check-data", default="prid2011", help="dataset whose real images check the export")
    p.add_argument("--nformer", help="NFormer stage-2 checkpoint (nformer.pt) to export as nformer.onnx")
    p.add_argument("--query-flip", action="store_true",
                   help="the card's query_flip: queries are embedded as the mean of the image and its mirror image "
                        "(two encoder runs per query; gallery images stay one)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("attach-nformer", help="export an NFormer checkpoint into an existing bundle (replacing "
                                              "its NFormer; encoder and stored vectors untouched)")
    p.add_argument("--bundle", default="service/default_bundle",
                   help="bundle to change (default service/default_bundle)")
    p.add_argument("--nformer", required=True, help="NFormer stage-2 checkpoint (nformer.pt)")
    p.set_defaults(func=cmd_attach_nformer)

    p = sub.add_parser("quantize-nformer", help="add the int8 NFormer (serves local/joint refinement) to a bundle")
    p.add_argument("--bundle", default="service/default_bundle",
                   help="bundle to change (default service/default_bundle)")
    p.set_defaults(func=cmd_quantize_nformer)

    p = sub.add_parser("evaluate", help="mAP / CMC of a bundle on standard protocols")
    p.add_argument("--bundle", default="service/default_bundle",
                   help="bundle evaluated (default service/default_bundle)")
    p.add_argument("--data", nargs="+", default=["cuhk03", "prid450s", "prid2011"],
                   help="protocols (default: cuhk03 prid450s prid2011)")
    p.add_argument("--splits", nargs="+", type=int, default=[0], help="splits of each protocol (default 0)")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (default 0: its own choice)")
    p.add_argument("--plot", help="write CMC curves to this PNG")
    p.add_argument("--ranklists", help="folder for rank-list pictures (first queries and their top 10)")
    p.add_argument("--json", help="write the figures to this JSON file")
    p.add_argument("--write-card", action="store_true", help="record the figures in the bundle's model.json")
    p.add_argument("--refine", nargs="+", choices=REFINE_MODES,
                   help="evaluate these refinement modes (local and local_kreciprocal at every --candidates K; "
                        "kreciprocal at 200 and classic)")
    p.add_argument("--candidates", nargs="+", type=int, default=[50, 100, 200, 500],
                   help="K of local and local_kreciprocal")
    p.add_argument("--latency-sizes", nargs="*", type=int, help="also time each mode at these gallery sizes")
    p.add_argument("--joint-cost", type=int, help="also measure joint refinement at this N, sparse vs dense")
    p.add_argument("--markdown", help="write the refinement report (markdown) here")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("serve", help="run the HTTP service",
                       epilog="Every other setting is an environment variable REID_* (README: Settings), "
                              "e.g. REID_API_KEY, REID_KEEP_IMAGES, REID_REFINE_DEFAULT.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0: every "
                                                        "interface)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--data-dir", help="the embedded Redis's files, index snapshots, adapted bundles (default: "
                                      "$REID_DATA_DIR, else ./data/reid)")
    p.add_argument("--model-dir", help="the model bundle served (default: $REID_MODEL_DIR, else the bundled model)")
    p.add_argument("--redis-url", help="an external Redis (default: $REID_REDIS_URL, else an embedded "
                                       "redis-server under the data directory)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="JSON log lines from this level up (default info)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("ingest", help="upload a folder or a dataset part to a gallery over HTTP")
    add_service_arguments(p)
    p.add_argument("--gallery", required=True, help="the gallery to add to (created if needed)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--folder", help="images, subfolders included, labelled as an import labels them: "
                                         "`<pid>_c<cam>_*` names give person and camera, else the subfolder "
                                         "gives the camera; the file name is the external_id")
    source.add_argument("--dataset", help="a dataset name or folder (see reid train --data)")
    p.add_argument("--part", default="gallery", choices=["gallery", "query", "train"],
                   help="with --dataset: which part to upload (default gallery)")
    p.add_argument("--split", type=int, default=0, help="with --dataset: the protocol split (default 0)")
    p.add_argument("--camera-id", help="with --folder: camera of images whose names give none")
    p.add_argument("--batch-size", type=int, default=32, help="images per request (default 32)")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("search", help="query a gallery with one image over HTTP")
    p.add_argument("image", help="the query image file")
    add_service_arguments(p)
    p.add_argument("--gallery", required=True, help="the gallery searched")
    p.add_argument("--top-k", type=int, default=10, help="results wanted (default 10)")
    p.add_argument("--refine", choices=[*REFINE_MODES, "auto"],
                   help="re-ranking mode (default: the server's REID_REFINE_DEFAULT; auto: the server picks per "
                        "gallery)")
    p.add_argument("--candidates", type=int, help="K of local/kreciprocal/local_kreciprocal, at least --top-k "
                                                  "(default: the server's)")
    p.add_argument("--exclude-camera-id", help="leave out results from this camera")
    p.add_argument("--json", action="store_true", help="print the answer as JSON instead of a table")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("jobs", help="list a service's background jobs (imports, adaptations, activations) over HTTP")
    add_service_arguments(p)
    p.add_argument("--gallery", help="only this gallery's jobs")
    p.add_argument("--kind", choices=["import", "adapt", "activate"], help="only jobs of this kind")
    p.add_argument("--status", choices=["queued", "running", "succeeded", "failed", "cancelled"],
                   help="only jobs in this status")
    p.add_argument("--limit", type=int, default=20, help="newest jobs shown (default 20)")
    p.add_argument("--json", action="store_true", help="print the jobs as JSON instead of a table")
    p.set_defaults(func=cmd_jobs)

    def add_store_arguments(p) -> None:
        p.add_argument("--data-dir", help="default: $REID_DATA_DIR (its embedded Redis: the running service's, "
                                          "else one started for the command)")
        p.add_argument("--redis-url", help="an external Redis (default: $REID_REDIS_URL)")
        p.add_argument("--blob-dir", help="the blob store (default: $REID_BLOB_DIR, else DATA_DIR/blobs)")

    p = sub.add_parser("migrate-store", help="bring a store of an older key layout to the current one (the service "
                                             "does it at start too); --blobs: also move kept bytes out of Redis (safe "
                                             "while the service runs)")
    add_store_arguments(p)
    p.add_argument("--blobs", action="store_true", help="move kept image bytes from Redis to the blob store")
    p.set_defaults(func=cmd_migrate_store)

    p = sub.add_parser("compact-store", help="give back the memory that deletes left in half-empty vector pages: "
                                             "each gallery's images moved into its first pages, the rest freed "
                                             "(safe while the service runs)")
    add_store_arguments(p)
    p.add_argument("--gallery", action="append", help="only this gallery (repeatable; default: every one)")
    p.set_defaults(func=cmd_compact_store)

    p = sub.add_parser("gc-blobs", help="remove blobs no image references (orphans of crashes) and the leftovers "
                                        "of interrupted writes (safe while the service runs)")
    add_store_arguments(p)
    p.add_argument("--grace-s", type=float, default=600.0, help="leave files younger than this alone (default 600)")
    p.set_defaults(func=cmd_gc_blobs)

    p = sub.add_parser("make-synthetic", help="write a procedural Market-1501-layout dataset")
    p.add_argument("out", help="folder to write (bounding_box_train, query, bounding_box_test)")
    p.add_argument("--train-ids", type=int, default=60, help="training identities (default 60)")
    p.add_argument("--test-ids", type=int, default=40, help="test identities (default 40)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(func=cmd_make_synthetic)

    p = sub.add_parser("bench", help="performance against the machine's limits and the peers' way (JSON, "
                                      "markdown, PNGs; README summary)")
    p.add_argument("--bundle", default="service/default_bundle",
                   help="bundle measured (default service/default_bundle)")
    p.add_argument("--out", default="bench/results", help="folder for the results (default bench/results)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (< 3 minutes); figures not comparable")
    p.add_argument("--readme", help="README to update between the bench markers (default: README.md for a "
                                    "full run, none for --quick)")
    p.add_argument("--no-readme", action="store_true", help="leave the README alone")
    p.add_argument("--only", nargs="+", choices=["encoder", "int8", "ingest", "search", "refinement", "accuracy",
                                                 "restart", "scale"], help="run only these sections")
    p.add_argument("--fresh-scale", action="store_true",
                   help="run the scale section (10M vectors, 30-60 min) even if its saved result exists")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("loadtest", help="sustained search + ingest against a real server on loopback")
    p.add_argument("--bundle", default="service/default_bundle", help="bundle served (default service/default_bundle)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds per concurrency")
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 16],
                   help="concurrent clients, one phase each (default 1 4 16)")
    p.add_argument("--gallery-size", type=int, default=500, help="images ingested before the phases (default 500)")
    p.add_argument("--search-share", type=float, default=0.8, help="share of requests that search; the rest "
                                                                    "ingest (default 0.8)")
    p.add_argument("--json", help="write the result here")
    p.add_argument("--markdown", help="write the table here")
    p.set_defaults(func=cmd_loadtest)

    p = sub.add_parser("demo", help="start the service, ingest a sample gallery, run a query")
    p.add_argument("--port", type=int, default=8000, help="port to serve on (default 8000; a free one if taken)")
    p.add_argument("--once", action="store_true", help="exit after printing the answer")
    p.add_argument("--data-dir", default="data/demo", help="the demo service's data (default data/demo)")
    p.set_defaults(func=cmd_demo)
    return parser


def error_line(e: BaseException) -> str:
    """What went wrong, in one line."""
    if isinstance(e, OSError) and e.filename is not None:
        return f"{e.filename}: {e.strerror or e}"
    return str(e) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    from index.bundle import BundleError
    from service.client import ClientError

    args = build_parser().parse_args(argv)
    # A user's mistake (a missing file or bundle) or an unreachable service is one line and exit status 1, not a
    # traceback.
    try:
        return args.func(args)
    except (ClientError, OSError, BundleError) as e:
        print(f"reid {args.command}: {error_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"reid {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
