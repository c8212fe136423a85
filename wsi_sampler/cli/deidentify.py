"""``wsi-sampler deidentify IN OUT``: de-identified copies of slide files and folders.
Registered onto the main app by :mod:`wsi_sampler.cli.main`."""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Annotated

import typer

from .._io import atomic_write_text
from ..errors import InvalidRequestError

__all__ = ["register"]

log = logging.getLogger("wsi_sampler")

InA = Annotated[Path, typer.Argument(help="A slide file, or a folder of slides.",
                                     exists=True, readable=True)]
OutA = Annotated[Path, typer.Argument(help="The copy: a file (IN is a file) or a folder.")]
KeepNamesO = Annotated[bool, typer.Option(
    help="Folders: keep the file names (they may name a patient); default: slide-<hash>.")]
MapO = Annotated[Path | None, typer.Option(
    "--map", help="Folders: write the CSV path,pseudonym of the renamed files here (keep it "
    "apart from OUT: it links pseudonyms back to the original names).")]


def deidentify(source: InA, out: OutA, keep_names: KeepNamesO = False,
               map_file: MapO = None) -> None:
    """Copy slides without their label and macro images and without identifying text
    (Aperio Filename/User/Date/Time…, TIFF DateTime/Artist/…); the pyramid's tiles are kept
    byte for byte. A folder's slides are copied side by side as slide-<hash> files (names
    may name a patient), or with their names and layout (--keep-names)."""
    from ..deidentify import deidentify_file, deidentify_folder

    if source.is_file():
        removed = deidentify_file(source, out)
        log.info("%s: %d associated image(s) removed", out.name, len(removed))
        return
    if map_file is not None and map_file.resolve().is_relative_to(out.resolve()):
        raise InvalidRequestError(f"{map_file}: keep the map outside the de-identified folder")
    rows = deidentify_folder(source, out, rename=not keep_names)
    if map_file is not None:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows([("path", "pseudonym"), *rows])
        atomic_write_text(map_file, buf.getvalue())
    log.info("%d slide(s) de-identified into %s", len(rows), out)


def register(app: typer.Typer) -> None:
    app.command("deidentify")(deidentify)
