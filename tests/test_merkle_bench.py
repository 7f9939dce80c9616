"""The append benchmark runs as a command and reports consistent numbers (not a timed test)."""

from __future__ import annotations

import orjson
import pytest

from listener.bench import tree


def test_bench_append_reports_rates_and_ratio(capsys):
    result = tree.bench_append(2_000, 500, repeat=1)
    assert orjson.loads(capsys.readouterr().out) == result
    assert result["leaves"] == 2_000 and result["batch"] == 500
    for key in ("hashlib_limit_leaves_per_s", "hash_and_append_leaves_per_s", "append_only_leaves_per_s"):
        assert result[key] > 0
    assert result["ratio_to_limit"] == pytest.approx(
        result["hash_and_append_leaves_per_s"] / result["hashlib_limit_leaves_per_s"], rel=0.01
    )


def test_bench_command_refuses_bad_sizes(capsys):
    with pytest.raises(SystemExit) as info:
        tree.main(["--leaves", "1"])
    assert info.value.code == 2
    assert "n_leaves >= 2" in capsys.readouterr().err
