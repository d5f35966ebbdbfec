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

At the session's start (tests/conftest.py) one ``run_many`` launch per rank count is planned for
all the selected tests with a ``launch`` mark (deselected ones plan nothing) and run in the
background while the other tests go on; each test's runs keep their own names and folder. The runs
are independent (run_plan gives each its own trainer and compile state), so a failed run fails
its own test only. A launch that dies fails the tests that were in it, with its log. The launch's
environment is the session's at its start (a test's monkeypatched variables never reach it). The rank count is the test's ``nproc`` parameter, or the mark's: ``launch(key, nproc=2)``.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import signal
import subprocess
import threading
import warnings
from collections import Counter
from pathlib import Path
from typing import Callable

import pytest

from .helpers import ROOT, run_many_cmd

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
    """The session's launches, one per rank count, run in turn (1 rank first) by a background thread
    started before the first test: the suite's other tests run meanwhile (a 1-rank launch keeps one
    of the 2 cores busy; the in-process tests mostly the other). A test waits for its launch only."""

    def __init__(self, session, assets, root: Path, env: dict[str, str], timeout: int = 2400):
        self.session, self.assets, self.root, self.env, self.timeout = session, assets, root, env, timeout
        self.done: dict[int, tuple[dict, dict]] = {}  # nproc -> (nodeid -> results, nodeid -> launch error)
        self.work: dict[str, Path] = {}
        self.retried: dict[str, str] = {}  # nodeid -> why its runs ran in a second launch
        self.ready: dict[int, threading.Event] = {n: threading.Event() for n in self.needed()}
        self.proc: subprocess.Popen | None = None
        self.stopping = False
        self.thread = threading.Thread(target=self._run_all, name="shared-launches", daemon=True)
        if self.ready:
            self.thread.start()

    def needed(self) -> list[int]:
        return sorted({_nproc(i) for i in self.session.items if i.get_closest_marker("launch") is not None} - {None})

    def _items(self, nproc: int) -> list:
        return [i for i in self.session.items if i.get_closest_marker("launch") is not None and _nproc(i) == nproc]

    def _run_all(self) -> None:
        for nproc in self.ready:
            items = self._items(nproc)
            try:
                if self.stopping:
                    self.done[nproc] = ({}, {i.nodeid: "the session ended before this launch ran" for i in items})
                else:
                    self._launch(nproc, items)
            except BaseException as exc:  # noqa: BLE001 - a planner or the launcher failed: its tests say so
                why = f"the shared {nproc}-rank launch could not run: {type(exc).__name__}: {exc}"
                self.done[nproc] = ({}, {i.nodeid: why for i in items})
            finally:
                self.ready[nproc].set()

    def _plan(self, nproc: int, items: list, base: Path) -> tuple[list[dict], dict]:
        runs, owner = [], {}
        for i, item in enumerate(items):
            key = item.get_closest_marker("launch").args[0]
            work = base / f"{i:03d}_{_folder(item.nodeid)}"
            work.mkdir()
            self.work[item.nodeid] = work
            params = _params(item)
            params.setdefault("nproc", nproc)
            fn = PLANNERS[key]
            wanted = list(inspect.signature(fn).parameters)[2:]  # after (assets, work)
            for run in fn(self.assets, work, **{k: params[k] for k in wanted}):
                name = f"{i:03d}/{run['name']}"
                owner[name] = (item.nodeid, run["name"])
                runs.append({**run, "name": name})
        return runs, owner

    def _launch(self, nproc: int, items: list) -> None:
        """The launch; if its process dies (a native crash: a gloo rank once segfaulted inside a
        collective on the loaded 2-core machine), the tests left without all their results are
        planned again into fresh folders and run once more in a new launch, and say so."""
        per_test, error, complete = self._run(nproc, items, self.root / f"{nproc}rank")
        errors = {}
        if error:
            missing = [item for item in items if item.nodeid not in complete]
            if self.stopping:
                errors = {item.nodeid: error for item in missing}
            else:
                retry, error2, _ = self._run(nproc, missing, self.root / f"{nproc}rank_retry")
                per_test.update(retry)
                self.retried.update({item.nodeid: error for item in missing})
                errors = {item.nodeid: error2 for item in missing} if error2 else {}
        self.done[nproc] = (per_test, errors)

    def _run(self, nproc: int, items: list, base: Path) -> tuple[dict, str | None, set[str]]:
        """One launch of ``items``' runs: (nodeid -> results, why it failed or None, the nodeids
        that got a result for every run they planned)."""
        base.mkdir()
        runs, owner = self._plan(nproc, items, base)
        cmd, results_file = run_many_cmd(nproc, runs, base)
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        try:
            out, _ = self.proc.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self._kill()
            out, _ = self.proc.communicate()
            out += f"\n[shared launch] killed after {self.timeout} s"
        (base / "run_many.log").write_text(out)
        per_test: dict[str, dict] = {nodeid: {} for nodeid, _ in owner.values()}
        if results_file.exists():
            for res in json.loads(results_file.read_text()):
                nodeid, own = owner[res["name"]]
                per_test[nodeid][own] = {**res, "name": own}
        planned = Counter(nodeid for nodeid, _ in owner.values())
        complete = {nodeid for nodeid, n in planned.items() if len(per_test[nodeid]) == n}
        error = None
        if self.proc.returncode != 0:
            error = (f"the shared {nproc}-rank launch failed (exit {self.proc.returncode}; log {base / 'run_many.log'}):\n"
                     f"{out[-6000:]}")
        return per_test, error, complete

    def stop(self) -> None:
        """The session ends: kill the launch under way and start no other."""
        self.stopping = True
        self._kill()

    def _kill(self) -> None:
        """End the launch under way (its whole process group: torchrun and its ranks)."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def results(self, node) -> tuple[dict, Path]:
        nproc = _nproc(node)
        if nproc is None:
            raise pytest.UsageError(f"{node.nodeid}: a test marked 'launch' needs an 'nproc' parameter or "
                                    f"launch(key, nproc=N)")
        self.ready[nproc].wait()
        per_test, errors = self.done[nproc]
        if node.nodeid in errors:
            pytest.fail(errors[node.nodeid])
        if node.nodeid not in per_test:
            raise pytest.UsageError(f"{node.nodeid}: its planner made no runs")
        if node.nodeid in self.retried:
            warnings.warn(f"{node.nodeid}: its runs ran again in a fresh launch after the shared one died: "
                          f"...{self.retried[node.nodeid][-800:]}", stacklevel=1)
        return per_test[node.nodeid], self.work[node.nodeid]
