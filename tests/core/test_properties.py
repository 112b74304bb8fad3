"""Property-based tests: every number option, for any text, is a value in its range or a clean
argparse error; the patch geometry round-trips through its attrs, and nonsense in them is a
GridError, never another exception."""

import argparse
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from napari_mil.cli import build_parser
from napari_mil.cli import options as opt
from napari_mil.cli.commands import grid_settings
from napari_mil.errors import NapariMilError
from napari_mil.geometry import MAX_SIDE, PatchGeometry

NUMBER_TEXT = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(min_value=-(10**40), max_value=10**40).map(str),
    st.sampled_from(["nan", "-nan", "inf", "-inf", "1e400", "-0", "0x10", "", " 7 ", "1_000", "abc", "2.5", "1e3"]),
)
TYPES = {name: value for name, value in vars(opt).items() if isinstance(value, opt.Number)}
REQUIRED = {"tile": ["s.svs", "--out", "o"], "extract": ["s.svs", "--out", "o"], "synthetic": ["s.tif"],
            "train": ["l.csv", "--features", "f", "--out", "o"], "predict": ["--features", "f", "--out", "o"],
            "export": ["a.h5", "--out", "o"], "demo": []}


def number_options():
    """(command, option, destination, type) of every option whose values are numbers."""
    sub = build_parser()._subparsers._group_actions[0].choices
    found = []
    for command, parser in sub.items():
        for action in parser._actions:
            if action.option_strings and action.type is not None:
                found.append((command, action.option_strings[0], action.dest, action.type))
    return found


OPTIONS = number_options()


def test_every_number_option_is_checked_at_parse_time():
    assert len(OPTIONS) > 30
    unchecked = [f"{command} {option}" for command, option, _, kind in OPTIONS if not isinstance(kind, opt.Number)]
    assert not unchecked, "options with unchecked numbers: " + ", ".join(unchecked)


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(sorted(TYPES)), text=NUMBER_TEXT)
def test_a_number_type_gives_a_value_in_its_range_or_an_argparse_error(name, text):
    number = TYPES[name]
    try:
        value = number(text)
    except argparse.ArgumentTypeError as exc:
        assert repr(text) in str(exc) and str(number) in str(exc)
        return
    assert type(value) is number.kind and math.isfinite(value) and number.contains(value)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(choice=st.sampled_from(OPTIONS), text=NUMBER_TEXT)
def test_the_parser_gives_a_value_in_range_or_exits_with_2(choice, text, capsys):
    command, option, dest, number = choice
    try:
        args = build_parser().parse_args([command, *REQUIRED[command], f"{option}={text}"])
    except SystemExit as exit_:
        assert exit_.code == 2
        err = capsys.readouterr().err
        assert f"argument {option}" in err and "Traceback" not in err
        return
    value = getattr(args, dest)
    assert math.isfinite(value) and number.contains(value)
    if command == "tile":  # what the core checks besides (the overlap against the patch size...)
        try:
            grid_settings(args)
        except NapariMilError:
            pass


# ---- the patch geometry ------------------------------------------------------------------------
RESOLUTION = st.none() | st.floats(min_value=1e-6, max_value=1e6)


@st.composite
def geometries(draw):
    patch_size = draw(st.integers(1, MAX_SIDE))
    return PatchGeometry(patch_size, draw(st.integers(1, MAX_SIDE)), draw(st.integers(1, MAX_SIDE)),
                         draw(st.integers(0, patch_size - 1)), draw(RESOLUTION), draw(RESOLUTION), draw(RESOLUTION),
                         draw(RESOLUTION), draw(st.none() | st.integers(0, 30)))


@settings(max_examples=300, deadline=None)
@given(geometry=geometries())
def test_valid_geometry_round_trips_through_its_attrs(geometry):
    assert PatchGeometry.from_attrs(geometry.to_attrs(), np.zeros((1, 2))) == geometry


ANYTHING = st.one_of(
    st.none(), st.booleans(), st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(10**40), max_value=10**40), st.text(max_size=8),
    st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=3),
)
KEYS = ["patch_size", "patch_size_level0", "step_level0", "overlap", "patch_level", "downsample", "mpp",
        "level0_mpp", "level0_magnification", "target_magnification"]


@settings(max_examples=500, deadline=None)
@given(attrs=st.dictionaries(st.sampled_from(KEYS), ANYTHING),
       coords=st.lists(st.tuples(st.integers(-(10**12), 10**12), st.integers(-(10**12), 10**12)), max_size=5))
def test_nonsense_attrs_are_a_grid_error_or_a_valid_geometry(attrs, coords):
    try:
        geometry = PatchGeometry.from_attrs(attrs, np.array(coords, dtype=np.int64).reshape(-1, 2))
    except NapariMilError:
        return
    assert 1 <= geometry.patch_size <= MAX_SIDE and 1 <= geometry.patch_size_level0 <= MAX_SIDE
    assert 1 <= geometry.step_level0 <= MAX_SIDE and 0 <= geometry.overlap < geometry.patch_size
    for value in (geometry.level0_mpp, geometry.target_mpp, geometry.level0_magnification):
        assert value is None or 0 < value < math.inf


@settings(max_examples=300, deadline=None)
@given(values=st.tuples(ANYTHING, ANYTHING, ANYTHING, ANYTHING, ANYTHING))
def test_the_constructor_refuses_what_is_no_geometry(values):
    patch_size, size0, step, overlap, level = values
    try:
        geometry = PatchGeometry(patch_size, size0, step, overlap, level=level)
    except NapariMilError:
        return
    assert geometry.patch_size >= 1 and 0 <= geometry.overlap < geometry.patch_size


@pytest.mark.parametrize("attrs", [
    {"patch_size_level0": float("inf")}, {"patch_size_level0": 1e300}, {"patch_size_level0": 2.5},
    {"patch_size_level0": -256}, {"patch_size_level0": 256, "patch_level": float("inf")},
    {"patch_size": 256, "patch_level": 0, "downsample": [float("nan")]},
])
def test_examples_of_nonsense_attrs(attrs):
    from napari_mil.errors import GridError

    with pytest.raises(GridError):
        PatchGeometry.from_attrs(attrs, np.zeros((1, 2)))
