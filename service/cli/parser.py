"""The ``ftdiff`` command line: every subcommand, flag, default and help text in one place."""

from __future__ import annotations

import argparse

from service.cli.ckpt_cmds import cmd_ckpt_ls, cmd_ckpt_prune, cmd_ckpt_show, cmd_ckpt_verify
from service.cli.common import add_storage_args
from service.cli.data_cmds import cmd_data_index, cmd_data_inspect, cmd_data_pack
from service.cli.env_cmd import cmd_env, ftdiff_version
from service.cli.runs_cmds import cmd_runs_ls
from service.cli.store_cmd import cmd_rdzv_store
from service.cli.tools_cmds import cmd_export, cmd_sample
from service.cli.train_cmds import cmd_supervise, cmd_train, cmd_worker
from service.launch_env import add_worker_args

DESCRIPTION = "ftdiff: train, supervise, inspect/verify/prune checkpoints, export, sample."
EPILOG = ("exit codes: 0 ok, 1 corrupt/missing checkpoint or failed run, 2 usage/config, "
          "3 storage unreachable or access denied (docs/operations.md)")
class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each flag's default, unless there is none worth showing or the help says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        nothing = default is None or default is False or default is argparse.SUPPRESS or default == []
        if "default" in text or nothing or not action.option_strings or action.nargs == 0:
            return text
        return f"{text} (default: %(default)s)"


def _sub(sub: argparse._SubParsersAction, name: str, help: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)  # type: ignore[no-any-return]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ftdiff", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"ftdiff {ftdiff_version()}",
                        help="print the version and exit")
    # Its own dest: a subcommand's --verbose default must not reset `ftdiff --verbose CMD`.
    parser.add_argument("--verbose", dest="global_verbose", action="store_true",
                        help="print the traceback of a failure (also accepted after the subcommand)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _sub(sub, "train", "run a supervised local job (default: embedded tiny job)")
    add_worker_args(p)
    p.add_argument("--nnodes", type=int, default=1, help="simulated nodes (torchrun agents)")
    p.add_argument("--from", dest="from_url", default=None, metavar="URL[/step-N]",
                   help="fork: start a new run (a run.name or checkpoint.url of its own) from another run's "
                        "checkpoint, with changed settings; its state is kept and the lineage recorded")
    p.add_argument("--weights-only", action="store_true",
                   help="with --from: take only the parent's EMA weights (fresh optimizer, step 0, the data "
                        "from its start); any architecture setting may change as long as the weights still fit")
    p.add_argument("--nproc-per-node", default="auto",
                   help="worker processes per node: a number, or auto: one per visible GPU, 2 on CPU")
    first_run = p.add_mutually_exclusive_group()
    first_run.add_argument("--print-config", action="store_true",
                           help="print the resolved config as TOML (secrets redacted) and exit")
    first_run.add_argument("--dry-run", action="store_true",
                           help="check config, geometry, data, storage and resume point, then exit "
                                "without starting anything")
    p.set_defaults(func=cmd_train)

    p = _sub(sub, "supervise", "watch a cluster-launched job (attach mode)")
    add_worker_args(p)
    p.set_defaults(func=cmd_supervise)

    p = _sub(sub, "worker", "the torchrun worker entry (same as python -m service.train)")
    add_worker_args(p)
    p.set_defaults(func=cmd_worker)

    _ckpt_parsers(_sub(sub, "ckpt", "inspect, verify and prune checkpoints"))

    p = _sub(sub, "runs", "the runs under a folder (runs/ by default)")
    runs = p.add_subparsers(dest="runs_command", required=True, metavar="ACTION")
    p = _sub(runs, "ls", "list runs: name, state (running, finished, preempted, failed, stopped), newest step")
    p.add_argument("parent", nargs="?", default="runs", help="the folder that holds the runs")
    p.add_argument("--json", action="store_true", help="machine-readable: a list of objects, one per run")
    p.add_argument("--endpoint-url", default=None,
                   help="S3 endpoint of runs whose checkpoints are in a bucket (default: AWS_ENDPOINT_URL)")
    p.add_argument("--region", default=None, help="S3 region (default: AWS_REGION)")
    p.add_argument("--verbose", action="store_true", help="print the traceback of a failure")
    p.set_defaults(func=cmd_runs_ls, quiet=True)

    p = _sub(sub, "export", "export weights as safetensors or a diffusers folder")
    p.add_argument("url", metavar="URL[/step-N]", help="a checkpoint, or a run's root (its latest)")
    p.add_argument("--format", choices=("safetensors", "diffusers"), required=True, help="output format")
    p.add_argument("--out", required=True, help="the .safetensors file, or a new folder for diffusers")
    p.add_argument("--weights", choices=("ema", "model"), default="ema", help="EMA or raw weights")
    add_storage_args(p)
    p.set_defaults(func=cmd_export, quiet=True)

    p = _sub(sub, "sample", "render a PNG grid of samples from a checkpoint")
    p.add_argument("url", metavar="URL[/step-N]", help="a checkpoint, or a run's root (its latest)")
    p.add_argument("--out", required=True, help="the PNG file to write")
    p.add_argument("--n", type=int, default=16, help="number of samples")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (strided DDPM)")
    p.add_argument("--weights", choices=("ema", "model"), default="ema", help="EMA or raw weights")
    p.add_argument("--class", dest="class_label", type=int, default=None, metavar="K",
                   help="class-conditional models: draw class K (default: the classes in turn)")
    p.add_argument("--prompt", default=None, metavar="TEXT",
                   help="text-conditional models: what to draw (default: the empty caption)")
    p.add_argument("--guidance-scale", type=float, default=None, metavar="S",
                   help="class- or text-conditional models: classifier-free guidance (default 3; 1: none)")
    add_storage_args(p)
    p.set_defaults(func=cmd_sample, quiet=True)

    p = _sub(sub, "data", "sharded data sets (data.kind = \"webdataset\"): pack, index, inspect")
    data = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    p = _sub(data, "pack", "pack an image folder (classes: first-level subfolders; captions: .txt beside "
                           "each image) into tar shards with an index")
    p.add_argument("src", metavar="SRC", help="the image folder (local path or fsspec URL)")
    p.add_argument("dst", metavar="DST", help="where the shards and index.json go (a new location)")
    p.add_argument("--shard-size", default="256MB", help="target size of a shard")
    p.add_argument("--verbose", action="store_true", help="print the traceback of a failure")
    p.set_defaults(func=cmd_data_pack, quiet=True)
    p = _sub(data, "index", "write index.json for existing .tar shards (e.g. img2dataset's): reads each once")
    p.add_argument("url", metavar="URL", help="the folder of shards")
    p.add_argument("--verbose", action="store_true", help="print the traceback of a failure")
    p.set_defaults(func=cmd_data_index, quiet=True)
    p = _sub(data, "inspect", "counts, sizes, label histogram and the first keys of a sharded data set")
    p.add_argument("url", metavar="URL", help="the data set (its index.json)")
    p.add_argument("--verbose", action="store_true", help="print the traceback of a failure")
    p.set_defaults(func=cmd_data_inspect, quiet=True)

    p = _sub(sub, "rdzv-store", "serve torchrun's c10d rendezvous store on its own (clusters: a store "
                                "that outlives every worker pod; agents join with is_host=0)")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on")
    p.add_argument("--port", type=int, default=29400, help="port (torchrun's --rdzv-endpoint HOST:PORT)")
    p.add_argument("--log-format", choices=("text", "json"), default="text", help="log line format")
    p.add_argument("--verbose", action="store_true", help="debug logs and tracebacks")
    p.set_defaults(func=cmd_rdzv_store)

    p = _sub(sub, "env", "print versions, platform and accelerators (for bug reports)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--verbose", action="store_true", help="print the traceback of a failure")
    p.set_defaults(func=cmd_env, quiet=True)
    return parser


def _ckpt_parsers(ckpt_parser: argparse.ArgumentParser) -> None:
    ckpt = ckpt_parser.add_subparsers(dest="ckpt_command", required=True, metavar="ACTION")
    p = _sub(ckpt, "ls", "list checkpoints under a run's root (exit 1 if the root does not exist)")
    p.add_argument("url", help="a run's checkpoint root")
    p.add_argument("--json", action="store_true",
                   help='machine-readable: a list of {"step", "committed", "path", "bytes", "time"}')
    add_storage_args(p)
    p.set_defaults(func=cmd_ckpt_ls, quiet=True)

    p = _sub(ckpt, "show", "print a checkpoint's manifest (JSON: config, fingerprint, run, skips, UTC time)")
    p.add_argument("url", metavar="URL[/step-N]", help="a checkpoint, or a run's root (its latest)")
    add_storage_args(p)
    p.set_defaults(func=cmd_ckpt_show, quiet=True)

    p = _sub(ckpt, "verify", "check every file's size and checksum (exit 1 if corrupt)")
    p.add_argument("url", metavar="URL[/step-N]", help="a checkpoint, or a run's root (its latest)")
    add_storage_args(p)
    p.set_defaults(func=cmd_ckpt_verify, quiet=True)

    p = _sub(ckpt, "prune", "delete old checkpoints (never the newest committed)")
    p.add_argument("url", help="a run's checkpoint root")
    p.add_argument("--keep-last", type=int, required=True, help="newest committed checkpoints to keep")
    p.add_argument("--keep-every", type=int, default=0,
                   help="also keep every step that is a multiple of this (0: none)")
    p.add_argument("--dry-run", action="store_true", help="print what would be deleted; delete nothing")
    p.add_argument("--json", action="store_true",
                   help='machine-readable: {"deleted", "failed"}, or {"dry_run", "would_delete", "kept"}')
    add_storage_args(p)
    p.set_defaults(func=cmd_ckpt_prune, quiet=True)
