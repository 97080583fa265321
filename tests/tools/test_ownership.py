"""Every artefact knows which model it belongs to, and no export, calibration or predict loses a previous file
(issue 26's probes; listed in docs/reliability.md)."""

from __future__ import annotations

import csv
import json
import logging
import shutil

import pytest
import torch

from tests.conftest import TINY_NAMES
from twincar.errors import TwinCarError
from twincar.inference.predictor import Predictor


def _other_model(tiny_export, folder):
    """Another model of the same architecture and classes (other weights) exported as model.pth + card."""
    from twincar.data.preprocess import Preprocess
    from twincar.models.card import build_model_card, write_model_card
    from twincar.models.checkpoint import state_fingerprint

    state = torch.load(tiny_export, weights_only=True)
    state["fc.bias"] = state["fc.bias"] + 1
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "model.pth")
    write_model_card(folder, build_model_card(TINY_NAMES, Preprocess(image_size=64), "resnet18",
                                              calibration={"temperature": 2.0, "threshold": 0.5},
                                              fingerprint=state_fingerprint(state)))
    return folder / "model.pth"


@pytest.mark.slow  # seconds of loads and predicts (the fast set keeps the probe table)
def test_export_never_replaces_another_models_card_and_keeps_its_own_calibration(tiny_export, tmp_path, caplog):
    """``export ckpt=RUN/checkpoints/last.ckpt out=RUN``: the run's card (the only home of model.pth's calibration)
    is another model's, so the export is refused and the card left as it was; an export of the same model into its
    own folder keeps the calibration its card carries."""
    from twincar.export import export_model

    run = _other_model(tiny_export, tmp_path / "run").parent
    before = (run / "model_card.json").read_text()
    with pytest.raises(TwinCarError, match=rf"out={run} already holds the model_card.json of another model "
                                           r"\(fingerprint [0-9a-f]{16}; ckpt=.* is [0-9a-f]{16}\): exporting there "
                                           r"would replace it"):
        export_model(tiny_export, "hf", run)
    assert (run / "model_card.json").read_text() == before and not (run / "config.json").exists()
    uncalibrated = tmp_path / "uncalibrated" / "model.pth"  # the same weights, a card without calibration
    uncalibrated.parent.mkdir()
    shutil.copy(run / "model.pth", uncalibrated)
    card = json.loads(before)
    del card["calibration"]
    (uncalibrated.parent / "model_card.json").write_text(json.dumps(card))
    export_model(uncalibrated, "hf", run)
    card = json.loads((run / "model_card.json").read_text())
    assert card["calibration"] == json.loads(before)["calibration"]  # kept: the same model's
    with caplog.at_level(logging.WARNING):
        export_model(tiny_export, "safetensors", tmp_path / "fresh")  # tiny_export carries no calibration
    assert "carries no calibration: the export names every car, never 'unknown'" in caplog.text
    assert "python -m twincar.calibrate" in caplog.text


def test_calibrate_refuses_a_split_it_cannot_fit_on_and_keeps_a_dated_backup(tmp_path):
    from twincar.evaluation.loop import EvalError
    from twincar.evaluation.recipes import MIN_CALIBRATION_IMAGES, backup_calibration, check_calibration_split

    with pytest.raises(EvalError, match=rf"the val split has 1 labelled image\(s\) of 1 class\(es\): a calibration "
                                        rf"needs at least {MIN_CALIBRATION_IMAGES} images of at least 2 classes"):
        check_calibration_split(torch.tensor([3]), "val", "model.pth")
    with pytest.raises(EvalError, match=r"40 labelled image\(s\) of 1 class\(es\).*nothing stored, m.pth keeps"):
        check_calibration_split(torch.zeros(40, dtype=torch.long), "test", "m.pth")
    check_calibration_split(torch.arange(6) % 2, "val", "m.pth")
    backup = backup_calibration(tmp_path / "model.pth", {"temperature": 1.5})
    assert backup.name.startswith("model.calibration-") and json.loads(backup.read_text()) == {"temperature": 1.5}


def _index(predictor, images, folder, fingerprint="own"):
    from twincar.evaluation.neighbours import NeighbourIndex

    embeddings = torch.from_numpy(predictor.embed(images))
    return NeighbourIndex(embeddings, torch.tensor([0, 1, 2]), [str(p) for p in images], list(TINY_NAMES),
                          fingerprint=predictor.fingerprint if fingerprint == "own" else fingerprint).save(folder)


@pytest.mark.slow  # seconds of loads and predicts (the fast set keeps the probe table)
def test_the_neighbour_index_is_the_models_own_and_neighbours_are_capped_at_its_size(tiny_export, car_images,
                                                                                   tmp_path):
    from twincar.predict import predict_files

    p = Predictor.load(tiny_export, device="cpu")
    index = _index(p, car_images, tmp_path / "index")
    out = tmp_path / "near.csv"
    predict_files(car_images, tiny_export, output=out, neighbours=100000, index=index, progress=False, topk=1)
    with out.open(newline="") as f:
        header = next(csv.reader(f))
    assert sum(c.startswith("nn") and c.endswith("_image") for c in header) == 3  # the index's 3 images, not 100000
    other = _index(p, car_images, tmp_path / "other", fingerprint="0123456789abcdef")
    with pytest.raises(TwinCarError, match=rf"^{other} belongs to another model \(fingerprint 0123456789abcdef; this "
                                           rf"model's is {p.fingerprint}\): rebuild it with python -m twincar.index"):
        predict_files(car_images, tiny_export, output=out, neighbours=1, index=other, progress=False)
    (other / "index.json").write_text("{not json")
    with pytest.raises(TwinCarError, match=r"index.json is not valid JSON .*: rebuild it"):
        predict_files(car_images, tiny_export, output=out, neighbours=1, index=other, progress=False)
    tensors = index / "index.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:100])
    with pytest.raises(TwinCarError, match=r"index.safetensors cannot be read .*: rebuild it"):
        predict_files(car_images, tiny_export, output=out, neighbours=1, index=index, progress=False)


@pytest.mark.slow  # seconds of loads and predicts (the fast set keeps the probe table)
def test_predict_shards_are_the_jobs_own(tiny_export, car_images, tmp_path, caplog):
    """A user's own .parquet in OUTPUT.shards/ survives the merge; a shard copied in from another job is named
    and ignored on --resume (its row is predicted again); a job of another model is refused; a plain predict into
    an output a sharded job is writing stops in one sentence."""
    from twincar.inference.results import Prediction
    from twincar.inference.shards import JOB_FILE, file_key, to_record, write_shard
    from twincar.inference.writers import job_lock, shard_dir
    from twincar.predict import predict_files

    out = tmp_path / "predictions.csv"
    folder = shard_dir(out)
    folder.mkdir()
    (folder / "mine.parquet").write_bytes(b"the user's own file")
    fake = Prediction(source="x.jpg", name=TINY_NAMES[2], label=2, confidence=0.5, topk=[(TINY_NAMES[2], 0.5)],
                      num_classes=6)
    foreign = write_shard(folder / "0badc0de-00000-000000.parquet", [to_record(fake, file_key(car_images[0]))])
    renamed = write_shard(folder / "aaaaaaaa-00000-000000.parquet", [to_record(fake, file_key(car_images[1]))],
                          "0123456789abcdef")  # named as the job's, predicted by another model
    fingerprint = Predictor.load(tiny_export, device="cpu").fingerprint
    (folder / JOB_FILE).write_text(json.dumps({"fingerprint": fingerprint, "topk": 1, "runs": ["aaaaaaaa"]}))
    with caplog.at_level(logging.WARNING):
        summary = predict_files(car_images, tiny_export, output=out, resume=True, topk=1, progress=False)
    assert f"1 shard file(s) in {folder} are not this job's (0badc0de-00000-000000.parquet" in caplog.text
    assert f"shard {renamed} was predicted by another model (fingerprint 0123456789abcdef" in caplog.text
    assert summary.resumed == 0  # neither copied shard's row was used
    with out.open(newline="") as f:
        assert next(csv.DictReader(f))["confidence"] != "0.5"
    assert (folder / "mine.parquet").read_bytes() == b"the user's own file" and foreign.is_file()

    (folder / JOB_FILE).write_text(json.dumps({"fingerprint": "0123456789abcdef", "runs": ["0badc0de"]}))
    with pytest.raises(TwinCarError, match=rf"{folder / JOB_FILE} belongs to another model \(fingerprint "
                                           r"0123456789abcdef; this model's is [0-9a-f]{16}\): resume with the model"):
        predict_files(car_images, tiny_export, output=out, resume=True, topk=1, progress=False)

    plain = tmp_path / "plain.csv"
    with job_lock(shard_dir(plain)):  # a sharded job writing plain.csv (this process: alive)
        with pytest.raises(TwinCarError, match=r"another predict job \(PID .*\) is writing into .*plain.csv.shards"):
            predict_files(car_images, tiny_export, output=plain, progress=False)
    assert not plain.exists()
    predict_files(car_images, tiny_export, output=plain, progress=False)
    assert plain.is_file() and not shard_dir(plain).exists()


@pytest.mark.slow  # the session's trained run
def test_the_docs_export_recipe_keeps_the_unknown_answer(trained_run, tmp_path):
    """docs/deploy.md exports RUN/model.pth: the export carries the run's calibration (temperature and unknown
    threshold), so it still answers "not one of the known classes"."""
    from twincar.export import export_model

    run_card = json.loads((trained_run / "model_card.json").read_text())
    for fmt in ("safetensors", "hf"):
        weights = export_model(trained_run / "model.pth", fmt, tmp_path / fmt)
        p = Predictor.load(f"local-dir:{weights.parent}" if fmt == "hf" else weights, device="cpu")
        assert p.unknown_threshold == run_card["calibration"]["threshold"] is not None
        assert p.temperature == run_card["calibration"]["temperature"]
