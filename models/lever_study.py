"""The lever study (issue 14): each row changes one thing in the current recipe and trains for the same
budget of this machine's training time, on split 1's training identities; it is measured on split 1's test
identities of CUHK03, PRID450S and PRID2011. Split 0's test identities never take part in a choice.

Same budget means the same seconds at the row's own measured training rate (`models.training_speed`, two
threads, machine otherwise idle): a faster row takes more steps. Every row keeps the recipe's schedule shape
(12 epochs of `budget x rate / 32` images between them, warm-up 1, head-only 2, decay at 9 and 11), so the
budget is the only clock. Rows are resumable and may run in parallel processes (`--rows`, one thread each):
the image counts, not the wall clock, define a row."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .training_speed import SpeedCase, training_throughput
from .train import TrainConfig, train

STUDY_SPLIT = 1
EVAL_DATA = ["cuhk03", "prid450s", "prid2011"]
RECIPE_EPOCHS = 12


@dataclass(frozen=True)
class Lever:
    name: str
    overrides: dict = field(default_factory=dict)
    budget_factor: float = 1.0  # schedule-length rows train for a multiple of the budget

    def config(self) -> TrainConfig:
        """The current recipe with this row's change."""
        return replace(TrainConfig(), **self.overrides)


MORE_DATA = ["cuhk03", "prid450s", "prid2011", "viper-all", "cuhk01-all", "pku-reid-all"]
LEVERS = [
    Lever("current recipe (Lite0, 128x64, 12 epochs' schedule)"),
    Lever("stem + 2 stages frozen", {"frozen_stages": 2}),
    Lever("input 192x96", {"height": 192, "width": 96}),
    Lever("input 256x128", {"height": 256, "width": 128}),
    Lever("backbone Lite1", {"backbone": "efficientnet_lite1"}),
    Lever("backbone Lite2", {"backbone": "efficientnet_lite2"}),
    Lever("+ CUHK01 + PKU-Reid training data", {"train_data": MORE_DATA}),
    Lever("schedule 2x budget", budget_factor=2.0),
    Lever("no random erasing", {"random_erasing": 0.0}),
    Lever("GeM pooling", {"pooling": "gem"}),
    Lever("colour jitter 0.2", {"color_jitter": 0.2}),
    # At 1x every row is early in training; these two pair up to ask whether the extra data pays later
    Lever("schedule 3x budget", budget_factor=3.0),
    Lever("+ CUHK01 + PKU-Reid at 3x budget (vs the row above)", {"train_data": MORE_DATA}, budget_factor=3.0),
]
FLIP_ROW = "flip-averaged embeddings (current recipe's model)"


def row_config(lever: Lever, budget_minutes: float, rate: float, threads: int) -> TrainConfig:
    cfg = replace(lever.config(), split=STUDY_SPLIT, eval_data=list(EVAL_DATA), eval_every=0, threads=threads)
    images = budget_minutes * 60 * rate * lever.budget_factor
    return replace(cfg, epochs=RECIPE_EPOCHS, max_batches_per_epoch=max(1, round(images / RECIPE_EPOCHS / (cfg.p * cfg.k))))


def speed_case(cfg: TrainConfig) -> SpeedCase:
    return SpeedCase(cfg.backbone, cfg.height, cfg.width, pooling=cfg.pooling, frozen_stages=cfg.frozen_stages)


def measure_rates(out: Path, seconds: float = 20.0) -> dict[str, float]:
    """Training img/s (2 threads) of every distinct architecture in the study, measured once, kept in
    `out/rates.json` so that later (or parallel) rows use the same figures."""
    path = out / "rates.json"
    rates = json.loads(path.read_text()) if path.exists() else {}
    for lever in LEVERS:
        case = speed_case(lever.config())
        if case.label() not in rates:
            rates[case.label()] = training_throughput(case, seconds=seconds)["images_per_second"]
            out.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(rates, indent=2))
    return rates


def run_row(lever: Lever, out: Path, budget_minutes: float, rates: dict[str, float], threads: int) -> dict:
    from .train import evaluate_all, load_trained_model

    row_dir = out / slug(lever.name)
    result_path = row_dir / "result.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    rate = rates[speed_case(lever.config()).label()]
    cfg = row_config(lever, budget_minutes, rate, threads)
    evaluation = train(cfg, row_dir)
    result = {"lever": lever.name, "train_images_per_second": rate, "steps": cfg.epochs * cfg.max_batches_per_epoch,
              "images": cfg.epochs * cfg.max_batches_per_epoch * cfg.p * cfg.k, "config": asdict(cfg),
              "evaluation": summarise(evaluation)}
    if lever.name == LEVERS[0].name:  # the flip row: the same model, embedded with its mirror image too
        model, spec, _ = load_trained_model(row_dir / "last.pt")
        flipped = evaluate_all(model, replace(cfg, flip_average=True), spec, "cpu")
        result["flip_average_evaluation"] = summarise(flipped)
    result_path.write_text(json.dumps(result, indent=2))
    return result


def summarise(evaluation: dict) -> dict:
    return {name: {"mAP": round(100 * m["mAP"], 1), "rank1": round(100 * m["ranks"]["rank1"], 1)}
            for name, m in evaluation.items()}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")[:60]


def markdown(results: list[dict], encoder_rates: dict[str, float], budget_minutes: float) -> str:
    """The README table: one row per lever, deltas against the current recipe's row."""
    names = [f"{d}/split{STUDY_SPLIT}" for d in EVAL_DATA]
    head = "| lever | " + " | ".join(f"{n.split('/')[0]} R1 / mAP" for n in names) + \
           " | train img/s | images seen | encoder img/s (ORT, b32) |"
    lines = [f"Split {STUDY_SPLIT}, {budget_minutes:g} minutes of training per row at its own rate.", "",
             head, "|" + "---|" * (len(names) + 4)]
    rows = list(results)
    base = next((r for r in rows if r["lever"] == LEVERS[0].name), None)
    if base and "flip_average_evaluation" in base:
        rows.append({**base, "lever": FLIP_ROW, "evaluation": base["flip_average_evaluation"], "flip": True})
    for r in rows:
        cells = []
        for n in names:
            m = r["evaluation"].get(n)
            b = base["evaluation"].get(n) if base else None
            if not m:
                cells.append("-")
                continue
            delta = f" ({m['mAP'] - b['mAP']:+.1f})" if b and r is not base else ""
            cells.append(f"{m['rank1']:.1f} / {m['mAP']:.1f}{delta}")
        arch = encoder_key(r["config"], r.get("flip", False))
        enc = encoder_rates.get(arch)
        lines.append(f"| {r['lever']} | " + " | ".join(cells) +
                     f" | {r['train_images_per_second']:.0f} | {r['images']:,} | {f'{enc:.0f}' if enc else '-'} |")
    return "\n".join(lines) + "\n"


def encoder_key(cfg: dict, flip: bool = False) -> str:
    return f"{cfg['backbone']} {cfg['height']}x{cfg['width']} {cfg.get('pooling', 'avg')}" + (" flip" if flip else "")
