"""``conceptevo export WORKSPACE --html DIR``: the explorer as a static, self-contained site.

The folder holds ``index.html`` (the same page the server sends), ``data/*.js``
(every data script, as the server would generate it) and ``files/patches/...``
(the sprite sheets). It works from ``file://`` with no server and no network,
and can be hosted by any static web server.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

from ..errors import ConceptEvoError
from ..io import write_bytes
from .data import ExplorerData
from .server import page_html

log = logging.getLogger(__name__)

MARKER = ".conceptevo-export"


def export_site(ws, out, kmeans: int = 8, data: ExplorerData | None = None) -> Path:
    """Write the static explorer for ``ws`` into the folder ``out``; return the path of its index.html.

    ``out`` must be empty, missing, or a previous export (which is replaced).
    """
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise ConceptEvoError(f"{out} exists and is not a folder; give a new folder for the site")
        if any(out.iterdir()) and not (out / MARKER).exists():
            raise ConceptEvoError(f"{out} is not empty and not a previous conceptevo export; give an empty or new folder")
        if Path(ws.path).resolve().is_relative_to(out.resolve()):
            raise ConceptEvoError(f"{out} contains the workspace; export somewhere else")
    data = data or ExplorerData(ws, kmeans=kmeans, public=True)
    for sub in ("data", "files"):
        if (out / sub).exists():
            shutil.rmtree(out / sub)
    out.mkdir(parents=True, exist_ok=True)
    write_bytes(out / MARKER, b"conceptevo explorer export\n")
    keys = data.keys()
    for key in keys:
        write_bytes(out / "data" / f"{key}.js", data.script(key))
    files = data.files()
    for rel in files:
        dst = out / "files" / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(ws.path) / rel, dst)
    index = out / "index.html"
    write_bytes(index, page_html())
    log.info("exported %d data scripts and %d sheets to %s", len(keys), len(files), out)
    return index
