"""Session 88 fixes of items session 87 noticed and left.

1. DeltaRows' meta load (``from_state`` of arrays on the meta device) took any ``nnz`` in ``[0, M K]`` from the
   metadata, whatever ``data``'s length: a 64x256 weight of 5 % density (one group a slice) loaded as 16384 nonzeros.
   Now bounded by the entries ``data`` holds (``_nnz_range``, as BitmapTiles and Tiled-CSL since session 87).
2. ``flash_llm.load(path, device="cuda")`` where CUDA is not available read the whole file and failed in the move
   (torch's "Torch not compiled with CUDA enabled" AssertionError); now a ValueError naming ``device`` before the
   read (``checkpoint.pretrained.check_device``, whose message for a backend torch lacks is now one line, not
   torch's list of every backend).
3. ``flash-llm convert --max-shard-size 500Mb`` said only "expected a byte count ..."; the Python API's message says
   why (megabits to transformers) and what to write: the flag's says it too.

And two of session 88's hunt findings:

4. A checkpoint stored in ``float8_e4m3fn`` loaded with ``dtype=torch.float16`` (as the refusal without a dtype asks)
   died in ``cast_loss``'s overflow check with torch's NotImplementedError (no ``isfinite`` for that dtype), naming no
   file; ``flash-llm convert --dtype float16`` showed a traceback.  ``cast_loss`` now checks such a source in float32
   (exact), so the load works.
5. A coded DeltaRows weight (bf16 only; its arrays' lengths say it is coded) given to a raw op with fp16 ``x`` is
   refused on CUDA, but the CPU reference and the fake kernel took it: the CPU read the coded bf16 bits as fp16
   (errors of 11 on outputs of 10).  ``ops._raw_weight`` refuses it on every device now.
6. ``load_checkpoint`` into a tensor-parallel model blamed the checkpoint ("has no place in the model"); now refused
   by name before the read, as the writers refuse such a model.
7. ``build_synthetic(fmt="delta-rows")`` of a projection 65536 columns wide failed inside the encoder after the
   embeddings and the narrower projections were built, naming neither; ``estimate_bytes`` planned it, and took
   dtypes no build takes.  Both refuse up front now.
8. ``bundled.save_model_dir(dtype=torch.float8_e4m3fn)`` ended in torch's bare NotImplementedError; a TypeError now.
"""

import json

import pytest
import torch

import flash_llm
from flash_llm.checkpoint.pretrained import check_device
from flash_llm.formats import DeltaRows, FormatError
from flash_llm.formats.delta_rows import GROUP, GROUP_WORDS, LANES
from flash_llm.nn import cast_loss


def _meta_state(c, **meta_changes):
    tensors, md = c.state()
    md = {k: json.dumps({**json.loads(v), **meta_changes}) for k, v in md.items()}
    return {n: t.to("meta") for n, t in tensors.items()}, md


def _weight(m, k, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(m, k, generator=g).add(0.5)
    return (w * (torch.rand(m, k, generator=g) < density)).half()


# ---- 1. DeltaRows meta nnz -------------------------------------------------------------------------------------------
def test_delta_rows_meta_nnz_bounded_by_data():
    """A sparse 64x256 weight has few groups: a metadata nnz past their entries is refused (naming the data's words
    and the range), the true nnz and every count up to the groups' capacity load."""
    c = DeltaRows.from_dense(_weight(64, 256, 0.05))
    cap = c.data.numel() // GROUP_WORDS * LANES * GROUP
    assert c.nnz <= cap < 64 * 256
    for nnz in (cap + 1, 64 * 256):
        with pytest.raises(FormatError, match=rf"on the meta device\) metadata says nnz={nnz}; data of "
                                              rf"{c.data.numel()} words holds 0 to {cap} nonzeros"):
            DeltaRows.from_state(*_meta_state(c, nnz=nnz))
    for nnz in (0, c.nnz, cap):
        assert DeltaRows.from_state(*_meta_state(c, nnz=nnz)).nnz == nnz
    assert DeltaRows.from_state(*_meta_state(c, nnz=None)).nnz == -1


@pytest.mark.parametrize("m, k, density", [(1, 1, 1.0), (33, 100, 0.5), (64, 256, 1.0), (40, 64, 0.0),
                                           (96, 512, 0.3)])
def test_delta_rows_real_encodings_load_on_meta(m, k, density):
    """No real encoding is refused by the bound: every one loads on the meta device with its nnz."""
    for parts in (None, 1):
        c = DeltaRows.from_dense(_weight(m, k, density), **({} if parts is None else {"splits": 2}))
        w = DeltaRows.from_state(*_meta_state(c))
        assert (w.device.type, w.shape, w.nnz) == ("meta", (m, k), c.nnz)


# ---- 2. load(device=...) checked before the read ---------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where CUDA is not available")
def test_load_to_cuda_without_cuda_refused_before_the_read(tmp_path, monkeypatch):
    """``device="cuda"`` without CUDA: ValueError naming the device, and the file is never opened."""
    p = tmp_path / "w.safetensors"
    flash_llm.BitmapTiles.from_dense(_weight(8, 16, 0.5)).save(p)
    import safetensors

    opened = []
    real = safetensors.safe_open
    monkeypatch.setattr(safetensors, "safe_open", lambda *a, **kw: opened.append(a) or real(*a, **kw))
    for dev in ("cuda", "cuda:0", torch.device("cuda")):
        with pytest.raises(ValueError, match=r"device=.*cuda.*: CUDA is not available here"):
            flash_llm.load(p, device=dev)
    assert opened == []
    assert flash_llm.load(p, device="meta").device.type == "meta"  # (meta stays a valid target: shapes only)
    assert flash_llm.load(p).device.type == "cpu" and opened


def test_check_device_message_is_one_line():
    """A backend this torch cannot allocate on: one line of torch's message, not its list of every backend."""
    with pytest.raises(ValueError) as e:
        check_device("xla")
    assert str(e.value).startswith("device='xla': this torch cannot allocate there (") and "\n" not in str(e.value)
    check_device("meta", meta_ok=True)
    with pytest.raises(ValueError, match="meta device is not supported"):
        check_device("meta")


# ---- 3. the CLI's --max-shard-size -----------------------------------------------------------------------------------
def test_cli_shard_size_lowercase_b_says_why(capsys):
    """The flag's refusal of ``500Mb`` says what transformers reads there and what to write; other bad sizes keep
    the generic message."""
    from flash_llm.cli import main

    for text, want in (("500Mb", "'500Mb' ends in a lowercase 'b', which transformers reads as bits (or refuses); "
                                 "write '500MB' for bytes"),
                       ("5x", "expected a byte count >= 1 or a size like 5GB, 500MB or 64KiB, got '5x'")):
        assert main(["convert", "in", "out", "--max-shard-size", text]) == 2
        assert f"argument --max-shard-size: {want}" in capsys.readouterr().err


# ---- 4. a float8 checkpoint --------------------------------------------------------------------------------------
def test_float8_checkpoint_loads_with_dtype(tmp_path):
    """A transformers checkpoint re-stored in float8_e4m3fn without a dtype in config.json: refused without a dtype
    (as before), loaded with ``dtype=torch.float16`` (every value exact) and equal to the float8 values cast."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from _ckpt import hf_model

    hf_model("llama", torch.float16).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.pop("dtype", None), cfg.pop("torch_dtype", None)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        f8 = {k: f.get_tensor(k).to(torch.float8_e4m3fn) for k in f.keys()}
    save_file(f8, tmp_path / "model.safetensors", {"format": "pt"})
    with pytest.raises(ValueError, match="declares no dtype"):
        flash_llm.from_pretrained(tmp_path, progress=False)
    model = flash_llm.from_pretrained(tmp_path, dtype=torch.float16, sparsify=False, progress=False)
    sd = model.state_dict()
    key = "model.layers.0.mlp.down_proj.weight"
    assert sd[key].dtype == torch.float16 and torch.equal(sd[key], f8[key].to(torch.float16))
    x = torch.tensor([448.0, -3.5, 0.0, 2.0**-9]).to(torch.float8_e4m3fn)  # (largest, ordinary, zero, subnormal)
    assert cast_loss(x, x.to(torch.float16)) is None and cast_loss(x, x.to(torch.bfloat16)) is None


# ---- 5. coded DeltaRows and fp16 x in the raw ops ----------------------------------------------------------------
def test_raw_op_refuses_fp16_x_with_coded_delta_rows():
    """The raw ops refuse fp16 ``x`` with a coded DeltaRows weight on the CPU and under FakeTensorMode (as the CUDA
    path does); bf16 ``x`` computes it to rounding, and an uncoded fp16 weight with fp16 ``x`` is unaffected."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    g = torch.Generator().manual_seed(0)
    m, k = 64, 256
    w = ((torch.rand(m, k, generator=g) + 1) * torch.randn(m, k, generator=g).sign()
         * (torch.rand(m, k, generator=g) < 0.3)).bfloat16()
    c = DeltaRows.from_dense(w).code_values()
    assert c is not None and c.coded
    x = torch.randn(2, k, generator=g)
    fmt = flash_llm.reference.FORMAT_IDS[DeltaRows]
    with pytest.raises(ValueError, match=r"x: a DeltaRows weight with coded values is bf16, got x in torch.float16"):
        torch.ops.flash_llm.spmm(x.half(), c.data, c.offsets, fmt, m, k, None)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        with pytest.raises(ValueError, match="coded values is bf16"):
            torch.ops.flash_llm.spmm(mode.from_tensor(x.half()), mode.from_tensor(c.data),
                                     mode.from_tensor(c.offsets), fmt, m, k, None)
    ref = x.bfloat16().float() @ w.float().t()
    y = torch.ops.flash_llm.spmm(x.bfloat16(), c.data, c.offsets, fmt, m, k, None)
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)
    u = DeltaRows.from_dense(w.half())
    y16 = torch.ops.flash_llm.spmm(x.half(), u.data, u.offsets, fmt, m, k, None)
    torch.testing.assert_close(y16.float(), x.half().float() @ w.half().float().t(), rtol=2e-2, atol=2e-2)


# ---- 6. load_checkpoint into a tensor-parallel model ---------------------------------------------------------------
def test_load_checkpoint_into_a_tensor_parallel_model_is_refused_by_name(world1, tmp_path):
    """A sharded model's own, correct checkpoint given to ``load_checkpoint`` failed with "has no place in the
    LlamaForCausalLM built from config.json (wrong config.json, or a checkpoint of another model)"; now a ValueError
    saying the module is tensor-parallel and what to do, before the checkpoint is read, the model unchanged."""
    from safetensors.torch import save_file

    from flash_llm.checkpoint import load_checkpoint
    from flash_llm.models import ModelConfig, from_config
    from flash_llm.parallel import tensor_parallel_

    cfg = ModelConfig(family="llama", vocab_size=97, hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                      intermediate_size=96, max_position_embeddings=64)
    save_file({k: v.contiguous() for k, v in from_config(cfg, dtype=torch.float32, seed=1).state_dict().items()},
              tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf()))
    model = from_config(cfg, dtype=torch.float32, seed=2)
    tensor_parallel_(model, world1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"^module is tensor-parallel \(7 sharded projections: .*load the checkpoint "
                                         r"before sharding \(tensor_parallel_\), or with .*load_tensor_parallel"):
        load_checkpoint(model, tmp_path)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


# ---- 7. build_synthetic / estimate_bytes: DeltaRows' column limit and the dtype, before anything is built -------------
def test_synthetic_delta_rows_too_wide_refused_before_the_build(monkeypatch):
    """A sparse DeltaRows projection 65536 columns wide (down_proj of intermediate_size 65536): refused by
    ``estimate_bytes`` and by ``build_synthetic`` before any projection is drawn, naming it and ``fmt`` (the encoder
    failed after the embeddings and 7 projections, naming neither); the dense build and the other formats plan it."""
    import flash_llm.formats as F
    from flash_llm.models import ModelConfig
    from flash_llm.models.synthetic import build_synthetic, estimate_bytes

    cfg = ModelConfig(family="llama", vocab_size=10, hidden_size=64, num_layers=1, num_heads=2,
                      intermediate_size=65536)
    drawn = []
    monkeypatch.setattr(F.DeltaRows, "from_dense", classmethod(lambda cls, w, *a, **k: drawn.append(w.shape)))
    want = r"down_proj has K = 65536 >= 65536: DeltaRows stores 16-bit columns \(use fmt='bitmap' or 'tiled-csl'"
    with pytest.raises(ValueError, match=want):
        estimate_bytes(cfg, 0.8, fmt="delta-rows")
    with pytest.raises(ValueError, match=want):
        build_synthetic(cfg, 0.8, device="cpu", progress=False, fmt="delta-rows")
    assert drawn == []
    assert estimate_bytes(cfg, None, fmt="delta-rows")["projections"] > 0
    assert estimate_bytes(cfg, 0.8, fmt="bitmap")["projections"] > 0
    assert estimate_bytes(cfg.replace(intermediate_size=65535), 0.8, fmt="delta-rows")["projections"] > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.int8, torch.float8_e4m3fn, "float16"])
def test_estimate_bytes_refuses_a_dtype_no_build_takes(dtype):
    """``estimate_bytes`` took float32 / int8 / float8 (numbers of no model ``build_synthetic`` builds) and failed in
    torch for a string; a TypeError naming ``dtype`` now, as ``build_synthetic`` gives."""
    from flash_llm.models.synthetic import build_synthetic, estimate_bytes

    for fn in (lambda: estimate_bytes("llama-3-8b", 0.8, dtype=dtype),
               lambda: build_synthetic("llama-3-8b", 0.8, dtype=dtype, device="meta")):
        with pytest.raises(TypeError, match=r"dtype must be torch.float16 or torch.bfloat16, got "):
            fn()


# ---- 8. save_model_dir(dtype=float8) ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_save_model_dir_refuses_float8_up_front(tmp_path, dtype):
    """A float8 ``dtype`` passed the floating-point check and ended in torch's bare NotImplementedError from the
    overflow check (no ``isfinite`` for float8 destinations); a TypeError naming ``dtype`` now, nothing written."""
    from flash_llm import bundled

    cfg = json.loads((bundled.path() / "config.json").read_text())
    with pytest.raises(TypeError, match=r"dtype must be a floating-point torch.dtype .*got torch.float8"):
        bundled.save_model_dir(bundled.load(), cfg, tmp_path / "out", dtype=dtype)
    assert list(tmp_path.iterdir()) == []
