"""Session 86, after the review of ``overridden_forward`` (``flash_llm.models._common``), which the fused forwards ask
through ``hooked()``:

* its per-class cache was read inside compiled graphs, so ``torch.compile`` guarded on it: a fused model compiled
  before any eager call built two graphs for one input, and every class met later (a ``hooked()`` check, a merge, an
  engine build) recompiled it, until ``fullgraph=True`` hit the recompile limit;
* a class torch derives from a user's subclass (``torch.nn.utils.parametrize``'s ``Parametrized...``) lives in a torch
  module, so the user's ``forward`` under it went unseen and the fused path skipped it (wrong logits)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from flash_llm.models import ModelConfig, from_config, set_fused
from flash_llm.models._common import hooked, overridden_forward


def _model(family: str):
    cfg = ModelConfig(family=family, vocab_size=128, hidden_size=64, num_layers=2, num_heads=4,
                      intermediate_size=128)
    return from_config(cfg, dtype=torch.float32, seed=0).eval()


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_a_compiled_fused_model_is_not_recompiled_by_classes_met_later(family):
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    m = _model(family)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        set_fused(m)
    c = torch.compile(m, fullgraph=True, backend="eager")
    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = [c(ids) for _ in range(3)]
        assert counters["stats"]["unique_graphs"] == 1  # (no eager call before: that compiles the fused helpers too)
        for i in range(10):  # more new classes than the recompile limit (8)
            hooked(type(f"Seen{i}", (nn.Linear,), {})(2, 2))
            got.append(c(ids))
        assert counters["stats"]["unique_graphs"] == 1
        twin = _model(family)  # (the same weights, eager)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            set_fused(twin)
        want = twin(ids)
    assert all(torch.allclose(g, want, atol=1e-5) for g in got)
    torch._dynamo.reset()



def test_a_parametrized_subclass_keeps_its_forward_in_the_fused_path():
    from flash_llm.models.llama import LlamaRMSNorm

    class HalfMore(LlamaRMSNorm):
        def forward(self, x):
            return 1.5 * super().forward(x)

    class Ident(nn.Module):
        def forward(self, w):
            return w

    m = _model("llama")
    n = m.model.layers[0].input_layernorm
    n.__class__ = HalfMore
    parametrize.register_parametrization(n, "weight", Ident())
    assert type(n).__module__.startswith("torch.")  # (torch's ParametrizedHalfMore)
    assert overridden_forward(n) == type(n).__name__ and hooked(n)
    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = m(ids)
        set_fused(m)
        got = m(ids)
    assert torch.allclose(got, want, atol=1e-5)


def test_flash_llm_and_torch_classes_are_their_own_base():
    from flash_llm import SparseLinear
    from flash_llm.models import MergedLinear

    assert overridden_forward(nn.Linear(2, 2)) is None
    assert overridden_forward(nn.modules.linear.NonDynamicallyQuantizableLinear(2, 2)) is None
    w = torch.zeros(16, 64, dtype=torch.float16)
    w[0, 0] = 1
    assert overridden_forward(SparseLinear.from_dense(w)) is None
    assert all(overridden_forward(mm) is None for mm in _model("llama").modules() if not isinstance(mm, MergedLinear))
    assert overridden_forward(type("NoForward", (nn.Linear,), {})(2, 2)) is None  # (inherits Linear's forward)
