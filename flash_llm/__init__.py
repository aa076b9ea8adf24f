"""flash-llm: unstructured-sparse LLM weights kept compressed in GPU memory, multiplied on tensor cores.

Public API::

    w = flash_llm.BitmapTiles.from_dense(weight)   # or TiledCSL, DeltaRows; weight [M, K] fp16/bf16
    y = flash_llm.spmm(x, w, bias)                 # x [..., K] -> y [..., M]
    report = flash_llm.sparsify_(model)            # nn.Linear -> flash_llm.SparseLinear, in place
    model = flash_llm.from_pretrained(path)        # a pruned HF checkpoint directory, sparse layers compressed
    flash_llm.save_pretrained(model, path)         # flash-llm checkpoint (transformers reads it too)

The other submodules (``flash_llm.bundled``, ``data``, ``evaluate``, ``engine``, ``models``, ``parallel``, ``demo``,
``prune``) are attributes too, imported on first use so that ``import flash_llm`` stays cheap.
"""

from .formats import BitmapTiles, DeltaRows, FormatError, TiledCSL, load, save
from .nn import SparseLinear, SparsifyConfig, sparsify_
from .ops import spmm

__version__ = "0.1.0"

from .checkpoint import from_pretrained, save_pretrained  # noqa: E402  (reads __version__)
from .checkpoint.hf_quantizer import install as _install_hf_quantizer  # noqa: E402

_install_hf_quantizer()  # registers with transformers when (and only if) it gets imported

# submodules imported on first attribute access (PEP 562), not by `import flash_llm`
_LAZY_SUBMODULES = frozenset({"bundled", "data", "demo", "engine", "evaluate", "models", "parallel", "prune"})


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")  # (which also binds it here)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _LAZY_SUBMODULES)


__all__ = ["BitmapTiles", "TiledCSL", "DeltaRows", "FormatError", "spmm", "load", "save", "SparseLinear",
           "SparsifyConfig", "sparsify_", "from_pretrained", "save_pretrained", "__version__"]
