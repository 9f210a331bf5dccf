"""A test plugin: records every handled event as one line, and misbehaves on request.

The event's data steers it: {"fail": N} raises on the first N attempts, {"permanent": true} raises
PermanentError, {"sleep": S} sleeps, {"hold": PATH} waits until that file exists (at most 60 s: a test releases
the handler when it has seen what it wanted while the handler ran), {"abort": true} kills the child with
os.abort() (SIGABRT, as a crashing C extension would), {"exit": N} ends it with os._exit(N), {"raise": NAME}
raises the builtin BaseException NAME (SystemExit, KeyboardInterrupt, GeneratorExit), {"follow": K} publishes K
follow-ons to topic "follow" (with {"follow_pad": N}: each with N bytes of padding), {"follow_kw": {...}} one
follow-on published with those keyword arguments, {"follow_then_set": {...}} one follow-on whose attributes it
sets to those values after publishing it, {"follow_then_grow": N} one follow-on whose data it adds N bytes of
padding to after publishing it, {"follow_fsname": true} one carrying a file name that is not
UTF-8, {"follow_strsub": true} one carrying instances of str and int subclasses, {"follow_bytes": N} one
follow-on carrying N bytes of padding, {"follow_reset_hops": true} one whose hops it sets to 0 after publishing,
{"fork": PATH} os.fork()s a process that lives on after the handler (writing its pid to PATH, exiting once
PATH + ".release" exists, at most 60 s), as a handler that leaves a helper running does, {"raise_len": N} raises
a RuntimeError whose message is N characters long (one carrying a whole response body), {"fork_return": true}
os.fork()s and lets the forked copy return from the handler too (a background fork whose os._exit() was
forgotten), {"follow_topics": N} publishes one follow-on to each of N topics of its own (a topic named per object,
as a hurried author may name one), {"close_fds": true} closes every descriptor above 2 (the process's own among
them: a daemonizing recipe without its fork, or a double close), so the child dies at its next message to the hub,
{"follow_threads": N} publishes N follow-ons to topic "follow" from 8 threads of a pool it waits for (with the
interpreter switching threads as often as it can, so that calls overlap), {"fan": K} publishes K follow-ons to
the topic it consumes, each carrying the same data (a plugin that consumes its own output: K^generations events
from one upload), with {"fan_forge": true} each naming another upload as its root (`rootsource`, `rootid`),
{"published_edit": HOW} publishes one follow-on and then edits `ctx.published` itself instead of calling
ctx.publish: HOW is "append" (a raw dict), "clear", "replace" (its item by a dict) or "assign" (a new list).
"""

from __future__ import annotations

import builtins
import json
import os
import sys
import time

from bucketwire import PermanentError, hookimpl

PLUGIN_NAME = "recorder"


@hookimpl
def validate_settings(settings):
    if "path" not in settings:
        raise ValueError("path: required; where to record handled events")
    return settings


def _fork_leftover(path: str) -> None:
    pid = os.fork()
    if pid == 0:  # the leftover: a copy of the child, holding every descriptor it had
        try:
            end = time.monotonic() + 60
            while not os.path.exists(path + ".release") and time.monotonic() < end:
                time.sleep(0.05)  # pacing: polling for the test's release file, with a deadline
        finally:
            os._exit(0)
    with open(path, "w") as f:
        f.write(str(pid))


@hookimpl
def handle_event(event, ctx):
    d = event.data if isinstance(event.data, dict) else {}
    t0 = time.monotonic()
    if d.get("mark_start"):  # lets a test act while the handler is provably running
        with open(ctx.settings["path"] + ".started", "a") as f:
            f.write(f"{os.getpid()} {event.seq}\n")
    if d.get("fork"):
        _fork_leftover(d["fork"])
    if d.get("close_fds"):
        os.closerange(3, 65536)
    if d.get("fork_return"):
        os.fork()
    if d.get("abort"):
        os.abort()
    if "exit" in d:
        os._exit(d["exit"])
    if d.get("raise_len"):
        raise RuntimeError("unexpected body: " + "x" * d["raise_len"])
    if d.get("raise"):
        raise getattr(builtins, d["raise"])(2 if d["raise"] == "SystemExit" else "planned")
    if d.get("sleep"):
        time.sleep(d["sleep"])  # pacing: simulated handler work
    if d.get("hold"):
        end = time.monotonic() + 60
        while not os.path.exists(d["hold"]) and time.monotonic() < end:
            time.sleep(0.02)  # pacing: polling for the test's release file, with a deadline
    if ctx.attempt <= d.get("fail", 0):
        raise RuntimeError(f"planned failure {ctx.attempt}")
    if d.get("permanent"):
        raise PermanentError("planned permanent failure")
    pad = {"pad": "x" * d["follow_pad"]} if d.get("follow_pad") else {}
    for i in range(d.get("follow", 0)):
        ctx.publish("follow", {"n": i, "cause_seq": event.seq, **pad})
    if d.get("follow_threads"):
        from concurrent.futures import ThreadPoolExecutor

        was = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)
        try:
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(lambda i: ctx.publish("follow", {"part": i, "cause_seq": event.seq}),
                              range(d["follow_threads"])))
        finally:
            sys.setswitchinterval(was)
    for i in range(d.get("follow_topics", 0)):
        ctx.publish(f"done-{event.seq}-{i}", {"cause_seq": event.seq})
    for i in range(d.get("fan", 0)):
        fo = ctx.publish(event.topic or "", {**d, "key": f"{d.get('key', 'k')}.{i}"})
        if d.get("fan_forge"):  # a plugin that names another upload as the root, to escape its budget
            fo.extensions.update({"rootsource": "urn:forged", "rootid": f"{event.seq}.{i}"})
    if d.get("follow_kw"):
        ctx.publish("follow", {"cause_seq": event.seq}, **d["follow_kw"])
    if d.get("follow_strsub"):  # a str subclass, as lxml's XPath results are
        ctx.publish("follow", {"name": type("Text", (str,), {})("caption"), "n": type("Num", (int,), {})(7)})
    if d.get("follow_fsname"):  # a file name with a byte that is not UTF-8, as os.listdir() returns it
        ctx.publish("follow", {"name": os.fsdecode(b"caf\xe9.jpg")})
    if d.get("follow_bytes"):
        ctx.publish("follow", {"pad": "x" * d["follow_bytes"]})
    if d.get("follow_reset_hops"):  # a plugin that resets the hop count of what it published
        ctx.publish("follow", {"cause_seq": event.seq}).hops = 0
    if d.get("follow_then_grow"):  # a plugin that adds to the data it published, after ctx.publish measured it
        published_data = {"cause_seq": event.seq}
        ctx.publish("follow", published_data)
        published_data["pad"] = "x" * d["follow_then_grow"]
    if d.get("follow_then_set"):  # a plugin that changes what it published, after ctx.publish checked it
        published = ctx.publish("follow", {"cause_seq": event.seq})
        for k, v in d["follow_then_set"].items():
            setattr(published, k, v)
    if d.get("published_edit"):  # a plugin that edits the follow-ons list instead of calling ctx.publish
        how = d["published_edit"]
        ctx.publish("follow", {"cause_seq": event.seq})
        if how == "append":
            ctx.published.append({"topic": "follow", "data": {"raw": True}})
        elif how == "clear":
            ctx.published.clear()
        elif how == "replace":
            ctx.published[0] = {"topic": "follow", "data": {"raw": True}}
        elif how == "assign":
            ctx.published = []
    line = json.dumps({"g": ctx.group, "pid": os.getpid(), "t": event.topic, "s": event.seq, "id": event.id,
                       "key": event.key, "a": ctx.attempt, "t0": t0, "ts": time.monotonic(), "data": d,
                       "bytes": None if event.data_bytes is None else event.data_bytes.hex()})
    fd = os.open(ctx.settings["path"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)
