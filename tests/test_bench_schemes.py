"""benchmarks/bench_schemes.py: the --heads argument is parsed strictly (the sweep itself needs a CUDA GPU)."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

_DIR = Path(__file__).parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(_DIR))  # bench_schemes imports bench_attention from its own folder
    try:
        spec = importlib.util.spec_from_file_location("bench_schemes", _DIR / "bench_schemes.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.path.remove(str(_DIR))


def test_heads_parse_query_and_kv_heads(bench):
    assert bench.parse_heads("16/8") == (16, 8)
    assert bench.parse_heads("4/1") == (4, 1)


@pytest.mark.parametrize("bad", ["16", "16/0", "12/8", "a/b", "16/8/2"])
def test_bad_heads_name_the_value(bench, bad):
    with pytest.raises(SystemExit, match=re.escape(repr(bad))):
        bench.parse_heads(bad)
