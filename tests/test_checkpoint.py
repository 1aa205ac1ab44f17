import argparse
import os

import numpy as np
import pytest
import torch

from eqm.checkpoint import describe_state_dict, load_checkpoint, load_model_state, save_checkpoint
from eqm.models import EqM_models
from model_helpers import randomize_, tiny_eqm


def trained_state():
    model = randomize_(tiny_eqm())
    ema = randomize_(tiny_eqm(), seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4, 8, 8), None, torch.tensor([0, 1])).pow(2).mean().backward()
    opt.step()
    args = argparse.Namespace(model="EqM-Ti/2", lr=1e-3, ckpt=None, uncond=True, ebm="none")
    return model, ema, opt, args


def test_roundtrip_full_checkpoint(tmp_path):
    model, ema, opt, args = trained_state()
    path = tmp_path / "ckpt" / "0000100.pt"
    data_state = {"epoch": 3, "index": 17, "rng": torch.get_rng_state()}
    save_checkpoint(path, {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                           "args": args, "step": 100, "data_state": data_state})
    assert os.listdir(path.parent) == ["0000100.pt"]  # no temp file left behind
    ck = load_checkpoint(path)
    assert ck["step"] == 100 and ck["args"] == args and ck["data_state"]["index"] == 17
    assert torch.equal(ck["data_state"]["rng"], data_state["rng"])
    fresh, fresh_ema = tiny_eqm(), tiny_eqm()
    assert load_model_state(fresh, ck, prefer="model") == "model"
    assert load_model_state(fresh_ema, path) == "ema"
    for a, b in [(fresh, model), (fresh_ema, ema)]:
        for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(v, w), k
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    fresh_opt.load_state_dict(ck["opt"])
    got, want = fresh_opt.state_dict()["state"], opt.state_dict()["state"]
    assert got.keys() == want.keys() and len(want) > 0
    for i in want:
        assert torch.equal(got[i]["exp_avg"], want[i]["exp_avg"]) and got[i]["step"] == want[i]["step"] == 1


def test_published_format_and_bare_and_ema_only(tmp_path):
    model, ema, opt, args = trained_state()
    published = tmp_path / "published.pt"
    # Exactly what the published train.py writes: a plain torch.save with a pickled Namespace.
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "args": args},
               published)
    bare, ema_only, ddp = tmp_path / "bare.pt", tmp_path / "ema.pt", tmp_path / "ddp.pt"
    torch.save(ema.state_dict(), bare)
    torch.save({"ema": ema.state_dict()}, ema_only)
    torch.save({"model": {"module." + k: v for k, v in model.state_dict().items()}}, ddp)
    expected = {published: ("ema", ema), bare: ("state_dict", ema), ema_only: ("ema", ema), ddp: ("model", model)}
    x, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 4])
    for path, (source, ref) in expected.items():
        m = tiny_eqm().eval()
        assert load_model_state(m, path) == source
        assert torch.equal(m(x, None, y), ref.eval()(x, None, y))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    path = tmp_path / "evil.pt"
    torch.save({"model": tiny_eqm().state_dict(), "args": Payload()}, path)
    with pytest.raises(RuntimeError, match="refusing to load"):
        load_checkpoint(path)
    with pytest.raises(RuntimeError, match="refusing to load"):
        load_model_state(tiny_eqm(), path)
    assert not marker.exists()


def test_size_mismatch_names_both_sizes():
    with torch.device("meta"):
        small, base = EqM_models["EqM-S/2"](), EqM_models["EqM-B/2"]()
    with pytest.raises(ValueError, match=r"checkpoint is EqM-S/2 \(hidden 384, depth 12, patch 2\) "
                                         r"but model is EqM-B/2 \(hidden 768, depth 12, patch 2\)"):
        load_model_state(base, {"ema": small.state_dict()})
    assert describe_state_dict(tiny_eqm().state_dict()) == "a custom EqM (hidden 32, depth 2, patch 2)"


def test_other_mismatches_are_explained(tmp_path):
    path = tmp_path / "ti4.pt"
    save_checkpoint(path, {"ema": EqM_models["EqM-Ti/4"](input_size=8, num_classes=10).state_dict()})
    with pytest.raises(ValueError, match="checkpoint is EqM-Ti/4 .* but model is EqM-Ti/2"):
        load_model_state(EqM_models["EqM-Ti/2"](input_size=8, num_classes=10), path)
    with pytest.raises(ValueError, match=r"label rows .* checkpoint \(11, 32\) vs model \(6, 32\)"):
        load_model_state(tiny_eqm(num_classes=5), {"model": tiny_eqm().state_dict()})
    with pytest.raises(ValueError, match="no model weights"):
        load_model_state(tiny_eqm(), {"opt": {}, "args": None})
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        load_checkpoint(tmp_path / "nowhere.pt")


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1})
    real_save = torch.save

    def broken_save(obj, f):
        real_save(obj, f)
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]


def test_unloadable_values_rejected_at_save(tmp_path):
    with pytest.raises(TypeError, match=r"state\['data_state'\]\['rng'\] is a numpy.ndarray"):
        save_checkpoint(tmp_path / "x.pt", {"data_state": {"rng": np.zeros(3)}})
    assert not (tmp_path / "x.pt").exists()
