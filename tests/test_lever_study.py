"""The lever study's bookkeeping: equal budgets in training time, one change per row, split 1 only."""

from dataclasses import asdict

from models.lever_study import FLIP_ROW, LEVERS, STUDY_SPLIT, Lever, markdown, row_config
from models.train import TrainConfig


def test_rows_change_one_thing_and_never_touch_split_0():
    base = asdict(TrainConfig())
    for lever in LEVERS:
        cfg = row_config(lever, budget_minutes=8, rate=80.0, threads=1)
        assert cfg.split == STUDY_SPLIT != 0
        changed = {k for k, v in asdict(cfg).items() if v != base[k]}
        assert changed - {"split", "eval_data", "eval_every", "threads", "max_batches_per_epoch"} == set(lever.overrides)


def test_the_budget_is_training_seconds_at_the_rows_own_rate():
    plain = row_config(LEVERS[0], budget_minutes=8, rate=80.0, threads=2)
    images = plain.epochs * plain.max_batches_per_epoch * plain.p * plain.k
    assert abs(images - 8 * 60 * 80) <= plain.epochs * plain.p * plain.k  # rounding to whole batches
    slower = row_config(Lever("big", {"height": 256, "width": 128}), budget_minutes=8, rate=20.0, threads=2)
    assert slower.max_batches_per_epoch * 4 == plain.max_batches_per_epoch * 1
    longer = row_config(Lever("2x", budget_factor=2.0), budget_minutes=8, rate=80.0, threads=2)
    assert longer.max_batches_per_epoch == 2 * plain.max_batches_per_epoch
    assert plain.decay_epochs == TrainConfig().decay_epochs and plain.epochs == 12  # the recipe's shape kept


def test_table_gives_deltas_against_the_current_recipe_and_the_flip_row():
    def result(lever, cuhk_map, flip=None):
        cfg = asdict(row_config(lever, 8, 80.0, 1))
        r = {"lever": lever.name, "train_images_per_second": 80.0, "images": 38400, "config": cfg,
             "evaluation": {f"cuhk03/split{STUDY_SPLIT}": {"mAP": cuhk_map, "rank1": cuhk_map - 2}}}
        if flip is not None:
            r["flip_average_evaluation"] = {f"cuhk03/split{STUDY_SPLIT}": {"mAP": flip, "rank1": flip - 2}}
        return r

    table = markdown([result(LEVERS[0], 30.0, flip=31.5), result(LEVERS[9], 33.0)],
                     {"efficientnet_lite0 128x64 avg": 500.0, "efficientnet_lite0 128x64 avg flip": 260.0,
                      "efficientnet_lite0 128x64 gem": 490.0}, 8)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert "28.0 / 30.0 |" in rows[LEVERS[0].name] and "| 500 |" in rows[LEVERS[0].name]
    assert "31.0 / 33.0 (+3.0)" in rows[LEVERS[9].name] and "| 490 |" in rows[LEVERS[9].name]
    assert "29.5 / 31.5 (+1.5)" in rows[FLIP_ROW] and "| 260 |" in rows[FLIP_ROW]
