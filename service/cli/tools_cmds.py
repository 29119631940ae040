"""``ftdiff export`` and ``ftdiff sample``: weights out of a checkpoint, and a grid of samples."""

from __future__ import annotations

import argparse

from service.cli.common import check_metadata, resolve_ref, shown
from service.cli.progress import byte_progress, step_progress
from service.errors import EXIT_OK, UserError


def cmd_export(args: argparse.Namespace) -> int:
    from service.export import export

    ref = resolve_ref(args)
    check_metadata(ref)
    with byte_progress("export", ref.manifest.total_bytes):
        out = export(ref, args.format, args.out, args.weights)
    print(f"exported {args.weights} weights of {shown(ref)} to {out}")
    return EXIT_OK


def cmd_sample(args: argparse.Namespace) -> int:
    from service.sample import check_grid_path, generate, save_grid, unet_from_state
    from service.weights import load_weights

    if args.n < 1:
        raise UserError("--n must be at least 1")
    check_grid_path(args.out)
    ref = resolve_ref(args)
    check_metadata(ref)
    with byte_progress("load", ref.manifest.total_bytes):
        cfg, state = load_weights(ref, args.weights)
    with step_progress("sample", args.steps) as on_step:
        images = generate(unet_from_state(cfg, state), cfg, args.n, seed=args.seed, steps=args.steps,
                          on_step=on_step)
    out = save_grid(images, args.out)
    print(f"wrote {out} ({args.n} samples, {args.weights} weights of {shown(ref)})")
    return EXIT_OK
