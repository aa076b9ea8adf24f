"""Session 85 fixes from the bug hunt of flash_llm/parallel (CPU, gloo: 2 ranks under torchrun, or world size 1).

1. ``load_tensor_parallel`` on a dense checkpoint whose ``config.json`` disagrees with its weights (projection
   biases with ``attention_bias: false``; a 2-layer file with a 1-layer config; a tensor in a decoder layer the
   model does not have) read what the config asked for, dropped the rest with a warning, and so loaded another
   model (max logit error 0.72), where ``flash_llm.from_pretrained`` and the compressed route refuse the same file
   with ``FormatError ... has no place``.  It now refuses it too, before reading; truly stray tensors (OPT's
   ``decoder.version``, a tied model's stored ``lm_head.weight``) are still only warned about.
2. ``TensorParallel.check_same`` promised a ``ValueError`` on every rank for values that differ, but lists of
   different lengths all-reduced tensors of different sizes (gloo aborted a rank with SIGABRT), and a value
   beyond int64 raised on its rank alone before the collective (the others waited in it).  The ranks now agree on
   the lengths and on the conversion first, and every rank raises the ``ValueError``.
3. ``parallel_linear`` took a bias of any shape: a column shard silently sliced a wrong-length bias, a row shard
   failed only at its first forward in torch's words.  A bias that is not ``[out_features]`` is now refused, naming
   the bias and the layer.
4. ``TensorParallel.from_group(group)`` on a rank outside ``group`` raised torch's bare "Invalid process group
   specified"; it now says which rank is not a member and what the group's ranks are.

This file is also the 2-rank worker of tests 2 and 4 (run by torchrun as ``__main__``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import save_file

import flash_llm
from flash_llm.formats import FormatError
from flash_llm.models import ModelConfig, from_config
from flash_llm.parallel import load_tensor_parallel
from flash_llm.parallel.layers import parallel_linear

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_TIMEOUT_S = 240  # the whole torchrun launch (the group's own timeout is 30 s: a hang fails, not waits)
GROUP_TIMEOUT_S = 30


# ---- 1. a dense checkpoint that disagrees with its config.json -------------------------------------------------------
def _llama(num_layers=1, attention_bias=False, seed=85):
    cfg = ModelConfig(family="llama", vocab_size=64, hidden_size=64, num_layers=num_layers, num_heads=4,
                      num_kv_heads=2, intermediate_size=128, max_position_embeddings=64,
                      attention_bias=attention_bias)
    torch.manual_seed(seed)
    m = from_config(cfg, dtype=torch.float32, device="cpu").eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith(".bias"):
                p.normal_()
    return m


def _save(state: dict, hf_config: dict, folder) -> str:
    os.makedirs(folder)
    save_file({k: v.contiguous().clone() for k, v in state.items()}, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf_config, f)
    return str(folder)


def _refused_alike(world1, path, key, more=""):
    """Both loaders refuse ``path`` naming its first misplaced tensor ``key`` (``more``: load_tensor_parallel's count
    of the others)."""
    with pytest.raises(FormatError, match=rf"model\.safetensors: tensor '{key}' has no place"):
        flash_llm.from_pretrained(path, dtype=torch.float32, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no warning instead of, or before, the error)
        with pytest.raises(FormatError) as e:
            load_tensor_parallel(path, world1, dtype=torch.float32, progress=False)
    assert str(e.value) == (f"{path}/model.safetensors: tensor '{key}' has no place in the llama model built from "
                            f"{path}/config.json (wrong config.json, or another model's checkpoint{more})")


def test_dense_checkpoint_with_biases_its_config_lacks_is_refused(world1, tmp_path):
    m = _llama(attention_bias=True)
    hf = {**m.config.to_hf(), "attention_bias": False}
    path = _save(m.state_dict(), hf, tmp_path / "ck")
    # 4 biases (q, k, v, o); k_proj's comes first in the file (keys sorted)
    _refused_alike(world1, path, "model.layers.0.self_attn.k_proj.bias", "; the checkpoint holds 3 more such tensor(s)")


def test_dense_checkpoint_with_more_layers_than_its_config_is_refused(world1, tmp_path):
    m = _llama(num_layers=2)
    hf = {**m.config.to_hf(), "num_hidden_layers": 1}
    path = _save(m.state_dict(), hf, tmp_path / "ck")
    with pytest.raises(FormatError, match=r"tensor 'model\.layers\.1\.input_layernorm\.weight' has no place in the "
                                          r"llama model built from .*config\.json \(config\.json says 1 decoder "
                                          r"layer\(s\); wrong config\.json, or another model's checkpoint; the "
                                          r"checkpoint holds 8 more such tensor\(s\)\)$"):
        load_tensor_parallel(path, world1, dtype=torch.float32, progress=False)
    with pytest.raises(FormatError, match=r"tensor 'model\.layers\.1\.input_layernorm\.weight' has no place"):
        flash_llm.from_pretrained(path, dtype=torch.float32, progress=False)


def test_tensor_in_a_decoder_layer_of_the_model_that_it_lacks_is_refused(world1, tmp_path):
    m = _llama()
    state = dict(m.state_dict())
    state["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)  # (qk-norm: another model family's layer)
    path = _save(state, m.config.to_hf(), tmp_path / "ck")
    _refused_alike(world1, path, "model.layers.0.self_attn.q_norm.weight")


def test_old_opt_file_with_an_lm_head_bias_its_model_lacks_is_refused_and_stray_tensors_still_warn(world1,
                                                                                                     tmp_path):
    cfg = ModelConfig(family="opt", vocab_size=64, hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=4,
                      intermediate_size=128, max_position_embeddings=64, tie_word_embeddings=False)
    m = from_config(cfg, dtype=torch.float32, device="cpu", seed=85).eval()
    state = {k.removeprefix("model."): v for k, v in m.state_dict().items()}  # old OPT files: no "model." prefix
    state["decoder.version"] = torch.zeros(1)  # stray: a fairseq leftover, under no module holding tensors
    state["extra.weight"] = torch.zeros(2)
    path = _save(state, cfg.to_hf(), tmp_path / "fine")
    with pytest.warns(UserWarning, match=r"2 tensor\(s\) of the checkpoint are not weights of a opt model and were "
                                         r"not read, e\.g\. \['decoder\.version', 'extra\.weight'\]"):
        tpm, _ = load_tensor_parallel(path, world1, dtype=torch.float32, progress=False)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(tpm(ids), m(ids))
    # a bias of a module the model has (under its old name, without "model."), which the model does not hold
    state["decoder.layers.0.fc1.bias_extra"] = torch.zeros(2)  # (in a decoder layer: refused too)
    state["lm_head.bias"] = torch.zeros(64)
    path = _save(state, cfg.to_hf(), tmp_path / "bad")
    with pytest.raises(FormatError, match=r"tensor 'decoder\.layers\.0\.fc1\.bias_extra' has no place in the opt "
                                          r"model .*; the checkpoint holds 1 more such tensor\(s\)\)$"):
        load_tensor_parallel(path, world1, dtype=torch.float32, progress=False)


def test_a_checkpoint_that_matches_its_config_loads_as_before(world1, tmp_path):
    m = _llama(num_layers=2, attention_bias=True)
    path = _save(m.state_dict(), m.config.to_hf(), tmp_path / "ck")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no warning: every tensor read)
        tpm, _ = load_tensor_parallel(path, world1, dtype=torch.float32, progress=False)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(tpm(ids), m(ids))


# ---- 3. parallel_linear checks the bias ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["column", "row"])
@pytest.mark.parametrize("shape", [(100,), (32,), (1, 64), ()])
def test_parallel_linear_refuses_a_bias_that_is_not_out_features_long(world1, kind, shape):
    w = torch.randn(64, 32)
    with pytest.raises(ValueError, match=rf"^demo: bias has shape {re.escape(str(shape))}; a 64x32 "
                                         r"weight needs a bias of shape \(64,\) \(\[out_features\]\)$"):
        parallel_linear(kind, w, torch.randn(shape), world1, "demo")


def test_parallel_linear_checks_bias_type_and_weight_rank_and_keeps_a_good_bias(world1):
    w = torch.randn(64, 32)
    with pytest.raises(TypeError, match=r"^parallel_linear: bias must be a torch\.Tensor or None, got list$"):
        parallel_linear("column", w, [0.0] * 64, world1)
    with pytest.raises(ValueError, match=r"^parallel_linear: weight has shape \(64,\); expected a 2-D"):
        parallel_linear("row", torch.randn(64), None, world1)
    b = torch.randn(64)
    x = torch.randn(3, 32)
    for kind in ("column", "row"):
        layer = parallel_linear(kind, w, b, world1, "demo")
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, w, b), rtol=0, atol=0)


# ---- 2. and 4.: check_same and from_group on 2 ranks -----------------------------------------------------------------
def _outcome(fn) -> dict:
    try:
        return {"ok": fn()}
    except Exception as e:
        return {"type": type(e).__name__, "msg": str(e)}


def _worker(out_dir: str) -> None:
    """Under torchrun (2 ranks): every case, each followed by a barrier (the ranks must still be in step); what
    happened to ``out_dir/rank<r>.json``."""
    import torch.distributed as dist

    from flash_llm.parallel import TensorParallel, init_tensor_parallel

    tp = init_tensor_parallel("gloo", timeout=GROUP_TIMEOUT_S)
    r = tp.rank
    cases = {
        "lengths": lambda: tp.check_same("the ids", [5, 6] if r == 0 else [5, 6, 7]),
        "empty": lambda: tp.check_same("the ids", [] if r == 0 else [1]),
        "overflow": lambda: tp.check_same("the ids", [1, 2**70] if r == 1 else [1, 2]),
        "not_int": lambda: tp.check_same("the ids", [1, "x"] if r == 0 else [1, 2]),
        "values": lambda: tp.check_same("the ids", [1, 2] if r == 0 else [1, 3]),
        "same": lambda: tp.check_same("the ids", [3, -4, 2**62]),
        "same_empty": lambda: tp.check_same("the ids", []),
    }
    got = {}
    for name, fn in cases.items():
        got[name] = _outcome(fn)
        tp.barrier()  # (mismatched collectives would pair up or time out here)
    g = dist.new_group([0])  # (a collective: every rank creates it)
    got["from_group"] = _outcome(lambda: repr(TensorParallel.from_group(g)))
    got["init"] = _outcome(lambda: repr(TensorParallel(g, "cpu")))
    tp.barrier()
    with open(os.path.join(out_dir, f"rank{r}.json"), "w") as f:
        json.dump(got, f)
    tp.close()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    d = tmp_path_factory.mktemp("tp85")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           os.path.abspath(__file__), str(d)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, cwd=ROOT)
    except subprocess.TimeoutExpired as e:
        out = lambda b: (b or b"").decode(errors="replace") if isinstance(b, bytes) else (b or "")  # noqa: E731
        pytest.fail(f"torchrun did not finish within {RUN_TIMEOUT_S} s (a rank waiting for another?):\n"
                    f"{out(e.stdout)[-3000:]}\n{out(e.stderr)[-6000:]}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]  # (a gloo abort: SIGABRT before)
    return [json.loads((d / f"rank{r}.json").read_text()) for r in range(2)]


def test_check_same_with_lists_of_different_lengths_raises_on_every_rank(two_ranks):
    for case, lengths in [("lengths", (2, 3)), ("empty", (0, 1))]:
        for r in range(2):
            got = two_ranks[r][case]
            assert got["type"] == "ValueError", got
            assert got["msg"] == (f"the ids differ between the 2 tensor-parallel ranks (this is rank {r}, with "
                                  f"{lengths[r]} value(s); the ranks pass {lengths[0]} to {lengths[1]} values); "
                                  "every rank must make the same call with the same inputs")


@pytest.mark.parametrize("case, failed, why", [("overflow", 1, "ValueError: Overflow when unpacking long long"),
                                               ("not_int", 0, "ValueError: invalid literal for int() with base 10: "
                                                              "'x'")])
def test_check_same_with_values_that_are_not_int64_raises_on_every_rank(two_ranks, case, failed, why):
    mine = two_ranks[failed][case]
    assert mine == {"type": "ValueError", "msg": f"the ids: this tensor-parallel rank ({failed} of 2) cannot compare "
                                                 f"its values as int64 integers ({why}); every rank raises"}
    other = two_ranks[1 - failed][case]
    assert other == {"type": "ValueError", "msg": f"the ids: tensor-parallel rank {failed} of 2 passed values that "
                                                  "are not int64 integers, so the ranks cannot compare them (this is "
                                                  f"rank {1 - failed}: [1, 2]); every rank must make the same call "
                                                  "with the same inputs"}


def test_check_same_still_compares_values_of_the_same_length(two_ranks):
    for r in range(2):
        assert two_ranks[r]["same"] == {"ok": None} and two_ranks[r]["same_empty"] == {"ok": None}
        got = two_ranks[r]["values"]
        assert got["type"] == "ValueError"
        assert got["msg"].startswith(f"the ids differ between the 2 tensor-parallel ranks (this is rank {r}: "
                                     f"[1, {2 + r}]; the ranks' minimum [1, 2], maximum [1, 3])")


def test_from_group_on_a_rank_outside_the_group_names_the_rank(two_ranks):
    assert two_ranks[0]["from_group"] == {"ok": "TensorParallel(rank=0, world_size=1, backend='gloo', device='cpu')"}
    assert two_ranks[0]["init"] == two_ranks[0]["from_group"]
    want = {"type": "ValueError", "msg": "this process (global rank 1) is not a member of the process group (its "
                                         "global ranks: [0]); wrap a sub-group in a TensorParallel on its member "
                                         "ranks only (torch.distributed.get_rank(group) >= 0)"}
    assert two_ranks[1]["from_group"] == want and two_ranks[1]["init"] == want


def test_check_same_at_world_size_one(world1):
    world1.check_same("x", [1, 2])
    world1.check_same("x", [])
    with pytest.raises(ValueError, match=r"^x: this tensor-parallel rank \(0 of 1\) cannot compare its values as "
                                         r"int64 integers \(ValueError: Overflow"):
        world1.check_same("x", [2**63])


if __name__ == "__main__":  # the 2-rank worker of tests 2 and 4, under torchrun
    _worker(sys.argv[1])
