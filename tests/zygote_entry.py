"""A tiny worker for the zygote/shim tests (``python -m service.node.zygote --entry
tests.zygote_entry:main``): behaves as its argv says, so each test checks one semantic."""

from __future__ import annotations

import json
import os
import signal
import sys
import time


def main(argv: list[str]) -> int:
    what, *rest = argv
    if what == "exit":  # exit N
        return int(rest[0])
    if what == "describe":  # describe FILE: who am I (env, cwd, argv, parent, path)
        from service.launch_env import LaunchEnv

        body = {"pid": os.getpid(), "agent": LaunchEnv.read().agent_pid, "cwd": os.getcwd(), "argv": sys.argv,
                "env": dict(os.environ), "path": sys.path, "sid": os.getsid(0)}
        with open(rest[0], "w") as f:
            json.dump(body, f)
        print("to stdout", flush=True)
        print("to stderr", file=sys.stderr, flush=True)
        return 0
    if what == "wait-term":  # wait-term FILE: a stop handler like the trainer's, then exit 43
        stopped: list[int] = []
        signal.signal(signal.SIGTERM, lambda signum, _frame: stopped.append(signum))
        _announce(rest[0])
        while not stopped:
            time.sleep(0.02)
        with open(rest[0], "a") as f:
            f.write(f"handled {stopped[0]}\n")
        return 43
    if what == "sleep":  # sleep FILE: announce the pid, then wait to be killed
        _announce(rest[0])
        while True:
            time.sleep(1)
    raise SystemExit(f"unknown action {what!r}")


def _announce(path: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(path + ".tmp", path)
