"""Nothing outlives its supervisor: child processes die with the process that started them.

Triton, the gateway (process launcher), the bench's baseline servers, llama-server and Locust are started with
``preexec_fn=die_with_parent()``: the kernel sends them SIGKILL (``PR_SET_PDEATHSIG``) when the process that
started them ends, however it ends (SIGKILL, SIGTERM, a crash, the OOM killer). Triton's Python stubs are
Triton's children: each stub checks every 300 ms that its Triton is alive and exits when it is not.

The death signal fires when the *thread* that forked the child ends, not the process: the children are tied
only when they are started from the main thread (the one whose end is the process's end); from any other thread
they are started untied (:func:`die_with_parent` returns None) and only an orderly stop ends them.

Containers are nobody's children: :func:`watch_parent` starts a small watchdog process that removes the given
Docker containers (by label) when the process that started it ends, unless it was released first.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

_prctl = None
if sys.platform == "linux":  # resolved here, not between fork and exec
    _prctl = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).prctl
    _prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


def die_with_parent(sig: int = signal.SIGKILL) -> Callable[[], None] | None:
    """A ``preexec_fn`` for :class:`subprocess.Popen` that makes the child receive ``sig`` when this process ends.

    None (start it untied) off Linux and off the main thread (see the module's note)."""
    if _prctl is None or threading.current_thread() is not threading.main_thread():
        return None
    parent = os.getpid()
    prctl = _prctl

    def tie() -> None:  # runs in the child, between fork and exec: no allocation-heavy work here
        prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the tie took hold: nobody would send the signal
            os.kill(os.getpid(), sig)

    return tie


@contextlib.contextmanager
def sigterm_exits() -> Iterator[None]:
    """Within it SIGTERM raises ``SystemExit(143)``, so ``finally`` blocks run and stop what was started (the
    default action ends the process on the spot). Usable as a decorator; a no-op off the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminated(signum: int, frame: object) -> None:  # noqa: ARG001
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


class Watchdog:
    """A process that removes this run's Docker containers once the process that started it has ended.

    It holds the read end of a pipe whose write end only this process holds: the kernel closes that end when this
    process ends, however it ends, and the watchdog reads EOF. :meth:`release` tells it to leave the containers
    (written ``release``, then closed) and waits for it to exit."""

    def __init__(self, labels: dict[str, str]) -> None:
        read, self._write = os.pipe()
        os.set_inheritable(self._write, False)
        filters = [f"{k}={v}" for k, v in labels.items()]
        # Its own session: a Ctrl-C to the terminal's process group, or a kill of this process's group, leaves it
        # running to do its work.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vlmserve.orchestrator.watchdog", str(read), *filters], pass_fds=(read,),
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        os.close(read)

    def release(self, timeout: float = 10.0) -> None:
        """Leave the containers running: this process's end no longer removes them."""
        if self._write < 0:
            return
        with contextlib.suppress(BrokenPipeError):  # it died already: nothing left to tell
            os.write(self._write, b"release\n")
        self.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def finish(self, timeout: float = 120.0) -> None:
        """Remove the containers now (as this process's death would) and wait until the watchdog has."""
        self.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def close(self) -> None:
        """Close the write end now (as this process's death would): the watchdog removes the containers."""
        if self._write >= 0:
            os.close(self._write)
            self._write = -1


def sleep_unless(seconds: float, should_stop: Callable[[], bool]) -> bool:
    """Sleep, waking early (and returning True) when a stop is requested."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if should_stop():
            return True
        time.sleep(0.1)
    return should_stop()
