"""Taking results out of the workspace: Cloud Optimized GeoTIFFs and portable models.

:func:`export` is what ``aether-scale export`` runs: it finds the workspace entry
(``field``, a query's ``similarity``, an ``rgb`` rendering of the field, or the
``model``), checks it and writes it with :func:`~.cog.export_cog` (band-first COG,
validated with rio-cogeo) or :func:`~.bundle.export_model` (safetensors, model card,
ONNX). Default outputs go to ``<workspace>/exports/`` (the current folder for a remote
workspace).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from ..logs import get_logger

__all__ = ["KINDS", "ExportError", "export"]

log = get_logger("export")
KINDS = ("field", "similarity", "rgb", "model")


class ExportError(ValueError):
    """An export that cannot be done as asked; the message says how to fix it."""


def _default_out(ws: Any, stem: str, ext: str) -> str:
    folder = ws.path("exports") if ws.is_local else os.path.abspath("exports")
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, stem + ext)


def _field(ws: Any, variant: str) -> tuple[Any, str]:
    from ..pipeline import ARTIFACTS
    from ..stores.field import open_field

    name = ARTIFACTS["field.zarr"].variant(variant)
    if not ws.exists(f"{name}/aether_chunks.json"):
        raise ExportError(f"workspace {ws.root} has no finished {name}: run `aether-scale infer "
                          f"-w {ws.root}` first")
    return open_field(ws.path(name), storage_options=ws.storage_options or None)["embedding"], name


def _similarity(ws: Any, query: str | None) -> tuple[Any, str]:
    from ..stores.similarity import NAME, open_similarity

    have = [os.path.basename(os.path.dirname(p)) for p in ws.fs.glob(
        ws.path(f"queries/*/{NAME}"))] if ws.exists("queries") else []
    if query is None:
        if len(have) != 1:
            raise ExportError(f"say which query to export with --query NAME (workspace {ws.root} "
                              f"has {', '.join(sorted(have)) or 'none: run `aether-scale query`'})")
        query = have[0]
    if query not in have:
        raise ExportError(f"workspace {ws.root} has no query {query!r} (it has "
                          f"{', '.join(sorted(have)) or 'none'}); run `aether-scale query -w "
                          f"{ws.root} --name {query} \"…\"` first")
    uri = ws.path(f"queries/{query}/{NAME}")
    return open_similarity(uri, storage_options=ws.storage_options or None), query


def export(workspace: Any, what: str, out: str | os.PathLike | None = None, *,
           variant: str = "", query: str | None = None, dtype: str | None = None,
           bbox: Sequence[float] | None = None, bbox_crs: str | None = None,
           blocksize: int | None = None, onnx: bool = True, overwrite: bool = False
           ) -> dict[str, Any]:
    """Export ``what`` (one of :data:`KINDS`) of ``workspace`` to ``out``.

    ``field``: the field (``variant``), float32 or — for an int8 field — ``dtype="int8"``
    codes; ``similarity``: the similarity raster of query ``query`` (one band per
    phrase); ``rgb``: the field's first three principal components as uint8 RGB;
    ``model``: the portable bundle (a folder). ``bbox`` (minx, miny, maxx, maxy; in the
    raster CRS or ``bbox_crs``) exports a window. Returns the writer's summary.
    """
    from ..workspace import Workspace
    from .cog import export_cog, pca_rgb

    if what not in KINDS:
        raise ExportError(f"cannot export {what!r}: choose one of {', '.join(KINDS)}")
    if not isinstance(workspace, Workspace):
        root = str(workspace)
        if "://" not in root and not os.path.isdir(root):
            raise ExportError(f"no workspace at {root}: give the folder a pipeline run wrote")
        workspace = Workspace(root)
    ws = workspace
    if what == "model":
        from ..pipeline import ARTIFACTS
        from .bundle import export_model

        name = ARTIFACTS["model"].variant(variant)
        if not ws.is_local:
            raise ExportError("model export reads the model folder locally; copy the workspace's "
                              f"{name}/ here and pass that path to aether_scale.export.bundle."
                              "export_model")
        out = os.fspath(out) if out else _default_out(ws, f"{name}-bundle", "")
        card = export_model(ws.path(name), out, workspace=ws, variant=variant or None,
                            onnx=onnx, overwrite=overwrite, log=log.info)
        return {"path": out, "card": card}
    if what == "similarity":
        da, label = _similarity(ws, query)
        stem, kind = f"similarity-{label}", "float32"
    else:
        da, label = _field(ws, variant)
        stem = label.removesuffix(".zarr") + ("-rgb" if what == "rgb" else "")
        kind = "uint8" if what == "rgb" else "float32"
        if what == "rgb":
            da = pca_rgb(da)
    if dtype is not None:
        kind = dtype
    out = os.fspath(out) if out else _default_out(ws, stem + (f"-{kind}" if what == "field"
                                                              else ""), ".tif")
    if os.path.exists(out) and not overwrite:
        raise ExportError(f"{out} exists: pass --overwrite to replace it, or choose another -o")
    # many-band tiles are read whole by GIS tools: smaller tiles for the 128-band field
    size = blocksize or (256 if da.shape[2] > 16 else 512)
    try:
        res = export_cog(da, out, dtype=kind, bbox=tuple(bbox) if bbox else None,
                         bbox_crs=bbox_crs, blocksize=size, log=log)
    except ValueError as e:
        src = ws.path(label) if what != "similarity" else ws.path(f"queries/{label}")
        raise ExportError(f"{src}: {e}") from None
    return res
