"""A digest of a frozen component's files (a VAE, a text encoder): part of the run's identity,
so a resume with other weights saved under the same path is refused."""

from __future__ import annotations

import hashlib
from pathlib import Path

from service.errors import UserError

# What decides a model's math: its config and its weights (a tokenizer adds its vocabulary:
# .txt merges, .model sentencepiece files).
MODEL_FILES = (".json", ".safetensors")


def files_digest(folders: list[Path], setting: str, suffixes: tuple[str, ...] = MODEL_FILES) -> str:
    """sha256 (16 hex digits) over the names and bytes of the files in ``folders`` that end in
    ``suffixes``; ``setting`` (e.g. ``"model.vae = 'x'"``) names the config key in the error."""
    files = sorted((f for folder in folders for f in folder.glob("*") if f.suffix in suffixes),
                   key=lambda f: (f.parent.name, f.name))
    if not files:
        raise UserError(f"{setting}: no config or safetensors files in {', '.join(map(str, folders))}")
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.parent.name}/{file.name}".encode() if len(folders) > 1 else file.name.encode())
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def local_folder(path: str, setting: str) -> Path:
    """``path`` as a folder on this machine: itself, or a hub id's snapshot in the local
    Hugging Face cache (never downloaded)."""
    if Path(path).is_dir():
        return Path(path)
    if "://" in path:
        raise UserError(f"{setting}: a URL; the component is read from a local folder (or a hub id in the local "
                        "cache): copy it to the machine first")
    if path.startswith(("/", ".", "~")) or Path(path).exists():
        raise UserError(f"{setting}: no such folder")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path, local_files_only=True))
    except Exception as e:  # not a repo id, or not in the cache
        raise UserError(f"{setting}: neither a local folder nor a hub id in the local cache "
                        f"({type(e).__name__}); nothing is downloaded: give a local folder") from None
