"""Session 87's small fixes (each left by an earlier session):

1. ``SparseLinear``: a state dict lacking one of a layer's arrays warned, naming what it dropped, on strict loads too,
   where torch's missing-keys error follows anyway (a strict load warned AND raised).  torch passes ``strict=True`` to
   every ``_load_from_state_dict`` whatever was asked, so the layer now reads what ``load_state_dict`` was asked for;
   only a non-strict load warns;
2. ``FLASH_LLM_*`` numbers read with a None default (to tell unset from set: ``FLASH_LLM_ENCODE_CHUNK_*``) warned
   "using the default" when refused, never saying which; ``env_int`` / ``env_float`` take ``means=``, the value the
   caller uses in its place, and the warning names it;
3. ``compile_kernels("sm_100f")`` was refused ("arch must look like 'sm_90'") though ``canonical_arch`` maps the family
   name to sm_100's slot and ``flash-llm build --arch sm_100f`` takes it; it now compiles into that slot (a
   ``source=`` keeps the sm_100f target, and its cached cubin is recognised as sm_100's);
4. the fused norms' eps check under ``torch.compile(fullgraph=True)`` with a float Dynamo makes dynamic: an invalid
   (negative) eps was refused, never silently used, but by a "BUILD_STRING type error" (the message's ``{eps!r}`` of a
   symbolic float) that named neither eps nor the reason; the ValueError's message is now one Dynamo can trace."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from flash_llm import SparseLinear, TiledCSL, ops
from flash_llm._env import env_float, env_int
from flash_llm.kernels import _build
from test_build_fixes81 import fake_cubin
from test_build_fixes85 import RecordingNVRTC


# ---- 1. a partial state dict warns only on non-strict loads ------------------------------------------------------

def _layer(seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(64, 128, generator=g)
    w[w.abs() < 1] = 0
    return SparseLinear.from_dense(w.half(), torch.randn(64, generator=g).half())


def _partial(prefix=""):
    return {prefix + k: v for k, v in _layer(1).state_dict().items() if k != "weight_offsets"}


@pytest.mark.parametrize("nested", [False, True])
def test_a_strict_partial_load_raises_without_the_warning(nested):
    model = nn.Sequential(_layer(0)) if nested else _layer(0)
    sd = _partial("0." if nested else "")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "(0\.)?weight_offsets"'):
            model.load_state_dict(sd)
        with pytest.raises(RuntimeError, match="weight_offsets"):
            model.load_state_dict(sd, True)  # (strict given positionally)
    assert [str(w.message) for w in seen if "not loaded" in str(w.message)] == []


@pytest.mark.parametrize("nested", [False, True])
def test_a_non_strict_partial_load_still_warns(nested):
    model = nn.Sequential(_layer(0)) if nested else _layer(0)
    p = "0." if nested else ""
    with pytest.warns(UserWarning, match=rf"{p}weight_data, {p}bias not loaded, as the checkpoint lacks "
                                         rf"{p}weight_offsets"):
        res = model.load_state_dict(_partial(p), strict=False)
    assert res.missing_keys == [f"{p}weight_offsets"]


def test_a_subclass_load_state_dict_asking_non_strict_warns():
    class Lenient(nn.Sequential):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return super().load_state_dict(state_dict, strict=False, assign=assign)

    with pytest.warns(UserWarning, match="not loaded, as the checkpoint lacks 0.weight_offsets"):
        Lenient(_layer(0)).load_state_dict(_partial("0."))  # (strict=True asked of the subclass, False of torch)


def test_a_strict_partial_load_a_post_hook_tolerates_is_still_an_error():
    """A load-state-dict post-hook that takes the missing array out of torch's list (as tied-weight or adapter code
    does) made a strict load pass with the layer loading nothing and no word at all (the review of session 87's
    first fix): the layer's own message is an error of the load now."""
    model = nn.Sequential(_layer(0))
    model.register_load_state_dict_post_hook(
        lambda module, inc: inc.missing_keys.clear())  # (torch's missing-keys error gone)
    with pytest.raises(RuntimeError, match="0.weight_data, 0.bias not loaded, as the checkpoint lacks 0.weight_off"):
        model.load_state_dict(_partial("0."))


def test_a_wrapped_load_state_dict_still_reads_strict(monkeypatch):
    """A library wrapping ``nn.Module.load_state_dict`` after flash_llm's import (``*args, **kwargs``): the strict
    load is still read from torch's own frame (its code taken at import), so it errs without the warning."""
    original = nn.Module.load_state_dict

    def wrapped(self, *args, **kwargs):
        return original(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "load_state_dict", wrapped)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError, match="weight_offsets"):
            nn.Sequential(_layer(0)).load_state_dict(_partial("0."))
    assert [str(w.message) for w in seen if "not loaded" in str(w.message)] == []


# ---- 2. a refused environment number names the value used --------------------------------------------------------

@pytest.mark.parametrize("text", ["abc", "0", "-3"])
def test_a_refused_int_with_a_none_default_names_the_value_meant(monkeypatch, text):
    monkeypatch.setenv("FLASH_LLM_TEST87_INT", text)
    with pytest.warns(RuntimeWarning, match=rf"FLASH_LLM_TEST87_INT='{text}' is not an integer >= 1; using 4194304$"):
        assert env_int("FLASH_LLM_TEST87_INT", None, 1, means=1 << 22) is None  # (None: unset, as before)
    monkeypatch.setenv("FLASH_LLM_TEST87_INT", "7")
    assert env_int("FLASH_LLM_TEST87_INT", None, 1, means=1 << 22) == 7


def test_a_refused_float_with_a_none_default_names_the_value_meant(monkeypatch):
    monkeypatch.setenv("FLASH_LLM_TEST87_FLOAT", "2")
    with pytest.warns(RuntimeWarning, match=r"is not a finite number >= 0.0 and <= 1.0; using 0.8$"):
        assert env_float("FLASH_LLM_TEST87_FLOAT", None, 0.0, 1.0, means=0.8) is None
    with pytest.warns(RuntimeWarning, match=r"; using the shares by density \(0.8 to 0.9\)$"):  # (words for it)
        assert env_float("FLASH_LLM_TEST87_FLOAT", None, 0.0, 1.0, means="the shares by density (0.8 to 0.9)") is None


def test_without_means_the_warnings_are_as_before(monkeypatch):
    monkeypatch.setenv("FLASH_LLM_TEST87_INT", "x")
    with pytest.warns(RuntimeWarning, match=r"using the default$"):
        assert env_int("FLASH_LLM_TEST87_INT", None, 1) is None
    with pytest.warns(RuntimeWarning, match=r"using 17$"):
        assert env_int("FLASH_LLM_TEST87_INT", 17, 0, means=5) == 17  # (a default given: it is named)


# ---- 3. compile_kernels takes sm_NNf -----------------------------------------------------------------------------

@pytest.fixture
def fake(monkeypatch, tmp_path):
    """A fake NVRTC (an sm_100 cubin), the cache in ``tmp_path``, no GPU."""
    monkeypatch.setenv("FLASH_LLM_CACHE", str(tmp_path))
    nvrtc = RecordingNVRTC(fake_cubin(sm=100))
    monkeypatch.setattr(_build, "_nvrtc", lambda: nvrtc)
    monkeypatch.setattr(_build, "nvrtc_build", lambda: "libnvrtc:1")
    monkeypatch.setattr(_build, "_unstored_said", set())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return nvrtc


def test_compile_kernels_takes_a_family_name_into_the_plain_slot(fake):
    c = _build.compile_kernels("sm_100f")
    assert c.arch == "sm_100" and fake.options[-1][-1] == "--gpu-architecture=sm_100" and fake.compiles == 1
    again = _build.compile_kernels("sm_100")  # (the slot the runtime reads on that GPU: device_arch's sm_100)
    assert again.cached and again.cubin == c.cubin and fake.compiles == 1


def test_a_source_keeps_the_family_target_and_its_cubin_is_cached(fake):
    src = b'extern "C" __global__ void k(int* p) { p[0] = 87; }\n'
    p = _build.compile_kernels("sm_100f", source=src)
    assert p.arch == "sm_100f" and fake.options[-1][-1] == "--gpu-architecture=sm_100f" and not p.cached
    assert _build.compile_kernels("sm_100f", source=src).cached and fake.compiles == 1  # (read as sm_100's cubin)


@pytest.mark.parametrize("arch", ["hopper", "sm_90b", "sm_100fa", "sm100"])
def test_other_arch_names_are_still_refused(fake, arch):
    with pytest.raises(ValueError, match=r"arch must look like 'sm_90' \(or 'sm_90a', 'sm_100f'\), got"):
        _build.compile_kernels(arch)
    assert fake.compiles == 0


# ---- 4. an invalid dynamic eps under a fullgraph compile is refused naming eps -----------------------------------

def _messages(e: BaseException) -> str:
    out = []
    while e is not None:
        out.append(str(e))
        e = e.__cause__
    return "\n".join(out)


@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_an_invalid_dynamic_eps_under_fullgraph_compile_names_eps(norm):
    torch.manual_seed(0)
    m, k = 64, 96
    w = TiledCSL.from_dense((torch.randn(m, k) * (torch.rand(m, k) < 0.3)).half())
    g, b, x = torch.rand(k).half(), torch.rand(k).half(), torch.randn(3, k).half()

    def f(x, eps):
        return ops.spmm_rms_norm(x, g, eps, w) if norm == "rms" else ops.spmm_layer_norm(x, g, b, eps, w)

    torch._dynamo.reset()
    try:
        cf = torch.compile(f, backend="eager", dynamic=True, fullgraph=True)
        torch.testing.assert_close(cf(x, 1e-5), f(x, 1e-5), rtol=0, atol=0)
        for bad, got in ((-1e-5, "a negative number"), (math.nan, "nan"), (-math.inf, "-inf")):
            with pytest.raises(Exception) as info:  # (Dynamo reports a fullgraph function's exception as its own)
                cf(x, bad)
            text = _messages(info.value)
            # (torch 2.13 quotes it as ValueError('...'), 2.11 as ValueError([ConstantVariable(str: '...')]))
            assert f"eps must be a finite number >= 0, got {got}'" in text and "ValueError" in text, text
            assert "BUILD_STRING" not in text
        with pytest.raises(ValueError, match=r"^eps must be a finite number >= 0, got -1e-05$"):
            f(x, -1e-5)  # (eagerly: the value itself, as before)
    finally:
        torch._dynamo.reset()
