"""Run `bucketwire ...` (the hub) with counters the profile reads: SQLite statements, mallocs, a cProfile.

Used by `profile_bus` only; it changes nothing in the hub's code. SIGUSR1 toggles a measuring window: the first
starts it, the second stops it; each appends one JSON line to $BUCKETWIRE_PROBE_OUT. Statements are counted per
thread and per first keyword through `set_trace_callback` (SQLite calls it for every statement it runs, one per
row of an executemany). Mallocs (malloc and realloc(NULL) calls) are counted if `malloc_count.so` was preloaded
with PYTHONMALLOC=malloc, so that every Python object's allocation is a malloc; they cover the whole process
(libzmq's threads too).
"""

from __future__ import annotations

import cProfile
import ctypes
import json
import os
import pstats
import signal
import sqlite3
import sys
import threading
from typing import Any

_state: dict[str, Any] = {"on": False, "sql": {}, "prof": None, "mallocs": 0}
_real_connect = sqlite3.connect


def _malloc_count() -> int:
    try:
        return int(ctypes.CDLL(None).bw_malloc_count())
    except (AttributeError, OSError):
        return -1


def _trace(stmt: str) -> None:
    if _state["on"]:
        key = f"{threading.current_thread().name}: {stmt.split(None, 1)[0].upper() if stmt.strip() else '?'}"
        _state["sql"][key] = _state["sql"].get(key, 0) + 1


def _connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
    db: sqlite3.Connection = _real_connect(*args, **kwargs)
    db.set_trace_callback(_trace)
    return db


def _toggle(signum: int, frame: Any) -> None:
    if not _state["on"]:
        _state["sql"] = {}
        _state["mallocs"] = _malloc_count()
        _state["prof"] = cProfile.Profile()
        _state["on"] = True
        with open(os.environ["BUCKETWIRE_PROBE_OUT"], "a") as f:  # the harness waits for this line
            f.write('{"started": true}\n')
        _state["prof"].enable()
        return
    _state["prof"].disable()
    _state["on"] = False
    mallocs = _malloc_count() - _state["mallocs"] if _state["mallocs"] >= 0 else -1
    st = pstats.Stats(_state["prof"])
    funcs = []
    for (file, line, name), (_cc, nc, tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        funcs.append({"func": f"{os.path.basename(file)}:{line}({name})", "calls": nc, "tottime": tt, "cumtime": ct})
    funcs.sort(key=lambda f: -f["tottime"])
    out = {"sql": _state["sql"], "mallocs": mallocs, "calls": sum(f["calls"] for f in funcs),
           "functions": funcs[:60], "by_name": {f["func"]: f["calls"] for f in funcs}}
    with open(os.environ["BUCKETWIRE_PROBE_OUT"], "a") as f:
        f.write(json.dumps(out) + "\n")


def main() -> None:
    sqlite3.connect = _connect  # type: ignore[assignment]
    signal.signal(signal.SIGUSR1, _toggle)
    from bucketwire.cli import main as cli_main

    sys.argv = ["bucketwire", *sys.argv[1:]]
    cli_main()


MALLOC_COUNTER_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>
static unsigned long long n;
static void *(*real_malloc)(size_t);
static void *(*real_realloc)(void *, size_t);
unsigned long long bw_malloc_count(void) { return __atomic_load_n(&n, __ATOMIC_RELAXED); }
void *malloc(size_t s) {
    if (!real_malloc) real_malloc = dlsym(RTLD_NEXT, "malloc");
    __atomic_add_fetch(&n, 1, __ATOMIC_RELAXED);
    return real_malloc(s);
}
void *realloc(void *p, size_t s) {
    if (!real_realloc) real_realloc = dlsym(RTLD_NEXT, "realloc");
    if (!p) __atomic_add_fetch(&n, 1, __ATOMIC_RELAXED);
    return real_realloc(p, s);
}
"""

if __name__ == "__main__":
    main()
