import csv

import pytest

from twincar.classes import main
from twincar.data.classes import (
    parse_car_name,
    read_class_names,
    read_classes_txt,
    same_class_names,
    stanford_cars_class_names,
    write_classes_txt,
)
from twincar.data.formats import read_meta


def test_packaged_names_are_the_devkit_names_in_order(devkit):
    assert stanford_cars_class_names() == read_meta(devkit / "cars_meta.mat")


def test_parse_names_with_multi_word_makes():
    car = parse_car_name("AM General Hummer SUV 2000")
    assert (car.make, car.model, car.year, car.body) == ("AM General", "Hummer SUV", 2000, "SUV")
    car = parse_car_name("Aston Martin V8 Vantage Coupe 2012")
    assert (car.make, car.model, car.year) == ("Aston Martin", "V8 Vantage Coupe", 2012)
    car = parse_car_name("Ram C/V Cargo Van Minivan 2012")
    assert (car.make, car.model, car.body) == ("Ram", "C/V Cargo Van Minivan", "Minivan")
    assert parse_car_name("smart fortwo Convertible 2012").make == "smart"


def test_every_real_name_has_make_model_and_year():
    cars = [parse_car_name(n) for n in stanford_cars_class_names()]
    assert all(c.year and 1990 <= c.year <= 2012 and c.model for c in cars)
    assert len({c.make for c in cars}) == 49  # Stanford Cars has 49 makes
    # year siblings: same family, different year
    s4 = [c for c in cars if c.family == "Audi S4 Sedan"]
    assert sorted(c.year for c in s4) == [2007, 2012]


def test_classes_txt_round_trip(tmp_path):
    names = stanford_cars_class_names()[:5]
    path = write_classes_txt(names, tmp_path / "sub" / "classes.txt")
    assert path.read_text().splitlines() == names
    assert read_classes_txt(path) == names


def test_classes_txt_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_classes_txt(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="empty.txt is empty"):
        read_classes_txt(tmp_path / "empty.txt")


def test_classes_cli_on_the_real_meta_gives_49_makes_and_16_years(devkit, tmp_path, capsys):
    assert main(["--from", str(devkit / "cars_meta.mat"), "--out", str(tmp_path / "out" / "classes.txt")]) == 0
    assert "196 classes, 49 makes, 16 years, years 1991-2012" in capsys.readouterr().out
    assert read_classes_txt(tmp_path / "out" / "classes.txt") == stanford_cars_class_names()
    with open(tmp_path / "out" / "classes.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[7] == {"label": "7", "name": "Aston Martin V8 Vantage Convertible 2012", "make": "Aston Martin",
                       "model": "V8 Vantage Convertible", "year": "2012"}
    assert {r["make"] for r in rows} >= {"AM General", "Aston Martin", "Land Rover"}
    assert len({r["make"] for r in rows}) == 49 and len({r["year"] for r in rows}) == 16
    assert read_class_names(tmp_path / "out" / "classes.csv") == stanford_cars_class_names()


def test_classes_cli_error_is_one_line(tmp_path, capsys):
    (tmp_path / "names.txt").write_text("x")
    assert main(["--from", str(tmp_path / "names.txt"), "--out", str(tmp_path / "c.txt")]) == 2
    assert "cannot read class names from a .txt file" in capsys.readouterr().err


def test_lowercased_names_parse_the_same_and_compare_equal():
    names = stanford_cars_class_names()
    lower = [n.lower() for n in names]
    for n, low in zip(names, lower, strict=True):
        car, car_low = parse_car_name(n), parse_car_name(low)
        assert (car_low.make, car_low.model, car_low.year) == (car.make.lower(), car.model.lower(), car.year)
        assert car_low.body == car.body
    assert same_class_names(names, lower) and not same_class_names(names, lower[::-1])
