"""The manifest writer: its exact format (nested objects indented, flat lists on one line), the
same bytes as a plain json.dumps-based reference on every kind of leaf, and non-finite numbers
refused."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from fedmoe.io.manifest import dumps


def reference(obj: Any, indent: int = 1) -> str:
    """The format, written the slow way: every scalar through json.dumps."""

    def enc(v: Any, level: int) -> str:
        pad, inner = " " * indent * level, " " * indent * (level + 1)
        if isinstance(v, dict):
            if not v:
                return "{}"
            rows = [f"{inner}{json.dumps(str(k))}: {enc(x, level + 1)}" for k, x in v.items()]
            return "{\n" + ",\n".join(rows) + "\n" + pad + "}"
        if isinstance(v, (list, tuple)):
            if not v:
                return "[]"
            if all(not isinstance(x, (dict, list, tuple)) for x in v):
                return "[" + ",".join(json.dumps(x, allow_nan=False) for x in v) + "]"
            return "[\n" + ",\n".join(inner + enc(x, level + 1) for x in v) + "\n" + pad + "]"
        return json.dumps(v, allow_nan=False)

    return enc(obj, 0) + "\n"


CASES: list[Any] = [
    {"kind": "plan", "pairs": [[3, 0.25], [7, 0.75]], "empty": [], "none": None},
    {"mixed": [1, True, False, None, 2.5, -0.0, 1e300, 5e-324, 'é\n\t"', 0.1 + 0.2]},
    {"long": list(range(100)), "floats": [0.1] * 40, "nested": [[[1, 2], [3]], {"a": {}}]},
    [{"client": c, "sources": [[c, 1.0 / (c + 1)]] * 3} for c in range(5)],
    {"ünï": {"x": [1.5, "s", 3]}, "tuple": (1, 2), "bigint": 2**70, "neg": [-1, -2.5e-8]},
]


@pytest.mark.parametrize("case", CASES)
def test_same_bytes_as_the_reference(case: Any) -> None:
    text = dumps(case)
    assert text == reference(case)
    assert json.loads(text) == json.loads(json.dumps(case))


def test_the_format_by_hand() -> None:
    assert dumps({"a": [[1, 0.5], [2, 0.5]], "b": {}}) == (
        '{\n "a": [\n  [1,0.5],\n  [2,0.5]\n ],\n "b": {}\n}\n'
    )


@pytest.mark.parametrize(
    "bad", [[1.0, math.nan], {"x": math.inf}, [[1, -math.inf]], [[0.5] * 40 + [math.nan]]]
)
def test_non_finite_numbers_are_refused(bad: Any) -> None:
    with pytest.raises(ValueError, match="cannot write non-finite number"):
        dumps(bad)
