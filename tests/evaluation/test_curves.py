import pytest
from PIL import Image

from twincar.evaluation.figures import plot_curves, read_epoch_history

# As Lightning's CSVLogger writes it: train and val rows of one epoch are separate lines.
CSV = """epoch,step,train/acc,train/loss,val/acc,val/loss
0,9,,,0.25,1.5
0,9,0.2,1.7,,
1,19,,,0.5,1.2
1,19,0.4,1.3,,
"""


def test_history_merges_rows_of_an_epoch(tmp_path):
    (tmp_path / "metrics.csv").write_text(CSV)
    history = read_epoch_history(tmp_path / "metrics.csv")
    assert history["val/acc"] == {0: 0.25, 1: 0.5}
    assert history["train/loss"] == {0: 1.7, 1: 1.3}
    assert "step" not in history


def test_curves_are_written_as_images(tmp_path):
    (tmp_path / "metrics.csv").write_text(CSV)
    paths = plot_curves(tmp_path / "metrics.csv", tmp_path)
    assert [p.name for p in paths] == ["loss_curve.png", "accuracy_curve.png"]
    for p in paths:
        with Image.open(p) as img:
            assert img.format == "PNG" and img.width > 300


FINE_CSV = """epoch,step,train/acc,train/loss,val/acc,val/loss,val/acc_make,val/acc_family,val/acc_year_in_family
0,9,,,0.25,1.5,0.5,0.4,nan
0,9,0.2,1.7,,,,,
1,19,,,0.5,1.2,0.75,0.6,0.5
1,19,0.4,1.3,,,,,
"""


def test_report_redraws_every_curve_of_a_run_including_the_fine_grained_one(tmp_path):
    from twincar.report import ReportError, main, report

    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "metrics.csv").write_text(FINE_CSV)
    paths = report(tmp_path)
    assert [p.name for p in paths] == ["loss_curve.png", "accuracy_curve.png", "fine_grained_curve.png"]
    for p in paths:
        with Image.open(p) as img:
            assert img.format == "PNG" and img.size == (600, 400)
    assert read_epoch_history(tmp_path / "csv" / "metrics.csv")["val/acc_make"] == {0: 0.5, 1: 0.75}
    with pytest.raises(ReportError, match="csv/metrics.csv not found: pass a training run directory"):
        report(tmp_path / "csv")
    assert main([str(tmp_path), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "fine_grained_curve.png").is_file()
