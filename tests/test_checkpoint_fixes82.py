"""Session 82 fixes from the bug hunt of flash_llm/checkpoint and flash_llm/formats (CPU):

1. An older compressed-tensors sparse-bitmask checkpoint (``compression_config`` without ``targets``), which stored
   every tensor of the state dict in bitmask form (embeddings, ``lm_head``, norm weights and biases, the 1-D ones
   with a ``[n]`` shape, a ``[ceil(n / 8)]`` bitmask and a 0-d ``row_offsets``), loads: a compressed tensor that is
   not a linear layer's weight is decompressed and placed as a dense one.  With ``targets``, a compressed tensor of a
   module they do not select is refused as before, in the words of a linear layer's.
2. ``write_sparse_bitmask`` stores a linear layer without elements dense (it died with ZeroDivisionError), named in
   the report and config.json's ``ignore``, and loading it back skips it; ``sparse_bitmask.compress`` refuses such a
   weight (``decompress`` refuses what it produced).
3. A compressed-tensors ``config_groups`` that is not an object is a FormatError naming config.json and the key (a
   bare TypeError before; ``flash-llm inspect`` printed a traceback).
4. A DeltaRows version-1 weight (read as it is: no conversion) loads on the meta device, as version 2 does; versions
   that ``_upgrade`` converts are still refused there.
"""

from __future__ import annotations

import json

import numpy
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import flash_llm
from flash_llm import FormatError, SparseLinear
from flash_llm.checkpoint import load_checkpoint, write_sparse_bitmask
from flash_llm.checkpoint import sparse_bitmask as sb
from flash_llm.cli import main
from flash_llm.formats import BitmapTiles, DeltaRows

from _ckpt import VOCAB, hf_model, logits, read_shard, save_hf
from conftest import assert_bit_equal

transformers = pytest.importorskip("transformers")


# ---- 1. older compressed-tensors files: every tensor in bitmask form ----------------------------------------------

def old_ct_bitmask(t: torch.Tensor) -> dict[str, torch.Tensor]:
    """compressed-tensors' ``bitmask_compress`` and ``BitmaskTensor.dict`` (the versions whose configs had no
    ``targets``), for a tensor of any rank: 1-D ones get a ``[ceil(n / 8)]`` bitmask and a 0-d ``row_offsets``."""
    bytemasks = t != 0
    row_counts = bytemasks.sum(dim=-1)
    row_offsets = torch.cumsum(row_counts, 0) - row_counts
    bitmask = torch.from_numpy(numpy.packbits(bytemasks.numpy(), axis=-1, bitorder="little"))
    return {"shape": torch.tensor(t.shape), "compressed": t[bytemasks], "bitmask": bitmask, "row_offsets": row_offsets}


def _old_ct_checkpoint(hf, path, sparsity_config: dict):
    """``hf``'s checkpoint with every tensor of its state dict in bitmask form, declared as older tools did."""
    path.mkdir()
    tensors = {f"{k}.{p}": v.contiguous() for k, t in hf.state_dict().items() for p, v in old_ct_bitmask(t).items()}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = hf.config.to_dict()
    config["compression_config"] = {"sparsity_config": sparsity_config}
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def old_opt(tmp_path_factory):
    """A tiny OPT (biases on every projection, layer norms with weight and bias, a tied lm_head) stored as older
    compressed-tensors stored it, and the same model as a dense checkpoint."""
    hf = hf_model("opt", seed=82)
    base = tmp_path_factory.mktemp("old-ct")
    old = _old_ct_checkpoint(hf, base / "old", {"format": "sparse-bitmask", "global_sparsity": 0.6,
                                                "sparsity_structure": "unstructured"})
    return hf, old, save_hf(hf, base / "dense")


def test_decompress_reads_the_1d_form():
    t = torch.tensor([0.0, 1.5, 0.0, -2.0, 0.0, 0.0, 0.0, 0.0, 3.0, 0.0], dtype=torch.float16)
    parts = old_ct_bitmask(t)
    assert tuple(parts["shape"].shape) == (1,) and parts["row_offsets"].ndim == 0
    back = sb.decompress(parts, "model.norm.weight", "f.safetensors")
    assert back.shape == (10,) and torch.equal(back, t)
    bad = dict(parts, bitmask=parts["bitmask"].reshape(1, 2))  # the 2-D form's bitmask for a 1-D shape
    with pytest.raises(FormatError, match=r"f.safetensors: tensor 'model.norm.weight.bitmask' has dtype torch.uint8 "
                                          r"and shape \(1, 2\); expected uint8 \(2,\) for a 1-D tensor of length 10"):
        sb.decompress(bad, "model.norm.weight", "f.safetensors")
    with pytest.raises(FormatError, match=r"tensor 'b.row_offsets' has dtype torch.int64 and shape \(1,\); expected "
                                          r"int64 \(\) for a 1-D tensor"):
        sb.decompress(dict(parts, row_offsets=parts["row_offsets"].reshape(1)), "b")


def test_old_file_with_every_tensor_compressed_loads(old_opt):
    hf, old, dense = old_opt
    tensors, _ = read_shard(old / "model.safetensors")
    assert "model.decoder.layers.0.fc1.bias.bitmask" in tensors and "model.decoder.embed_tokens.weight.shape" in tensors
    exact = flash_llm.from_pretrained(old, sparsify=False, progress=False)  # decompressed only
    state = exact.state_dict()
    for k, v in hf.state_dict().items():
        assert_bit_equal(state[k], v)
    a = flash_llm.from_pretrained(old, progress=False)  # compressed as a dense checkpoint's layers are
    b = flash_llm.from_pretrained(dense, progress=False)
    sparse = [n for n, m in a.named_modules() if isinstance(m, SparseLinear)]
    assert len(sparse) > 5 and sparse == [n for n, m in b.named_modules() if isinstance(m, SparseLinear)]
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(82))
    with torch.no_grad():
        assert torch.equal(logits(a, ids), logits(b, ids))


def test_inspect_lists_an_old_file_under_its_tensor_names(old_opt, capsys):
    _, old, _ = old_opt
    assert main(["inspect", str(old)]) == 0
    out = capsys.readouterr().out
    assert "model.decoder.layers.0.fc1.bias " in out and ".bias.weight" not in out


def test_with_targets_a_compressed_tensor_they_do_not_select_is_refused(tmp_path):
    hf = hf_model("llama", seed=82)
    path = _old_ct_checkpoint(hf, tmp_path / "ct", {"format": "sparse-bitmask", "targets": ["Linear"]})
    with pytest.raises(FormatError, match=r"model.safetensors: 'model.embed_tokens.weight' is stored in "
                                          r"sparse-bitmask form \('model.embed_tokens.weight.\*'\) but config.json's "
                                          r"sparsity_config does not target "
                                          r"'model.embed_tokens' \(targets \['Linear'\], ignore \[\]\)"):
        flash_llm.from_pretrained(path, progress=False)


# ---- 2. a linear layer without elements --------------------------------------------------------------------------

class _EmptyHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(64, 32, dtype=torch.float16)
        self.b = nn.Linear(32, 0, bias=False, dtype=torch.float16)  # zero-width head


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")
def test_write_sparse_bitmask_stores_an_empty_layer_dense(tmp_path):
    torch.manual_seed(0)
    m = _EmptyHead()
    with torch.no_grad():
        m.a.weight[torch.rand(32, 64) < 0.7] = 0
    report = write_sparse_bitmask(m, tmp_path / "sb", config={"model_type": "custom"}, progress=False)
    assert [c.fqn for c in report.converted] == ["a"]
    assert [(s.fqn, s.reason) for s in report.skipped] == [
        ("b", "empty weight (0, 32): the sparse-bitmask layout needs rows, cols >= 1")]
    tensors, _ = read_shard(tmp_path / "sb" / "model.safetensors")
    assert tensors["b.weight"].shape == (0, 32) and "a.bitmask" in tensors
    qc = json.loads((tmp_path / "sb" / "config.json").read_text())["quantization_config"]
    assert qc["sparsity_config"]["ignore"] == ["lm_head", "b"]
    with torch.device("meta"):
        back = _EmptyHead()
    rep = load_checkpoint(back, tmp_path / "sb", progress=False)  # (compressed as a dense checkpoint is)
    assert isinstance(back.a, SparseLinear) and torch.equal(back.a.to_dense(), m.a.weight.detach())
    assert back.b.weight.shape == (0, 32) and not back.b.weight.is_meta
    assert ("b", "empty weight (0, 32)") in [(s.fqn, s.reason) for s in rep.skipped]


def test_compress_refuses_a_weight_without_elements():
    for shape in ((0, 16), (16, 0)):
        with pytest.raises(ValueError, match=rf"weight has shape \({shape[0]}, {shape[1]}\); the sparse-bitmask "
                                             r"layout needs rows, cols >= 1 \(store a weight without elements dense\)"):
            sb.compress(torch.zeros(shape))


# ---- 3. config_groups that is not an object ----------------------------------------------------------------------

@pytest.mark.parametrize("groups, kind", [(5, "int"), ([{"targets": ["Linear"]}, {"targets": ["Embedding"]}], "list")])
def test_config_groups_not_an_object_is_a_format_error(tmp_path, capsys, groups, kind):
    path = tmp_path / "ck"
    path.mkdir()
    save_file({"w": torch.zeros(2, 2)}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {
        "quant_method": "compressed-tensors", "config_groups": groups}}))
    message = (f"{path / 'config.json'}: quantization_config.config_groups must be an object (quantization schemes "
               f"by group name), got {kind}")
    with pytest.raises(FormatError) as e:
        sb.parse_config(json.loads((path / "config.json").read_text()), path / "config.json")
    assert str(e.value) == message
    with pytest.raises(FormatError, match="config_groups must be an object"):
        flash_llm.from_pretrained(path, progress=False)
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"error: {message}" in err and "Traceback" not in err


# ---- 4. DeltaRows version 1 on the meta device -------------------------------------------------------------------

def _as_version(fmt, w: torch.Tensor, version: int, **kw):
    tensors, meta = fmt.from_dense(w, **kw).state()
    m = json.loads(meta["flash_llm"])
    m["version"] = version
    return tensors, {"flash_llm": json.dumps(m)}


def test_delta_rows_version_1_loads_on_the_meta_device():
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(82)).half()
    w[torch.rand(64, 128, generator=torch.Generator().manual_seed(1)) < 0.8] = 0
    tensors, meta = _as_version(DeltaRows, w, 1, splits=2)  # the split layout: version 1's, read as it is
    assert torch.equal(DeltaRows.from_state(tensors, meta).to_dense(), w)
    on_meta = DeltaRows.from_state({k: t.to("meta") for k, t in tensors.items()}, meta)
    assert on_meta.device.type == "meta" and on_meta.shape == (64, 128) and on_meta.dtype == torch.float16
    assert on_meta.nnz == int(torch.count_nonzero(w))
    # a version that loading converts (BitmapTiles 1: its bits are permuted) still needs the values
    tensors, meta = _as_version(BitmapTiles, w, 1)
    with pytest.raises(FormatError, match=r"'weight' is flash_llm.bitmap_tiles format version 1 on the meta device: "
                                          r"converting it to version 2 needs its values"):
        BitmapTiles.from_state({k: t.to("meta") for k, t in tensors.items()}, meta)


# ---- 1b. today's compressed-tensors names: the module prefix, ".weight" stripped ----------------------------------

def _bitmask_names(path, legacy: bool, drop_targets: bool = False):
    """A write_sparse_bitmask folder (today's compressed-tensors names since session 83: ``P.compressed`` for the
    weight of module ``P``, as ``BitmaskTensor.dict`` strips ``.weight``), rewritten with the older full names
    (``P.weight.compressed``: flash-llm's writer before session 83 and older compressed-tensors) where ``legacy``;
    optionally without ``targets``."""
    from safetensors.torch import load_file
    f = path / "model.safetensors"
    t = load_file(str(f))
    parts = [k for k in t if sb.split_key(k)]
    assert parts and not any(".weight." in k for k in parts)  # (the writer's own names are today's)
    if legacy:
        t = {f"{k.rpartition('.')[0]}.weight.{k.rpartition('.')[2]}" if k in parts else k: v for k, v in t.items()}
        save_file(t, str(f), metadata={"format": "pt"})
    if drop_targets:
        config = json.loads((path / "config.json").read_text())
        section = config["quantization_config"]["sparsity_config"]
        section.pop("targets", None)
        (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("legacy", [False, True], ids=["today", "legacy"])
@pytest.mark.parametrize("drop_targets", [False, True])
def test_module_prefix_names_load_compressed(tmp_path, drop_targets, legacy):
    hf = hf_model("llama", seed=821)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("proj.weight"):
                p.mul_(torch.rand_like(p) > 0.7)
    write_sparse_bitmask(hf, tmp_path / "ct")
    _bitmask_names(tmp_path / "ct", legacy, drop_targets)
    model = flash_llm.from_pretrained(tmp_path / "ct", dtype=torch.float16, progress=False)
    up = model.model.layers[0].mlp.up_proj
    assert isinstance(up, SparseLinear)
    assert torch.equal(up.to_dense(), hf.model.layers[0].mlp.up_proj.weight.to(torch.float16))
