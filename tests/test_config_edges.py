"""Every ranged key at the edges of its range: the lowest and highest allowed values load, the values
just outside are refused with the key, its rule and the value named.

The edges are read from config.RULES themselves (the rule's words: "must be >= 0", "must be in
[0, 1)", ...), so a key added with one of these rules is covered the day it is added, and a rule worded
in a way `edges` does not know fails here until it is taught. "Just outside" is the next integer for
int keys and the next float (math.nextafter) for float keys; a range open above is tried at a large value.
"""

import math
import re
import typing

import pytest

from pwda_fast import config
from pwda_fast.config import ConfigError

BIG_INT, BIG_FLOAT = 10**12, 1e300
# Sizes large and a crop small, so that the crop-inside-the-image check passes at every edge.
BASE = {"data.source_size": [BIG_INT, BIG_INT], "data.target_size": [BIG_INT, BIG_INT], "data.crop": [1, 1]}
NUMBER = r"(-?\d+(?:\.\d+)?)"


def key_type(key: str):
    section, name = key.split(".")
    return typing.get_type_hints(config.section_classes()[section])[name]


def edges(key: str, rule: str, tmp_path) -> tuple[list, list]:
    """(values allowed, values refused) at the edges of `key`'s rule."""
    typ = key_type(key)
    item = typing.get_args(typ)[0] if typing.get_origin(typ) is list else typ
    num = item if item in (int, float) else None

    def below(x):
        return x - 1 if num is int else math.nextafter(float(x), -math.inf)

    def above(x):
        return x + 1 if num is int else math.nextafter(float(x), math.inf)

    def big():
        return BIG_INT if num is int else BIG_FLOAT

    def cast(text):
        return num(float(text)) if num else None

    def scalar_edges(words: str):
        """One number's edges for a rule's words -> (allowed, refused), or None if not understood."""
        if m := re.fullmatch(rf"> {NUMBER}", words):
            lo = cast(m[1])
            return [above(lo), big()], [lo]
        if m := re.fullmatch(rf">= {NUMBER}, or {NUMBER} for \w+", words):  # one value below, named
            lo, extra = cast(m[1]), cast(m[2])
            assert extra == below(lo), f"{key}: the extra value {extra} is not next to {lo}"
            return [extra, lo, big()], [below(extra)]
        if m := re.fullmatch(rf">= {NUMBER}", words):
            lo = cast(m[1])
            return [lo, big()], [below(lo)]
        if m := re.fullmatch(rf"(?:a percentile )?in \[{NUMBER}, {NUMBER}([)\]])", words):
            lo, hi, closed = cast(m[1]), cast(m[2]), m[3] == "]"
            return [lo, hi if closed else below(hi)], [below(lo), above(hi) if closed else hi]
        return None

    # The rule's words without "must be " and without a "(why)" after them (a list of numbers stays).
    words = re.sub(r" \((?![-\d, ]+\)$).*\)$", "", rule.removeprefix("must be "))
    if m := re.fullmatch(r"one of \(?([-\d, ]+?)\)?", words):
        members = {cast(v) for v in m[1].split(",")}
        return sorted(members), sorted({n for v in members for n in (below(v), above(v))} - members)
    if m := re.fullmatch(NUMBER, words):
        v = cast(m[1])
        return [v], [below(v), above(v)]
    if found := scalar_edges(words):
        return found
    if m := re.fullmatch(r"two (positive )?numbers(?: (.*))?", words):
        one = scalar_edges("> 0" if m[1] else m[2])
        if one is not None:
            (lo, hi), refused = one[0][-2:], one[1]
            return [[lo, lo], [hi, hi]], [[r, lo] for r in refused] + [[lo, r] for r in refused] + [
                [lo], [lo, lo, lo]]
    if words == "[lo, hi] with 0 < lo <= hi":
        tiny = above(0.0)
        return [[tiny, tiny], [1.0, 1.0], [tiny, BIG_FLOAT]], [[0.0, 1.0], [1.0, below(1.0)], [1.0]]
    if rule == "must not be empty":
        return ["x"], ["", " "]
    if rule == "must name an existing file (or be empty)":
        (tmp_path / "w.pth").write_bytes(b"")
        return ["", str(tmp_path / "w.pth")], [str(tmp_path / "missing.pth")]
    pytest.fail(f"{key}: no edges for the rule {rule!r}; teach tests/test_config_edges.py its form")


def load_with(key: str, value) -> config.Config:
    return config.load("toy", {**BASE, key: value})


def test_the_base_config_is_valid():
    load_with("train.iters", 1)


@pytest.mark.parametrize("key", sorted(config.RULES))
def test_lowest_and_highest_allowed_values_load(key, tmp_path):
    allowed, _ = edges(key, config.RULES[key][1], tmp_path)
    for value in allowed:
        section, name = key.split(".")
        assert getattr(getattr(load_with(key, value), section), name) == value, value


@pytest.mark.parametrize("key", sorted(config.RULES))
def test_values_just_outside_are_refused_naming_the_key(key, tmp_path):
    rule = config.RULES[key][1]
    _, refused = edges(key, rule, tmp_path)
    assert refused
    for value in refused:
        with pytest.raises(ConfigError) as e:
            load_with(key, value)
        assert f"{key} {rule}; got {value!r}" in str(e.value), (value, str(e.value))


def documented_values() -> list[tuple[str, int | float]]:
    """(key, value) that the settings' own words give a meaning, read apart from the rules: each
    "N = meaning" in a ranged key's docstring ("0 = none", "-1 = auto", "64 = the standard ResNet"), and
    0 for each lambda_* weight (a zero weight turns its term off)."""
    found = []
    for section, cls in config.section_classes().items():
        for name, doc in config.field_docs(cls).items():
            key = f"{section}.{name}"
            if key in config.RULES:
                values = re.findall(r"(?<![\w.])(-?\d+(?:\.\d+)?) = ", " ".join(doc.split()))
                values += ["0"] if name.startswith("lambda_") else []
                found += [(key, key_type(key)(float(v))) for v in values]
    return found


@pytest.mark.parametrize("key, value", documented_values())
def test_the_values_the_documentation_gives_a_meaning_are_allowed(key, value):
    """Catches an edge moved with its rule's words (a weight refused at 0 as "must be > 0"), which the
    edges read from the rules would follow."""
    load_with(key, value)


def test_the_documented_values_are_read():
    found = set(documented_values())
    assert {("adapt.lambda_adv", 0.0), ("adapt.lambda_mrnet_aux", 0.0), ("data.workers", -1),
            ("optim.warmup_iters", 0), ("adapt.hard_pixels", 0.0), ("model.width", 64)} <= found


def test_the_edges_of_a_few_rules_read_as_intended(tmp_path):
    """The reading of the rules' words, spot-checked (the tests above trust it for every key)."""
    tiny = math.nextafter(0.0, 1.0)
    assert edges("train.max_skips", "must be > 0", tmp_path) == ([1, BIG_INT], [0])
    assert edges("adapt.lambda_adv", "must be >= 0", tmp_path) == ([0.0, BIG_FLOAT], [-tiny])
    assert edges("optim.momentum", "must be in [0, 1)", tmp_path) == (
        [0.0, math.nextafter(1.0, 0.0)], [-tiny, 1.0])
    assert edges("optim.warmup_start", "must be in [0, 1]", tmp_path) == (
        [0.0, 1.0], [-tiny, math.nextafter(1.0, 2.0)])
    assert edges("data.workers", config.RULES["data.workers"][1], tmp_path) == ([-1, 0, BIG_INT], [-2])
    assert edges("model.aux_disc_width", config.RULES["model.aux_disc_width"][1], tmp_path) == (
        [4, BIG_INT], [3])
    assert edges("model.depth", config.RULES["model.depth"][1], tmp_path) == (
        [14, 26, 50, 101], [13, 15, 25, 27, 49, 51, 100, 102])
    assert edges("model.num_classes", config.RULES["model.num_classes"][1], tmp_path) == ([19], [18, 20])
    assert edges("adapt.hard_pixels", config.RULES["adapt.hard_pixels"][1], tmp_path) == (
        [0.0, math.nextafter(100.0, 0.0)], [-tiny, 100.0])


@pytest.mark.parametrize("value", ["inf", "nan"])
def test_an_infinite_or_nan_rate_or_weight_is_refused(value):
    """float("inf") and float("nan") parse from the command line; a positive or non-negative key
    refuses both, naming the key."""
    for key in ("optim.lr", "adapt.lambda_adv"):
        with pytest.raises(config.ConfigError, match=rf"{key} must be .* \(and finite\); got {value}"):
            config.load("toy", {key: float(value)})
