"""The shared launch's bookkeeping (tests/integration/shared_launch.py) with a stand-in launcher:
a launch that dies after some tests finished keeps their results and runs the others again once;
a second death fails only those others. The stand-in is a short Python process that writes the
results run_plan would write, then exits with the code the case needs."""

from __future__ import annotations

import json
import sys

import pytest

from . import shared_launch


class FakeItem:
    def __init__(self, nodeid: str, key: str):
        self.nodeid = nodeid
        self.mark = pytest.mark.launch(key, nproc=1).mark

    def get_closest_marker(self, name):
        return self.mark if name == "launch" else None


class FakeSession:
    def __init__(self, items):
        self.items = items


def fake_launcher(exits: list[int], finish_first: list[int]):
    """Launch number k writes results for its first ``finish_first[k]`` runs and exits ``exits[k]``."""
    calls = []

    def run_many_cmd(nproc, runs, workdir):
        k = len(calls)
        calls.append([r["name"] for r in runs])
        results = workdir / "results.json"
        done = [{"name": r["name"], "ok": True, "error": None, "launch": k} for r in runs[:finish_first[k]]]
        code = f"import json, sys; json.dump({done!r}, open({str(results)!r}, 'w')); sys.exit({exits[k]})"
        return [sys.executable, "-c", code], results

    return run_many_cmd, calls


@pytest.fixture
def two_tests(monkeypatch, tmp_path):
    for key in ("fake_a", "fake_b"):
        monkeypatch.setitem(shared_launch.PLANNERS, key, lambda assets, work: [{"name": "x", "args": []},
                                                                               {"name": "y", "args": []}])
    items = [FakeItem("t::a", "fake_a"), FakeItem("t::b", "fake_b")]
    return items, tmp_path


def launches(items, root):
    got = shared_launch.Launches(FakeSession(items), {}, root, env={"PATH": "/usr/bin:/bin"})
    got.thread.join(timeout=60)
    return got


def test_a_launch_that_dies_keeps_the_finished_tests_and_reruns_the_others_once(monkeypatch, two_tests):
    items, root = two_tests
    cmd, calls = fake_launcher(exits=[1, 0], finish_first=[3, 2])  # dies inside test b's runs
    monkeypatch.setattr(shared_launch, "run_many_cmd", cmd)
    got = launches(items, root)
    assert calls == [["000/x", "000/y", "001/x", "001/y"], ["000/x", "000/y"]]  # only b again
    with pytest.warns(UserWarning, match="ran again in a fresh launch"):
        b, b_work = got.results(items[1])
    assert {r["launch"] for r in b.values()} == {1} and set(b) == {"x", "y"}
    a, _ = got.results(items[0])
    assert {r["launch"] for r in a.values()} == {0} and set(a) == {"x", "y"}
    assert b_work.parent.name == "1rank_retry"


def test_a_second_death_fails_only_the_tests_without_results(monkeypatch, two_tests):
    items, root = two_tests
    cmd, calls = fake_launcher(exits=[1, 1], finish_first=[2, 0])
    monkeypatch.setattr(shared_launch, "run_many_cmd", cmd)
    got = launches(items, root)
    assert len(calls) == 2
    a, _ = got.results(items[0])
    assert set(a) == {"x", "y"}
    with pytest.raises(pytest.fail.Exception, match="shared 1-rank launch failed"):
        got.results(items[1])
    assert json.loads((root / "1rank" / "results.json").read_text())[0]["name"] == "000/x"
