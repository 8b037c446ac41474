"""Shapes VQA: deterministic, balanced, answers consistent with the scenes, scenes drawn as described."""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pytest

from hf_kan.data.shapes_vqa import (
    ANSWERS,
    CHANCE_LEVELS,
    COLOURS,
    COLUMNS,
    NUMBERS,
    QUESTION_TYPES,
    RELATIONS,
    ROWS,
    SHAPES,
    ShapesVQAConfig,
    generate_shapes_vqa,
    load_shapes_vqa,
    split_by_question_type,
)
from hf_kan.errors import HFKanConfigError

ALL_TYPES = QUESTION_TYPES + ("describe",)


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def rows():
    return list(generate_shapes_vqa(1200, seed=3, question_types=ALL_TYPES))


def test_generation_is_deterministic_in_the_seed():
    a = list(generate_shapes_vqa(24, seed=5))
    b = list(generate_shapes_vqa(24, seed=5))
    c = list(generate_shapes_vqa(24, seed=6))
    key = lambda r: (_png(r["image"]), r["question"], r["answer"], r["objects"])  # noqa: E731
    assert [key(r) for r in a] == [key(r) for r in b]
    assert [key(r) for r in a] != [key(r) for r in c]


def test_types_cycle_and_answers_are_exactly_balanced(rows):
    assert [r["question_type"] for r in rows[:12]] == list(ALL_TYPES) * 2
    for kind in QUESTION_TYPES:
        answers = [r["answer"] for r in rows if r["question_type"] == kind]
        n = len(ANSWERS[kind])
        # each bag of n consecutive rows of a type holds every answer once
        for start in range(0, len(answers) - n + 1, n):
            assert sorted(answers[start:start + n]) == sorted(ANSWERS[kind]), kind
        assert CHANCE_LEVELS[kind] == pytest.approx(1 / n)
    assert CHANCE_LEVELS == {"colour": 0.2, "shape": 0.25, "presence": 0.5, "count": 1 / 6, "position": 0.5}


def _answer_from_objects(kind: str, question: str, objects: list[dict]) -> str:
    """Recompute the answer of a question from the scene description alone."""
    words = question.split()
    if kind == "colour":
        matches = [o for o in objects if o["shape"] == words[4]]
        assert len(matches) == 1
        return matches[0]["colour"]
    if kind in ("shape", "describe"):
        row, col = ROWS.index(words[-3]), COLUMNS.index(words[-2])
        found = [o for o in objects if (o["row"], o["col"]) == (row, col)]
        if kind == "shape":
            return found[0]["shape"]
        return f"{found[0]['colour']} {found[0]['shape']}" if found else "nothing"
    if kind == "presence":
        colour, shape = words[3], words[4]
        if not any(o["colour"] == colour and o["shape"] == shape for o in objects):
            # near misses: the colour and the shape occur, on other objects (one of them in 1-object scenes)
            misses = [any(o["colour"] == colour for o in objects), any(o["shape"] == shape for o in objects)]
            assert all(misses) if len(objects) > 1 else any(misses)
            return "no"
        return "yes"
    if kind == "count":
        return NUMBERS[len(objects) - 1]
    if kind == "position":
        a, b = words[2], words[-2]
        relation = " ".join(words[3:-3])
        (oa,), (ob,) = ([o for o in objects if o["shape"] == s] for s in (a, b))
        axis, sign = RELATIONS[relation]
        delta = np.sign(oa[axis] - ob[axis])
        assert delta != 0  # never on the same row/column along the asked axis
        return "yes" if delta == sign else "no"
    raise KeyError(kind)


def test_answers_follow_from_the_scene(rows):
    for row in rows:
        objects = row["objects"]
        cells = [(o["row"], o["col"]) for o in objects]
        assert 1 <= len(objects) <= 6 and len(set(cells)) == len(cells)
        assert _answer_from_objects(row["question_type"], row["question"], objects) == row["answer"], row


def test_objects_are_drawn_in_their_cells_in_their_colours(rows):
    palette = np.array(list(COLOURS.values()), dtype=float)
    names = list(COLOURS)
    for row in rows[:200]:
        pixels = np.asarray(row["image"], dtype=float)
        assert pixels.shape == (48, 48, 3)
        occupied = {(o["row"], o["col"]): o for o in row["objects"]}
        for r in range(3):
            for c in range(3):
                cell = pixels[16 * r:16 * (r + 1), 16 * c:16 * (c + 1)].reshape(-1, 3)
                saturation = cell.max(-1) - cell.min(-1)  # background and clutter are grey (saturation 0)
                if (r, c) not in occupied:
                    assert saturation.max() == 0
                    continue
                # fully covered object pixels: the most saturated ones
                core = cell[saturation >= np.percentile(saturation, 97)].mean(0)
                nearest = names[int(np.argmin(((palette - core) ** 2).sum(-1)))]
                assert nearest == occupied[(r, c)]["colour"]


def test_dataset_dict_splits_are_independent_and_cached(tmp_path):
    small = load_shapes_vqa(train_size=10, validation_size=6, test_size=12, seed=1, cache_dir=str(tmp_path))
    assert {k: len(v) for k, v in small.items()} == {"train": 10, "validation": 6, "test": 12}
    assert small["test"].features["image"].__class__.__name__ == "Image"
    other = load_shapes_vqa(train_size=4, validation_size=0, test_size=12, seed=1, cache_dir=str(tmp_path))
    assert "validation" not in other
    assert other["test"]["question"] == small["test"]["question"]  # test split unchanged by the other sizes
    assert other["train"]["question"] == small["train"]["question"][:4]
    assert _png(other["test"][5]["image"]) == _png(small["test"][5]["image"])
    assert small["train"]["question"] != small["test"]["question"][:10]
    by_type = split_by_question_type(small["test"])
    assert list(by_type) == list(QUESTION_TYPES)
    assert all(set(d["question_type"]) == {k} and len(d) in (2, 3) for k, d in by_type.items())


def test_train_question_types_and_curriculum_config(tmp_path):
    data = load_shapes_vqa(train_size=12, validation_size=5, test_size=0, train_question_types=ALL_TYPES,
                           config=ShapesVQAConfig(max_objects=2), cache_dir=str(tmp_path))
    assert set(data["train"]["question_type"]) == set(ALL_TYPES)
    assert set(data["validation"]["question_type"]) == set(QUESTION_TYPES)
    assert max(len(o) for o in data["train"]["objects"]) <= 2
    counts = Counter(r["answer"] for r in generate_shapes_vqa(40, question_types=["count"],
                                                              config=ShapesVQAConfig(max_objects=2)))
    assert counts == {"one": 20, "two": 20}


@pytest.mark.parametrize(
    "kwargs", [{"image_size": 40}, {"min_objects": 0}, {"max_objects": 7}, {"min_objects": 3, "max_objects": 2}]
)
def test_bad_config_raises(kwargs):
    with pytest.raises(HFKanConfigError):
        ShapesVQAConfig(**kwargs)


def test_bad_question_type_raises():
    with pytest.raises(HFKanConfigError, match="question types"):
        next(generate_shapes_vqa(1, question_types=["colour", "size"]))


def test_every_shape_is_asked_about(rows):
    asked = Counter(w for r in rows for w in r["question"].split() if w in SHAPES)
    assert set(asked) == set(SHAPES)
