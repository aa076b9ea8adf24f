"""Compressed weight formats: every one a class with ``from_dense`` / ``to_dense``, ``nbytes`` and
safetensors (de)serialization.  ``docs/formats.md`` describes the layouts."""

from ._base import FormatError, SparseFormat, load, save
from .bitmap import BitmapTiles
from .delta_rows import DeltaRows
from .tiled_csl import TiledCSL

FORMATS = {cls.FORMAT_NAME: cls for cls in (BitmapTiles, TiledCSL, DeltaRows)}

__all__ = ["BitmapTiles", "TiledCSL", "DeltaRows", "SparseFormat", "FormatError", "FORMATS", "load", "save"]
