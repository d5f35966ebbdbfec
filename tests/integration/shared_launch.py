"""One torchrun launch per rank count for the trainings of every selected test.

A launch costs about 7 s on one rank and 9 s on two before its first step (torch, torchtitan and
the plugins imported per process), while a nano training in it takes 0.3-1 s: with a launch per
test the suite spent most of its time starting processes. A test that trains through the training
command therefore states its runs in a *planner* and receives their results:

    @planner("multi_rule")
    def plan(assets, work, nproc):            # the test's parameters, by name, as it needs them
        return [{"name": ..., "args": [...]}, ...]   # run_many entries; files under ``work``

    @pytest.mark.launch("multi_rule")
    @pytest.mark.parametrize("nproc", [1, 2])
    def test_...(launched, nproc):
        results, work = launched              # this test's runs (names as planned), its folder

The first test that asks runs one ``run_many`` launch per rank count for all the selected tests
with a ``launch`` mark (deselected ones plan nothing), each test's runs under their own names and
folder; the runs are independent (run_plan gives each its own trainer and compile state), so
a failed run fails its own test only. A launch that dies fails the tests that were in it, with its
log. The rank count is the test's ``nproc`` parameter, or the mark's: ``launch(key, nproc=2)``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import pytest

from .helpers import run_many

PLANNERS: dict[str, Callable[..., list[dict]]] = {}


def planner(key: str):
    """Register ``fn(assets, work, **params) -> runs`` as the plan of the tests marked ``launch(key)``."""

    def register(fn):
        if key in PLANNERS and PLANNERS[key] is not fn:
            raise ValueError(f"two planners named {key!r}")
        PLANNERS[key] = fn
        return fn

    return register


def _params(item) -> dict:
    callspec = getattr(item, "callspec", None)
    return dict(callspec.params) if callspec else {}


def _nproc(item) -> int | None:
    """The test's ``nproc`` parameter, else the mark's ``nproc=`` keyword."""
    mark = item.get_closest_marker("launch")
    return _params(item).get("nproc", mark.kwargs.get("nproc") if mark else None)


def _folder(nodeid: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", nodeid.split("::", 1)[-1])[:80]


class Launches:
    """The session's launches: planned lazily, one per rank count, on the first request."""

    def __init__(self, session, assets, root: Path, timeout: int = 2400):
        self.session, self.assets, self.root, self.timeout = session, assets, root, timeout
        self.done: dict[int, tuple[dict, str | None]] = {}  # nproc -> (nodeid -> results, launch error)
        self.work: dict[str, Path] = {}

    def _items(self, nproc: int) -> list:
        out = []
        for item in self.session.items:
            if item.get_closest_marker("launch") is not None and _nproc(item) == nproc:
                out.append(item)
        return out

    def _launch(self, nproc: int) -> None:
        base = self.root / f"{nproc}rank"
        base.mkdir()
        runs, owner = [], {}
        for i, item in enumerate(self._items(nproc)):
            key = item.get_closest_marker("launch").args[0]
            work = base / f"{i:03d}_{_folder(item.nodeid)}"
            work.mkdir()
            self.work[item.nodeid] = work
            params = _params(item)
            fn = PLANNERS[key]
            wanted = fn.__code__.co_varnames[2:fn.__code__.co_argcount]
            params.setdefault("nproc", nproc)
            for run in fn(self.assets, work, **{k: params[k] for k in wanted}):
                name = f"{i:03d}/{run['name']}"
                owner[name] = (item.nodeid, run["name"])
                runs.append({**run, "name": name})
        per_test: dict[str, dict] = {nodeid: {} for nodeid, _ in owner.values()}
        error = None
        try:
            results = run_many(nproc, runs, base, timeout=self.timeout)
        except Exception as exc:  # noqa: BLE001 - the launch died: every test in it fails
            error = f"the shared {nproc}-rank launch failed ({type(exc).__name__}): {str(exc)[-6000:]}"
        else:
            for name, res in results.items():
                nodeid, own = owner[name]
                per_test[nodeid][own] = {**res, "name": own}
        self.done[nproc] = (per_test, error)

    def results(self, node) -> tuple[dict, Path]:
        nproc = _nproc(node)
        if nproc is None:
            raise pytest.UsageError(f"{node.nodeid}: a test marked 'launch' needs an 'nproc' parameter or "
                                    f"launch(key, nproc=N)")
        if nproc not in self.done:
            self._launch(nproc)
        per_test, error = self.done[nproc]
        if error:
            pytest.fail(error)
        if node.nodeid not in per_test:
            raise pytest.UsageError(f"{node.nodeid}: its planner made no runs")
        return per_test[node.nodeid], self.work[node.nodeid]
