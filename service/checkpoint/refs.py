"""Naming one committed checkpoint from a URL: a run's root (its latest) or ``root/step-N``.

Used by the tools that read a checkpoint in one process (``ftdiff ckpt show``, ``export``,
``sample``) and by tests that compare runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from service.checkpoint.catalog import Catalog, split_checkpoint_url
from service.checkpoint.errors import ManifestError
from service.checkpoint.manifest import Manifest, step_dir
from service.checkpoint.storage import open_storage
from service.config import Config, config_from_dict
from service.errors import UserError


@dataclass
class CheckpointRef:
    catalog: Catalog
    step: int
    manifest: Manifest

    @property
    def url(self) -> str:
        return self.catalog.storage.url_of(step_dir(self.step))

    @property
    def folder(self) -> str:
        """The step folder's path on its filesystem (for the DCP reader)."""
        return self.catalog.storage.path(step_dir(self.step))

    @property
    def config(self) -> Config:
        """The run's config as recorded in the manifest."""
        return config_from_dict(self.manifest.config, source=f"{self.url}/manifest.json")


def resolve(url: str, endpoint_url: str | None = None, region: str | None = None) -> CheckpointRef:
    """``URL`` (a run's root: its latest committed checkpoint) or ``URL/step-N``."""
    root, step = split_checkpoint_url(url)
    catalog = Catalog(open_storage(root, endpoint_url, region))
    if step is not None:
        try:
            return CheckpointRef(catalog, step, catalog.manifest(step))
        except ManifestError as e:
            raise UserError(f"{url}: {e}") from None
    found = catalog.latest()
    if found is None:
        raise UserError(f"no committed checkpoint under {catalog.storage.display_url}")
    return CheckpointRef(catalog, found[0], found[1])
