"""The launch interface of a worker process: its command-line flags and the environment its
launcher (``ftdiff train``, torchrun, the warm process) hands it.

Every ``FTDIFF_*`` variable a launcher sets is named here. A process reads its environment once,
into a ``LaunchEnv``, and passes that down; nothing else reads these variables. The flags are
kept free of torch: ``ftdiff --version`` and ``ftdiff env`` build their parser from them and
must work where torch cannot be imported. Standard library only (the shim imports this).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass

from service.errors import UserError

SUPERVISOR_URL_ENV = "FTDIFF_SUPERVISOR_URL"  # where heartbeats go (else supervisor.url)
SUPERVISOR_PID_ENV = "FTDIFF_SUPERVISOR_PID"  # set by `ftdiff train`: its workers die with it
TOKEN_ENV = "FTDIFF_TOKEN"  # the shared secret (else supervisor.token)
NODE_ENV = "FTDIFF_NODE"  # the node a worker reports as (else torchrun's GROUP_RANK)
RUN_ID_ENV = "FTDIFF_RUN_ID"  # one run across every restart (else torchrun's rendezvous id)
ZYGOTE_SOCKET_ENV = "FTDIFF_ZYGOTE_SOCKET"  # the node's warm process, for the shims
RDZV_POLL_ENV = "FTDIFF_RDZV_POLL_S"  # agents: how often the c10d rendezvous looks again
# "<worker pid>:<agent pid>", set by the warm process in a worker it forked: the worker's
# kernel parent is the warm process, but its agent (which it watches and names the run after)
# is the shim's parent. Applies to that pid only, not to processes the worker forks.
WORKER_AGENT_ENV = "FTDIFF_WORKER_AGENT"
# The old spelling of train.collective_timeout_s (seconds); when set, it still wins.
COLLECTIVE_TIMEOUT_ENV = "FTDIFF_COLLECTIVE_TIMEOUT_S"


@dataclass(frozen=True)
class LaunchEnv:
    """What a launcher handed this process, read once (``read()``). The config overrides in
    FTDIFF_OVERRIDES are read where the config is loaded (``overrides_from_env``): a malformed
    value is a config error there, not a failure to start."""

    supervisor_url: str | None = None
    supervisor_pid: int | None = None
    token: str | None = None
    node: str = "0"
    run_id: str | None = None
    rendezvous_id: str | None = None
    """torchrun's --rdzv-id (TORCHELASTIC_RUN_ID); "none" is its default and names nothing."""
    agent_pid: int = 0
    """The torchrun agent that started this worker (its parent, or the shim's parent)."""
    zygote_socket: str | None = None
    rendezvous_poll_s: str | None = None
    """As given (agents validate it: a bad value only costs the faster polls)."""
    collective_timeout_s: str | None = None
    """FTDIFF_COLLECTIVE_TIMEOUT_S as given (see ``collective_timeout()``)."""

    def collective_timeout(self, configured_s: float) -> float:
        """train.collective_timeout_s, or the old variable's value where it is set."""
        if self.collective_timeout_s is None:
            return configured_s
        try:
            seconds = float(self.collective_timeout_s)
        except ValueError:
            seconds = float("nan")
        if not 0 < seconds < 1e7:
            raise UserError(f"{COLLECTIVE_TIMEOUT_ENV}={self.collective_timeout_s!r} is not a number of seconds; "
                            "unset it and set train.collective_timeout_s instead")
        return seconds

    @property
    def under_local_supervisor(self) -> bool:
        """Started by ``ftdiff train``: its processes must not outlive it."""
        return self.supervisor_pid is not None

    @classmethod
    def read(cls, environ: Mapping[str, str] | None = None) -> "LaunchEnv":
        env = os.environ if environ is None else environ
        return cls(
            supervisor_url=env.get(SUPERVISOR_URL_ENV) or None,
            supervisor_pid=_pid(env.get(SUPERVISOR_PID_ENV)),
            token=env.get(TOKEN_ENV) or None,
            node=env.get(NODE_ENV) or env.get("GROUP_RANK") or "0",
            run_id=env.get(RUN_ID_ENV) or None,
            rendezvous_id=env.get("TORCHELASTIC_RUN_ID"),
            agent_pid=_agent_pid(env.get(WORKER_AGENT_ENV)),
            zygote_socket=env.get(ZYGOTE_SOCKET_ENV) or None,
            rendezvous_poll_s=env.get(RDZV_POLL_ENV) or None,
            collective_timeout_s=env.get(COLLECTIVE_TIMEOUT_ENV) or None,
        )


def launcher_env(*, node: int, supervisor_url: str, token: str, run_id: str, supervisor_pid: int) -> dict[str, str]:
    """What ``ftdiff train`` sets for the agents of node ``node`` and their workers."""
    return {NODE_ENV: str(node), SUPERVISOR_URL_ENV: supervisor_url, TOKEN_ENV: token,
            RUN_ID_ENV: run_id, SUPERVISOR_PID_ENV: str(supervisor_pid)}


def worker_agent_env(worker_pid: int, agent_pid: int) -> dict[str, str]:
    """What the warm process sets in a worker it forked (see WORKER_AGENT_ENV)."""
    return {WORKER_AGENT_ENV: f"{worker_pid}:{agent_pid}"}


def _pid(raw: str | None) -> int | None:
    try:
        return int(raw) if raw else None
    except ValueError:
        return None


def _agent_pid(raw: str | None) -> int:
    worker, _, agent = (raw or "").partition(":")
    if worker == str(os.getpid()) and _pid(agent) is not None:
        return int(agent)
    return os.getppid()

# Worker overrides travel in the environment, not on the command line: /proc/<pid>/cmdline is
# readable by every user of the machine, /proc/<pid>/environ only by the process's owner.
OVERRIDES_ENV = "FTDIFF_OVERRIDES"


# Config tables whose keys are free (a model family's constructor keywords): ``--set
# model.arch.layers_per_block=2`` sets one of them.
NESTED_TABLES = frozenset({("model", "arch")})


def is_config_key(parts: list[str]) -> bool:
    """``section.key``, or ``section.table.key`` for a table in NESTED_TABLES."""
    if not all(parts):
        return False
    return len(parts) == 2 or (len(parts) == 3 and tuple(parts[:2]) in NESTED_TABLES)


def overrides_to_env(items: list[str]) -> str:
    """The value of FTDIFF_OVERRIDES for these ``section.key=value`` items (a JSON list)."""
    return json.dumps(list(items))


def overrides_from_env(environ: Mapping[str, str] | None = None) -> list[str]:
    """The ``section.key=value`` items in FTDIFF_OVERRIDES ([] if unset or empty).

    Errors name the variable and the item's position (and its key), never a value: the
    variable exists to carry secrets.
    """
    raw = (os.environ if environ is None else environ).get(OVERRIDES_ENV)
    if raw is None or not raw.strip():
        return []
    expected = 'expected a JSON list of "section.key=value" strings, e.g. ["train.max_steps=30"]'
    try:
        items = json.loads(raw)
    except json.JSONDecodeError as e:
        raise UserError(f"{OVERRIDES_ENV} is not valid JSON ({e.msg} at character {e.pos}); {expected}") from None
    if not isinstance(items, list):
        raise UserError(f"{OVERRIDES_ENV} holds a JSON {type(items).__name__}; {expected}")
    for n, item in enumerate(items):
        if not isinstance(item, str):
            raise UserError(f"{OVERRIDES_ENV} item {n} is a JSON {type(item).__name__}, not a string; {expected}")
        key = item.split("=", 1)[0].strip()
        parts = key.split(".")
        if "=" not in item or not is_config_key(parts):
            raise UserError(f"{OVERRIDES_ENV} item {n}: not section.key=value; {expected}")
    return items


def override_item(item: str) -> str:
    """``--set``'s type: a ``section.key=value`` item, refused at parse time (exit 2, naming
    --set) when it cannot be one. Messages name the key, never the value (it may be a secret)."""
    key, eq, _ = item.partition("=")
    parts = key.strip().split(".")
    if not eq or not is_config_key([p.strip() for p in parts]):
        shown = f"{key.strip()!r}" if eq else "an item without '='"
        raise argparse.ArgumentTypeError(
            f"{shown}: expected section.key=value, e.g. train.max_steps=30")
    try:
        item.encode("utf-8")
    except UnicodeEncodeError:
        # Bytes that are not UTF-8 reach Python as lone surrogates; a TOML config (and the
        # JSON in $FTDIFF_OVERRIDES) can only hold Unicode text, so no config can carry them.
        raise argparse.ArgumentTypeError(
            f"{key.strip()!r}=...: the value is not valid UTF-8 (a config can only hold Unicode "
            "text; rename the path or set LANG/LC_ALL to a UTF-8 locale)") from None
    return item


def add_worker_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML file or preset name (tiny, small, base); default: embedded tiny")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", type=override_item,
                   help=f"override one config key (repeatable; after those in ${OVERRIDES_ENV})")
    p.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="log lines as text or JSON (one object per line)")
    p.add_argument("--verbose", action="store_true",
                   help="more detail: debug logs (workers, supervisor) and the traceback of a failure")
