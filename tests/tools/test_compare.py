"""compare: every run of a sweep in one table, best first, labelled by what differs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from tests.conftest import run_cli
from twincar.compare import CompareError, compare, main
from twincar.runs import RunsError


def make_job(d: Path, overrides: list[str], metrics: dict | None) -> Path:
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (d / "csv").mkdir()
    if metrics is not None:
        (d / "metrics.json").write_text(json.dumps({**metrics, "best_checkpoint": str(d / "x.ckpt")}))
    return d


@pytest.fixture
def sweep(tmp_path) -> Path:
    """A three-job sweep as Hydra lays it out; job 2 crashed before writing metrics.json; an eval run beside."""
    root = tmp_path / "multiruns" / "2026-01-01_00-00-00_000000"
    make_job(root / "0", ["optimizer=adam", "experiment=smoke"], {"val/acc_best": 0.4, "val/ece": 0.1, "epochs": 3})
    make_job(root / "1", ["optimizer=sgd", "experiment=smoke"], {"val/acc_best": 0.6, "val/ece": 0.3, "epochs": 3})
    make_job(root / "2", ["optimizer=adamw", "experiment=smoke"], None)
    ev = tmp_path / "multiruns" / "evals" / "x"  # eval runs are not training runs
    (ev / ".hydra").mkdir(parents=True)
    (ev / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["ckpt=a.ckpt"]))
    (ev / "reports").mkdir()
    (ev / "reports" / "metrics.json").write_text(json.dumps({"test/acc": 0.9}))
    return root


def test_sweep_table_best_first_labelled_by_the_overrides_that_differ(sweep, capsys):
    runs, table = compare(sweep)
    assert [r.path.name for r in runs] == ["1", "0", "2"]  # sgd 0.6, adam 0.4, then the crashed job
    assert [r.label for r in runs] == ["optimizer=sgd", "optimizer=adam", "optimizer=adamw"]
    assert runs[2].status == "no metrics.json"
    lines = table.splitlines()
    assert lines[0].startswith("| # | run | overrides | val/acc_best | val/ece | epochs")
    assert lines[2] == "| 1 | 1 | optimizer=sgd | 0.6000 | 0.3000 | 3 |"
    assert lines[3] == "| 2 | 0 | optimizer=adam | 0.4000 | 0.1000 | 3 |"
    assert lines[4].startswith("| 3 | 2 | optimizer=adamw | no metrics.json")
    with (sweep / "compare.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["run"], r["label"], r["val/acc_best"]) for r in rows] == [
        ("1", "optimizer=sgd", "0.6"), ("0", "optimizer=adam", "0.4"), ("2", "optimizer=adamw", "")]
    assert rows[0]["overrides"] == "optimizer=sgd experiment=smoke"
    with Image.open(sweep / "compare.png") as img:
        assert img.format == "PNG" and img.size == (800, int(100 * (1.2 + 0.45 * 2)))
    # lower is better for calibration error: adam first
    assert [r.path.name for r in compare(sweep, "val/ece", sweep.parent / "out")[0]] == ["0", "1", "2"]
    assert (sweep.parent / "out" / "compare.csv").is_file()
    assert main([str(sweep)]) == 0 and "| 1 | 1 | optimizer=sgd |" in capsys.readouterr().out


def test_bad_directory_or_metric_says_what_to_pass(tmp_path, sweep):
    with pytest.raises(RunsError, match="is not a directory: pass a sweep directory"):
        compare(tmp_path / "nowhere")
    with pytest.raises(RunsError, match="no training runs below"):
        compare(sweep / "0" / "csv")
    with pytest.raises(CompareError, match=r"no run below .* has metric 'val/f2': pass --sort one of epochs, "):
        compare(sweep, "val/f2")
    assert main([str(tmp_path / "nowhere")]) == 1


@pytest.mark.slow
def test_compare_after_a_real_two_job_sweep(smoke_sweep, tmp_path):
    """python -m twincar.train -m optimizer=adam,sgd (the session's sweep), then python -m twincar.compare on its
    directory."""
    (sweep,) = (smoke_sweep[0] / "outputs" / "multiruns").iterdir()
    proc = run_cli("twincar.compare", str(sweep), "--sort", "val/acc_best", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and not line.startswith("| #")]
    assert len(rows) == 2 and {r.split(" | ")[2] for r in rows} == {"optimizer=adam", "optimizer=sgd"}
    acc = {j: json.loads((sweep / j / "metrics.json").read_text())["val/acc_best"] for j in ("0", "1")}
    expected = sorted(acc, key=lambda j: (-acc[j], j))  # best first, job order on a tie
    assert [r.split(" | ")[1] for r in rows] == expected
    assert "val/acc_make" in (sweep / "compare.csv").read_text().splitlines()[0]
    with Image.open(sweep / "compare.png") as img:  # two finished jobs: two bars
        assert img.format == "PNG" and img.size == (800, int(100 * (1.2 + 0.45 * 2)))
