"""Checkpoints in the published format, both ways: the published train.py's files resume here, with their
Adam moments on the right parameters, and files written here resume in (and sample with) the published code.

The published formats are built here as the published train.py / sample_gd.py build them: AdamW over
model.parameters() (the frozen pos_embed first), `args` an argparse Namespace with the published flags,
checkpoints named <step:07d>.pt holding {"model", "ema", "opt", "args"}, written with a plain torch.save.
"""
import argparse
from copy import deepcopy

import pytest
import torch

from eqm import train
from eqm.checkpoint import (OptimizerStateMismatch, export_optimizer_state, import_optimizer_state,
                            load_checkpoint)
from eqm.fast import make_optimizer
from eqm.models import EqM, EqM_models
from eqm.objective import eqm_training_losses

pytestmark = pytest.mark.usefixtures("one_thread")

# The digits setup of the CLI tests: 4x4 one-channel images, EqM-Ti/4 (one token).
TINY = ["--data-path", "digits", "--model", "EqM-Ti/4", "--image-size", "4", "--num-workers", "0"]
MODEL_KW = dict(input_size=4, in_channels=1, num_classes=10)


def published_args(**over):
    """The Namespace the published train.py pickles into its checkpoints."""
    args = dict(data_path="/data/imagenet/train", results_dir="results", model="EqM-Ti/4", image_size=256,
                num_classes=10, epochs=80, global_batch_size=256, global_seed=0, vae="ema", num_workers=4,
                log_every=100, ckpt_every=50000, cfg_scale=4.0, wandb=False, ckpt=None, disp=False, uncond=True,
                ebm="none", path_type="Linear", prediction="velocity", loss_weight=None, sample_eps=None,
                train_eps=None)
    return argparse.Namespace(**{**args, **over})


def published_training(steps=3, seed=0):
    """(model, ema, opt) after `steps` steps of the published loop: AdamW(model.parameters()), lr 1e-4."""
    torch.manual_seed(seed)
    model = EqM_models["EqM-Ti/4"](**MODEL_KW).train()
    ema = deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    for _ in range(steps):
        x1, y = torch.randn(8, 1, 4, 4), torch.randint(0, 10, (8,))
        loss = eqm_training_losses(model, x1, dict(y=y))["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, ema, opt


def moments_by_name(model, opt):
    """{parameter name: exp_avg} of an optimizer over `model`."""
    return {n: opt.state[p]["exp_avg"] for n, p in model.named_parameters() if p in opt.state}


def test_published_optimizer_state_maps_onto_the_right_parameters():
    model, _, opt = published_training()
    theirs = moments_by_name(model, opt)
    assert "pos_embed" not in theirs and len(theirs) == sum(p.requires_grad for p in model.parameters())
    ours_model = EqM_models["EqM-Ti/4"](**MODEL_KW)
    ours_model.load_state_dict(model.state_dict())
    ours_opt = make_optimizer(ours_model)
    saved = deepcopy(opt.state_dict())  # as from a file: no tensors shared with `opt`
    ours_opt.load_state_dict(import_optimizer_state(saved, ours_model, ours_opt))
    ours = moments_by_name(ours_model, ours_opt)
    assert ours.keys() == theirs.keys()
    for n in theirs:
        assert torch.equal(ours[n], theirs[n]), n
    # One more step on both gives the same weights: the moments and step counters carried over.
    x1, y = torch.randn(8, 1, 4, 4), torch.randint(0, 10, (8,))
    for m, o in ((model, opt), (ours_model, ours_opt)):
        torch.manual_seed(1)
        loss = eqm_training_losses(m, x1, dict(y=y))["loss"].mean()
        o.zero_grad()
        loss.backward()
        o.step()
    for (n, a), b in zip(model.state_dict().items(), ours_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7, msg=n)


def test_checkpoints_written_here_used_to_index_trainable_parameters_only():
    model, _, _ = published_training(steps=0)
    legacy = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model(torch.randn(2, 1, 4, 4), None, torch.tensor([1, 2])).pow(2).mean().backward()
    legacy.step()
    opt = make_optimizer(model)
    opt.load_state_dict(import_optimizer_state(legacy.state_dict(), model, opt))
    theirs = {n: legacy.state[p]["exp_avg"] for n, p in model.named_parameters() if p in legacy.state}
    assert moments_by_name(model, opt).keys() == theirs.keys()
    for n, m in moments_by_name(model, opt).items():
        assert torch.equal(m, theirs[n]), n


def test_unmappable_optimizer_states_are_named():
    model, _, opt = published_training(steps=1)
    other = EqM_models["EqM-Ti/4"](input_size=4, in_channels=3, num_classes=10)  # patch embed of another shape
    with pytest.raises(OptimizerStateMismatch, match="x_embedder.proj.weight"):
        import_optimizer_state(opt.state_dict(), other, make_optimizer(other))
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 1, 4, 4), None, torch.tensor([1, 2])).pow(2).mean().backward()
    sgd.step()
    with pytest.raises(OptimizerStateMismatch, match="not AdamW"):
        import_optimizer_state(sgd.state_dict(), model, make_optimizer(model))
    deeper = EqM(depth=2, hidden_size=192, num_heads=3, patch_size=4, **MODEL_KW)
    with pytest.raises(OptimizerStateMismatch, match="parameters"):
        import_optimizer_state(opt.state_dict(), deeper, make_optimizer(deeper))


def test_published_checkpoint_resumes_in_the_cli(tmp_path):
    model, ema, opt = published_training(steps=3)
    path = tmp_path / "0000003.pt"  # the published name: the step comes from it
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                "args": published_args()}, path)
    s = train.main(TINY + ["--results-dir", str(tmp_path / "res"), "--ckpt", str(path), "--max-steps", "5",
                           "--global-batch-size", "16", "--sample-every", "0", "--log-every", "1"])
    assert s["steps"] == 5 and s["steps_this_run"] == 2
    ck = load_checkpoint(s["checkpoint"])
    steps = {float(st["step"]) for st in ck["opt"]["state"].values()}
    assert steps == {5.0}  # Adam's own counters went on from the published 3: the state was carried over


def test_checkpoint_written_here_resumes_in_the_published_code(tmp_path):
    s = train.main(TINY + ["--results-dir", str(tmp_path / "res"), "--max-steps", "3", "--global-batch-size",
                           "16", "--sample-every", "0"])
    ck = torch.load(s["checkpoint"], map_location="cpu", weights_only=False)  # the published find_model
    # The published train.py --ckpt: build, then load model, ema and opt as they are.
    model = EqM_models["EqM-Ti/4"](**MODEL_KW)
    ema = deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    model.load_state_dict(ck["model"])
    ema.load_state_dict(ck["ema"])
    opt.load_state_dict(ck["opt"])
    group = opt.param_groups[0]
    assert group["foreach"] is None and group["fused"] is None and not group["capturable"]
    saved = ck["opt"]["state"]
    names = [n for n, _ in model.named_parameters()]
    assert 0 not in saved and names[0] == "pos_embed"  # index 0, pos_embed, has no state, as published
    for i, (n, p) in enumerate(model.named_parameters()):
        if i in saved:
            assert torch.equal(opt.state[p]["exp_avg"], saved[i]["exp_avg"]) and opt.state[p]["step"].device.type == "cpu"
    loss = eqm_training_losses(model.train(), torch.randn(4, 1, 4, 4), dict(y=torch.tensor([0, 1, 2, 3])))["loss"]
    opt.zero_grad()
    loss.mean().backward()
    opt.step()  # the published optimizer steps on it
    # The published sample_gd.py: EMA weights, forward_with_cfg on a doubled batch, out[0] when a tuple.
    ema.eval()
    z, y = torch.randn(2, 1, 4, 4), torch.tensor([3, 4])
    with torch.no_grad():
        out = ema.forward_with_cfg(torch.cat([z, z]), torch.ones(4), torch.cat([y, torch.full_like(y, 10)]), 1.5)
        plain = ema.forward(z, torch.ones(2), y, 1.0)  # sample_gd passes cfg_scale into the return_act slot
    assert out.shape == (4, 1, 4, 4) and torch.isfinite(out).all()
    assert isinstance(plain, tuple) and plain[0].shape == (2, 1, 4, 4)


def test_unmappable_optimizer_state_is_one_line_and_fresh_optimizer_loads_weights(tmp_path):
    model, ema, _ = published_training(steps=0)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 1, 4, 4), None, torch.tensor([1, 2])).pow(2).mean().backward()
    sgd.step()
    path = tmp_path / "0000002.pt"
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": sgd.state_dict(),
                "args": published_args()}, path)
    argv = TINY + ["--results-dir", str(tmp_path / "res"), "--ckpt", str(path), "--max-steps", "3",
                   "--global-batch-size", "16", "--sample-every", "0"]
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    msg = str(e.value)
    assert "\n" not in msg and "not AdamW" in msg and "--fresh-optimizer" in msg
    s = train.main(argv + ["--fresh-optimizer"])
    assert s["steps"] == 3 and s["steps_this_run"] == 1
    ck = load_checkpoint(s["checkpoint"])
    assert {float(st["step"]) for st in ck["opt"]["state"].values()} == {1.0}


def test_export_keeps_values_and_resets_runtime_flags():
    model, _, opt = published_training(steps=1)
    ours = make_optimizer(model)
    ours.load_state_dict(import_optimizer_state(opt.state_dict(), model, ours))
    assert ours.param_groups[0]["foreach"] is True  # the runtime flag is this process's, not the file's
    out = export_optimizer_state(ours.state_dict())
    assert out["param_groups"][0]["foreach"] is None and out["param_groups"][0]["fused"] is None
    for i, st in opt.state_dict()["state"].items():
        assert torch.equal(out["state"][i]["exp_avg_sq"], st["exp_avg_sq"])


def test_fresh_optimizer_without_ckpt_is_one_line(capsys):
    with pytest.raises(SystemExit):
        train.main(TINY + ["--fresh-optimizer"])
    assert "--fresh-optimizer goes with --ckpt" in capsys.readouterr().err
