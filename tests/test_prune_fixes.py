"""Regression tests: `flash-llm prune --out` checked up front, evaluate's per-module training flags, a teacher sharing
the student's weights, SparseGPT restoring the layers it pruned when a later layer fails, prompts with bytes that are
not UTF-8."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

from flash_llm import data, demo
from flash_llm.evaluate import evaluate
from flash_llm.prune import gradual_prune_, sparsegpt_prune_
from test_demo import calib_file, hf_checkpoint, run  # noqa: F401  (fixtures)
from test_prune import VOCAB, ToyLM, _calib


# ---- 1. flash-llm prune: an --out that cannot be replaced is refused before the model is loaded ----------------
def _no_load(*args, **kwargs):
    raise AssertionError("the model was loaded although --out cannot be written")


@pytest.mark.parametrize("case", ["regular file", "dangling symlink", "cwd", "parent of cwd", "mount point"])
def test_prune_out_that_cannot_be_replaced_is_refused_up_front(capsys, tmp_path, monkeypatch, calib_file, case):
    monkeypatch.setattr(demo, "load_model", _no_load)
    work = tmp_path / "work" / "sub"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    if case == "regular file":
        out = tmp_path / "out.txt"
        out.write_text("mine")
    elif case == "dangling symlink":
        out = tmp_path / "link"
        out.symlink_to(tmp_path / "missing")
    elif case == "cwd":
        out = "."
    elif case == "parent of cwd":
        out = ".."
    else:
        if not os.path.ismount("/proc"):
            pytest.skip("no mount point /proc")
        out = "/proc"
    before = sorted(p.name for p in tmp_path.rglob("*"))
    rc, _, err = run(capsys, "prune", "tiny-shakespeare", "--method", "magnitude", "--sparsity", "0.5", "--calib",
                     str(calib_file), "--out", str(out), "--force", "--device", "cpu")
    assert rc == 2, err
    assert f"--out {out}" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written (no '.old-' directory)
    if case == "regular file":
        assert (tmp_path / "out.txt").read_text() == "mine"


def test_prune_out_existing_directory_stays_replaceable(tmp_path):
    (tmp_path / "old").mkdir()
    assert demo._unreplaceable_out(tmp_path / "old") is None
    assert demo._unreplaceable_out(tmp_path / "new" / "dir") is None


# ---- 2. evaluate restores every submodule's own training flag --------------------------------------------------
def test_evaluate_restores_each_submodules_training_flag():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.drop, self.head = nn.Embedding(256, 16), nn.Dropout(0.5), nn.Linear(16, 256)

        def forward(self, x):
            return self.head(self.drop(self.emb(x)))

    m = M().train()
    m.drop.eval()  # frozen by the caller while the rest trains
    flags = {n: x.training for n, x in m.named_modules()}
    evaluate(m, torch.randint(0, 256, (100,)), seq_len=16, progress=False)
    assert {n: x.training for n, x in m.named_modules()} == flags
    m.eval()
    m.head.train()
    evaluate(m, torch.randint(0, 256, (100,)), seq_len=16, progress=False)
    assert [x.training for x in m.modules()] == [False, False, False, True]


# ---- 3. gradual_prune_ refuses a teacher that shares memory with the model --------------------------------------
class _Wrap(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, b):
        return self.m(b)


def _ce(out, b):
    return nn.functional.cross_entropy(out.reshape(-1, VOCAB), b.reshape(-1))


@pytest.mark.parametrize("how", ["same inner module", "one tied weight"])
def test_gradual_refuses_a_teacher_sharing_the_models_weights(how):
    inner = ToyLM()
    model = _Wrap(inner)
    if how == "same inner module":
        teacher = _Wrap(inner)
    else:
        teacher = copy.deepcopy(model)
        teacher.m.blocks[1].fc2.weight = model.m.blocks[1].fc2.weight
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"teacher shares memory with model .*copy\.deepcopy"):
        gradual_prune_(model, _calib(), 0.5, steps=4, loss_fn=_ce, teacher=teacher, distill_weight=1.0,
                       progress=False)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # refused before any change
    ok = copy.deepcopy(model)  # an independent copy is still accepted
    r = gradual_prune_(model, _calib(), 0.5, steps=2, loss_fn=_ce, teacher=ok, distill_weight=1.0, progress=False)
    assert len(r.losses) == 2


# ---- 4. sparsegpt_prune_ leaves the model as it was when a later layer fails ------------------------------------
def test_sparsegpt_failure_of_a_later_layer_restores_the_earlier_ones():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 64, bias=False), nn.Linear(64, 16, bias=False))  # layer 1's inputs: rank 8
    x = torch.randn(256, 8)
    before = [layer.weight.detach().clone() for layer in m]
    with pytest.raises(ValueError, match=r"1\.weight: .*raise percdamp .*the model is unchanged"):
        sparsegpt_prune_(m, x, 0.5, percdamp=1e-20)
    assert all(torch.equal(layer.weight, w) for layer, w in zip(m, before))
    r = sparsegpt_prune_(m, x, 0.5)  # a retry with the default dampening prunes both layers once
    assert [round(layer.sparsity, 6) for layer in r.layers] == [0.5, 0.5]
    full = nn.Linear(8, 16, bias=False)  # a tiny percdamp stays valid where the inputs have full rank
    assert sparsegpt_prune_(full, x, 0.5, percdamp=1e-20).layers[0].sparsity == 0.5


def test_sparsegpt_without_room_for_the_originals_warns_and_names_the_pruned_layers(monkeypatch):
    """Where the layers' weights exceed half the host's available memory no originals are kept: a warning says so
    up front, and a later layer's failure names the layers already pruned (they stay pruned)."""
    from flash_llm.models import synthetic

    monkeypatch.setattr(synthetic, "host_available_memory", lambda: 1024)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 64, bias=False), nn.Linear(64, 16, bias=False))  # layer 1's inputs: rank 8
    x = torch.randn(256, 8)
    with pytest.warns(RuntimeWarning, match="originals are not kept"), \
            pytest.raises(ValueError, match=r"1\.weight: .*raise percdamp .*1 layer\(s\) were already pruned .*: 0\)"):
        sparsegpt_prune_(m, x, 0.5, percdamp=1e-20)
    assert (m[0].weight == 0).float().mean().item() == 0.5 and (m[1].weight != 0).all()


# ---- 5. text with bytes that are not UTF-8 (surrogate-escaped, as in argv) ----------------------------------------
def test_encode_gives_back_surrogate_escaped_bytes():
    raw = b"ROMEO\xff:\x80"
    text = raw.decode("utf-8", errors="surrogateescape")
    assert data.encode(text).tolist() == list(raw)
    assert data.decode(data.encode(text)) == "ROMEO\ufffd:\ufffd"
    assert data.encode("a\ud800\udcff").tolist() == [97, 0xED, 0xA0, 0x80, 0xFF]  # any str encodes
    assert data.encode("é").tolist() == list("é".encode())


def test_demo_prompt_with_a_byte_that_is_not_utf8(capsys):
    prompt = b"ROMEO\xff:".decode("utf-8", errors="surrogateescape")  # how Python passes $'ROMEO\xff:' in argv
    rc, out, err = run(capsys, "demo", "--prompt", prompt, "--eval-tokens", "64", "--seq-len",
                       "32", "--gen-tokens", "2", "--method", "magnitude", "--device", "cpu")
    assert rc == 0, err
    out.encode("utf-8")  # printable on a UTF-8 terminal: no lone surrogate
    assert out.count("\n  ROMEO\ufffd:") == 2  # dense and sparse


def test_hf_tokenizer_prompt_with_a_byte_that_is_not_utf8(hf_checkpoint):  # noqa: F811
    d, _ = hf_checkpoint
    tok = demo.HFTokenizer(d, 320)
    prompt = b"ROMEO\xff:".decode("utf-8", errors="surrogateescape")
    assert tok.encode(prompt).tolist() == tok.encode("ROMEO\ufffd:").tolist()
