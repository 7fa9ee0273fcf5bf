"""Image building: `dmimage build SPEC.toml` (docs/build.md).

Public API::

    load_spec(path) -> Spec          build(spec, outdir) -> BuildReport
    read_gpt(image) -> (disk_guid, [GptPartition])
"""

from __future__ import annotations

from dmimage.image.build import BuildError, BuildReport, build
from dmimage.image.gpt import GptPartition, read_gpt
from dmimage.image.spec import Spec, SpecError, SpecFileError, load_spec

__all__ = ["BuildError", "BuildReport", "GptPartition", "Spec", "SpecError", "SpecFileError",
           "build", "load_spec", "read_gpt"]
