"""bench/run.py argument errors and result files that are never overwritten (issue 12)."""

import json

import pytest

from bench import common, run


def test_unknown_section_exits_2_with_the_valid_list(capsys):
    for sections in ("foo", "drift,foo", ","):
        with pytest.raises(SystemExit) as e:
            run.main(["--sections", sections, "--no-save"])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "--sections: unknown section" in err and "valid: drift, attention, rollout" in err
    assert "foo" in err or "(none given)" in err


def test_two_runs_never_overwrite_each_other(tmp_path):
    env = {"date_utc": "2026-11-22T23:59:58Z", "device_name": "cpu", "device": "cpu"}
    rows = [common.row("drift", "x", "ref", "1", "float32", "time", 1.0, "ms")]
    paths = [common.write_results(rows, env, tmp_path, "drift")[0] for _ in range(3)]
    later = common.write_results(rows, dict(env, date_utc="2026-11-22T23:59:59Z"), tmp_path, "drift")[0]
    assert len({*paths, later}) == 4
    assert [p.name for p in paths][1:] == [paths[0].stem + "-2.csv", paths[0].stem + "-3.csv"]
    assert paths[0].name.endswith("-20261122-235958.csv") and later.name.endswith("-20261122-235959.csv")
    for p in paths:
        assert json.loads(p.with_suffix(".json").read_text())["rows"][0]["value"] == 1.0
