"""The evaluator against cases computed by hand."""

import numpy as np
import pytest

from index.metrics import NothingToEvaluate, evaluate_features, evaluate_rankings

# gallery: g0 same id+cam as q0 (ignored), g1 other id, g2 true match, g3 other id, g4 true match, g5 junk
G_PIDS = np.array([1, 2, 1, 3, 1, -1])
G_CAMS = np.array([1, 2, 2, 2, 3, 2])


def test_hand_computed_case():
    distmat = np.array([
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.15],  # q0 id1 cam1: kept ranking g1 g2* g3 g4* -> AP (1/2 + 2/4)/2
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.15],  # q1 id2 cam2: its only match shares its camera -> skipped
        [0.9, 0.8, 0.7, 0.1, 0.5, 0.0],   # q2 id3 cam1: junk g5 first is ignored, g3 is rank 1
    ])
    m = evaluate_rankings(distmat, np.array([1, 2, 3]), G_PIDS, np.array([1, 2, 1]), G_CAMS, max_rank=5)
    assert m.evaluated_queries == 2 and m.skipped_queries == 1
    assert m.mAP == pytest.approx((0.5 + 1.0) / 2)
    assert m.mINP == pytest.approx((2 / 4 + 1.0) / 2)
    assert m.cmc == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0])
    assert m.ranks["rank1"] == pytest.approx(0.5) and m.ranks["rank5"] == pytest.approx(1.0)


def test_market_rule_distractors_count_as_wrong_answers():
    """Market-1501's protocol (and torchreid's, fast-reid's): only id -1 is junk; id 0 images are
    distractors, ranked and counted like any other wrong person, whatever their camera."""
    g_pids = np.array([0, 5, -1, 0, 5, 6])
    g_cams = np.array([2, 2, 2, 3, 3, 1])
    distmat = np.array([
        [0.1, 0.3, 0.2, 0.4, 0.5, 0.6],    # q0 id5 cam1: kept g0(0) g1* g3(0) g4* g5 -> AP (1/2 + 2/4)/2
        [0.05, 0.6, 0.0, 0.3, 0.5, 0.1],   # q1 id6 cam2: junk g2 ignored, same-camera distractor g0 first, g5* rank 2
    ])
    m = evaluate_rankings(distmat, np.array([5, 6]), g_pids, np.array([1, 2]), g_cams, max_rank=5)
    assert m.evaluated_queries == 2 and m.skipped_queries == 0
    assert m.mAP == pytest.approx((0.5 + 0.5) / 2)
    assert m.mINP == pytest.approx((2 / 4 + 1 / 2) / 2)
    assert m.cmc == pytest.approx([0.0, 1.0, 1.0, 1.0, 1.0])


def test_perfect_and_worst_ranking():
    q = np.eye(3, dtype=np.float32)
    perfect = evaluate_features(q, q, [1, 2, 3], [1, 2, 3], [1, 1, 1], [2, 2, 2])
    assert perfect.mAP == 1.0 and perfect.ranks["rank1"] == 1.0
    # the true match is always last of 3 -> AP 1/3, rank-1 0
    distmat = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.5, 0.0, 1.0]])
    worst = evaluate_rankings(distmat, np.array([1, 2, 3]), np.array([1, 2, 3]), np.ones(3), np.full(3, 2))
    assert worst.mAP == pytest.approx(1 / 3) and worst.ranks["rank1"] == 0.0 and worst.ranks["rank5"] == 1.0


def test_multiple_matches_average_precision():
    # hits at kept positions 1 and 3 -> AP (1/1 + 2/3) / 2
    distmat = np.array([[0.1, 0.2, 0.3]])
    m = evaluate_rankings(distmat, np.array([7]), np.array([7, 8, 7]), np.array([1]), np.array([2, 2, 2]))
    assert m.mAP == pytest.approx((1 + 2 / 3) / 2)
    assert m.mINP == pytest.approx(2 / 3)


def test_all_one_camera_is_a_clear_error():
    f = np.eye(4, dtype=np.float32)
    with pytest.raises(NothingToEvaluate, match="no query has a valid match"):
        evaluate_features(f, f, [1, 2, 3, 4], [1, 2, 3, 4], [1] * 4, [1] * 4)


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="does not match"):
        evaluate_rankings(np.zeros((2, 3)), np.array([1, 2]), np.array([1, 2]), np.array([1, 1]), np.array([2, 2]))
