"""flash-llm: unstructured-sparse LLM weights kept compressed in GPU memory, multiplied on tensor cores.

Public API::

    w = flash_llm.BitmapTiles.from_dense(weight)   # or TiledCSL; weight [M, K] fp16/bf16
    y = flash_llm.spmm(x, w, bias)                 # x [..., K] -> y [..., M]
    report = flash_llm.sparsify_(model)            # nn.Linear -> flash_llm.SparseLinear, in place
"""

from .formats import BitmapTiles, FormatError, TiledCSL, load, save
from .nn import SparseLinear, SparsifyConfig, sparsify_
from .ops import spmm

__version__ = "0.1.0"

__all__ = ["BitmapTiles", "TiledCSL", "FormatError", "spmm", "load", "save", "SparseLinear", "SparsifyConfig",
           "sparsify_", "__version__"]
