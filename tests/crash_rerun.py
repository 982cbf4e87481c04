"""Run a test once more when its pytest-xdist worker died while running it (a hard crash: a signal such as SIGSEGV
or SIGABRT inside XLA, not an assertion). xdist reports such a test as failed with no traceback and starts a fresh
worker; this plugin instead puts the test back in the queue once, marks the crashed attempt ``rerun`` (shown as
``R``, listed at the end of the run) and lets the second attempt's own result count. A test that crashes its worker
twice fails as before."""

from __future__ import annotations

import pytest

#: how many times one test may crash its worker and still be run again
MAX_CRASH_RERUNS = 1


class CrashRerun:
    """xdist controller-side plugin (registered by tests/conftest.py)."""

    def __init__(self, max_reruns: int = MAX_CRASH_RERUNS):
        self.max_reruns = max_reruns
        self.crashes: dict[str, int] = {}
        self.lines: list[str] = []

    @pytest.hookimpl(optionalhook=True)
    def pytest_handlecrashitem(self, crashitem, report, sched):
        n = self.crashes.get(crashitem, 0) + 1
        self.crashes[crashitem] = n
        if n > self.max_reruns:
            self.lines.append(f"{crashitem}: worker crashed {n} times; failed")
            return
        try:
            sched.mark_test_pending(crashitem)
        except NotImplementedError:  # schedulers that cannot re-queue one test (loadscope, ...): leave it failed
            self.lines.append(f"{crashitem}: worker crashed; this scheduler cannot run it again; failed")
            return
        report.outcome = "rerun"
        self.lines.append(f"{crashitem}: worker crashed ({report.longrepr}); run again on a fresh worker")

    def pytest_report_teststatus(self, report):
        if report.outcome == "rerun":
            return "rerun", "R", ("RERUN", {"yellow": True})
        return None

    def pytest_terminal_summary(self, terminalreporter):
        if self.lines:
            terminalreporter.section("worker crashes")
            for line in self.lines:
                terminalreporter.line(line)
