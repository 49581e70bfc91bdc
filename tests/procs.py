"""Start a command and SIGKILL it at a chosen moment: the crash half of the kill-and-resume tests."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest


def kill_tree(pid: int) -> None:
    """SIGKILL a launcher and every process under it (torchrun's workers run in sessions of their own, so a
    process-group kill would leave them training)."""
    import psutil

    root = psutil.Process(pid)
    workers = root.children(recursive=True)
    for p in [*workers, root]:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(workers, timeout=30)  # not the launcher: its exit status is the caller's to read


def run_and_kill(cmd: list[str], log: Path, kill_when: Callable[[], bool], *, env: dict[str, str], cwd: Path,
                 grace: float = 0.0, timeout: float = 300, whole_tree: bool = False) -> None:
    """Start ``cmd`` (output to ``log``), SIGKILL it as soon as ``kill_when()`` holds (polled every 5 ms, then
    ``grace`` seconds more), wait for it, and check it died of the kill. ``whole_tree``: kill its children too."""
    def kill(proc: subprocess.Popen) -> None:
        kill_tree(proc.pid) if whole_tree else proc.send_signal(signal.SIGKILL)

    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while not kill_when():
                if proc.poll() is not None:
                    pytest.fail(f"the run ended (exit {proc.returncode}) before the kill point:\n{log.read_text()[-3000:]}")
                if time.monotonic() > deadline:
                    pytest.fail(f"no kill point within {timeout} s:\n{log.read_text()[-3000:]}")
                time.sleep(0.005)
            if grace:
                time.sleep(grace)
            kill(proc)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                kill(proc)
                proc.wait()
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, log.read_text()[-3000:])
