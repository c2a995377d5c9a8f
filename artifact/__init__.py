"""The deployable artifact: its layout, the one writer and the one reader (numpy only)."""
from .format import (FORMAT_VERSION, LIBRARY, MANIFEST, MANIFEST_DIGEST, WEIGHTS, ArtifactError,
                     Manifest, check_replaceable, read_manifest, read_weights, replace_weights,
                     write_artifact)

__all__ = ["FORMAT_VERSION", "LIBRARY", "MANIFEST", "MANIFEST_DIGEST", "WEIGHTS", "ArtifactError",
           "Manifest", "check_replaceable", "read_manifest", "read_weights", "replace_weights",
           "write_artifact"]
