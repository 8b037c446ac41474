"""Shapes VQA: an offline, procedural visual-question-answering data set (Pillow, deterministic from a seed).

Each image is a ``image_size`` x ``image_size`` scene (default 48 px) on a 3 x 3 grid: 1 to 6 objects, each a
circle, square, triangle or cross in red, green, blue, yellow or purple, one per cell, with random size, position
jitter inside its cell and colour jitter, on a dark background with a few grey specks of clutter. Every row is one
question with a one-word answer (the auxiliary ``describe`` type answers two words):

==============  ============================================  ===========================  ======
type            question                                      answers                      chance
==============  ============================================  ===========================  ======
``colour``      ``what colour is the triangle ?``             5 colours                    1/5
``shape``       ``what shape is at the top left ?``           4 shapes                     1/4
``presence``    ``is there a red triangle ?``                 yes / no                     1/2
``count``       ``how many shapes are there ?``               one .. six                   1/6
``position``    ``is the circle left of the square ?``        yes / no                     1/2
``describe``    ``what is at the middle centre ?``            ``red circle`` / ``nothing``  (aux)
==============  ============================================  ===========================  ======

Answers are balanced: within each type the answer is drawn first, from a shuffled bag holding every answer once
(so any ``n * len(answers)`` consecutive rows of a type hold each answer ``n`` times), and the scene is built to
fit it. So the chance level (the accuracy of a model that ignores the image, or of the best constant answer) is
``1 / len(answers)``, listed in :data:`CHANCE_LEVELS`. The scenes leave no shortcut that skips the skill:

- ``colour``: the named shape occurs exactly once; the other objects have other shapes and any colour.
- ``shape``: the asked cell is occupied; the other objects are random.
- ``presence``: a "no" scene always holds the asked colour on another shape and the asked shape in another
  colour (when it has two or more objects), so only binding colour to shape answers it.
- ``count``: the answer is the number of objects; sizes vary, so the coloured area does not give it away.
- ``position``: both named shapes occur exactly once; for "yes" the relation holds strictly (``left of``: a
  smaller column; ``above``: a smaller row), for "no" the opposite relation holds strictly.
- ``describe`` (training aid, not in the default types): what occupies a named cell, ``<colour> <shape>`` or
  ``nothing``; it teaches the language model to address image tokens by position.

The ``i``-th row of a split has type ``question_types[i % len(question_types)]``, so types are balanced too and
:func:`split_by_question_type` gives an evaluator one subset per type.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
from PIL import Image, ImageDraw

from ..errors import HFKanConfigError

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 45, 45),
    "green": (45, 185, 70),
    "blue": (55, 95, 235),
    "yellow": (235, 215, 45),
    "purple": (160, 65, 210),
}
ROWS: tuple[str, ...] = ("top", "middle", "bottom")
COLUMNS: tuple[str, ...] = ("left", "centre", "right")
NUMBERS: tuple[str, ...] = ("one", "two", "three", "four", "five", "six")
# relation -> (axis, sign): "left of" holds when the column of a is smaller than the column of b
RELATIONS: dict[str, tuple[str, int]] = {"left of": ("col", -1), "right of": ("col", 1), "above": ("row", -1),
                                         "below": ("row", 1)}
YES_NO: tuple[str, ...] = ("yes", "no")
GRID = 3
MAX_OBJECTS = 6

QUESTION_TYPES: tuple[str, ...] = ("colour", "shape", "presence", "count", "position")
AUXILIARY_QUESTION_TYPES: tuple[str, ...] = ("describe",)
ANSWERS: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "presence": YES_NO,
    "count": NUMBERS,
    "position": YES_NO,
}
CHANCE_LEVELS: dict[str, float] = {t: 1.0 / len(a) for t, a in ANSWERS.items()}
SPLIT_SIZES: dict[str, int] = {"train": 60_000, "validation": 2_000, "test": 5_000}
_SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}

FEATURES = datasets.Features(
    {
        "image": datasets.Image(),
        "question": datasets.Value("string"),
        "answer": datasets.Value("string"),
        "question_type": datasets.Value("string"),
        "objects": datasets.List(
            {
                "shape": datasets.Value("string"),
                "colour": datasets.Value("string"),
                "row": datasets.Value("int8"),
                "col": datasets.Value("int8"),
            }
        ),
    }
)


@dataclass(frozen=True)
class ShapesVQAConfig:
    """How scenes are drawn. ``image_size`` must be a multiple of 3 and at least 24 (cells of 8 px or more)."""

    image_size: int = 48
    min_objects: int = 1
    max_objects: int = MAX_OBJECTS
    clutter: int = 6
    supersample: int = 4

    def __post_init__(self) -> None:
        if self.image_size % GRID or self.image_size < 8 * GRID:
            raise HFKanConfigError(
                f"ShapesVQAConfig: image_size={self.image_size} must be a multiple of {GRID} and >= {8 * GRID}"
            )
        if not 1 <= self.min_objects <= self.max_objects <= MAX_OBJECTS:
            raise HFKanConfigError(
                f"ShapesVQAConfig: need 1 <= min_objects <= max_objects <= {MAX_OBJECTS}, got "
                f"{self.min_objects}..{self.max_objects}"
            )
        if self.clutter < 0 or self.supersample < 1:
            raise HFKanConfigError("ShapesVQAConfig: clutter must be >= 0 and supersample >= 1")


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    row: int
    col: int


# ----------------------------------------------------------------------------------------------- scenes


class _AnswerBags:
    """Per question type, a shuffled bag of all answers that is refilled when empty (exact balance per bag)."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.bags: dict[str, list[str]] = {}

    def draw(self, kind: str, answers: Sequence[str]) -> str:
        bag = self.bags.get(kind)
        if not bag:
            bag = [answers[i] for i in self.rng.permutation(len(answers))]
            self.bags[kind] = bag
        return bag.pop()


def _pick(rng: np.random.Generator, items: Sequence[Any], exclude: Sequence[Any] = ()) -> Any:
    pool = [x for x in items if x not in exclude]
    return pool[int(rng.integers(len(pool)))]


def _free_cells(rng: np.random.Generator, n: int, taken: Sequence[tuple[int, int]] = ()) -> list[tuple[int, int]]:
    cells = [(r, c) for r in range(GRID) for c in range(GRID) if (r, c) not in taken]
    return [cells[i] for i in rng.permutation(len(cells))[:n]]


def _fill(rng, objects: list[SceneObject], n: int, shapes: Sequence[str], colours: Sequence[str] | None = None,
          forbid: tuple[str, str] | None = None) -> list[SceneObject]:
    """Add random objects until there are ``n``, in free cells, with shapes from ``shapes`` (never ``forbid``)."""
    colours = list(colours or COLOURS)
    for row, col in _free_cells(rng, n - len(objects), [(o.row, o.col) for o in objects]):
        while True:
            shape, colour = _pick(rng, shapes), _pick(rng, colours)
            if (colour, shape) != forbid:
                break
        objects.append(SceneObject(shape, colour, row, col))
    return objects


def _num_objects(rng, config: ShapesVQAConfig, low: int = 1) -> int:
    low = max(low, config.min_objects)
    return int(rng.integers(low, max(low, config.max_objects) + 1))


def _colour_question(rng, config, bags) -> tuple[list[SceneObject], str, str]:
    colour = bags.draw("colour", ANSWERS["colour"])
    shape = _pick(rng, SHAPES)
    (row, col), = _free_cells(rng, 1)
    objects = _fill(rng, [SceneObject(shape, colour, row, col)], _num_objects(rng, config), [s for s in SHAPES
                                                                                              if s != shape])
    return objects, f"what colour is the {shape} ?", colour


def _shape_question(rng, config, bags):
    shape = bags.draw("shape", SHAPES)
    (row, col), = _free_cells(rng, 1)
    objects = _fill(rng, [SceneObject(shape, _pick(rng, list(COLOURS)), row, col)], _num_objects(rng, config), SHAPES)
    return objects, f"what shape is at the {ROWS[row]} {COLUMNS[col]} ?", shape


def _presence_question(rng, config, bags):
    answer = bags.draw("presence", YES_NO)
    colour, shape = _pick(rng, list(COLOURS)), _pick(rng, SHAPES)
    n = _num_objects(rng, config)
    cells = _free_cells(rng, n)
    if answer == "yes":
        objects = [SceneObject(shape, colour, *cells[0])]
    else:
        # near misses: the colour on another shape and the shape in another colour
        misses = [SceneObject(_pick(rng, SHAPES, [shape]), colour, *cells[0]),
                  SceneObject(shape, _pick(rng, list(COLOURS), [colour]), *cells[min(1, n - 1)])]
        objects = misses if n >= 2 else [misses[int(rng.integers(2))]]
    objects = _fill(rng, objects, n, SHAPES, forbid=(colour, shape) if answer == "no" else None)
    return objects, f"is there a {colour} {shape} ?", answer


def _count_question(rng, config, bags):
    allowed = NUMBERS[config.min_objects - 1:config.max_objects]
    n = NUMBERS.index(bags.draw(f"count{config.min_objects}-{config.max_objects}", allowed)) + 1
    return _fill(rng, [], n, SHAPES), "how many shapes are there ?", NUMBERS[n - 1]


def _position_question(rng, config, bags):
    answer = bags.draw("position", YES_NO)
    relation = _pick(rng, list(RELATIONS))
    axis, sign = RELATIONS[relation]
    if answer == "no":
        sign = -sign
    a, b = (SHAPES[i] for i in rng.permutation(len(SHAPES))[:2])
    # a strictly before b along the axis when sign < 0, strictly after when sign > 0
    lo, hi = sorted(rng.permutation(GRID)[:2])
    first, second = (lo, hi) if sign < 0 else (hi, lo)
    other_a, other_b = int(rng.integers(GRID)), int(rng.integers(GRID))
    cell_a = (first, other_a) if axis == "row" else (other_a, first)
    cell_b = (second, other_b) if axis == "row" else (other_b, second)
    objects = [SceneObject(a, _pick(rng, list(COLOURS)), *cell_a), SceneObject(b, _pick(rng, list(COLOURS)), *cell_b)]
    objects = _fill(rng, objects, _num_objects(rng, config, low=2), [s for s in SHAPES if s not in (a, b)])
    return objects, f"is the {a} {relation} the {b} ?", answer


def _describe_question(rng, config, bags):
    objects = _fill(rng, [], _num_objects(rng, config), SHAPES)
    row, col = int(rng.integers(GRID)), int(rng.integers(GRID))
    found = [o for o in objects if (o.row, o.col) == (row, col)]
    answer = f"{found[0].colour} {found[0].shape}" if found else "nothing"
    return objects, f"what is at the {ROWS[row]} {COLUMNS[col]} ?", answer


_QUESTION_MAKERS = {
    "colour": _colour_question,
    "shape": _shape_question,
    "presence": _presence_question,
    "count": _count_question,
    "position": _position_question,
    "describe": _describe_question,
}


# ----------------------------------------------------------------------------------------------- drawing


def _shape_points(shape: str, cx: float, cy: float, half: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)]
    if shape == "cross":
        t = half / 3.0
        return [(cx - t, cy - half), (cx + t, cy - half), (cx + t, cy - t), (cx + half, cy - t), (cx + half, cy + t),
                (cx + t, cy + t), (cx + t, cy + half), (cx - t, cy + half), (cx - t, cy + t), (cx - half, cy + t),
                (cx - half, cy - t), (cx - t, cy - t)]
    raise KeyError(shape)


def render_scene(objects: Sequence[SceneObject], rng: np.random.Generator, config: ShapesVQAConfig) -> Image.Image:
    """Draw ``objects`` (one per grid cell) as an RGB ``PIL.Image`` of ``config.image_size`` px.

    Object sizes are uniform in [0.55, 0.85] of a cell, centres jittered so the object stays in its cell, each RGB
    channel jittered by up to +-25; drawn at ``supersample`` x the size and box-filtered down (anti-aliasing).
    """
    size, k = config.image_size, config.supersample
    cell = size / GRID
    background = int(rng.integers(0, 41))
    canvas = Image.new("RGB", (size * k, size * k), (background,) * 3)
    draw = ImageDraw.Draw(canvas)
    for _ in range(config.clutter):
        x, y = (int(v) for v in rng.integers(0, size, 2))
        grey = int(rng.integers(70, 150))
        draw.rectangle([x * k, y * k, (x + 1) * k - 1, (y + 1) * k - 1], fill=(grey,) * 3)
    for obj in objects:
        side = cell * rng.uniform(0.55, 0.85)
        slack = (cell - side) / 2
        cx = (obj.col + 0.5) * cell + rng.uniform(-slack, slack)
        cy = (obj.row + 0.5) * cell + rng.uniform(-slack, slack)
        base = np.array(COLOURS[obj.colour])
        fill = tuple(int(v) for v in np.clip(base + rng.integers(-25, 26, 3), 0, 255))
        half = side * k / 2
        cx, cy = cx * k, cy * k
        if obj.shape == "circle":
            draw.ellipse([cx - half, cy - half, cx + half, cy + half], fill=fill)
        elif obj.shape == "square":
            draw.rectangle([cx - half, cy - half, cx + half, cy + half], fill=fill)
        else:
            draw.polygon(_shape_points(obj.shape, cx, cy, half), fill=fill)
    return canvas.resize((size, size), Image.Resampling.BOX) if k > 1 else canvas


# ----------------------------------------------------------------------------------------------- public API


def _check_types(question_types: Sequence[str]) -> tuple[str, ...]:
    types = tuple(question_types)
    unknown = [t for t in types if t not in _QUESTION_MAKERS]
    if not types or unknown:
        raise HFKanConfigError(
            f"unknown or no question types {unknown or types}; choose from {list(_QUESTION_MAKERS)}"
        )
    return types


def generate_shapes_vqa(
    num_samples: int | None = None,
    seed: int = 0,
    question_types: Sequence[str] = QUESTION_TYPES,
    config: ShapesVQAConfig | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield ``num_samples`` rows (forever when None): ``{"image": PIL.Image, "question", "answer",
    "question_type", "objects": [{"shape", "colour", "row", "col"}, ...]}``.

    Deterministic in ``(seed, question_types, config)``; row ``i`` has type ``question_types[i % T]``. Each
    ``seed`` is an independent stream (the splits of :func:`load_shapes_vqa` use derived seeds).
    """
    config = config or ShapesVQAConfig()
    types = _check_types(question_types)
    rng = np.random.default_rng(np.random.SeedSequence(seed))
    bags = _AnswerBags(rng)
    i = 0
    while num_samples is None or i < num_samples:
        kind = types[i % len(types)]
        objects, question, answer = _QUESTION_MAKERS[kind](rng, config, bags)
        yield {
            "image": render_scene(objects, rng, config),
            "question": question,
            "answer": answer,
            "question_type": kind,
            "objects": [dataclasses.asdict(o) for o in objects],
        }
        i += 1


def split_seed(seed: int, split: str) -> int:
    """The stream seed of ``split`` (``train`` / ``validation`` / ``test``) for the data set seed ``seed``."""
    if split not in _SPLIT_IDS:
        raise HFKanConfigError(f"unknown split {split!r}; choose one of {list(_SPLIT_IDS)}")
    return int(np.random.SeedSequence([seed, _SPLIT_IDS[split]]).generate_state(1)[0])


def _split_rows(num_samples: int, seed: int, question_types: tuple[str, ...], config_dict: dict[str, Any]):
    yield from generate_shapes_vqa(num_samples, seed, question_types, ShapesVQAConfig(**config_dict))


def load_shapes_vqa(
    train_size: int = SPLIT_SIZES["train"],
    validation_size: int = SPLIT_SIZES["validation"],
    test_size: int = SPLIT_SIZES["test"],
    seed: int = 0,
    question_types: Sequence[str] = QUESTION_TYPES,
    train_question_types: Sequence[str] | None = None,
    config: ShapesVQAConfig | None = None,
    cache_dir: str | None = None,
) -> datasets.DatasetDict:
    """Shapes VQA as a ``DatasetDict`` with ``train`` / ``validation`` / ``test`` splits (columns as in
    :func:`generate_shapes_vqa`; ``image`` is a ``datasets.Image``).

    Each split is its own stream (:func:`split_seed`), so changing one size leaves the other splits unchanged.
    ``train_question_types`` (default: ``question_types``) may add training aids such as ``describe``. Splits are
    written once to the ``datasets`` cache (``cache_dir``) and reused by later calls with the same arguments.
    A split of size 0 is left out.
    """
    config = config or ShapesVQAConfig()
    types = _check_types(question_types)
    train_types = _check_types(train_question_types or types)
    sizes = {"train": train_size, "validation": validation_size, "test": test_size}
    splits = {}
    for split, size in sizes.items():
        if size < 0:
            raise HFKanConfigError(f"{split}_size must be >= 0, got {size}")
        if size == 0:
            continue
        kwargs = dict(num_samples=size, seed=split_seed(seed, split),
                      question_types=train_types if split == "train" else types,
                      config_dict=dataclasses.asdict(config))
        splits[split] = datasets.Dataset.from_generator(_split_rows, gen_kwargs=kwargs, features=FEATURES,
                                                        cache_dir=cache_dir)
    return datasets.DatasetDict(splits)


def split_by_question_type(dataset: datasets.Dataset) -> dict[str, datasets.Dataset]:
    """One subset per question type of ``dataset`` (in order of first appearance), rows in their original order."""
    kinds = dataset["question_type"]
    order = list(dict.fromkeys(kinds))
    return {k: dataset.select([i for i, x in enumerate(kinds) if x == k]) for k in order}


__all__ = [
    "ANSWERS",
    "AUXILIARY_QUESTION_TYPES",
    "CHANCE_LEVELS",
    "COLOURS",
    "COLUMNS",
    "FEATURES",
    "NUMBERS",
    "QUESTION_TYPES",
    "RELATIONS",
    "ROWS",
    "SHAPES",
    "SPLIT_SIZES",
    "SceneObject",
    "ShapesVQAConfig",
    "generate_shapes_vqa",
    "load_shapes_vqa",
    "render_scene",
    "split_by_question_type",
    "split_seed",
]
