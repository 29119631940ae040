"""``ftdiff rdzv-store``: the c10d rendezvous store on its own, for clusters.

torchrun's c10d rendezvous keeps its state in a TCPStore hosted by one agent (``is_host``).
On Kubernetes that agent is a worker pod, so draining that pod's node ends the store and every
other pod's agent with it. Run as a small Deployment of its own, the store outlives any worker
pod: every agent joins as a client (``is_host=0``), and an evicted pod's agents leave and come
back without taking the others down.
"""

from __future__ import annotations

import argparse
import logging
import signal
from datetime import timedelta

from service.errors import EXIT_OK, UserError

log = logging.getLogger(__name__)


def cmd_rdzv_store(args: argparse.Namespace) -> int:
    from torch.distributed import TCPStore

    from service.logs import setup_logging

    setup_logging("rdzv-store", args.log_format, args.verbose)
    stop = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)  # waited for below, never delivered mid-call
    try:
        store = TCPStore(args.host, args.port, is_master=True, wait_for_workers=False,
                         timeout=timedelta(seconds=30))
    except (RuntimeError, OSError) as e:
        raise UserError(f"cannot serve the rendezvous store on {args.host}:{args.port}: {e}") from None
    log.info("rendezvous store on %s:%d (agents: --rdzv-endpoint=HOST:%d, is_host=0)",
             args.host, store.port, store.port)
    signum = signal.sigwait(stop)
    log.info("signal %d: store stops", signum)
    return EXIT_OK
