"""A worker child's stop signals (SIGTERM, SIGINT) stay the child's own, whatever its plugins install.

The child turns them into a flag its loop reads between events: a stop finishes the event in hand, gives the rest
back to the hub uncharged and calls every plugin's `worker_shutdown`. The kernel also sends SIGTERM when the
child's pool dies (procutil.stop_with_parent). A plugin that installed its own handler (a "flush on shutdown"
habit, or a library doing it at import) took all of that away: the child outlived a killed pool, taking events
with no one to enforce handler_timeout; a handler that called sys.exit() raised inside whatever ran, so a stop
charged the event in hand and stranded the rest until the hub's heartbeat timeout; one that only noted the signal
made every stop wait out the drain timeout. So after each stretch of plugin code the child puts its handler back,
saying once which handler it replaced.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Callable, Iterable, Iterator
from typing import Any

log = logging.getLogger("bucketwire.worker")

SIGNALS = (signal.SIGTERM, signal.SIGINT)

# The C functions under `signal.getsignal` and `signal.pthread_sigmask`: those wrappers turn what they return into
# enums, and for a handler that is a function the enum lookup raises and catches a ValueError. `keep` runs after
# every batch (every event at a modest rate): 12 µs a `keep` through the wrappers, 1.5 µs without them (most of it
# the one sigprocmask system call).
_signal: Any = getattr(signal, "_signal", signal)
_getsignal: Callable[[int], object] = _signal.getsignal
_sigmask: Callable[[int, Iterable[int]], set[int]] = _signal.pthread_sigmask


def describe(handler: Any) -> str:
    """A signal handler as its author would recognise it: the function's module and name, not its repr."""
    if handler == signal.SIG_IGN:
        return "SIG_IGN (the signal ignored)"
    if handler == signal.SIG_DFL:
        return "SIG_DFL (the default: the process dies at once)"
    if handler is None:
        return "a handler installed outside Python"
    name = getattr(handler, "__qualname__", None) or getattr(handler, "__name__", None) or type(handler).__name__
    module = getattr(handler, "__module__", None)
    return f"{module}.{name}" if module else str(name)


class StopSignals:
    """SIGTERM/SIGINT set `stopped` and make `fd` readable, so a child idle in poll stops at once."""

    def __init__(self) -> None:
        self.fd, w = os.pipe()
        os.set_blocking(w, False)
        self._w = w
        self.stopped = False
        self._said: set[tuple[int, str]] = set()
        for sig in SIGNALS:
            signal.signal(sig, self._on_stop)
        # Unblocked here, before any plugin code runs, without a word: a child starts with SIGINT blocked by its
        # pool (`sigint_ignored_by_children`; a signal mask survives exec), and `keep` blamed that on the plugins.
        _sigmask(signal.SIG_UNBLOCK, SIGNALS)

    def _on_stop(self, signum: int, frame: Any) -> None:
        self.stopped = True
        try:
            os.write(self._w, b"\0")
        except OSError:  # full (a stop is already pending), or closed as the child ends
            pass

    def stopping(self) -> bool:
        return self.stopped

    def keep(self, during: str) -> None:
        """Put the child's handlers back where plugin code (`during`: what just ran) replaced or blocked them."""
        # Blocked (pthread_sigmask), a stop signal stays pending for good: the child outlived its killed pool as
        # surely as with SIG_IGN. One system call (per batch) unblocks them and tells whether they were.
        blocked = _sigmask(signal.SIG_UNBLOCK, SIGNALS)
        for sig in SIGNALS:
            if sig in blocked:
                self._say(sig, "blocked the signal (pthread_sigmask)", "unblocked it", during)
        for sig in SIGNALS:
            now = _getsignal(sig)
            if now == self._on_stop:  # a bound method: a new object at each lookup, equal when it is ours
                continue
            signal.signal(sig, self._on_stop)
            self._say(sig, f"set its own {signal.Signals(sig).name} handler ({describe(now)})", "put its own back",
                      during)

    def _say(self, sig: int, did: str, undone: str, during: str) -> None:
        """One warning per signal and deed, however often plugin code does it again."""
        if (sig, did) in self._said:
            return
        self._said.add((sig, did))
        name = signal.Signals(sig).name
        log.warning(f"plugin code {did} {during}; the worker child {undone}, since it must stop when its pool "
                    f"does: on {name} it finishes the event in hand, gives the rest back to the hub and calls "
                    "every plugin's worker_shutdown, so flush and close there")

    def close(self) -> None:
        os.close(self.fd)


@contextlib.contextmanager
def sigint_ignored_by_children() -> Iterator[None]:
    """Around starting a worker child: it starts with SIGINT ignored (a disposition survives exec), so the
    terminal's Ctrl+C, which reaches every process of the group, does not end a child still importing bucketwire
    (the spawn start method imports it before any code of ours runs) with a KeyboardInterrupt traceback or `Fatal
    Python error: init_import_site`. `StopSignals` puts the child's handler in. The pool gets its own Ctrl+C and
    stops the child (SIGTERM, quiet). Here SIGINT is blocked meanwhile, so one that comes in these few lines stays
    pending for the pool's own handler (Linux never discards a blocked signal, ignored or not). The mask survives
    exec too (multiprocessing's fork_exec keeps it), so the child starts with SIGINT blocked as well, unless
    multiprocessing unblocked it meanwhile (starting its resource tracker); `StopSignals` unblocks it, before any
    plugin code runs, so that `keep` does not take it for a plugin's doing."""
    old = _sigmask(signal.SIG_BLOCK, [signal.SIGINT])
    handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, handler)
        _sigmask(signal.SIG_SETMASK, old)
