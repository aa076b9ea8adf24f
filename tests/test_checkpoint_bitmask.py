"""The compressed-tensors sparse-bitmask layout: our compress/decompress against a plain-Python reading of the
published layout, checkpoints written by our writer and built by hand, targets/ignore, refusals, corruption."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import flash_llm
from flash_llm import FormatError, SparseLinear
from flash_llm.checkpoint import convert, write_sparse_bitmask
from flash_llm.checkpoint import sparse_bitmask as sb

from _ckpt import LOW_SPARSITY_LAYER, VOCAB, edit_json, edit_tensor, hf_model, logits, read_shard, save_hf, shards
from conftest import assert_bit_equal, random_values

transformers = pytest.importorskip("transformers")


def hand_layout(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """The four tensors of ``w [rows, cols]``, element by element from the published description."""
    rows, cols = w.shape
    bitmask, offsets, where = [], [], []
    for r in range(rows):
        offsets.append(len(where))
        row = [0] * ((cols + 7) // 8)
        for c in range(cols):
            if float(w[r, c]) != 0.0:  # NaN != 0 is a nonzero too
                row[c // 8] |= 1 << (c % 8)  # bit j of byte b is column 8 b + j, LSB first
                where.append((r, c))
        bitmask.append(row)
    idx = torch.tensor(where, dtype=torch.int64).reshape(-1, 2)
    return {"shape": torch.tensor([rows, cols], dtype=torch.int64), "compressed": w[idx[:, 0], idx[:, 1]],
            "bitmask": torch.tensor(bitmask, dtype=torch.uint8).reshape(rows, (cols + 7) // 8),
            "row_offsets": torch.tensor(offsets, dtype=torch.int64)}


def test_worked_example():
    w = torch.zeros(2, 10, dtype=torch.float16)
    w[0, 0], w[0, 3], w[0, 9], w[1, 7], w[1, 8] = 1.5, -2.0, 3.0, 0.25, -0.5
    parts = sb.compress(w)
    assert parts["bitmask"].tolist() == [[0b00001001, 0b00000010], [0b10000000, 0b00000001]]
    assert parts["row_offsets"].tolist() == [0, 3]
    assert parts["compressed"].tolist() == [1.5, -2.0, 3.0, 0.25, -0.5]
    assert parts["shape"].dtype == torch.int64 and parts["shape"].tolist() == [2, 10]
    assert torch.equal(sb.decompress(parts), w)


@pytest.mark.parametrize("shape", [(1, 1), (3, 8), (5, 13), (16, 64), (7, 130)])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_round_trip_matches_hand_layout(shape, density, dtype):
    rows, cols = shape
    g = torch.Generator().manual_seed(rows * 1000 + cols)
    w = torch.where(torch.rand(rows, cols, generator=g) < density, random_values(rows, cols, dtype, seed=cols),
                    torch.zeros((), dtype=dtype))
    if density == 0.3 and rows * cols > 4:  # specials: -0.0 is a zero, NaN and Inf are values
        w[0, 0], w[-1, -1], w[rows // 2, cols // 2] = -0.0, float("nan"), float("-inf")
    parts = sb.compress(w)
    hand = hand_layout(w)
    for p in sb.PARTS:
        assert parts[p].dtype == hand[p].dtype and parts[p].shape == hand[p].shape, p
        assert torch.equal(parts[p].view(torch.uint8) if p == "compressed" else parts[p],
                           hand[p].view(torch.uint8) if p == "compressed" else hand[p]), p
    back = sb.decompress(hand)
    want = torch.where(w == 0, torch.zeros((), dtype=dtype), w)  # -0.0 comes back as +0.0
    assert torch.equal(back.view(torch.uint8), want.view(torch.uint8))


@pytest.mark.parametrize("damage, match", [
    (lambda p: p.update(row_offsets=p["row_offsets"] + (torch.arange(p["row_offsets"].numel()) == 2)),
     r"tensor 'w.row_offsets'\[2\] is \d+; the bitmask's rows before it hold \d+ nonzeros"),
    (lambda p: p.update(compressed=p["compressed"][:-1]), r"tensor 'w.compressed' holds \d+ values; the bitmask has"),
    (lambda p: p["bitmask"][1].__setitem__(-1, p["bitmask"][1][-1] | 0x80),
     r"tensor 'w.bitmask': row 1 has bits set in its padding past column 12"),
    (lambda p: p.update(bitmask=p["bitmask"][:, :1].contiguous()), r"'w.bitmask' has dtype torch.uint8 and shape"),
    (lambda p: p.update(shape=torch.tensor([4, 13, 1])), r"'w.shape' has dtype torch.int64 and shape \(3,\)"),
    (lambda p: p.pop("row_offsets"), r"tensor 'w.row_offsets' is missing"),
    (lambda p: p.update(compressed=p["compressed"].to(torch.int16)), r"'w.compressed' has dtype torch.int16"),
])
def test_decompress_rejects_inconsistent_parts(damage, match):
    w = torch.where(torch.rand(4, 13, generator=torch.Generator().manual_seed(1)) < 0.5,
                    random_values(4, 13, torch.float16), torch.zeros((), dtype=torch.float16))
    parts = sb.compress(w)
    damage(parts)
    with pytest.raises(FormatError, match=match):
        sb.decompress(parts, "w", "file.safetensors")


# ---- checkpoints ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["llama", "opt"])
def model_and_dirs(request, tmp_path_factory):
    family = request.param
    hf = hf_model(family)
    base = tmp_path_factory.mktemp(f"bitmask-{family}")
    dense = save_hf(hf, base / "dense")
    bitmask = base / "bitmask"
    report = write_sparse_bitmask(hf, bitmask, max_shard_size="16KB", progress=False)
    return family, hf, dense, bitmask, report


def test_writer_layout_and_config(model_and_dirs):
    family, hf, _, path, report = model_and_dirs
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    sc = qc["sparsity_config"]
    assert sc["format"] == "sparse-bitmask" and sc["targets"] == ["Linear"] and sc["ignore"] == ["lm_head"]
    linears = [n for n, m in hf.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    zeros = sum(int((hf.get_submodule(n).weight == 0).sum()) for n in linears)
    assert sc["global_sparsity"] == pytest.approx(zeros / sum(hf.get_submodule(n).weight.numel() for n in linears))
    assert sorted(c.fqn for c in report.converted) == sorted(linears)
    tensors = {}
    for f in shards(path):
        t, meta = read_shard(f)
        assert meta == {"format": "pt"}
        tensors.update(t)
    for n in linears:
        parts = {p: tensors.pop(f"{n}.{p}") for p in sb.PARTS}  # (today's compressed-tensors naming)
        want = hand_layout(hf.get_submodule(n).weight.detach())
        assert all(torch.equal(parts[p], want[p]) for p in sb.PARTS), n
        assert f"{n}.weight" not in tensors
    # what is left is stored densely, as transformers stores it
    state = hf.state_dict()
    assert all(torch.equal(t, state[k]) for k, t in tensors.items())


def test_reader_gives_the_same_model_as_the_dense_checkpoint(model_and_dirs):
    family, hf, dense, path, _ = model_and_dirs
    a = flash_llm.from_pretrained(path)
    b = flash_llm.from_pretrained(dense)
    sparse = [n for n, m in a.named_modules() if isinstance(m, SparseLinear)]
    assert sparse == [n for n, m in b.named_modules() if isinstance(m, SparseLinear)]
    assert LOW_SPARSITY_LAYER[family] not in sparse and len(sparse) > 5
    for n in sparse:
        assert torch.equal(a.get_submodule(n).weight_data, b.get_submodule(n).weight_data)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(logits(a, ids), logits(b, ids))
    dense_a = flash_llm.from_pretrained(path, sparsify=False)  # decompressed only: the original weights
    for n, m in hf.named_modules():
        if isinstance(m, nn.Linear):
            assert_bit_equal(dense_a.get_submodule(n).weight, m.weight.detach())


def test_convert_between_bitmask_and_flash_is_lossless(model_and_dirs, tmp_path):
    _, hf, _, path, _ = model_and_dirs
    convert(path, tmp_path / "flash", progress=False)
    convert(tmp_path / "flash", tmp_path / "bitmask", format="sparse-bitmask", progress=False)
    convert(tmp_path / "bitmask", tmp_path / "flash2", progress=False)
    a, b = (flash_llm.from_pretrained(tmp_path / d, sparsify=False) for d in ("flash", "flash2"))
    for n, m in hf.named_modules():
        if isinstance(m, nn.Linear):
            assert_bit_equal(a.get_submodule(n).weight, m.weight.detach())
            assert_bit_equal(b.get_submodule(n).weight, m.weight.detach())


def test_hand_built_checkpoint(tmp_path):
    hf = hf_model("llama", seed=3)
    state = hf.state_dict()
    tensors = {}
    compressed = [n for n, m in hf.named_modules() if isinstance(m, nn.Linear) and "mlp" in n]
    for k, v in state.items():
        if k.endswith(".weight") and k[:-7] in compressed:
            tensors.update({f"{k}.{p}": t for p, t in hand_layout(v).items()})
        else:
            tensors[k] = v.contiguous()
    path = tmp_path / "hand"
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = hf.config.to_dict()
    config["quantization_config"] = {  # the published schema, with the keys flash-llm does not use
        "quant_method": "compressed-tensors", "format": "dense", "quantization_status": "compressed",
        "config_groups": {}, "kv_cache_scheme": None, "ignore": [], "version": "0.9.4",
        "global_compression_ratio": 1.4,
        "sparsity_config": {"format": "sparse-bitmask", "global_sparsity": 0.6, "registry_requires_subclass": False,
                            "sparsity_structure": "unstructured", "targets": ["re:.*mlp\\..*_proj$"],
                            "ignore": ["lm_head"]}}
    (path / "config.json").write_text(json.dumps(config))
    model = flash_llm.from_pretrained(path, sparsify=False)
    for n, m in hf.named_modules():
        if isinstance(m, nn.Linear):
            assert_bit_equal(model.get_submodule(n).weight, m.weight.detach())
    # an older file that declares it under "compression_config", without targets
    config.pop("quantization_config")
    config["compression_config"] = {"sparsity_config": {"format": "sparse-bitmask", "global_sparsity": 60.0}}
    (path / "config.json").write_text(json.dumps(config))
    model = flash_llm.from_pretrained(path)
    for n in compressed:
        assert isinstance(model.get_submodule(n), SparseLinear)
        assert_bit_equal(model.get_submodule(n).to_dense(), hf.get_submodule(n).weight.detach())


def test_targets_and_ignore(tmp_path):
    hf = hf_model("llama", seed=4)
    path = tmp_path / "bm"
    report = write_sparse_bitmask(hf, path, targets=["re:.*self_attn.*"], ignore=["re:.*\\.v_proj$"], progress=False)
    chosen = sorted(c.fqn for c in report.converted)
    assert chosen == sorted(n for n, m in hf.named_modules()
                            if isinstance(m, nn.Linear) and "self_attn" in n and not n.endswith("v_proj"))
    tensors, _ = read_shard(path / "model.safetensors")
    assert "model.layers.0.mlp.up_proj.weight" in tensors and "model.layers.0.self_attn.v_proj.weight" in tensors
    assert "model.layers.0.self_attn.q_proj.bitmask" in tensors
    model = flash_llm.from_pretrained(path, sparsify=False)
    assert_bit_equal(model.get_submodule("model.layers.1.self_attn.k_proj").weight,
                     hf.get_submodule("model.layers.1.self_attn.k_proj").weight.detach())
    # a compressed weight the config does not target contradicts the config: refused, never guessed
    edit_json(path / "config.json",
              lambda d: d["quantization_config"]["sparsity_config"].update(ignore=["re:.*q_proj$"]))
    with pytest.raises(FormatError, match=r"model.safetensors: 'model.layers.0.self_attn.q_proj.weight' is stored in "
                                          r"sparse-bitmask form .* but config.json's sparsity_config does not target"):
        flash_llm.from_pretrained(path)


@pytest.mark.parametrize("section, match", [
    ({"quant_method": "compressed-tensors", "config_groups": {"group_0": {"targets": ["Linear"]}},
      "sparsity_config": {"format": "sparse-bitmask"}}, r"declares quantization \(config_groups \['group_0'\]\)"),
    ({"quant_method": "compressed-tensors", "sparsity_config": {"format": "sparse-24-bitmask"}},
     r"sparsity_config has format 'sparse-24-bitmask'; flash-llm reads 'sparse-bitmask'"),
    ({"quant_method": "compressed-tensors", "kv_cache_scheme": {"num_bits": 8},
      "sparsity_config": {"format": "sparse-bitmask"}}, r"kv_cache_scheme"),
    ({"quant_method": "compressed-tensors", "sparsity_config": {"format": "sparse-bitmask", "targets": "Linear"}},
     r"sparsity_config.targets must be a list of strings"),
    ({"quant_method": "compressed-tensors", "sparsity_config": {"format": "sparse-bitmask", "targets": ["re:("]}},
     r"sparsity_config.targets has an invalid regular expression 're:\(': missing \)"),
    ({"quant_method": "compressed-tensors", "sparsity_config": {"format": "sparse-bitmask", "ignore": ["re:*x"]}},
     r"sparsity_config.ignore has an invalid regular expression 're:\*x': nothing to repeat"),
])
def test_unsupported_compressed_tensors_configs(tmp_path, section, match):
    hf = hf_model("llama", seed=5)
    path = tmp_path / "bm"
    write_sparse_bitmask(hf, path, progress=False)
    edit_json(path / "config.json", lambda d: d.update(quantization_config=section))
    with pytest.raises(FormatError, match=f"config.json: .*{match}"):
        flash_llm.from_pretrained(path)


def test_corrupt_bitmask_checkpoint_names_file_and_tensor(tmp_path):
    hf = hf_model("opt", seed=6)
    path = tmp_path / "bm"
    write_sparse_bitmask(hf, path, max_shard_size="16KB", progress=False)
    name = "model.decoder.layers.1.fc1"  # (its weight's parts: today's compressed-tensors names, '.weight' stripped)
    file = edit_tensor(path, f"{name}.row_offsets", lambda t: t.flip(0).contiguous())
    with pytest.raises(FormatError, match=rf"{file.name}: tensor '{name}.row_offsets'\[0\] is \d+; the bitmask"):
        flash_llm.from_pretrained(path)
    edit_tensor(path, f"{name}.row_offsets", lambda t: None)
    with pytest.raises(FormatError, match=rf"tensor '{name}.row_offsets' is missing \(no shard holds it"):
        flash_llm.from_pretrained(path)


def test_invalid_regex_in_config_is_a_cli_input_error(tmp_path, capsys):
    """A bad ``re:`` pattern in sparsity_config: inspect and convert exit 2 naming config.json and the pattern."""
    from flash_llm.cli import main

    path = tmp_path / "bm"
    write_sparse_bitmask(hf_model("llama", seed=7), path, progress=False)
    edit_json(path / "config.json", lambda d: d["quantization_config"]["sparsity_config"].update(targets=["re:("]))
    for argv in (["inspect", str(path)], ["convert", str(path), str(tmp_path / "out")]):
        rc = main(argv)
        out, err = capsys.readouterr()
        assert rc == 2, (argv, err)
        assert f"error: {path / 'config.json'}: sparsity_config.targets has an invalid regular expression 're:('" \
            in err, err
        assert out == "" and "Traceback" not in err
    assert not (tmp_path / "out").exists()
