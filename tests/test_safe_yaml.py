"""YAML from users: alias bombs bounded, duplicate keys and recursion refused, errors bounded and escaped."""
from __future__ import annotations

import time

import pytest

from thalia_ray import safe_yaml
from thalia_ray.errors import excerpt

from tests.helpers import billion_laughs


def test_an_alias_bomb_is_refused_at_once_naming_the_line() -> None:
    bomb = billion_laughs()
    assert len(bomb) < 700
    started = time.perf_counter()
    with pytest.raises(safe_yaml.YamlError, match="line 6 expands to more than 100,000 values through its aliases"):
        safe_yaml.load(bomb)
    assert time.perf_counter() - started < 1.0  # refused before anything walks the expansion


def test_shared_blocks_and_merge_keys_still_load() -> None:
    text = "base: &base {lr: 0.1, epochs: 2}\ntrain: {<<: *base, epochs: 5}\nother: *base\n"
    assert safe_yaml.load(text) == {"base": {"lr": 0.1, "epochs": 2}, "train": {"lr": 0.1, "epochs": 5},
                                    "other": {"lr": 0.1, "epochs": 2}}


@pytest.mark.parametrize("text,message", [
    ("train:\n  epochs: 1\ntrain:\n  epochs: 5\n", "duplicate key 'train' at line 3"),
    ("train: {epochs: 1, epochs: 2}\n", "duplicate key 'epochs' at line 1"),
    ("a: &x\n  b: *x\n", "contains an alias (*name) of itself"),
    ("[" * 5000, "nested too deeply"),
    ("a: 1\n---\nb: 2\n", "2 documents"),
    ("a: !!python/object/apply:os.system ['true']\n", "could not determine a constructor"),
    ("a: [1\n", "at line 2, column 1"),
])
def test_refused_with_the_reason_and_line(text: str, message: str) -> None:
    with pytest.raises(safe_yaml.YamlError) as err:
        safe_yaml.load(text)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_empty_text_is_no_document() -> None:
    assert safe_yaml.load("") is None and safe_yaml.load("# only a comment\n\n") is None
    assert safe_yaml.load_all("a: 1\n---\n---\nb: 2\n") == [{"a": 1}, None, {"b": 2}]


def test_an_excerpt_is_short_escaped_and_fast_whatever_the_value() -> None:
    assert excerpt("x" * 10_000) == repr("x" * 37 + "...")[:-1] + "x" * 38 + "'" + " (10,000 characters)"
    assert excerpt("line\n\x1b[31mred") == repr("line\n\x1b[31mred")  # control characters escaped
    nested: list = ["lol"] * 9
    for _ in range(12):  # 9**12 strings if printed in full
        nested = [nested] * 9
    started = time.perf_counter()
    shown = excerpt({"a": nested})
    assert len(shown) <= 81 and time.perf_counter() - started < 0.1
    loop: list = []
    loop.append(loop)
    assert excerpt(loop) == "[[[[...]]]]"  # three levels shown
