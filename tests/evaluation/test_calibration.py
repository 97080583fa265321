"""Calibration and the unknown answer (issue 16): temperature scaling, the unknown threshold, AUROC / FPR95."""

from __future__ import annotations

import csv
import json
import math
import shutil
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from twincar.errors import TwinCarError
from twincar.evaluation.calibration import (
    Calibration,
    calibrate,
    ece_nll,
    fit_temperature,
    fit_threshold,
    unknown_scores,
)
from twincar.evaluation.open_set import auroc, fpr_at_tpr, open_set_metrics


def calibrated_set(n: int = 8000, k: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels drawn from the logits' own softmax: calibrated by construction (optimum T = 1)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=g) * 2
    labels = torch.multinomial(logits.softmax(1), 1, generator=g).flatten()
    return logits, labels


@pytest.mark.parametrize("scale", [1.0, 3.0, 0.5])
def test_the_temperature_undoes_a_known_scaling_of_calibrated_logits(scale):
    logits, labels = calibrated_set()
    t = fit_temperature(logits * scale, labels)
    assert t == pytest.approx(scale, rel=0.05)
    ece_raw, nll_raw = ece_nll(logits * scale, labels)
    ece, nll = ece_nll(logits * scale, labels, t)
    if scale != 1.0:
        assert ece < ece_raw / 3 and nll < nll_raw


def test_the_threshold_keeps_the_target_share_of_the_split_it_is_fitted_on():
    scores = torch.randn(200, generator=torch.Generator().manual_seed(1))
    for tpr in (0.95, 0.9, 0.5, 1.0):
        t = fit_threshold(scores, tpr)
        assert float((scores >= t).double().mean()) == pytest.approx(tpr)
    assert 1.5 <= fit_threshold(torch.tensor([1.0, 2.0, 3.0, 4.0]), 0.75) < 2.0  # just below the 3rd highest
    with pytest.raises(TwinCarError, match=r"true-positive rate must be in \(0, 1\]"):
        fit_threshold(scores, 0)


def test_auroc_and_fpr95_equal_their_analytic_values():
    # known ~ U[0.3, 1.3], unknown ~ U[0, 1] (fine grids): AUROC = 1 - (1 - 0.3)^2 / 2, FPR95 = P(u >= 0.35) = 0.65
    grid = (torch.arange(10000, dtype=torch.float64) + 0.5) / 10000
    known, unknown = grid + 0.3, grid
    assert auroc(known, unknown) == pytest.approx(1 - 0.7**2 / 2, abs=1e-3)
    assert fpr_at_tpr(known, unknown, 0.95) == pytest.approx(0.65, abs=1e-3)
    # exact small case with a tie: pairs (3>1, 3>2, 3=3, 4>1, 4>2, 4>3) -> 5.5 / 6
    assert auroc(torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0, 3.0])) == pytest.approx(5.5 / 6)
    assert auroc(grid + 2, grid) == 1.0 and auroc(grid, grid + 2) == 0.0
    assert fpr_at_tpr(grid + 2, grid) == 0.0


def test_the_open_set_metrics_at_a_threshold_count_what_it_accepts_and_names():
    known = torch.tensor([0.1, 0.5, 0.6, 0.9, 2.0])
    unknown = torch.tensor([0.0, 0.2, 0.55, 3.0])
    correct = torch.tensor([True, False, True, True, False])
    m = open_set_metrics(known, unknown, threshold=0.5, known_correct=correct, tpr=0.8)
    assert m["ood/known_accepted"] == 4 / 5 and m["ood/unknown_rejected"] == 2 / 4 and m["ood/images"] == 4
    assert m["ood/acc_accepted"] == 2 / 4  # 0.5 wrong, 0.6 right, 0.9 right, 2.0 wrong
    assert m["ood/auroc"] == auroc(known, unknown) and m["ood/fpr95"] == fpr_at_tpr(known, unknown, 0.8)
    assert math.isnan(open_set_metrics(known, unknown, threshold=9.0, known_correct=correct)["ood/acc_accepted"])
    assert set(open_set_metrics(known, unknown)) == {"ood/auroc", "ood/fpr95", "ood/images"}  # no threshold


def test_the_scores_on_known_logits():
    z = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    assert unknown_scores(z).tolist() == [2.0, 1.0]
    assert unknown_scores(z, "max_softmax").tolist() == pytest.approx([1 / (1 + math.exp(-2)), 0.5])
    assert unknown_scores(z, "energy", 2.0).tolist() == pytest.approx(
        [2 * torch.logsumexp(z[0] / 2, 0).item(), 2 * torch.logsumexp(z[1] / 2, 0).item()])
    with pytest.raises(TwinCarError, match="unknown score 'odin': use one of max_logit, max_softmax, energy"):
        unknown_scores(z, "odin")


def test_a_calibration_round_trips_and_refuses_nonsense():
    logits, labels = calibrated_set(2000)
    c = calibrate(logits * 2, labels, tpr=0.9)
    assert c.temperature == pytest.approx(2, rel=0.15) and c.images == 2000 and c.ece < c.ece_raw
    assert float((c.scores(logits * 2) >= c.threshold).double().mean()) == pytest.approx(0.9)
    assert Calibration.from_dict({**c.to_dict(), "added_later": 1}) == c
    assert Calibration.from_dict(None) is None
    with pytest.raises(TwinCarError, match="temperature must be a positive number"):
        Calibration(temperature=0.0)


# -- the model file carries it; predict marks unknown cars -------------------------------------------------------
def calibrated_copy(tiny_export: Path, tmp_path: Path, calibration: dict) -> Path:
    """A copy of the tiny exported model (weights, card, classes) whose model card carries ``calibration``."""
    from twincar.models.loading import write_calibration

    d = tmp_path / "model"
    d.mkdir()
    for name in ("model.pth", "model_card.json", "classes.txt"):
        shutil.copy(tiny_export.parent / name, d / name)
    write_calibration(d / "model.pth", calibration)
    return d / "model.pth"


def test_predict_marks_cars_below_the_threshold_unknown_and_keeps_their_closest_classes(tiny_export, car_images,
                                                                                      tmp_path):
    from twincar.inference.predictor import Predictor
    from twincar.predict import predict_files

    plain = Predictor.load(tiny_export, device="cpu", precision="fp32")
    raw = torch.cat([torch.from_numpy(plain.outputs(plain.prepare(p)[None])[0]) for p in car_images])
    scores = unknown_scores(raw)
    threshold = float(scores.median())  # 3 images: the lowest is unknown, the other two known
    model = calibrated_copy(tiny_export, tmp_path, {"temperature": 2.0, "threshold": threshold})

    p = Predictor.load(model, device="cpu", precision="fp32")
    assert p.temperature == 2.0 and p.unknown_threshold == threshold
    results = p.predict(car_images)
    assert [r.known for r in results] == (scores >= threshold).tolist() == [s >= threshold for s in scores.tolist()]
    assert [r.unknown_score for r in results] == pytest.approx(scores.tolist())
    # confidence is the calibrated probability: softmax(logits / T)
    assert results[0].confidence == pytest.approx(float((raw[0] / 2).softmax(0).max()), abs=1e-6)

    out = tmp_path / "preds.csv"
    summary = predict_files(car_images, model, output=out, device="cpu", precision="fp32", progress=False, topk=2)
    with out.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[-3:] == ["known", "unknown_score", "error"] and summary.unknown == 1
    (unknown,) = [r for r in rows if r["known"] == "false"]
    assert unknown["class"] == "not one of the 6 known classes" and unknown["make"] == "" and unknown["label"] == ""
    assert unknown["top1_class"] and unknown["top2_class"]  # its closest classes, still there
    assert sum(r["known"] == "true" and r["class"] == r["top1_class"] for r in rows) == 2

    off = p.with_calibration(p.calibration, unknown="off")
    assert off.unknown_threshold is None and {r.unknown_score for r in off.predict(car_images)} == {None}
    predict_files(car_images, model, output=out, device="cpu", precision="fp32", progress=False, unknown="off")
    with out.open(newline="") as f:
        assert "known" not in next(csv.reader(f))  # no threshold in use: no open-set columns
    assert {r.known for r in p.with_calibration(p.calibration, unknown="-1e9").predict(car_images)} == {True}
    assert p.with_calibration(p.calibration, unknown="1.5").unknown_threshold == 1.5
    with pytest.raises(TwinCarError, match="--unknown maybe is not auto, off or a number"):
        p.with_calibration(p.calibration, unknown="maybe")


def test_the_original_projects_pth_is_calibrated_through_a_sidecar_beside_it(tmp_path):
    import timm

    from twincar.inference.predictor import Predictor
    from twincar.models.card import calibration_sidecar
    from twincar.models.checkpoint import export_state_dict
    from twincar.models.loading import write_calibration

    torch.manual_seed(0)
    pth = export_state_dict(timm.create_model("resnet18", num_classes=3), tmp_path / "twincars.pth")
    before = pth.read_bytes()
    names = ["Audi S4 Sedan 2012", "Audi S4 Sedan 2007", "BMW M3 Coupe 2012"]
    assert write_calibration(pth, {"temperature": 1.5, "threshold": 3.0}) == calibration_sidecar(pth)
    assert pth.read_bytes() == before  # the weights file is never touched
    p = Predictor.load(pth, names, architecture="resnet18", device="cpu")
    assert p.temperature == 1.5 and p.unknown_threshold == 3.0
    assert Predictor.load(pth, names, architecture="resnet18", device="cpu", unknown="off").unknown_threshold is None


# -- a trained model: training calibrates; eval, calibrate ------------------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir) -> Path:
    from tests.trained import trained_run

    return trained_run(tmp_path_factory, data_dir)


@pytest.mark.slow  # trains the shared small model once per session
def test_training_fits_a_temperature_that_lowers_the_ece_of_the_held_out_test_split(run, tmp_path):
    from twincar.evaluation.loop import collect_logits
    from twincar.inference.predictor import Predictor

    metrics = json.loads((run / "metrics.json").read_text())
    card = json.loads((run / "model_card.json").read_text())
    ckpt = Path(metrics["best_checkpoint"])
    stored = torch.load(ckpt, weights_only=True)["hyper_parameters"]["calibration"]
    # each model file names its own statistics file beside it; the rest of the calibration is the same
    assert card["calibration"].pop("features")["file"] == "model.unknown.npz"
    assert stored.pop("features")["file"] == f"{ckpt.stem}.unknown.npz"
    assert (ckpt.parent / f"{ckpt.stem}.unknown.npz").is_file()
    assert card["calibration"] == stored and stored["temperature"] == pytest.approx(metrics["val/temperature"])
    assert metrics["test/ece"] < metrics["test/ece_raw"] and metrics["test/nll"] < metrics["test/nll_raw"]
    # the threshold keeps 95% of the validation images it was fitted on, with the logits predict computes
    p = Predictor.load(ckpt, device="cpu", precision="fp32")
    assert p.temperature == stored["temperature"] and p.unknown_threshold == stored["threshold"]
    split = json.loads((run / "split.json").read_text())
    assert stored["images"] == len(split["val"])
    from tests.trained import compose
    from twincar.evaluation.loop import data_config, eval_samples

    cfg = compose("eval", [f"ckpt={ckpt}", f"paths.output_dir={tmp_path}", "data.split=val"])
    data, _ = data_config(cfg)
    samples, margin, _ = eval_samples(data, "val", p.class_names)
    val = collect_logits(p, samples, bbox_margin=margin, progress=False)
    kept = float((p.unknown_scores(val.logits, val.embeddings) >= p.unknown_threshold).mean())
    assert kept == pytest.approx(math.ceil(0.95 * len(samples)) / len(samples))


def test_the_demo_says_not_one_of_the_cars_it_knows_and_shows_the_closest(tiny_export, car_images, tmp_path):
    from twincar.demo import Answerer
    from twincar.inference.predictor import Predictor

    model = calibrated_copy(tiny_export, tmp_path, {"temperature": 1.0, "threshold": 1e9})  # nothing is known
    answer = Answerer(Predictor.load(model, device="cpu"))
    make, _, _, confidence, top5, _, message = answer(str(car_images[0]))
    assert message.startswith("### Not one of the 6 cars I know") and make == "" and confidence == ""
    assert len(top5) == 5 and list(top5)[0] in message  # the closest classes, named and as bars
    make, *_, overlay, message = answer(str(car_images[0]), show_cam=True)  # Grad-CAM on: the same answer
    assert message.startswith("### Not one of the 6 cars I know") and make == "" and overlay is not None


@pytest.mark.slow  # uses the shared trained model
def test_eval_reports_raw_and_calibrated_and_the_open_set_of_the_unknown_synthetic_classes(run, tmp_path):
    from tests.trained import compose
    from twincar.evaluation.recipes import evaluate

    best = json.loads((run / "metrics.json").read_text())["best_checkpoint"]
    logged = json.loads((run / "metrics.json").read_text())
    m = evaluate(compose("eval", [f"ckpt={best}", f"paths.output_dir={tmp_path}", "progress=false", "ood=synthetic"]))
    for name in ("ece", "ece_raw", "nll", "nll_raw", "temperature"):
        assert m[f"test/{name}"] == pytest.approx(logged[f"test/{name}" if name != "temperature" else
                                                         "val/temperature"], abs=1e-4), name
    for name in ("auroc", "fpr95", "known_accepted", "unknown_rejected", "acc_accepted"):  # as training reported
        assert 0 <= m[f"ood/{name}"] <= 1 and m[f"ood/{name}"] == pytest.approx(logged[f"ood/{name}"], abs=1e-4)
    assert m["ood/images"] == 6 * 4  # data.synthetic.unknown_classes=6 classes x test_per_class
    with (tmp_path / "reports" / "predictions.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert sum(int(r["known"]) for r in rows) / len(rows) == pytest.approx(m["ood/known_accepted"])
    named = [r for r in rows if r["known"] == "1"]  # the known test images the threshold still names
    assert sum(r["correct"] == "1" for r in named) / len(named) == pytest.approx(m["ood/acc_accepted"])
    assert (tmp_path / "reports" / "ood_scores.png").stat().st_size > 0


@pytest.mark.slow  # uses the shared trained model
def test_calibrate_refits_an_exported_model_and_stores_it_in_its_card(run, tmp_path):
    from tests.trained import compose
    from twincar.evaluation.recipes import calibrate_model

    d = tmp_path / "export"
    d.mkdir()
    for name in ("model.pth", "model_card.json", "classes.txt"):
        shutil.copy(run / name, d / name)
    cfg = compose("calibrate", [f"ckpt={d / 'model.pth'}", f"run_config={run / 'config.yaml'}",
                                f"paths.output_dir={tmp_path / 'out'}", "progress=false", "tpr=0.5"])
    c = calibrate_model(cfg)
    logged = json.loads((run / "metrics.json").read_text())
    assert c.temperature == pytest.approx(logged["val/temperature"], rel=1e-3)  # the same val images and weights
    card = json.loads((d / "model_card.json").read_text())
    assert card["calibration"]["target_tpr"] == 0.5 and card["calibration"]["threshold"] == pytest.approx(c.threshold)
    assert json.loads((tmp_path / "out" / "calibration.json").read_text())["stored_in"] == str(d / "model_card.json")
    # the training features' statistics beside it, every score's threshold, the default the best AUROC
    assert card["calibration"]["features"]["file"] == "model.unknown.npz" and (d / "model.unknown.npz").is_file()
    assert set(card["calibration"]["thresholds"]) >= {"max_logit", "mahalanobis", "rel_mahalanobis"}
    assert c.score == max(c.auroc, key=c.auroc.get) and "generated images of no car" in c.selected_on


def test_the_synthetic_unknown_classes_are_never_in_the_dataset_and_leave_it_unchanged(tmp_path):
    from twincar.data.synthetic import SyntheticSpec, generate_unknown, select_classes, unknown_class_names

    spec = SyntheticSpec(num_classes=4, unknown_classes=3, test_per_class=2, width=32, height=32)
    assert spec.fingerprint() == SyntheticSpec(num_classes=4, test_per_class=2, width=32, height=32).fingerprint()
    names = unknown_class_names(spec)
    assert len(names) == 3 and not set(names) & set(select_classes(4))
    samples = generate_unknown(tmp_path / spec.fingerprint(), spec)
    assert len(samples) == 6 and all(s.label == -1 and s.path.is_file() for s in samples)
    first = samples[0].path.read_bytes()
    assert generate_unknown(tmp_path / spec.fingerprint(), spec)[0].path.read_bytes() == first  # cached, same files


# -- embeddings and the nearest training cars --------------------------------------------------------------------
def test_neighbours_equal_a_brute_force_search_and_the_index_round_trips(tmp_path):
    from twincar.evaluation.neighbours import CHUNK, NeighbourIndex, knn_metrics, top_k_similar

    g = torch.Generator().manual_seed(0)
    keys = torch.nn.functional.normalize(torch.randn(300, 16, generator=g), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(CHUNK + 7, 16, generator=g), dim=1)  # two chunks
    sims, idx = top_k_similar(queries, keys, 3)
    distances = torch.cdist(queries, keys)  # brute force: the smallest Euclidean distances
    assert torch.equal(idx, distances.argsort(dim=1)[:, :3])
    assert torch.allclose(sims, 1 - distances.gather(1, idx) ** 2 / 2, atol=1e-5)
    _, own = top_k_similar(keys, keys, 1, exclude_self=True)
    assert torch.equal(own[:, 0], torch.cdist(keys, keys).fill_diagonal_(float("inf")).argmin(dim=1))

    labels = torch.arange(300) % 3
    index = NeighbourIndex(keys, labels, [f"img{i}.jpg" for i in range(300)], ["A 2012", "B 2012", "C 2012"])
    loaded = NeighbourIndex.load(index.save(tmp_path / "index"))
    assert torch.equal(loaded.embeddings, keys) and loaded.paths == index.paths
    (first, *_), = loaded.search(queries[:1], 3)
    assert first == (f"img{idx[0, 0]}.jpg", index.class_names[int(labels[idx[0, 0]])], pytest.approx(sims[0, 0]))
    # a query equal to an indexed image finds it (k-NN top-1 of the index on itself is 1)
    assert knn_metrics(index, keys, labels)["test/knn_acc"] == 1.0


def test_an_index_of_another_model_is_one_sentence_not_wrong_neighbours(tmp_path):
    from twincar.evaluation.neighbours import INDEX_META, NeighbourIndex

    keys = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
    folder = NeighbourIndex(keys, torch.arange(6) % 2, [f"{i}.jpg" for i in range(6)], ["A 2012", "B 2012"]).save(
        tmp_path / "index")
    assert NeighbourIndex.load(folder, ["a  2012", "B 2012"]).paths[0] == "0.jpg"  # the one class-name rule
    with pytest.raises(TwinCarError, match=r"was built for other classes than the model's \(label 1 is 'B 2012' "
                                           r"against 'C 2012'\): rebuild it with python -m twincar.index"):
        NeighbourIndex.load(folder, ["A 2012", "C 2012"])
    with pytest.raises(TwinCarError, match="the model's embeddings are 4-d but the neighbour index holds 8-d ones"):
        NeighbourIndex.load(folder).search(torch.ones(1, 4))
    meta = json.loads((folder / INDEX_META).read_text())
    (folder / INDEX_META).write_text(json.dumps({**meta, "paths": meta["paths"][:5]}))  # a build killed half-way
    with pytest.raises(TwinCarError, match=f"{INDEX_META} names 5 images but index.safetensors holds 6"):
        NeighbourIndex.load(folder)


def test_faiss_and_torch_search_give_the_same_neighbours(tmp_path):
    pytest.importorskip("faiss", reason="faiss is not installed (the faiss extra: pip install 'twincar[faiss]')")
    from twincar.evaluation.neighbours import NeighbourIndex, knn_metrics, top_k_similar

    g = torch.Generator().manual_seed(1)
    keys = torch.nn.functional.normalize(torch.randn(2000, 32, generator=g), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(300, 32, generator=g), dim=1)
    for q, exclude_self in ((queries, False), (keys, True)):
        (ts, ti), (fs, fi) = (top_k_similar(q, keys, 5, exclude_self=exclude_self, backend=b)
                              for b in ("torch", "faiss"))
        assert torch.equal(ti, fi) and torch.allclose(ts, fs, atol=1e-5)
    labels = torch.arange(2000) % 7
    indexes = [NeighbourIndex(keys, labels, [f"{i}.jpg" for i in range(2000)], list("ABCDEFG"), b) for b in
               ("torch", "faiss")]
    by_torch, by_faiss = (index.search(queries, 3) for index in indexes)  # faiss: from its index, built once
    assert [[(p, c) for p, c, _ in row] for row in by_torch] == [[(p, c) for p, c, _ in row] for row in by_faiss]
    assert [s for row in by_torch for *_, s in row] == pytest.approx([s for row in by_faiss for *_, s in row], abs=1e-5)
    assert knn_metrics(indexes[0], queries, labels[:300]) == knn_metrics(indexes[1], queries, labels[:300])
    assert NeighbourIndex.load(indexes[1].save(tmp_path / "index")).backend == "faiss"


def test_the_search_backend_falls_back_to_torch_and_a_missing_faiss_is_one_sentence(monkeypatch):
    from twincar.evaluation import neighbours

    monkeypatch.setattr(neighbours, "faiss_installed", lambda: False)
    assert neighbours.resolve_backend("auto") == "torch"
    with pytest.raises(TwinCarError, match=r"backend=faiss needs faiss: pip install 'twincar\[faiss\]'"):
        neighbours.resolve_backend("faiss")
    with pytest.raises(TwinCarError, match="backend=annoy is not a search backend"):
        neighbours.resolve_backend("annoy")


def test_embed_gives_normalised_pre_logit_features(tiny_export, car_images):
    from twincar.inference.predictor import Predictor

    p = Predictor.load(tiny_export, device="cpu", precision="fp32")
    e = torch.from_numpy(p.embed(car_images))
    assert e.shape == (3, p.model.num_features) and torch.allclose(e.norm(dim=1), torch.ones(3), atol=1e-5)
    x = p.engine.input(p.prepare(car_images[0])[None])  # the network's input, as the engine builds it
    with torch.inference_mode():
        features = p.model.forward_head(p.model.forward_features(x), pre_logits=True)
        assert torch.allclose(p.model.get_classifier()(features), p.model(x), atol=1e-4)  # the head's input
    assert torch.allclose(e[0], torch.nn.functional.normalize(features, dim=1)[0], atol=1e-5)


@pytest.mark.parametrize("tta", [None, "flip"])
def test_one_forward_pass_gives_the_logits_and_the_embeddings_of_two(tiny_export, car_images, tta):
    from twincar.evaluation.neighbours import NeighbourIndex
    from twincar.inference.predictor import Predictor

    p = Predictor.load(tiny_export, device="cpu", precision="fp32", tta=tta)
    batch = np.stack([p.prepare(c) for c in car_images])
    raw, calibrated, embeddings = p.outputs_with_embeddings(batch)
    for one, two in zip((raw, calibrated, embeddings), (*p.outputs(batch), p.embeddings(batch)), strict=True):
        assert np.allclose(one, two, atol=1e-5)
    # predict's neighbours come from that pass: the same as searching the embeddings of a second one
    index = NeighbourIndex(torch.from_numpy(p.embed(car_images)), torch.tensor([0, 1, 2]), [str(c) for c in car_images],
                           p.class_names, "torch")
    calls = []
    forward_features = p.model.forward_features
    p.model.forward_features = lambda x: calls.append(len(x)) or forward_features(x)
    found = [r.neighbours for r in p.iter_predict(car_images, neighbours=partial(index.search, k=2))]
    assert calls == [3 * (2 if tta else 1)]  # one batch, one pass through the backbone
    del p.model.forward_features
    expected = index.search(p.embed(car_images), 2)
    assert [[n[:2] for n in row] for row in found] == [[n[:2] for n in row] for row in expected]
    assert found[0][0][0] == str(car_images[0]) and found[0][0][2] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.slow  # uses the shared trained model
def test_the_index_of_a_run_gives_predict_its_nearest_training_cars_and_eval_its_knn_metrics(run, tmp_path):
    from tests.trained import compose
    from twincar.evaluation.neighbours import NeighbourIndex
    from twincar.evaluation.recipes import build_neighbour_index, evaluate
    from twincar.inference.predictor import Predictor
    from twincar.predict import predict_files

    ckpt = Path(json.loads((run / "metrics.json").read_text())["best_checkpoint"])
    folder = build_neighbour_index(compose("index", [f"ckpt={ckpt}", f"out={tmp_path / 'index'}",
                                                     f"paths.output_dir={tmp_path}"]))
    index = NeighbourIndex.load(folder)
    split = json.loads((run / "split.json").read_text())
    assert len(index.paths) == len(split["train"])  # every training image
    with Image.open(index.paths[0]) as image:  # with a thumbnail of each, longer side 128 (never enlarged)
        assert max(index.thumbnail(index.paths[0]).shape[:2]) == min(128, max(image.size))
    assert len(index.thumbnails) == len(index.paths) and all(index.thumbnails)
    test_images = sorted((Path(index.paths[0]).parent.parent / "cars_test").glob("*.jpg"))[:3]
    out = tmp_path / "preds.csv"
    predict_files(test_images, ckpt, output=out, device="cpu", precision="fp32", progress=False, neighbours=2,
                  index=folder, unknown="off")
    with out.open(newline="") as f:
        rows = list(csv.DictReader(f))
    p = Predictor.load(ckpt, device="cpu", precision="fp32")
    brute = (torch.from_numpy(p.embed(test_images)) @ index.embeddings.T).argsort(dim=1, descending=True)[:, :2]
    for row, best in zip(rows, brute.tolist(), strict=True):
        assert [row["nn1_image"], row["nn2_image"]] == [index.paths[i] for i in best]
        assert row["nn1_class"] == index.class_names[int(index.labels[best[0]])]
    m = evaluate(compose("eval", [f"ckpt={ckpt}", f"paths.output_dir={tmp_path / 'eval'}", "progress=false",
                                  f"index={folder}"]))
    assert 0 <= m["test/knn_acc"] <= 1 and 0 <= m["test/recall_at_1"] <= 1


def test_the_far_ood_script_writes_the_same_images_of_no_car_for_a_seed(tmp_path):
    import runpy

    from twincar.evaluation.unknown import write_far_images

    script = runpy.run_path(str(Path(__file__).parents[2] / "scripts" / "far_ood_images.py"))
    script["main"]([str(tmp_path / "a"), "--count", "7", "--size", "48"])
    first = sorted((tmp_path / "a").glob("*.jpg"), key=lambda p: p.name.split("_")[1])
    again = write_far_images(tmp_path / "b", count=7, size=48)
    assert [p.name.split("_")[0] for p in first] == ["noise", "gradient", "shapes"] * 2 + ["noise"]
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in again]
    with Image.open(first[1]) as image:
        assert image.size == (48, 48) and image.mode == "RGB"
