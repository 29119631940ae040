"""What the local launcher does about its torchrun agents, as pure decisions.

The launcher (``launcher.LocalSupervisor``) is a thin executor: on every check it reads the
agents' exit codes, asks ``on_agent_codes`` what they mean, and carries out the action; when
every rank of a relaunched job reports again it calls ``on_ranks_fresh``. No process, clock or
metric here, so the rules are tested as a table (tests/unit/test_agent_policy.py).

States (``Phase``) and transitions:

============  ===============================================  ==========================
phase         event                                            next phase, action
============  ===============================================  ==========================
RUNNING       every agent exited 0                             OVER, ``Finish(0)``
RUNNING       an agent failed; workers refused (exit 2 or 3)   OVER, ``Refuse(code)``
RUNNING       an agent failed; relaunch budget spent           OVER, ``GiveUp(node, code)``
RUNNING       an agent failed; budget left                     RELAUNCHING, ``Relaunch``
RELAUNCHING   every rank of the new round reports              RUNNING
RELAUNCHING   an agent failed                                  as from RUNNING
============  ===============================================  ==========================

The relaunch budget (``supervisor.max_restarts``) counts relaunches since the last new commit:
a job that keeps committing between failures is making progress and is never given up on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import StrEnum

from service.errors import EXIT_DIVERGED, EXIT_OK, EXIT_STORAGE, EXIT_USAGE
from service.vocabulary import FailureKind, RestartReason


class Phase(StrEnum):
    RUNNING = "running"
    RELAUNCHING = "relaunching"
    """Every agent was started again in a fresh rendezvous round; not all ranks report yet."""
    OVER = "over"


@dataclass(frozen=True)
class LauncherState:
    phase: Phase = Phase.RUNNING
    relaunches: int = 0
    """Relaunches since the last new commit."""
    commit_at_relaunch: int | None = None
    """The newest commit when the last relaunch was decided."""
    round: int = 0
    """Rendezvous round (``<run id>-r<round>``): torchrun closes a round for good when an
    agent gives up, so relaunched agents join a fresh one."""


@dataclass(frozen=True)
class Finish:
    code: int


@dataclass(frozen=True)
class Refuse:
    """Workers refused before they could say so by heartbeat: a relaunch would only repeat it."""

    code: int
    kind: FailureKind


@dataclass(frozen=True)
class GiveUp:
    node: int
    code: int
    kind: FailureKind


@dataclass(frozen=True)
class Relaunch:
    """End what is left of the job (the survivors leave their steps in memory first), wait
    ``backoff``, then start every agent in round ``round``."""

    failed: tuple[int, ...]
    kind: FailureKind
    reason: RestartReason
    also_failed: tuple[FailureKind, ...]
    """The kinds of the other agents that failed in the same check: counted, one restart."""
    round: int


Action = Finish | Refuse | GiveUp | Relaunch | None


def failure_kind(code: int) -> FailureKind:
    """An agent ended by a signal (killed: a negative code; or 128 + signal through
    service.node.agent) means its node is gone, not that the program failed."""
    return FailureKind.LOST_NODE if code < 0 or code > 128 else FailureKind.AGENT_FAILED


def budget_renewed(state: LauncherState, last_commit: int | None) -> bool:
    """A new commit since the last relaunch: the job progresses, the budget is full again."""
    return state.relaunches > 0 and last_commit != state.commit_at_relaunch


def on_agent_codes(state: LauncherState, codes: Mapping[int, int | None], last_commit: int | None,
                   max_restarts: int) -> tuple[LauncherState, Action]:
    """The agents' exit codes (None: still running), by node, in node order."""
    if codes and all(c == 0 for c in codes.values()):
        return replace(state, phase=Phase.OVER), Finish(EXIT_OK)
    if budget_renewed(state, last_commit):
        state = replace(state, relaunches=0)
    failed = {n: c for n, c in codes.items() if c is not None and c != 0}
    if not failed:
        return state, None
    node, code = next(iter(failed.items()))
    kind = failure_kind(code)
    refused = next((c for c in (EXIT_USAGE, EXIT_STORAGE, EXIT_DIVERGED) if c in failed.values()), None)
    if refused is not None:
        return replace(state, phase=Phase.OVER), Refuse(refused, kind)
    if state.relaunches >= max_restarts:
        return replace(state, phase=Phase.OVER), GiveUp(node, code, kind)
    state = replace(state, phase=Phase.RELAUNCHING, relaunches=state.relaunches + 1,
                    commit_at_relaunch=last_commit, round=state.round + 1)
    reason = RestartReason.LOST_NODE if kind is FailureKind.LOST_NODE else RestartReason.JOB_FAILED
    also = tuple(failure_kind(c) for c in list(failed.values())[1:])
    return state, Relaunch(tuple(failed), kind, reason, also, state.round)


def on_exclusion(state: LauncherState) -> LauncherState:
    """Nodes are being left out (service.supervisor.exclusion): the rest start in a fresh round.
    Not a failure, so the relaunch budget is untouched (each exclusion shrinks the job, which
    min_nodes bounds)."""
    return replace(state, phase=Phase.RELAUNCHING, round=state.round + 1)


def on_ranks_fresh(state: LauncherState) -> LauncherState:
    """Every rank of the job reports: a relaunch is over."""
    return replace(state, phase=Phase.RUNNING) if state.phase is Phase.RELAUNCHING else state
