"""``ftdiff data pack | index | inspect``: sharded data sets (service/data/pack.py)."""

from __future__ import annotations

import argparse

from service.cli.progress import count_progress
from service.errors import EXIT_OK


def cmd_data_pack(args: argparse.Namespace) -> int:
    from service.data.pack import pack_folder, parse_size

    shard_bytes = parse_size(args.shard_size)
    with count_progress("pack") as on_image:
        index = pack_folder(args.src, args.dst, shard_bytes, on_image=on_image)
    print(f"packed {index.num_samples} images into {len(index.shards)} shards "
          f"({len(index.classes)} classes, {index.num_captioned} captioned); index {index.digest()}")
    return EXIT_OK


def cmd_data_index(args: argparse.Namespace) -> int:
    from service.data.pack import index_shards

    with count_progress("index") as on_shard:
        index = index_shards(args.url, on_shard=on_shard)
    print(f"indexed {index.num_samples} samples in {len(index.shards)} shards; index {index.digest()}")
    return EXIT_OK


def cmd_data_inspect(args: argparse.Namespace) -> int:
    from service.data.pack import inspect

    print(inspect(args.url))
    return EXIT_OK
