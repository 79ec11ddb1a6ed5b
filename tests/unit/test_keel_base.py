"""The base package (keel/) on its own: ids, lifecycle, procfs, peer
credentials, retry policies, log tails, timestamps and error codes.

Real objects throughout: processes, sockets, files, tenacity's own loop.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import tenacity

from keel import clock, errors, ids, logs, peercred, procfs, retry
from keel.errors import Code, FailedPrecondition, InvalidArgument, KeelError
from keel.lifecycle import Lifecycle, State
from tests.prereq import skip_or_fail

# -- keel.ids ----------------------------------------------------------------


@pytest.mark.parametrize("value", [
    "a", "Z", "0", "c1", "abc-123", "a.b_c-d", "A1.b2_C3-d4", "sha256.0123abcdef",
    "x" * 76, "a" + "-b" * 37 + "c",
])
def test_ids_follow_containerds_rule(value: str) -> None:
    assert ids.valid(value)
    assert ids.check(value) == value


@pytest.mark.parametrize("value", [
    "", "x" * 77, "-a", "a-", ".a", "a.", "_a", "a_", "a--b", "a.-b", "a..b", "a/b", "a b",
    "../etc", "a\n", "ä", "a:b", None, 7, b"abc", ["a"],
])
def test_ids_outside_the_rule_are_refused(value: object) -> None:
    assert not ids.valid(value)
    with pytest.raises(InvalidArgument, match=r"invalid exec id .*at most 76 characters"):
        ids.check(value, "exec id")


def test_an_optional_id_may_be_empty_but_not_invalid() -> None:
    assert ids.check("", "exec id", optional=True) == ""
    assert ids.check("e1", "exec id", optional=True) == "e1"
    with pytest.raises(InvalidArgument, match="invalid exec id ''"):
        ids.check("", "exec id")
    with pytest.raises(InvalidArgument, match="invalid exec id 'a/b'"):
        ids.check("a/b", "exec id", optional=True)
    with pytest.raises(InvalidArgument):
        ids.check(None, optional=True)


# -- keel.lifecycle ----------------------------------------------------------

C, R, P, S = State.CREATED, State.RUNNING, State.PAUSED, State.STOPPED
#: containerd's init process states, written out independently of the table.
LEGAL = {(C, R), (C, S), (R, P), (R, S), (P, R), (P, S)}


class _Process(Lifecycle):
    def __init__(self, state: State) -> None:
        self.state = state

    @property
    def what(self) -> str:
        return "container c1"


@pytest.mark.parametrize("old", list(State))
@pytest.mark.parametrize("new", list(State))
def test_lifecycle_moves_only_by_the_table(old: State, new: State) -> None:
    proc = _Process(old)
    if old is new:
        assert proc.to(new, "touch") is False
        assert proc.state is old
    elif (old, new) in LEGAL:
        assert proc.to(new, "move") is True
        assert proc.state is new
    else:
        with pytest.raises(FailedPrecondition) as info:
            proc.to(new, "move")
        assert str(info.value) == f"cannot move container c1: it is {old.value}"
        assert proc.state is old


def test_an_illegal_move_names_the_current_state() -> None:
    proc = _Process(C)
    proc.to(R, "start")
    proc.to(S, "kill")
    with pytest.raises(FailedPrecondition, match="^cannot start container c1: it is stopped$"):
        proc.to(R, "start")
    assert errors.code_of(FailedPrecondition("x")) is Code.FAILED_PRECONDITION


def test_require_names_the_current_state() -> None:
    proc = _Process(P)
    proc.require("resume", P)
    proc.require("kill", R, P)
    with pytest.raises(FailedPrecondition, match="^cannot exec in container c1: it is paused$"):
        proc.require("exec in", R)


# -- keel.procfs -------------------------------------------------------------


def _stat_start_time(pid: int) -> int:
    """Field 22 of /proc/<pid>/stat (proc(5)), read without keel."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return int(text[text.rindex(")") + 2:].split()[19])


def _wait_until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "60"])
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.wait()


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_start_time_of_self() -> None:
    me = os.getpid()
    assert procfs.start_time(me) == _stat_start_time(me)
    assert procfs.is_running(me, procfs.start_time(me))
    assert procfs.uptime_s() >= 0.0


def test_is_running_is_false_for_another_start_time() -> None:
    me = os.getpid()
    started = procfs.start_time(me)
    assert not procfs.is_running(me, started + 1)
    assert not procfs.is_running(me, started - 1)


def test_is_running_is_false_for_a_zombie_and_for_a_reaped_child(
        sleeper: subprocess.Popen[bytes]) -> None:
    started = procfs.start_time(sleeper.pid)
    assert procfs.is_running(sleeper.pid, started)
    os.kill(sleeper.pid, signal.SIGKILL)
    # Not reaped yet: a zombie has exited, whatever its start time says.
    _wait_until(lambda: not procfs.is_running(sleeper.pid, started))
    assert Path(f"/proc/{sleeper.pid}/stat").exists()
    sleeper.wait()
    assert not procfs.is_running(sleeper.pid, started)
    with pytest.raises(OSError):
        procfs.start_time(sleeper.pid)


def test_open_pidfd_checks_the_start_time(sleeper: subprocess.Popen[bytes]) -> None:
    started = procfs.start_time(sleeper.pid)
    fd = procfs.open_pidfd(sleeper.pid, started)
    try:
        signal.pidfd_send_signal(fd, 0)
    finally:
        os.close(fd)
    before = _open_fds()
    with pytest.raises(ProcessLookupError, match="no longer the recorded process"):
        procfs.open_pidfd(sleeper.pid, started + 1)
    assert _open_fds() == before  # the pidfd opened for the check was closed
    fd = procfs.open_pidfd(sleeper.pid)  # no start time: no check
    os.close(fd)


def test_open_pidfd_of_a_reaped_child_fails(sleeper: subprocess.Popen[bytes]) -> None:
    started = procfs.start_time(sleeper.pid)
    sleeper.kill()
    sleeper.wait()
    with pytest.raises(ProcessLookupError):
        procfs.open_pidfd(sleeper.pid, started)


# -- keel.peercred -----------------------------------------------------------


def test_peer_credentials_of_a_socketpair_are_ours() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        want = peercred.PeerCred(os.getpid(), os.getuid(), os.getgid())
        assert peercred.of(a) == want
        assert peercred.of(b) == want
        assert peercred.of_or_none(a) == want


def test_a_closed_socket_has_no_credentials() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    b.close()
    a.close()
    with pytest.raises(OSError):
        peercred.of(a)
    assert peercred.of_or_none(a) is None


# -- keel.retry --------------------------------------------------------------


class _Flaky:
    """Fails with OSError("failure N") on each of its first *failures* calls."""

    def __init__(self, failures: int = 1 << 30, exc: type[Exception] = OSError) -> None:
        self.calls = 0
        self.failures = failures
        self.exc = exc

    async def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.exc(f"failure {self.calls}")
        return "done"


async def _run(policy: tenacity.AsyncRetrying, flaky: _Flaky) -> str:
    async for attempt in policy:
        with attempt:
            return await flaky()
    raise AssertionError("the policy neither returned nor raised")


def test_retrying_stops_after_n_attempts_and_reraises_the_last_error() -> None:
    flaky = _Flaky()
    with pytest.raises(OSError, match="^failure 3$"):
        asyncio.run(_run(retry.retrying(first=0.001, cap=0.002, attempts=3, on=OSError), flaky))
    assert flaky.calls == 3


def test_retrying_returns_once_an_attempt_succeeds() -> None:
    flaky = _Flaky(failures=2)
    policy = retry.retrying(first=0.001, cap=0.002, attempts=5, on=OSError)
    assert asyncio.run(_run(policy, flaky)) == "done"
    assert flaky.calls == 3


def test_retrying_stops_within_its_deadline() -> None:
    flaky = _Flaky()
    began = time.monotonic()
    with pytest.raises(OSError, match="^failure "):
        asyncio.run(_run(retry.retrying(first=0.001, cap=0.005, within=0.05, on=OSError), flaky))
    # It gave up on its own (there is no attempt limit), not before the deadline.
    assert flaky.calls >= 1
    assert time.monotonic() - began >= 0.05


def test_give_up_stops_early() -> None:
    flaky = _Flaky()
    policy = retry.retrying(first=0.001, cap=0.002, attempts=100, on=OSError,
                            give_up=lambda: flaky.calls >= 2)
    with pytest.raises(OSError, match="^failure 2$"):
        asyncio.run(_run(policy, flaky))
    assert flaky.calls == 2


def test_errors_outside_on_are_not_retried() -> None:
    flaky = _Flaky(exc=ValueError)
    with pytest.raises(ValueError, match="^failure 1$"):
        asyncio.run(_run(retry.retrying(first=0.001, cap=0.002, attempts=5, on=OSError), flaky))
    assert flaky.calls == 1


def test_before_sleep_sees_each_failure_that_is_retried() -> None:
    seen: list[str] = []
    policy = retry.retrying(first=0.001, cap=0.002, attempts=3, on=OSError,
                            before_sleep=lambda exc: seen.append(str(exc)))
    with pytest.raises(OSError):
        asyncio.run(_run(policy, _Flaky()))
    assert seen == ["failure 1", "failure 2"]


def _state(attempt: int) -> tenacity.RetryCallState:
    state = tenacity.RetryCallState(retry_object=tenacity.AsyncRetrying(), fn=None, args=(),
                                    kwargs={})
    state.attempt_number = attempt
    return state


def test_backoff_doubles_from_first_and_is_capped() -> None:
    wait = retry.backoff(0.01, 0.25)
    waits = [wait(_state(n)) for n in range(1, 9)]
    assert waits == pytest.approx([0.01, 0.02, 0.04, 0.08, 0.16, 0.25, 0.25, 0.25])


def test_retrying_sleeps_the_backoff() -> None:
    """The waits a policy took add up to backoff's, capped."""
    states: list[tenacity.RetryCallState] = []

    async def run() -> None:
        async for attempt in retry.retrying(first=0.001, cap=0.003, attempts=5, on=OSError):
            states.append(attempt.retry_state)
            with attempt:
                raise OSError("always")

    with pytest.raises(OSError):
        asyncio.run(run())
    assert len(states) == 5
    assert states[-1].idle_for == pytest.approx(0.001 + 0.002 + 0.003 + 0.003)


# -- keel.logs ---------------------------------------------------------------


def test_tail_is_the_end_of_the_file(tmp_path: Path) -> None:
    log = tmp_path / "agent.log"
    log.write_text("first line\n" + "x" * 1000 + "\nlast words\n")
    # The last 800 bytes, then stripped: 788 x's, "\nlast words\n".
    assert logs.tail(log) == "x" * 788 + "\nlast words"
    assert logs.tail(log, limit=11) == "last words"
    log.write_text("  only this  \n")  # shorter than the limit: all of it, stripped
    assert logs.tail(log) == "only this"


def test_tail_says_empty_or_none(tmp_path: Path) -> None:
    empty = tmp_path / "empty.log"
    empty.write_bytes(b"\n \n")
    assert logs.tail(empty) == "(empty)"
    assert logs.tail(tmp_path / "missing.log") == "(none)"
    assert logs.tail(tmp_path) == "(none)"  # a directory cannot be read


def test_tail_replaces_bytes_that_are_not_utf8(tmp_path: Path) -> None:
    log = tmp_path / "bin.log"
    log.write_bytes(b"ok \xff\xfe end")
    assert logs.tail(log) == "ok \ufffd\ufffd end"
    # A cut through a multi-byte character reads as a replacement, not an error.
    log.write_bytes("é".encode() * 4)
    assert logs.tail(log, limit=3) == "\ufffdé"


def test_throttle_says_how_many_it_kept_quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(logs.time, "monotonic", lambda: now[0])
    throttle = logs.Throttle(every_s=30)
    assert throttle() == 0  # the first one is logged
    assert [throttle() for _ in range(5)] == [None] * 5
    now[0] += 30
    assert throttle() == 5 and throttle() is None


def test_loop_error_handler_one_line_for_a_listener_out_of_fds(
        caplog: pytest.LogCaptureFixture) -> None:
    handle = logs.loop_error_handler(logging.getLogger("keel.test"))
    emfile = OSError(24, "Too many open files")
    with caplog.at_level(logging.ERROR, "keel.test"):
        for _ in range(100):
            handle(None, {"message": "socket.accept() out of system resource", "exception": emfile})
        handle(None, {"message": "Exception in callback", "exception": ValueError("boom")})
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == ("accept failed: [Errno 24] Too many open files; retrying each second"
                        " (0 failures since the last line)")
    assert lines[1:] == ["unhandled error in event loop: Exception in callback"]
    assert caplog.records[1].exc_info is not None  # other errors keep their traceback


# -- keel.clock --------------------------------------------------------------


def test_utc_of_ns() -> None:
    epoch = clock.utc_of_ns(0)
    assert epoch == datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
    assert epoch.utcoffset() == datetime.timedelta(0)
    when = clock.utc_of_ns(1_700_000_000_123_456_000)
    assert when == datetime.datetime(2023, 11, 14, 22, 13, 20, 123456, tzinfo=datetime.UTC)
    now_ns = time.time_ns()
    assert abs(clock.utc_of_ns(now_ns).timestamp() - now_ns / 1e9) < 1e-3


# -- keel.errors -------------------------------------------------------------

KEEL_ERRORS = [
    (errors.InvalidArgument, 3), (errors.NotFound, 5), (errors.AlreadyExists, 6),
    (errors.FailedPrecondition, 9), (errors.PermissionDenied, 7),
    (errors.ResourceExhausted, 8), (errors.Unavailable, 14), (errors.Unimplemented, 12),
    (errors.Internal, 13), (errors.DeadlineExceeded, 4), (errors.Cancelled, 1),
]


@pytest.mark.parametrize(("cls", "wire"), KEEL_ERRORS)
def test_error_codes_round_trip(cls: type[KeelError], wire: int) -> None:
    code = errors.code_of(cls("it broke"))
    assert code == wire  # google.rpc.Code's number, as every peer reads it
    back = errors.from_code(int(code), "it broke")
    assert type(back) is cls
    assert back.code == code and str(back) == "it broke"


@pytest.mark.parametrize(("exc", "code"), [
    (TimeoutError(), Code.DEADLINE_EXCEEDED),
    (FileNotFoundError(), Code.NOT_FOUND),
    (FileExistsError(), Code.ALREADY_EXISTS),
    (PermissionError(), Code.PERMISSION_DENIED),
    (ValueError(), Code.UNKNOWN),
    (KeelError(), Code.UNKNOWN),
])
def test_foreign_errors_get_a_code_by_type(exc: BaseException, code: Code) -> None:
    assert errors.code_of(exc) is code


@pytest.mark.parametrize(("wire", "code"), [
    (Code.ABORTED, Code.ABORTED), (Code.OUT_OF_RANGE, Code.OUT_OF_RANGE),
    (Code.UNKNOWN, Code.UNKNOWN), (99, Code.UNKNOWN), (-1, Code.UNKNOWN),
])
def test_codes_without_a_class_keep_their_code(wire: int, code: Code) -> None:
    err = errors.from_code(wire, "from the peer")
    assert type(err) is KeelError
    assert err.code is code and errors.code_of(err) is code
    assert str(err) == "from the peer"


def test_mounts_unescape_their_points(tmp_path: Path) -> None:
    """mountinfo writes a space as \\040; every reader gets the real path."""
    import subprocess

    from keel import procfs
    from shim.vmm import _sizing

    if os.geteuid() != 0:
        skip_or_fail("mounting a tmpfs needs root", what="requires_root")
    spaced = tmp_path / "with space"
    spaced.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "t", str(spaced)], check=True)
    try:
        found = [m for m in procfs.mounts() if m.point == str(spaced)]
        assert [(m.fstype, "size=4096k" in m.options) for m in found] == [("tmpfs", True)]
        assert _sizing.tmpfs_bytes(str(spaced)) == 4 << 20
    finally:
        subprocess.run(["umount", str(spaced)], check=True)
    assert not any(m.point == str(spaced) for m in procfs.mounts())
