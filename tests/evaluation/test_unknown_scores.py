"""The feature-space unknown scores (issue 28): values on hand-made features, the statistics file beside the model,
the default score chosen by AUROC, and the same score on both engines."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from twincar.errors import TwinCarError
from twincar.inference.features import FeatureStats, default_k, fit_feature_stats, shrunk_precision
from twincar.inference.results import unknown_scores


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def features(seed: int = 0, n: int = 30, d: int = 8, classes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """``n`` unit features around ``classes`` well-separated directions, and their labels."""
    rng = np.random.default_rng(seed)
    centres = np.eye(d)[:classes] * 3
    labels = np.arange(n) % classes
    return unit(centres[labels] + rng.normal(0, 0.3, (n, d))), labels


def test_knn_is_the_similarity_to_the_kth_nearest_training_embedding():
    bank, labels = features()
    queries = unit(np.random.default_rng(1).normal(size=(5, 8)))
    stats = fit_feature_stats(bank, labels, 3, k=4)
    brute = [sorted((float(q @ b) for b in bank), reverse=True)[3] for q in queries]
    np.testing.assert_allclose(unknown_scores(np.zeros((5, 3)), "knn", features=queries, stats=stats), brute,
                               atol=1e-6)
    assert default_k(560, 14) == 4 and default_k(10, 10) == 1 and default_k(10**6, 10) == 50


def test_mahalanobis_scores_equal_their_closed_forms():
    x, y = features()
    stats = fit_feature_stats(x, y, 3, shrinkage=0.1)
    means = np.stack([x[y == c].mean(0) for c in range(3)])

    def precision(centred):  # (1 - s) S + s tr(S)/D I, inverted
        cov = centred.T @ centred / len(centred)
        return np.linalg.inv(0.9 * cov + 0.1 * np.trace(cov) / cov.shape[0] * np.eye(cov.shape[0]))

    p, p0, mu0 = precision(x - means[y]), precision(x - x.mean(0)), x.mean(0)
    q = unit(np.random.default_rng(2).normal(size=(4, 8)))
    md = np.array([[(v - m) @ p @ (v - m) for m in means] for v in q])
    md0 = np.array([(v - mu0) @ p0 @ (v - mu0) for v in q])
    np.testing.assert_allclose(stats.scores(q, "mahalanobis"), -md.min(1), rtol=1e-4)
    np.testing.assert_allclose(stats.scores(q, "rel_mahalanobis"), -(md - md0[:, None]).min(1), rtol=1e-4)
    np.testing.assert_allclose(shrunk_precision(x - mu0), p0, rtol=1e-9)
    # a point at a class mean is the most known of all
    assert stats.scores(means[:1], "mahalanobis")[0] > stats.scores(q, "mahalanobis").max()


def test_a_feature_score_without_statistics_is_one_sentence():
    with pytest.raises(TwinCarError, match="needs the training features' statistics"):
        unknown_scores(np.zeros((1, 3)), "mahalanobis", features=np.ones((1, 8)))
    x, y = features()
    with pytest.raises(TwinCarError, match="4-d but its unknown-score statistics are 8-d"):
        fit_feature_stats(x, y, 3).scores(np.ones((1, 4)), "mahalanobis")
    with pytest.raises(TwinCarError, match="do not keep"):
        fit_feature_stats(x, y, 3).without_bank().scores(x[:1], "knn")


def known_and_unknown():
    """Known images whose logits do not tell them from unknown ones, but whose features do."""
    x, y = features(n=60)
    rng = np.random.default_rng(3)
    train, val = slice(0, 30), slice(30, 60)
    stats = fit_feature_stats(x[train], y[train], 3)
    logits = torch.from_numpy(rng.normal(size=(30, 3))).float()
    far = torch.from_numpy(unit(rng.normal(size=(20, 8)) + np.eye(8)[5] * 3)).float()  # around an unused axis
    far_logits = torch.from_numpy(rng.normal(size=(20, 3)) + 0.5).float()  # more confident than the known ones
    return stats, logits, torch.from_numpy(y[val]), torch.from_numpy(x[val]).float(), far_logits, far


def test_every_threshold_keeps_its_tpr_and_the_best_auroc_is_the_default():
    from twincar.evaluation.calibration import unknown_scores as scores_of
    from twincar.evaluation.unknown import fit_unknown

    stats, logits, labels, feats, far_logits, far = known_and_unknown()
    calibration, kept = fit_unknown(logits, labels, features=feats, stats=stats, unknown_logits=far_logits,
                                    unknown_features=far, tpr=0.9, selected_on="far")
    assert set(calibration.auroc) == {"max_logit", "max_softmax", "energy", "knn", "mahalanobis", "rel_mahalanobis"}
    assert calibration.auroc["max_logit"] < 0.5 < calibration.auroc["mahalanobis"] == 1.0
    best = max(calibration.auroc.values())
    assert calibration.auroc[calibration.score] == best and calibration.selected_on == "far"
    for score, threshold in calibration.thresholds.items():
        s = scores_of(logits, score, calibration.temperature, features=feats, stats=kept)
        assert float((s >= threshold).double().mean()) == math.ceil(0.9 * len(s)) / len(s), score
    assert calibration.threshold == calibration.thresholds[calibration.score]
    if calibration.score != "knn":  # the bank is kept only for knn
        assert kept.bank is None and "knn" not in calibration.thresholds
    forced, _ = fit_unknown(logits, labels, features=feats, stats=stats, unknown_logits=far_logits,
                            unknown_features=far, score="energy", keep_knn=True)
    assert forced.score == "energy" and "knn" in forced.thresholds


def test_the_statistics_file_round_trips_and_another_models_is_refused(tmp_path):
    from twincar.models import WeightsError
    from twincar.models.card import read_unknown_stats, write_unknown_stats

    x, y = features()
    stats = fit_feature_stats(x, y, 3, k=2)
    entry = write_unknown_stats(tmp_path / "model.pth", stats.arrays())
    assert entry["file"] == "model.unknown.npz" and entry["classes"] == 3 and entry["dim"] == 8
    assert entry["knn_bank"] == 30 and entry["knn_k"] == 2
    back = FeatureStats.from_arrays(read_unknown_stats(tmp_path / "model.pth", {"features": entry}, 3))
    q = x[:4]
    for score in ("knn", "mahalanobis", "rel_mahalanobis"):
        np.testing.assert_allclose(back.scores(q, score), stats.scores(q, score), rtol=1e-6)
    with pytest.raises(WeightsError, match="holds statistics of 3 classes but model.pth has 5"):
        read_unknown_stats(tmp_path / "model.pth", {"features": entry}, 5)
    write_unknown_stats(tmp_path / "other.pth", fit_feature_stats(*features(seed=9), 3).arrays())
    (tmp_path / "other.unknown.npz").replace(tmp_path / "model.unknown.npz")
    with pytest.raises(WeightsError, match="is not the unknown-score statistics file model.pth was calibrated with"):
        read_unknown_stats(tmp_path / "model.pth", {"features": entry}, 3)
    (tmp_path / "model.unknown.npz").unlink()
    with pytest.raises(WeightsError, match="model.unknown.npz is missing"):
        read_unknown_stats(tmp_path / "model.pth", {"features": entry}, 3)


@pytest.mark.slow
def test_training_stores_the_statistics_and_the_onnx_runtime_scores_as_torch_does(trained_run, tmp_path):
    """The trained run carries the statistics beside model.pth; predict, eval and the ONNX export use its default
    score, the ONNX runtime within 1e-4 of torch."""
    from tests.trained import compose
    from twincar.evaluation.recipes import evaluate
    from twincar.export import export_model
    from twincar.inference.predictor import Predictor

    card = json.loads((trained_run / "model_card.json").read_text())
    calibration = card["calibration"]
    assert calibration["features"]["file"] == "model.unknown.npz" and (trained_run / "model.unknown.npz").is_file()
    assert set(calibration["auroc"]) >= {"max_logit", "mahalanobis", "rel_mahalanobis", "knn"}
    assert calibration["score"] == max(calibration["auroc"], key=calibration["auroc"].get)
    assert "generated images of no car" in calibration["selected_on"]

    feature_score = "mahalanobis"
    torch_p = Predictor.load(trained_run / "model.pth", device="cpu", unknown_score=feature_score)
    onnx_path = export_model(trained_run / "model.pth", "onnx", tmp_path / "onnx")
    assert (tmp_path / "onnx" / "model.unknown.npz").is_file()
    onnx_p = Predictor.load(onnx_path, unknown_score=feature_score)
    images = sorted((trained_run.parent.parent / "data").rglob("*.jpg"))[:6] or None
    if images is None:
        from twincar.evaluation.unknown import write_far_images

        images = write_far_images(tmp_path / "far", count=6, size=64)
    a, b = torch_p.predict(images), onnx_p.predict(images)
    assert onnx_p.needs_features and all(p.unknown_score is not None for p in b)
    # Mahalanobis distances are in the thousands: within 1e-4 of the score's scale (float32 features on two engines)
    np.testing.assert_allclose([p.unknown_score for p in b], [p.unknown_score for p in a], rtol=1e-5, atol=1e-4)
    assert [p.known for p in b] == [p.known for p in a]

    m = evaluate(compose("eval", [f"ckpt={trained_run / 'model.pth'}", f"paths.output_dir={tmp_path / 'eval'}",
                                  "progress=false", "ood=synthetic"]))
    for score in ("max_logit", "mahalanobis", "rel_mahalanobis"):
        assert 0 <= m[f"ood/auroc_{score}"] <= 1
        assert (tmp_path / "eval" / "reports" / f"ood_scores_{score}.png").is_file()
    assert m["ood/auroc"] == m[f"ood/auroc_{calibration['score']}"]
