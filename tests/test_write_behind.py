"""The background writer that spilled sessions go through: order, a bounded line, flush and close."""

from __future__ import annotations

import threading

import pytest

from ttaserve.server.write_behind import WriteBehind


def test_jobs_run_in_order_off_the_callers_thread() -> None:
    writer = WriteBehind(limit=8, name="test-writer")
    ran: list[tuple[int, str]] = []
    for i in range(5):
        writer.submit(lambda i=i: ran.append((i, threading.current_thread().name)))
    writer.flush()
    assert [i for i, _ in ran] == [0, 1, 2, 3, 4]
    assert {name for _, name in ran} == {"test-writer"}
    assert writer.pending() == 0
    writer.close()


def test_a_full_line_makes_the_caller_run_its_job() -> None:
    writer = WriteBehind(limit=2, name="test-writer")
    release = threading.Event()
    started = threading.Event()
    ran: list[tuple[str, str]] = []

    def blocker() -> None:
        started.set()
        release.wait(10)
        ran.append(("blocker", threading.current_thread().name))

    writer.submit(blocker)
    assert started.wait(10)
    for name in ("queued-1", "queued-2", "inline"):
        writer.submit(lambda name=name: ran.append((name, threading.current_thread().name)))
    assert writer.pending() == 3, "the running job and the two that wait"
    assert ran == [("inline", threading.current_thread().name)], "the third found the line full"
    release.set()
    writer.flush()
    assert [name for name, _ in ran] == ["inline", "blocker", "queued-1", "queued-2"]
    writer.close()


def test_jobs_wait_only_while_their_sizes_fit() -> None:
    """The running job's size counts until it ends; a job that does not fit runs in its caller."""
    writer = WriteBehind(limit=8, name="test-writer", max_size=100)
    release = threading.Event()
    started = threading.Event()
    ran: list[tuple[str, str]] = []

    def record(name: str) -> None:
        ran.append((name, threading.current_thread().name))

    def blocker() -> None:
        started.set()
        release.wait(10)
        record("running-60")

    writer.submit(blocker, 60)
    assert started.wait(10)
    writer.submit(lambda: record("queued-40"), 40)
    writer.submit(lambda: record("inline-1"), 1)
    assert ran == [("inline-1", threading.current_thread().name)], "60 + 40 leave no room"
    release.set()
    writer.flush()
    writer.submit(lambda: record("inline-101"), 101)
    assert ran[-1] == ("inline-101", threading.current_thread().name), "never fits"
    writer.submit(lambda: record("queued-100"), 100)
    writer.flush()
    assert ran[-1] == ("queued-100", "test-writer"), "the line is empty again"
    assert [name for name, _ in ran] == ["inline-1", "running-60", "queued-40", "inline-101", "queued-100"]
    writer.close()


def test_close_runs_what_waits_and_later_jobs_run_inline() -> None:
    writer = WriteBehind(limit=4, name="test-writer")
    gate = threading.Event()
    ran: list[str] = []
    writer.submit(lambda: gate.wait(10))
    writer.submit(lambda: ran.append("waiting"))
    closer = threading.Thread(target=writer.close)
    closer.start()
    gate.set()
    closer.join(10)
    assert not closer.is_alive() and ran == ["waiting"]
    writer.submit(lambda: ran.append(threading.current_thread().name))
    assert ran == ["waiting", threading.current_thread().name]


def test_a_failing_job_is_logged_and_the_next_still_runs(caplog: pytest.LogCaptureFixture) -> None:
    writer = WriteBehind(limit=4, name="test-writer")
    ran: list[str] = []

    def fail() -> None:
        raise OSError("disk full")

    writer.submit(fail)
    writer.submit(lambda: ran.append("after"))
    writer.flush()
    writer.close()
    assert ran == ["after"]
    assert any("disk full" in (r.exc_text or "") for r in caplog.records)
