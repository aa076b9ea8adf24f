"""Session 82: a one-element tensor ``eps`` of the fused norms under ``torch.compile(fullgraph=True)`` is refused
naming ``eps`` (it was a data-dependent guard error from inside the check); eager and a compile that may break the
graph still take it."""

import pytest
import torch

from flash_llm import BitmapTiles, ops


def test_tensor_eps_under_fullgraph_compile_names_eps():
    torch.manual_seed(0)
    w = torch.randn(64, 64).half()
    w[torch.rand(64, 64) < 0.6] = 0
    fw = BitmapTiles.from_dense(w)
    x, g, eps = torch.randn(3, 64).half(), torch.rand(64).half(), torch.tensor(1e-5)
    want = ops.spmm_rms_norm(x, g, eps, fw)
    torch._dynamo.reset()
    assert torch.equal(torch.compile(lambda x, e: ops.spmm_rms_norm(x, g, e, fw))(x, eps), want)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="eps must be a Python number under torch.compile"):
        torch.compile(lambda x, e: ops.spmm_rms_norm(x, g, e, fw), fullgraph=True)(x, eps)
    torch._dynamo.reset()
