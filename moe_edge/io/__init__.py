"""Reliable outputs: atomic writes (:mod:`atomic`), run manifests and output-folder ownership
(:mod:`manifest`), and script entry points with one-line usage errors (:mod:`cli`)."""
from moe_edge.io import atomic, cli, manifest
from moe_edge.io.manifest import OutputError, OutputFolder, RunIdentity, check_output_file

__all__ = ["atomic", "cli", "manifest", "OutputError", "OutputFolder", "RunIdentity",
           "check_output_file"]
