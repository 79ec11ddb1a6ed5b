"""Issue 13 (console): ``opsctl console`` into a keel pod (process backend)
against what runc users do today, ``ctr task exec``, same host, same minutes.

* attach: wall time of ``opsctl console POD -- true`` (opsctl -> opsd -> shim
  -> agent, a new process there, its exit back) against ``ctr task exec
  ... true`` on a runc container;
* keystroke echo: on an interactive session (opsctl on a pseudo-terminal of
  its own, a shell on the remote one), the time from writing one byte to
  reading its echo, against ``ctr task exec -t ... sh`` on runc the same
  way;
* the pod's own stdout throughput (an exec writing to ctr's stdout, through
  the same shim and agent) while a console session of the same pod prints
  as fast as it may (``yes``: opsd holds a session to 1 MiB/s), against the
  same pod with no session.

Targets (issue 13): attach at most 300 ms on the process backend; echo p99
at most 20 ms (process), 50 ms (qemu under TCG).  ``--only console-vm``
measures attach and echo with the keel pod in a VM (:func:`vm_stage`).
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import subprocess
import sys
import tempfile
import termios
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import Row, alternate, median, p99
from bench.core import MIB
from bench.releases import REPO
from bench.stage import OPSD_ENV, Opsd, Stage, progress

NAMES = ("keel console", "runc exec")


@dataclass(frozen=True, slots=True)
class ConsoleConfig:
    attach_rounds: int = 20
    keystrokes: int = 200
    #: 0: no stdout figures (a VM pod's stdout under TCG measures emulation).
    throughput_rounds: int = 3
    #: The backend the keel pod must be on (checked with ``opsctl ls``).
    backend: str = "process"
    throughput_bytes: int = 128 * MIB

    @classmethod
    def quick(cls) -> ConsoleConfig:
        return cls(attach_rounds=3, keystrokes=20, throughput_rounds=1,
                   throughput_bytes=8 * MIB)

    @classmethod
    def vm(cls, quick: bool) -> ConsoleConfig:
        return cls(attach_rounds=2 if quick else 10, keystrokes=10 if quick else 100,
                   throughput_rounds=0, backend="qemu")


def vm_stage() -> Stage:
    """A stage whose keel pods are VMs (the guest image built or found as the VM
    tests do; KVM where usable, TCG otherwise)."""
    from shim.vmm.qemu import image

    img = image.build(image.default_dir(), say=lambda line: progress(f"console-vm: {line}"))
    stage = Stage()
    config = stage.tmp / "keel.toml"
    config.write_text("\n".join([
        "[shim]", 'backend = "qemu"', "agent_timeout_s = 120", "", "[qemu]",
        f'image = "{img.initrd.parent}"', f'probe_cache = "{stage.tmp / "kvm-probe.json"}"', ""]))
    stage.shim_env["KEEL_CONFIG"] = str(config)
    return stage


def run_console(stage: Stage, cfg: ConsoleConfig) -> tuple[list[Row], dict[str, Any]]:
    raw: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="rel-", dir=stage.tmp) as releases, \
            Opsd(stage, Path(releases)) as opsd, \
            stage.container("keel", "con", "sleep", "100000") as pod, \
            stage.container("runc", "con", "sleep", "100000") as ref:
        r = opsd.opsctl("console", "enable", pod)
        if r.returncode != 0:
            raise RuntimeError(f"console enable: {r.stderr}")
        listed = {sb["id"]: sb for sb in json.loads(opsd.opsctl("ls", "--json").stdout)
                  ["sandboxes"]}
        raw["backend"] = listed[pod].get("backend", "?")
        raw["accel"] = listed[pod].get("accel", "")
        if raw["backend"] != cfg.backend:
            raise RuntimeError(f"the keel pod runs on {raw['backend']}, not {cfg.backend}")

        progress(f"console: attach, {cfg.attach_rounds} rounds each")
        ids = iter(range(1, 1 << 30))

        def attach() -> None:
            r = opsd.opsctl("console", pod, "--", "true")
            if r.returncode != 0:
                raise RuntimeError(f"opsctl console: {r.stderr}")

        def exec_() -> None:
            stage.ctr("tasks", "exec", "--exec-id", f"b{next(ids)}", ref, "true")

        attaches = alternate(cfg.attach_rounds, {NAMES[0]: attach, NAMES[1]: exec_}, warmup=1)
        raw["attach_s"] = attaches

        progress(f"console: keystroke echo, {cfg.keystrokes} keystrokes each")
        keel_echo = _echo([sys.executable, "-m", "opsd.cli", "--socket", str(opsd.socket),
                           "console", pod, "--", "/bin/sh"], cfg.keystrokes)
        runc_echo = _echo(stage.ctr_argv("tasks", "exec", "-t", "--exec-id", "echo", ref, "sh"),
                          cfg.keystrokes)
        raw["echo_s"] = {NAMES[0]: keel_echo, NAMES[1]: runc_echo}

        if not cfg.throughput_rounds:
            return _rows(attaches, keel_echo, runc_echo, [], []), raw
        size = cfg.throughput_bytes
        progress(f"console: pod stdout with and without a busy console session, "
                 f"{size // MIB} MiB x {cfg.throughput_rounds}")
        alone = [_stdout_rate(stage, pod, size) for _ in range(cfg.throughput_rounds)]
        busy = subprocess.Popen([sys.executable, "-m", "opsd.cli", "--socket", str(opsd.socket),
                                 "console", pod, "--", "yes", "console output"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=OPSD_ENV, cwd=REPO)
        try:
            time.sleep(1)
            loaded = [_stdout_rate(stage, pod, size) for _ in range(cfg.throughput_rounds)]
        finally:
            busy.terminate()
            busy.wait(30)
        raw["stdout_mb_s"] = {"alone": alone, "busy console": loaded}
    return _rows(attaches, keel_echo, runc_echo, loaded, alone), raw


def _rows(attaches: dict[str, list[float]], keel_echo: list[float], runc_echo: list[float],
          loaded: list[float], alone: list[float]) -> list[Row]:
    a, b = attaches[NAMES[0]], attaches[NAMES[1]]
    rows = [
        Row("attach median (console -- true / exec true)", median(a) * 1e3, median(b) * 1e3,
            "ms", 0, "keel <= 300 ms"),
        Row(f"attach p99 (n={len(a)})", p99(a) * 1e3, p99(b) * 1e3, "ms", 0),
        Row("keystroke echo median", median(keel_echo) * 1e3, median(runc_echo) * 1e3, "ms", 1),
        Row(f"keystroke echo p99 (n={len(keel_echo)})", p99(keel_echo) * 1e3,
            p99(runc_echo) * 1e3, "ms", 1, "keel <= 20 ms (process), 50 ms (qemu TCG)"),
    ]
    if alone:
        rows.append(Row("keel pod stdout: with a busy console | alone", median(loaded),
                        median(alone), "MB/s", 1, "console bytes do not slow the pod"))
    return rows


def _echo(argv: list[str], keystrokes: int) -> list[float]:
    """Seconds from writing a byte to its echo, on a shell behind *argv*, which
    runs on a pseudo-terminal of its own."""
    master, slave = os.openpty()
    termios.tcsetwinsize(slave, (24, 80))
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=OPSD_ENV,
                            cwd=REPO, start_new_session=True,
                            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
    os.close(slave)
    samples: list[float] = []
    try:
        _read_until(master, b"# ", 30)
        for n in range(keystrokes):
            key = b"abcdefghij"[n % 10:n % 10 + 1]
            t0 = time.perf_counter()
            os.write(master, key)
            _read_until(master, key, 10)
            samples.append(time.perf_counter() - t0)
        os.write(master, b"\x15exit\n")  # Ctrl-U drops the typed line
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return samples


def _read_until(fd: int, needle: bytes, timeout: float) -> None:
    seen = b""
    deadline = time.monotonic() + timeout
    while needle not in seen:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise RuntimeError(f"no {needle!r} within {timeout}s: {seen[-200:]!r}")
        seen += os.read(fd, 4096)


def _stdout_rate(stage: Stage, pod: str, size: int) -> float:
    """MB/s of an exec's stdout in *pod* (through the same shim and agent as
    its console sessions), from the first byte to EOF."""
    argv = stage.ctr_argv("tasks", "exec", "--exec-id", stage.new_id("tput"), pod,
                          "head", "-c", str(size), "/dev/zero")
    total, t_first = 0, 0.0
    with subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        while chunk := os.read(proc.stdout.fileno(), 1 << 20):
            if not total:
                t_first = time.perf_counter()
            total += len(chunk)
        t_end = time.perf_counter()
        if proc.wait(120) != 0 or total != size:
            raise RuntimeError(f"ctr task exec: rc {proc.returncode}, {total} of {size} bytes")
    return total / max(t_end - t_first, 1e-9) / 1e6
