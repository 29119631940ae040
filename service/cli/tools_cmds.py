"""``ftdiff export`` and ``ftdiff sample``: weights out of a checkpoint, and a grid of samples.

Usage errors come before any checkpoint byte is read: a bad ``--n``, ``--steps`` below 1, an
``--out`` that cannot be written. ``--steps`` above the model's ``num_train_timesteps`` is
refused as soon as the manifest (which records the config) is read, before the weights load.
"""

from __future__ import annotations

import argparse

from service.cli.common import check_frozen_parts, check_metadata, check_out_path, resolve_ref, shown
from service.cli.progress import byte_progress, step_progress
from service.errors import EXIT_OK, UserError


def cmd_export(args: argparse.Namespace) -> int:
    from service.export import export

    check_out_path(args.out, folder=args.format == "diffusers")
    ref = resolve_ref(args)
    check_metadata(ref)
    if args.format == "diffusers":  # the pipeline ships the VAE and text encoder too
        check_frozen_parts(ref)
    with byte_progress("export", ref.manifest.total_bytes) as counter:
        try:
            out = export(ref, args.format, args.out, args.weights, counter)
        except Exception as e:
            # safetensors reports a failed write of --out as its own error type.
            if type(e).__name__ == "SafetensorError":
                raise UserError(f"--out {args.out!r}: cannot write it: {e}") from e
            raise
    print(f"exported {args.weights} weights of {shown(ref)} to {out}")
    return EXIT_OK


def cmd_sample(args: argparse.Namespace) -> int:
    from service.sample import check_condition_args, check_grid_path, generate, model_from_state, save_grid
    from service.weights import load_weights

    if args.n < 1:
        raise UserError(f"--n {args.n}: must be at least 1")
    if args.steps < 1:
        raise UserError(f"--steps {args.steps}: must be at least 1")
    check_grid_path(args.out)
    check_out_path(args.out)
    ref = resolve_ref(args)
    limit = ref.config.model.num_train_timesteps
    if args.steps > limit:
        raise UserError(f"--steps {args.steps}: at most {limit} "
                        "(this checkpoint's model.num_train_timesteps)")
    check_metadata(ref)
    check_frozen_parts(ref)
    check_condition_args(ref.config, args.class_label, args.guidance_scale, args.prompt)
    with byte_progress("load", ref.manifest.total_bytes) as counter:
        cfg, state = load_weights(ref, args.weights, counter)
    with step_progress("sample", args.steps) as on_step:
        images = generate(model_from_state(cfg, state), cfg, args.n, seed=args.seed, steps=args.steps,
                          on_step=on_step, class_label=args.class_label, guidance_scale=args.guidance_scale,
                          prompt=args.prompt)
    try:
        out = save_grid(images, args.out)
    except OSError as e:  # a local file the user named: a usage error, not the storage's
        raise UserError(f"--out {args.out!r}: cannot write it: {e.strerror or e}") from None
    print(f"wrote {out} ({args.n} samples, {args.weights} weights of {shown(ref)})")
    return EXIT_OK
