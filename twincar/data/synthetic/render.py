"""Drawing one synthetic car: what a class looks like, and one random image of it.

What identifies a class is *shape*, organised like the Stanford Cars names themselves:

* the **model** (``CarName.family``) sets the silhouette: the body type named in the class
  ("Sedan", "SUV", "Crew Cab", ...) picks a template and a stable hash of the family name sets
  its proportions (roof height, hood and trunk length, wheel size and base, window layout,
  roundness);
* the **make** sets features shared by all its models: the wheel-rim pattern, the grille shape
  and a side crease line;
* the **year** sets only a small "facelift" detail: head- and taillight shapes and a thin side
  trim. Siblings (same family, different years) always get different details.

Everything else is random per image (:class:`Nuisance`, scaled by one ``difficulty`` knob) and
carries no class information. :mod:`twincar.data.synthetic` writes datasets of these images.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from twincar.data.classes import CarName, parse_car_name, stanford_cars_class_names

# Fraction of images saved as single-channel (mode "L") JPEGs, whatever the difficulty.
GRAYSCALE_FRACTION = 0.06
_SUPERSAMPLE = 2  # cars are drawn at 2x and box-downsampled: cheap anti-aliasing
_CAMERA_DISTANCE = 2.2  # in car lengths; sets how strong the 3/4 perspective is

# --------------------------------------------------------------------------------------------
# What a class looks like (fixed by its name)

BODY_KINDS = ("sedan", "coupe", "convertible", "hatchback", "wagon", "suv", "pickup", "van", "minivan")
_BODY_WORDS = {
    "Sedan": "sedan", "Coupe": "coupe", "Convertible": "convertible", "Hatchback": "hatchback",
    "Wagon": "wagon", "SUV": "suv", "Cab": "pickup", "SuperCab": "pickup", "Van": "van", "Minivan": "minivan",
}
# Official families whose name states no body type, with the body of the real car.
_BODY_OVERRIDES = {
    "Acura TL Type-S": "sedan", "Acura Integra Type R": "coupe", "Buick Regal GS": "sedan",
    "Chevrolet Corvette ZR1": "coupe", "Chevrolet Corvette Ron Fellows Edition Z06": "coupe",
    "Chevrolet HHR SS": "wagon", "Chevrolet Cobalt SS": "coupe", "Chevrolet TrailBlazer SS": "suv",
    "Chrysler 300 SRT-8": "sedan", "Dodge Challenger SRT8": "coupe", "Dodge Charger SRT-8": "sedan",
    "FIAT 500 Abarth": "hatchback", "Jaguar XK XKR": "coupe", "Lamborghini Gallardo LP 570-4 Superleggera": "coupe",
}
# Base proportions per body kind, in car lengths (x: 0 = rear, 1 = front; y: up from the ground).
# r wheel radius, xr/xf axles, c sill, b belt line, t roof, h hood at the windscreen, hn hood at
# the nose, d tail top, tail_x/deck_x/roof_rx/roof_fx/cowl_x/nose_x: x of tail top, rear-window
# foot, roof ends, windscreen foot, nose top.
_TEMPLATES: dict[str, dict[str, float]] = {
    "sedan": dict(r=.085, xr=.2, xf=.79, c=.055, b=.19, t=.29, h=.185, hn=.165, d=.2, tail_x=.015,
                  deck_x=.19, roof_rx=.35, roof_fx=.6, cowl_x=.71, nose_x=.95),
    "coupe": dict(r=.08, xr=.2, xf=.79, c=.05, b=.165, t=.245, h=.16, hn=.13, d=.17, tail_x=.025,
                  deck_x=.1, roof_rx=.4, roof_fx=.57, cowl_x=.7, nose_x=.965),
    "convertible": dict(r=.088, xr=.2, xf=.79, c=.05, b=.175, t=.25, h=.17, hn=.14, d=.18, tail_x=.02,
                        deck_x=.24, roof_rx=.38, roof_fx=.57, cowl_x=.68, nose_x=.96),
    "hatchback": dict(r=.095, xr=.15, xf=.84, c=.055, b=.205, t=.345, h=.19, hn=.17, d=.24, tail_x=.0,
                      deck_x=.015, roof_rx=.14, roof_fx=.55, cowl_x=.71, nose_x=.965),
    "wagon": dict(r=.085, xr=.19, xf=.8, c=.055, b=.19, t=.3, h=.185, hn=.165, d=.215, tail_x=.0,
                  deck_x=.008, roof_rx=.035, roof_fx=.6, cowl_x=.71, nose_x=.955),
    "suv": dict(r=.12, xr=.19, xf=.8, c=.09, b=.265, t=.42, h=.255, hn=.235, d=.28, tail_x=.0,
                deck_x=.006, roof_rx=.03, roof_fx=.65, cowl_x=.75, nose_x=.975),
    "pickup": dict(r=.115, xr=.17, xf=.81, c=.085, b=.245, t=.39, h=.24, hn=.225, d=.245, tail_x=.0,
                   deck_x=.0, roof_rx=.44, roof_fx=.63, cowl_x=.73, nose_x=.975),
    "van": dict(r=.085, xr=.16, xf=.83, c=.06, b=.25, t=.47, h=.25, hn=.2, d=.45, tail_x=.0,
                deck_x=.0, roof_rx=.012, roof_fx=.8, cowl_x=.9, nose_x=.985),
    "minivan": dict(r=.09, xr=.18, xf=.81, c=.06, b=.225, t=.395, h=.205, hn=.17, d=.25, tail_x=.0,
                    deck_x=.006, roof_rx=.06, roof_fx=.56, cowl_x=.82, nose_x=.975),
}
# How far each proportion may move between models of one body kind (+-, car lengths).
_SPREAD = dict(r=.01, xr=.025, xf=.025, c=.01, b=.018, t=.03, h=.015, hn=.015, deck_x=.05,
               roof_rx=.05, roof_fx=.05, cowl_x=.03, nose_x=.015)
_RIM_SPOKES = (0, 3, 4, 5, 6, 7, 8, 10)
GRILLES = ("slot", "tall", "kidney", "trapezoid", "round", "mesh")
CREASES = ("none", "straight", "wedge", "arc")
# Year details: (headlight shape, taillight shape, side trim); siblings get consecutive entries.
YEAR_DETAILS = (
    ("round", "vertical", "none"),
    ("swept", "horizontal", "stripe"),
    ("rect", "hook", "double"),
    ("strip", "dots", "rocker"),
)

Point = tuple[float, float]


@dataclass(frozen=True)
class MakeStyle:
    """Features shared by every model of a make."""

    spokes: int  # 0 = a disc with holes
    rim_ratio: float  # rim radius / tyre radius
    spoke_width: float  # in tyre radii
    grille: str  # one of GRILLES
    crease: str  # one of CREASES


@dataclass(frozen=True)
class CarDesign:
    """Everything about a class's appearance, fixed by its name; coordinates in car lengths,
    seen from the car's left side facing right (x: 0 rear .. 1 front, y: up from the ground)."""

    name: str
    body: str  # one of BODY_KINDS
    outline: tuple[Point, ...]  # smoothed body silhouette
    glass: tuple[Point, ...]  # side windows (one polygon, split by the pillars)
    surround: tuple[str, tuple[Point, ...]] | None  # (role, polygon) window frame under the glass
    pillars: tuple[tuple[Point, ...], ...]  # body-coloured bars across the glass
    extras: tuple[tuple[str, tuple[Point, ...]], ...]  # (role, polygon); role: "dark", "chrome", "glass", "body"
    door_seams: tuple[float, ...]  # x of vertical door gaps
    wheels: tuple[tuple[float, float], ...]  # (x centre, radius); centre height = radius
    sill: float
    belt: float
    roof: float
    head_at: Point  # headlight centre
    tail_at: Point  # taillight centre
    make: MakeStyle
    year_detail: tuple[str, str, str]  # an entry of YEAR_DETAILS


def _unit_values(key: str, count: int = 32) -> np.ndarray:
    """``count`` stable pseudo-random numbers in [0, 1) derived from ``key`` (sha256, not hash())."""
    blocks = [hashlib.sha256(f"twincar-synthetic/{key}/{i}".encode()).digest() for i in range(count // 8 + 1)]
    words = np.frombuffer(b"".join(blocks), dtype=">u4")[:count]
    return words.astype(np.float64) / 2.0**32


def body_kind(car: CarName) -> str:
    """The body template for a class: from the body word of its name, else from what the real car
    is, else (a name outside the official list) a stable choice among sedan, coupe and hatchback."""
    if car.body is not None:
        return _BODY_WORDS[car.body]
    if car.family in _BODY_OVERRIDES:
        return _BODY_OVERRIDES[car.family]
    return ("sedan", "coupe", "hatchback")[int(_unit_values("body/" + car.family, 1)[0] * 3)]


@cache
def make_style(make: str) -> MakeStyle:
    """The make's shared features, from a stable hash of the make name."""
    u = _unit_values("make/" + make, 8)
    return MakeStyle(
        spokes=_RIM_SPOKES[int(u[0] * len(_RIM_SPOKES))],
        rim_ratio=float(0.56 + 0.16 * u[1]),
        spoke_width=float(0.1 + 0.12 * u[2]),
        grille=GRILLES[int(u[3] * len(GRILLES))],
        crease=CREASES[int(u[4] * len(CREASES))],
    )


def year_detail(car: CarName) -> tuple[str, str, str]:
    """The small detail set by the year. Years of one family (as in the official list) take
    consecutive entries of YEAR_DETAILS from a family-dependent start, so official siblings always
    differ (a year that is not in the list is ranked among the official ones)."""
    official = (parse_car_name(n) for n in stanford_cars_class_names())
    years = sorted({c.year for c in official if c.family == car.family and c.year is not None})
    if car.year is not None and car.year not in years:
        years = sorted(years + [car.year])
    rank = years.index(car.year) if car.year in years else 0
    start = int(_unit_values("year/" + car.family, 1)[0] * len(YEAR_DETAILS))
    return YEAR_DETAILS[(start + rank) % len(YEAR_DETAILS)]


def _chaikin(points: list[Point], ratio: float, iterations: int = 2) -> np.ndarray:
    """Round the corners of a closed polygon (Chaikin corner cutting); larger ratio = rounder."""
    p = np.asarray(points, dtype=np.float64)
    for _ in range(iterations):
        q = np.roll(p, -1, axis=0)
        p = np.stack([p * (1 - ratio) + q * ratio, p * ratio + q * (1 - ratio)], axis=1).reshape(-1, 2)
    return p


def _x_on(line: tuple[Point, Point], y: float) -> float:
    """x where the (extended) line through two points reaches height y."""
    (x0, y0), (x1, y1) = line
    return x0 if abs(y1 - y0) < 1e-9 else x0 + (x1 - x0) * (y - y0) / (y1 - y0)


def _quad(x0: float, x1: float, y0: float, y1: float, lean: float = 0.0) -> tuple[Point, ...]:
    """A bar from (x0..x1, y0) to (x0..x1 shifted by lean, y1)."""
    return ((x0, y0), (x1, y0), (x1 + lean, y1), (x0 + lean, y1))


@cache
def car_design(name: str) -> CarDesign:
    """The (cached) shape of one class: body template + model proportions + make + year details."""
    car = parse_car_name(name)
    kind = body_kind(car)
    u = _unit_values("model/" + car.family, 40)
    p = dict(_TEMPLATES[kind])
    for i, (key, spread) in enumerate(_SPREAD.items()):
        p[key] += spread * (2 * u[i] - 1)
    words = car.model.split()
    cab = 0 if "Regular" in words else 2 if ("Crew" in words or "Quad" in words) else 1
    if kind == "pickup":  # the cab's rear wall moves with the cab size; the bed is behind it
        p["roof_rx"] = (0.45, 0.385, 0.32)[cab] + 0.02 * (2 * u[20] - 1)
    p["h"] = min(p["h"], p["b"] - 0.002)
    p["hn"] = min(p["hn"], p["h"] - 0.01)
    p["d"] = max(p["d"], p["b"]) if kind not in ("van",) else p["t"] - 0.02
    r, c, b, t, h, hn, d = (p[k] for k in ("r", "c", "b", "t", "h", "hn", "d"))
    x_keys = ("tail_x", "deck_x", "roof_rx", "roof_fx", "cowl_x", "nose_x")
    tail_x, deck_x, roof_rx, roof_fx, cowl_x, nose_x = (p[k] for k in x_keys)
    if kind in ("hatchback", "wagon", "suv", "van", "minivan"):
        deck_x = min(deck_x, roof_rx - 0.01)
    roundness = 0.12 + 0.16 * u[21] if kind not in ("van", "suv", "pickup") else 0.08 + 0.1 * u[21]

    nose = [(nose_x, hn), (1.0, c + 0.45 * (hn - c)), (0.975, c)]
    extras: list[tuple[str, tuple[Point, ...]]] = []
    if kind == "pickup":
        cab_x = roof_rx - 0.015
        outline = [(0.02, c), (0.0, c + 0.4 * (b - c)), (0.0, b), (cab_x - 0.02, b), (cab_x, t - 0.012),
                   (roof_rx, t), (roof_fx, t), (cowl_x, h), *nose]
        rear_line = ((cab_x, b), (roof_rx, t))
        extras.append(("dark", _quad(cab_x - 0.03, cab_x - 0.022, c + 0.02, b - 0.005)))  # bed / cab gap
        extras.append(("dark", _quad(0.015, cab_x - 0.035, b - 0.016, b - 0.008)))  # bed rail
    elif kind == "convertible":
        outline = [(0.03, c), (0.0, c + 0.4 * (d - c)), (tail_x, d), (deck_x, d + 0.005), (deck_x + 0.03, b + 0.004),
                   (cowl_x, h), *nose]
        rear_line = ((deck_x, d), (deck_x, t))
        top_x = cowl_x - 0.09 - 0.03 * u[22]
        extras.append(("dark", ((cowl_x, h), (cowl_x + 0.012, h), (top_x + 0.012, b + 0.085), (top_x, b + 0.085))))
        windscreen = ((cowl_x - 0.014, h + 0.004), (top_x + 0.004, b + 0.078), (top_x - 0.02, b + 0.078),
                      (cowl_x - 0.06, h + 0.004))
        extras.append(("glass", windscreen))
        for hx in (deck_x + 0.09, deck_x + 0.23):  # headrests
            extras.append(("dark", _quad(hx, hx + 0.035, b, b + 0.05, lean=-0.006)))
        extras.append(("dark", _quad(deck_x - 0.04, deck_x + 0.04, d, d + 0.022, lean=0.01)))  # folded top
    else:
        outline = [(0.03, c), (0.0, c + 0.4 * (d - c)), (tail_x, d), (deck_x, d + 0.005), (roof_rx, t),
                   (roof_fx, t), (cowl_x, h), *nose]
        rear_line = ((deck_x, d), (roof_rx, t))
    front_line = ((roof_fx, t), (cowl_x, h))

    glass: tuple[Point, ...] = ()
    pillars: list[tuple[Point, ...]] = []
    seams = [min(cowl_x - 0.02, p["xf"] - 1.3 * r)]
    if kind != "convertible":
        y0, y1, inset = b + 0.008, t - 0.024, 0.016
        x0b, x0t = _x_on(rear_line, y0) + inset, _x_on(rear_line, y1) + inset
        x1b, x1t = _x_on(front_line, y0) - inset, _x_on(front_line, y1) - inset
        if kind == "van" and "Cargo" in words:
            x0b = x0t = roof_fx - 0.1  # cargo vans: no side windows behind the driver
        glass = ((x0b, y0), (x1b, y0), (x1t, y1), (x0t, y1))
        n_windows = {"sedan": 2 + (u[23] > 0.6), "coupe": 1 + (u[23] > 0.5), "hatchback": 2 + (u[23] > 0.5),
                     "wagon": 3, "suv": 3, "pickup": 1 if cab == 0 else 2, "van": 1 if "Cargo" in words else 3,
                     "minivan": 3}[kind]
        for k in range(1, n_windows):
            f = k / n_windows + 0.08 * (2 * u[24 + k] - 1)
            xb, xt = x0b + f * (x1b - x0b), x0t + f * (x1t - x0t)
            w = 0.018 + 0.012 * (k == n_windows - 1 and n_windows > 2)
            pillars.append(((xb - w / 2, y0 - 0.004), (xb + w / 2, y0 - 0.004),
                            (xt + w / 2, y1 + 0.004), (xt - w / 2, y1 + 0.004)))
            if k == 1 or n_windows == 2:
                seams.append(xb)
        if kind in ("sedan", "wagon", "suv", "minivan") or (kind == "pickup" and cab == 2):
            seams.append(max(x0b + 0.01, p["xr"] + 1.3 * r))
    else:
        seams.append(deck_x + 0.06)
    if kind == "van":
        seams = [roof_fx + 0.02, roof_fx - 0.12]
    # model-level trim: window frame, lower cladding, roof rails
    surround = None
    frame = ("chrome", "dark", None)[int(u[30] * 3)]
    if glass and frame:
        (gx0, gy0), (gx1, _), (gx2, gy1), (gx3, _) = glass
        e = 0.009
        surround = (frame, ((gx0 - e, gy0 - e), (gx1 + e, gy0 - e), (gx2 + e, gy1 + e), (gx3 - e, gy1 + e)))
    if kind in ("suv", "pickup") or u[31] < 0.25:
        extras.append(("dark", _quad(0.04, 0.96, c - 0.002, c + 0.03 + 0.02 * u[32])))
    if kind in ("wagon", "suv", "minivan") and u[33] < 0.7:
        x0, x1 = roof_rx + 0.04, roof_fx - 0.04
        rails = ((x0, t - 0.01), (x1, t - 0.01), (x1, t + 0.016), (x1 - 0.02, t + 0.016), (x1 - 0.02, t + 0.008),
                 (x0 + 0.02, t + 0.008), (x0 + 0.02, t + 0.016), (x0, t + 0.016))
        extras.append(("dark", rails))
    wheels = ((p["xr"], r), (p["xf"], r))
    head_at = (nose_x - 0.02 + 0.3 * (1.0 - nose_x), hn - 0.022)
    tail_at = (tail_x + 0.022, d - 0.03)
    return CarDesign(
        name=car.full, body=kind, outline=tuple(map(tuple, _chaikin(outline, roundness))), glass=glass,
        surround=surround,
        pillars=tuple(pillars), extras=tuple(extras), door_seams=tuple(sorted(set(seams))), wheels=wheels,
        sill=c, belt=b, roof=t, head_at=head_at, tail_at=tail_at, make=make_style(car.make),
        year_detail=year_detail(car),
    )


# --------------------------------------------------------------------------------------------
# Drawing one image


@dataclass(frozen=True)
class Nuisance:
    """Ranges of the per-image nuisance for one difficulty; see :meth:`from_difficulty`."""

    scale: tuple[float, float]  # car length as a fraction of the image width (uniform)
    max_yaw_deg: float  # 3/4 view: perspective turn, either way (uniform)
    roll_std_deg: float  # camera roll (normal)
    out_of_frame: float  # how far the car may leave the frame, fraction of the width
    p_studio: float  # plain backdrop and floor; the rest outdoor (sky, ground, road) ...
    p_abstract: float  # ... or random colour fields
    clutter_mean: float  # mean number of clutter shapes in the background (Poisson)
    p_occluder: float  # chance of a pole or bush in front of the car
    blur_max: float  # Gaussian blur radius in output pixels (uniform from 0)
    light_std: float  # log-normal spread of brightness and of contrast
    cast_std: float  # per-channel colour-cast spread
    noise_max: float  # sensor-noise standard deviation, 0-255 scale (uniform from 0.5)
    detail_scale: float  # size of the year detail (lights, trim) relative to difficulty 0

    @classmethod
    def from_difficulty(cls, difficulty: float) -> Nuisance:
        """Every range grows linearly with ``difficulty`` in [0, 1]. The slopes are calibrated so
        that the default 0.5 is learnable from scratch in a few CPU epochs (a ResNet at 64 px
        reaches roughly 40-50% on the 14 default classes) while 1.0 is much harder."""
        d = float(difficulty)
        return cls(
            scale=(0.86 - 0.12 * d, 0.95 - 0.03 * d), max_yaw_deg=3 + 9 * d, roll_std_deg=0.5 + 1.5 * d,
            out_of_frame=0.03 * d, p_studio=0.85 - 0.35 * d, p_abstract=0.175 * d, clutter_mean=0.2 + 1.5 * d,
            p_occluder=0.125 * d, blur_max=0.2 + 0.35 * d, light_std=0.04 + 0.1 * d, cast_std=0.02 + 0.03 * d,
            noise_max=1.5 + 3.5 * d, detail_scale=1.0 - 0.25 * d,
        )



@dataclass(frozen=True)
class _Pose:
    """Maps car coordinates to canvas pixels: perspective yaw, scale, roll, mirror, shift."""

    length: float  # car length in canvas pixels
    yaw: float  # radians; 0 = pure side view
    roll: float  # radians
    flip: bool  # True: the car faces left
    tx: float = 0.0
    ty: float = 0.0

    def project(self, points) -> np.ndarray:
        p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        x, y = p[:, 0] - 0.5, p[:, 1]
        k = _CAMERA_DISTANCE / (_CAMERA_DISTANCE + x * math.sin(self.yaw))
        u, v = x * math.cos(self.yaw) * k * self.length, -y * k * self.length
        cr, sr = math.cos(self.roll), math.sin(self.roll)
        px, py = u * cr - v * sr, u * sr + v * cr
        if self.flip:
            px = -px
        return np.stack([px + self.tx, py + self.ty], axis=1)


def _xy(points: np.ndarray) -> list[tuple[float, float]]:
    return [(float(a), float(b)) for a, b in points]


def _circle(cx: float, cy: float, radius: float, n: int = 28) -> np.ndarray:
    a = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + radius * np.cos(a), cy + radius * np.sin(a)], axis=1)


# Body paints (not related to the class), roughly as common as on real roads.
PAINTS = np.array([(236, 236, 233), (200, 201, 204), (160, 162, 166), (115, 117, 121), (28, 28, 31),
                   (175, 35, 40), (55, 85, 150), (205, 190, 155)], dtype=np.float64)
PAINT_WEIGHTS = np.array([0.22, 0.17, 0.15, 0.12, 0.1, 0.1, 0.08, 0.06])


def _car_colour(rng: np.random.Generator) -> np.ndarray:
    """A random body colour from the common paints, slightly varied; not related to the class."""
    colour = PAINTS[rng.choice(len(PAINTS), p=PAINT_WEIGHTS)] * rng.uniform(0.94, 1.06) + rng.normal(0, 3, 3)
    return np.clip(colour, 0, 255)


def _background(rng: np.random.Generator, w: int, h: int, nz: Nuisance, ground_y: float) -> Image.Image:
    """Studio, outdoor or abstract background with clutter; ``ground_y`` is where the car stands."""
    style = rng.choice(3, p=[nz.p_studio, 1 - nz.p_studio - nz.p_abstract, nz.p_abstract])
    rows = np.linspace(0, 1, h)[:, None]
    if style == 0:  # studio / showroom: light plain walls and floor
        top = rng.uniform(150, 250) + rng.normal(0, 8, 3)
        bottom = top * rng.uniform(0.7, 1.05)
    elif style == 1:  # sky
        top = np.array([90, 140, 210]) * rng.uniform(0.7, 1.15) + rng.normal(0, 20, 3)
        bottom = np.array([200, 215, 230]) * rng.uniform(0.8, 1.1) + rng.normal(0, 15, 3)
    else:
        top, bottom = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    img = np.broadcast_to(top * (1 - rows[:, :, None]) + bottom * rows[:, :, None], (h, 1, 3))
    img = Image.fromarray(np.repeat(np.clip(img, 0, 255), w, axis=1).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    horizon = rng.uniform(0.3, 0.95) * ground_y
    if style != 2 or rng.random() < 0.5:
        if style == 0:
            floor = np.clip(np.asarray(img.getpixel((0, h - 1)), np.float64) * rng.uniform(0.75, 1.0), 0, 255)
        else:
            floor = (np.array([95, 95, 98]) if rng.random() < 0.6 else np.array([80, 120, 60])) * rng.uniform(0.6, 1.3)
        draw.rectangle((0, horizon, w, h), fill=tuple(int(v) for v in np.clip(floor + rng.normal(0, 8, 3), 0, 255)))
        if style == 1 and rng.random() < 0.5:  # lane marking
            y = rng.uniform(ground_y + 0.02 * h, h)
            for x in np.arange(rng.uniform(-w * 0.2, 0), w, w * 0.18):
                draw.rectangle((x, y, x + w * 0.09, y + h * 0.01), fill=(225, 225, 210))
    for _ in range(rng.poisson(nz.clutter_mean)):  # clutter: buildings, trees, poles, boxes
        base = np.asarray(img.getpixel((int(rng.integers(w)), int(rng.integers(h)))), dtype=np.float64)
        colour = tuple(int(v) for v in 0.5 * base + 0.5 * rng.uniform(20, 235, 3))  # muted
        kind = rng.integers(4)
        x, y = rng.uniform(-0.1 * w, w), rng.uniform(0, horizon + 0.1 * h)
        sw, sh = rng.uniform(0.04, 0.35) * w, rng.uniform(0.05, 0.4) * h
        if kind == 0:
            draw.rectangle((x, y - sh, x + sw, y), fill=colour)
        elif kind == 1:
            draw.ellipse((x, y - sh, x + sw, y), fill=colour)
        elif kind == 2:
            draw.line((x, rng.uniform(0, h), x + rng.normal(0, 0.05 * w), rng.uniform(0, h)), fill=colour,
                      width=max(1, int(rng.uniform(0.005, 0.02) * w)))
        else:
            pts = rng.uniform(0, 1, (int(rng.integers(3, 6)), 2)) * (sw, sh) + (x, y - sh)
            draw.polygon(_xy(pts), fill=colour)
    # the camera focuses on the car: the background is a little out of focus
    return img.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 2.5) * w / 256))


def _light(shape: str, centre: Point, size: float, front: bool) -> list[tuple[Point, ...]]:
    """Polygons of a head- (front=True) or taillight of the given shape, in car coordinates."""
    cx, cy = centre
    s = size
    if shape == "round":
        return [tuple(map(tuple, _circle(cx - 0.2 * s if front else cx + 0.2 * s, cy, 0.42 * s, 12)))]
    if shape == "swept":
        return [((cx + 0.3 * s, cy + 0.15 * s), (cx - 1.6 * s, cy + 0.45 * s), (cx - 1.3 * s, cy - 0.05 * s),
                 (cx + 0.25 * s, cy - 0.35 * s))]
    if shape == "rect":
        return [_quad(cx - 0.9 * s, cx + 0.3 * s, cy - 0.35 * s, cy + 0.35 * s)]
    if shape == "strip":
        return [_quad(cx - 1.9 * s, cx + 0.3 * s, cy + 0.05 * s, cy + 0.3 * s, lean=0.0)]
    if shape == "vertical":
        return [_quad(cx - 0.25 * s, cx + 0.25 * s, cy - 0.9 * s, cy + 0.6 * s)]
    if shape == "horizontal":
        return [_quad(cx - 0.3 * s, cx + 1.4 * s, cy - 0.2 * s, cy + 0.25 * s)]
    if shape == "hook":
        return [_quad(cx - 0.3 * s, cx + 0.15 * s, cy - 0.9 * s, cy + 0.35 * s),
                _quad(cx - 0.3 * s, cx + 1.2 * s, cy + 0.05 * s, cy + 0.35 * s)]
    if shape == "dots":
        return [tuple(map(tuple, _circle(cx + dx * s, cy, 0.3 * s, 10))) for dx in (0.0, 0.85)]
    raise ValueError(f"unknown light shape {shape!r}")


def _draw_car(img: Image.Image, design: CarDesign, pose: _Pose, rng: np.random.Generator, detail_scale: float) -> None:
    """Paint the car (shadow, body, glass, trim, lights, wheels) onto ``img`` in place."""
    w, h = img.size
    L = pose.length
    draw = ImageDraw.Draw(img)
    colour = _car_colour(rng)
    dark_body = tuple(int(v) for v in colour * 0.55)
    lum = float(colour @ (0.299, 0.587, 0.114))

    # soft shadow on the ground
    shadow = Image.new("L", (w, h), 0)
    xs = np.linspace(-0.02, 1.02, 12)
    ground = pose.project([(x, 0.0) for x in xs] + [(x, 0.03) for x in xs[::-1]])
    ImageDraw.Draw(shadow).polygon(_xy(ground), fill=int(rng.uniform(90, 170)))
    shadow = shadow.filter(ImageFilter.BoxBlur(max(1.0, 0.02 * L)))
    arr = np.asarray(img, dtype=np.float32) * (1 - np.asarray(shadow, dtype=np.float32)[:, :, None] / 255.0)
    img.paste(Image.fromarray(arr.astype(np.uint8)))

    # body: vertical shading, lighter along the shoulder
    outline = pose.project(design.outline)
    mask = Image.new("L", (w, h), 0)
    ImageDraw.Draw(mask).polygon(_xy(outline), fill=255)
    top, bottom = outline[:, 1].min(), outline[:, 1].max()
    belt_y = pose.project([(0.5, design.belt)])[0, 1]
    rows = np.arange(h, dtype=np.float64)
    frac = np.clip((rows - top) / max(bottom - top, 1.0), 0, 1)
    shade = 1.12 - 0.42 * frac + 0.22 * np.exp(-(((rows - belt_y) / (0.025 * L + 1)) ** 2)) * rng.uniform(0.3, 1.0)
    layer = np.clip(colour[None, :] * shade[:, None] + 12 * (shade[:, None] - 1), 0, 255).astype(np.uint8)
    img.paste(Image.fromarray(np.repeat(layer[:, None, :], w, axis=1)), (0, 0), mask)
    roof_colour = tuple(int(v) for v in np.clip(colour * 1.05, 0, 255))
    edge = tuple(int(v) for v in colour * 0.15 + 12)
    draw.line(_xy(np.vstack([outline, outline[:1]])), fill=edge, width=max(1, int(round(0.02 * L))), joint="curve")

    px = lambda pts: _xy(pose.project(pts))  # noqa: E731
    lw = lambda units: max(1, int(round(units * L)))  # noqa: E731

    # make crease line
    c, b = design.sill, design.belt
    crease = design.make.crease
    if crease != "none":
        xs = np.linspace(0.08, 0.92, 16)
        lift = {"straight": 0 * xs, "wedge": 0.06 * (0.92 - xs),
                "arc": 0.05 * np.sin(np.pi * (xs - 0.08) / 0.84)}[crease]
        draw.line(px(np.stack([xs, c + 0.55 * (b - c) + lift * (b - c) / 0.13], 1)), fill=dark_body, width=lw(0.006))

    glass_colour = tuple(int(v) for v in np.clip(rng.normal((40, 50, 65), 12) * rng.uniform(0.6, 1.5), 0, 255))
    chrome = tuple(int(v) for v in rng.uniform(175, 230) * np.array([1.0, 1.0, 1.03]))
    trim_fill = {"dark": (22, 22, 24), "chrome": chrome}
    if design.surround:
        draw.polygon(px(design.surround[1]), fill=trim_fill[design.surround[0]])
    if design.glass:
        draw.polygon(px(design.glass), fill=glass_colour)
        for pillar in design.pillars:
            draw.polygon(px(pillar), fill=roof_colour)
    for role, poly in design.extras:
        fill = {**trim_fill, "glass": glass_colour, "body": roof_colour}[role]
        draw.polygon(px(poly), fill=fill)
    for x in design.door_seams:
        draw.line(px([(x, c + 0.015), (x, b - 0.004)]), fill=dark_body, width=lw(0.005))
        draw.polygon(px(_quad(x - 0.045, x - 0.02, b - 0.028, b - 0.02)), fill=dark_body)  # handle

    head, tail, trim = design.year_detail
    s = 0.06 * detail_scale
    trim_colour = (28, 28, 30) if lum > 110 else (232, 232, 228)
    if trim == "stripe":
        y = c + 0.5 * (b - c)
        draw.polygon(px(_quad(0.05, 0.95, y, y + 0.022 * detail_scale)), fill=trim_colour)
    elif trim == "double":
        for y in (c + 0.35 * (b - c), c + 0.62 * (b - c)):
            draw.polygon(px(_quad(0.05, 0.95, y, y + 0.013 * detail_scale)), fill=trim_colour)
    elif trim == "rocker":
        (xr, r), (xf, _) = design.wheels
        draw.polygon(px(_quad(xr + 1.2 * r, xf - 1.2 * r, c, c + 0.04 * detail_scale)), fill=trim_colour)
    for poly in _light(head, design.head_at, s, front=True):
        draw.polygon(px(poly), fill=tuple(int(v) for v in rng.uniform(215, 255) * np.array([1.0, 1.0, 0.93])))
    for poly in _light(tail, design.tail_at, s, front=False):
        draw.polygon(px(poly), fill=tuple(int(v) for v in np.array([200, 25, 30]) * rng.uniform(0.75, 1.1)))
    # grille at the nose (make feature)
    gx, gy = 0.985, design.sill + 0.55 * (design.head_at[1] - design.sill)
    g = 0.022
    grille = {
        "slot": [_quad(gx - 1.2 * g, gx + 0.6 * g, gy - 0.2 * g, gy + 0.2 * g),
                 _quad(gx - 1.2 * g, gx + 0.6 * g, gy - 0.9 * g, gy - 0.5 * g)],
        "tall": [_quad(gx - 0.5 * g, gx + 0.5 * g, gy - 1.1 * g, gy + 0.9 * g)],
        "kidney": [tuple(map(tuple, _circle(gx - 0.2 * g, gy + dy * g, 0.55 * g, 10))) for dy in (-0.6, 0.6)],
        "trapezoid": [((gx - 1.3 * g, gy - 0.9 * g), (gx + 0.6 * g, gy - 0.9 * g), (gx + 0.6 * g, gy + 0.7 * g),
                       (gx - 0.5 * g, gy + 0.7 * g))],
        "round": [tuple(map(tuple, _circle(gx - 0.3 * g, gy, 0.85 * g, 14)))],
        "mesh": [_quad(gx - 1.0 * g, gx + 0.6 * g, gy + (0.55 * k - 0.8) * g, gy + (0.55 * k - 0.55) * g)
                 for k in range(4)],
    }[design.make.grille]
    for poly in grille:
        draw.polygon(px(poly), fill=(18, 18, 20))

    # wheels: arch, tyre, rim with the make's spoke pattern
    rim_grey = rng.uniform(120, 225)
    phase = rng.uniform(0, 2 * np.pi)
    style = design.make
    for xw, r in design.wheels:
        big = 1.17 * r  # the wheel well: the part of a larger circle above the sill
        a0 = math.asin(max(-1.0, min(1.0, (c - r) / big)))
        a = np.linspace(a0, np.pi - a0, 20)
        draw.polygon(px(np.stack([xw + big * np.cos(a), r + big * np.sin(a)], 1)), fill=(12, 12, 14))
        draw.polygon(px(_circle(xw, r, r)), fill=(28, 28, 30))
        rr = style.rim_ratio * r
        grey = tuple(int(rim_grey * k) for k in (1.0, 1.0, 1.03))
        if style.spokes == 0:  # disc with holes
            draw.polygon(px(_circle(xw, r, rr)), fill=grey)
            for k in range(5):
                a = phase + 2 * np.pi * k / 5
                hole = _circle(xw + 0.6 * rr * np.cos(a), r + 0.6 * rr * np.sin(a), 0.2 * rr, 8)
                draw.polygon(px(hole), fill=(45, 45, 48))
        else:
            draw.polygon(px(_circle(xw, r, rr)), fill=(48, 48, 52))
            for k in range(style.spokes):
                a = phase + 2 * np.pi * k / style.spokes
                spoke = [(xw, r), (xw + rr * np.cos(a), r + rr * np.sin(a))]
                draw.line(px(spoke), fill=grey, width=lw(style.spoke_width * r))
            ring = _circle(xw, r, rr, 24)
            draw.line(px(np.vstack([ring, ring[:1]])), fill=grey, width=lw(0.1 * r))
        draw.polygon(px(_circle(xw, r, 0.2 * rr, 10)), fill=tuple(int(v * 0.8) for v in grey))


def _photometric(img: Image.Image, rng: np.random.Generator, nz: Nuisance) -> Image.Image:
    """Blur, lighting, colour cast, sensor noise and (sometimes) grayscale."""
    radius = rng.uniform(0.0, nz.blur_max)
    if radius > 0.2:
        img = img.filter(ImageFilter.GaussianBlur(radius))
    a = np.asarray(img, dtype=np.float32)
    mean = a.mean()
    gain = math.exp(rng.normal(0, nz.light_std))
    contrast = math.exp(rng.normal(0, nz.light_std))
    cast = 1 + rng.normal(0, nz.cast_std, 3)
    a = ((a - mean) * contrast + mean * gain) * cast.astype(np.float32)
    a += rng.normal(0, rng.uniform(0.5, nz.noise_max), a.shape).astype(np.float32)
    out = Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8))
    if rng.random() < GRAYSCALE_FRACTION:
        out = out.convert("L")
    return out


def render_car(car: CarName, rng: np.random.Generator, width: int, height: int,
               difficulty: float) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """Render one image of class ``car`` and return it with the car's bounding box.

    The image is RGB, or mode "L" for a grayscale one (GRAYSCALE_FRACTION of them). The box is
    (x1, y1, x2, y2), 1-based inclusive pixels like the devkit, clipped to the image.
    ``difficulty`` in [0, 1] scales every nuisance (see :class:`SyntheticSpec`); all randomness
    comes from ``rng``.
    """
    design = car_design(car.full)
    s = _SUPERSAMPLE
    w, h = width * s, height * s
    nz = Nuisance.from_difficulty(difficulty)
    # pose: scale, roll, 3/4 yaw, facing; then a position that keeps the car (mostly) in frame
    length = w * rng.uniform(*nz.scale)
    yaw = rng.uniform(-1, 1) * math.radians(nz.max_yaw_deg)
    roll = rng.normal(0, math.radians(nz.roll_std_deg))
    pose = _Pose(length=length, yaw=yaw, roll=roll, flip=bool(rng.random() < 0.5))
    corners = pose.project(list(design.outline) + [(x, 0.0) for x, _ in design.wheels])
    (x0, y0), (x1, y1) = corners.min(axis=0), corners.max(axis=0)
    out = nz.out_of_frame * w
    lo, hi = -x0 - out, w - x1 + out
    tx = rng.uniform(lo, hi) if lo < hi else (w - x0 - x1) / 2
    margin = 0.04 * h
    lo, hi = -y0 + margin, h - y1 - margin
    ty = (lo + (hi - lo) * rng.beta(3, 2)) if lo < hi else (h - y0 - y1) / 2
    pose = _Pose(length=length, yaw=yaw, roll=roll, flip=pose.flip, tx=tx, ty=ty)

    img = _background(rng, w, h, nz, ground_y=float(pose.project([(0.5, 0.0)])[0, 1]))
    _draw_car(img, design, pose, rng, detail_scale=nz.detail_scale)
    if rng.random() < nz.p_occluder:  # an occluder in front: a pole or a bush
        draw = ImageDraw.Draw(img)
        colour = tuple(int(v) for v in rng.uniform(20, 200, 3))
        x = rng.uniform(0, w)
        if rng.random() < 0.5:
            top = x + rng.normal(0, 0.03 * w)
            draw.line((x, 0, top, h), fill=colour, width=max(1, int(rng.uniform(0.01, 0.03) * w)))
        else:
            draw.ellipse((x - 0.12 * w, h - rng.uniform(0.1, 0.3) * h, x + 0.12 * w, h + 0.1 * h), fill=colour)
    img = img.reduce(s)

    parts = [design.outline] + [poly for _, poly in design.extras] + [_circle(x, r, r) for x, r in design.wheels]
    pts = np.vstack([pose.project(part) for part in parts]) / s
    bx0, by0 = np.floor(pts.min(axis=0)).astype(int) + 1
    bx1, by1 = np.ceil(pts.max(axis=0)).astype(int)
    bbox = (int(np.clip(bx0, 1, width)), int(np.clip(by0, 1, height)),
            int(np.clip(bx1, 1, width)), int(np.clip(by1, 1, height)))
    return _photometric(img, rng, nz), bbox


