"""This project's fast path against torchebm (pip install torchebm==0.8.9), same CPU, same model, batch and weights.

    python bench/vs_torchebm.py --compile          # pip install -e ".[peers]" first

torchebm's `DiT` with EqM-Ti/2's shape (depth 6, width 192, 3 heads, patch 2, 1000 classes plus a null row,
label dropout 0.1, sin/cos positions, 8 output channels of which the first 4 are used, as in the published EqM)
is the same network as ours: the weights are copied across by name and the outputs agree at t = 0 (both models
are time-invariant there); the script checks this and prints both parameter counts. torchebm side, as its docs
use it: `EquilibriumMatchingLoss` (linear interpolant, truncated c(t), a = 0.8, lambda = 4, t = 0 to the model),
AdamW and its `EMA` for training; `NesterovSampler` on `EqMEnergy("implicit")` over `ClassifierFreeGuidance`
(null label 1000, guidance on channels 0-2) for sampling, steps - 1 model calls like ours. torchebm's mixed
precision is CUDA-only, so it runs fp32 on CPU; ours runs the probed precision (or --precision). Timing,
rounds and profiles come from vs_published.py.
"""

import torch
import torch.nn as nn

from eqm.execution import resolve_precision
from eqm import runtime
from eqm.models import EqM_configs, EqM_models
from eqm_bench.vs_published import compare, comparison_parser, fast_work

# our parameter names -> torchebm.models.DiT's
RENAMES = [("x_embedder.", "patch_embed."), ("embedding_table", "embedding"), ("attn.proj", "attn.out_proj"),
           ("mlp.fc1", "mlp.net.0"), ("mlp.fc2", "mlp.net.3"), ("adaLN_modulation", "modulation"),
           ("final_layer.linear", "head.proj"), ("final_layer.modulation", "head.modulation")]


def import_torchebm():
    """The torchebm module, or one line saying how to install it."""
    try:
        import torchebm
    except ImportError:
        raise SystemExit('vs_torchebm: error: torchebm is not installed; pip install -e ".[peers]" (torchebm==0.8.9)')
    return torchebm


class FirstChannels(nn.Module):
    """model(x, t, y=y)[:, :c]: the published EqM's use of a learn-sigma head (2C outputs, the first C kept)."""

    def __init__(self, model, channels):
        super().__init__()
        self.model, self.channels = model, channels

    def forward(self, x, t=None, y=None):
        return self.model(x, t, y=y)[:, :self.channels]


def torchebm_twin(ours, name, input_size):
    """torchebm's DiT with the configuration of our model `name` and the weights of `ours`, returning 4 channels."""
    from torchebm.models import DiT

    depth, hidden, heads, patch = EqM_configs[name]
    dit = DiT(input_size=input_size, in_channels=4, out_channels=8, patch_size=patch, embed_dim=hidden, depth=depth,
              num_heads=heads, num_classes=1000, class_dropout_prob=0.1)
    state = {}
    for key, value in ours.state_dict().items():
        if key != "pos_embed":  # both are the fixed 2D sin/cos table (a buffer in torchebm)
            for a, b in RENAMES:
                key = key.replace(a, b)
            state[key] = value
    dit.load_state_dict(state, strict=True)
    return FirstChannels(dit, 4)


def trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def check_same_function(name, input_size, x, y):
    """Largest |ours - torchebm twin| at t = 0, eval mode, random weights (adaLN-Zero starts at zero output);
    exits with an error if they are not the same network."""
    ours = EqM_models[name](input_size=input_size, num_classes=1000).eval()
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
        twin = torchebm_twin(ours, name, input_size).eval()
        a, b = ours(x, torch.zeros(len(x)), y), twin(x, torch.zeros(len(x)), y=y)
    err = (a - b).abs().max().item() if a.shape == b.shape else float("inf")
    if not err <= 1e-4 * max(1.0, a.abs().max().item()):
        raise SystemExit(f"vs_torchebm: error: torchebm's DiT does not reproduce ours (max difference {err:.3g})")
    return err


def torchebm_work(twin, x, y, xs, ys, steps, cfg_scale):
    """{"train": one torchebm EqM step (loss, AdamW, EMA), "sample": one NesterovSampler run} for twin."""
    from torchebm.losses import EquilibriumMatchingLoss
    from torchebm.models import ClassifierFreeGuidance, EqMEnergy
    from torchebm.samplers import NesterovSampler
    from torchebm.utils import EMA

    loss_fn = EquilibriumMatchingLoss(twin, prediction="velocity", energy_type="none", interpolant="linear",
                                      device="cpu", check_conditioning=False)  # a one-off probe, not per step
    opt = torch.optim.AdamW(twin.parameters(), lr=1e-4, weight_decay=0)
    ema = EMA(twin, decay=0.9999)

    def train():
        loss = loss_fn(x, y=y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(twin)
        return loss.detach()

    field = ClassifierFreeGuidance(ema.module, cfg_scale, null_condition=1000, guide_channels=3)
    sampler = NesterovSampler(EqMEnergy(field, "implicit"), step_size=0.0017, momentum=0.3, device="cpu")
    return {"train": train, "sample": lambda: sampler.sample(x=xs.clone(), n_steps=steps - 1, y=ys)}


def main(argv=None):
    p = comparison_parser(__doc__.split("\n\n")[0], "torchebm")
    args = p.parse_args(argv)
    torchebm = import_torchebm()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    precision = resolve_precision(args.precision, "cpu")
    ours = EqM_models[args.model](input_size=args.input_size, num_classes=1000)
    twin = torchebm_twin(ours, args.model, args.input_size)
    x = torch.randn(args.batch_size, 4, args.input_size, args.input_size)
    y = torch.randint(0, 1000, (args.batch_size,))
    xs = torch.randn(args.sample_batch_size, 4, args.input_size, args.input_size)
    ys = torch.randint(0, 1000, (args.sample_batch_size,))
    err = check_same_function(args.model, args.input_size, x, y)
    print(f"{args.model} on {args.input_size}x{args.input_size}x4 latents, train batch {args.batch_size}, sample batch "
          f"{args.sample_batch_size} ({args.sample_steps} steps, cfg {args.cfg_scale}); 1 thread each\n"
          f"trainable parameters: ours {trainable(ours):,}, torchebm {trainable(twin):,}; same weights, outputs "
          f"agree to {err:.1e}\ntorchebm {torchebm.__version__}: fp32 eager (its mixed precision is CUDA-only); "
          f"fast: {precision} ({runtime.precision_reason()}), compile {args.compile}")
    fast = fast_work(ours, x, y, xs, ys, precision, args.compile, args.sample_steps, args.cfg_scale)
    peer = torchebm_work(twin, x, y, xs, ys, args.sample_steps, args.cfg_scale)
    work = {("train", "torchebm"): peer["train"], ("train", "fast"): fast["train"],
            ("sample", "torchebm"): peer["sample"], ("sample", "fast"): fast["sample"]}
    return compare(work, args, "torchebm")


if __name__ == "__main__":
    main()
