"""The one artefact layout: every materialisation of an asset writes a new, immutable version folder

    <root>/<asset key path>/versions/<version>/

and the record on the asset edge points at it. A version is named by what it is built from (the asset's code
version and its inputs' versions; the catalog: its content), so an identical rebuild finds its version already
there and reuses it, two concurrent runs never write the same folder half-way, and a reader following a
record never sees a half-swapped artefact. Resumable training state lives beside the version it will become
(`<version>.resume`, `<version>.partial`). Old versions beyond the retention are deleted after a new one lands
(a rollback is materialising the old configuration again: its version is reused while retained).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from r4t_pipeline.io import STALE_TEMP_SECONDS, stable_hash, sweep_leftovers

PARTIAL_SUFFIXES = (".resume", ".partial")


def version_of(code_version: str, input_versions: dict[str, str]) -> str:
    """The version an asset's output will have, from its code version and its inputs' versions."""
    return stable_hash([code_version, sorted(input_versions.items())], length=16)


class ArtefactStore:
    def __init__(self, root: str | Path, retention: int = 3):
        self.root, self.retention = Path(root), retention

    def versions_dir(self, asset: Sequence[str]) -> Path:
        return self.root.joinpath(*asset, "versions")

    def version_dir(self, asset: Sequence[str], version: str) -> Path:
        return self.versions_dir(asset) / version

    def versions(self, asset: Sequence[str]) -> list[Path]:
        """Finished versions, oldest first."""
        folder = self.versions_dir(asset)
        if not folder.is_dir():
            return []
        done = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")
                and not p.name.endswith(PARTIAL_SUFFIXES)]
        return sorted(done, key=lambda p: p.stat().st_mtime_ns)

    def prepare(self, asset: Sequence[str], version: str) -> list[Path]:
        """Before a run: sweep the leftovers of killed writers, and the resumable state of other versions left
        untouched for a day (a concurrent run of another configuration may still be writing a fresher one).
        Returns what was removed."""
        folder = self.versions_dir(asset)
        removed = sweep_leftovers(folder)
        if folder.is_dir():
            for partial in folder.iterdir():
                if partial.name.endswith(PARTIAL_SUFFIXES) and not partial.name.startswith(version) \
                        and time.time() - partial.stat().st_mtime > STALE_TEMP_SECONDS:
                    shutil.rmtree(partial, ignore_errors=True)
                    removed.append(partial)
        return removed

    def retire(self, asset: Sequence[str], keep: Path) -> list[Path]:
        """After a run: delete the oldest versions beyond the retention (never `keep`)."""
        versions = [v for v in self.versions(asset) if v != keep]
        extra = versions[:max(0, len(versions) - (self.retention - 1))]
        for old in extra:
            shutil.rmtree(old, ignore_errors=True)
        return extra
