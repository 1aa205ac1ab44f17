"""EqM in 2-D, in seconds: `python -m eqm.toy2d --data moons --out runs/toy2d`.

A small MLP potential phi(x) gives the field f(x) = grad phi (an explicit energy E = -phi, as EqM-E), trained
with the EqM objective (eqm.objective); sampling is eqm.sampling's GD from N(0, I). Writes <out>/<data>.png:
the learned energy landscape with sample trajectories, the field as arrows, and the data; and <data>.gif, the
samples descending (--gif).
"""
import argparse
import math
import os
import time

import torch
from torch import nn

from eqm.objective import eqm_training_losses
from eqm.sampling import Engine

DATASETS = ("moons", "8gaussians")


def toy_data(name, n, generator=None):
    """n points of a 2-D set, scaled to about unit variance."""
    g = generator or torch.Generator().manual_seed(0)
    if name == "moons":
        t = torch.rand(n, generator=g) * math.pi
        upper = torch.rand(n, generator=g) < 0.5
        x = torch.where(upper, torch.cos(t), 1 - torch.cos(t))
        y = torch.where(upper, torch.sin(t), 0.5 - torch.sin(t))
        pts = torch.stack([x - 0.5, y - 0.25], 1) * 1.6
        return pts + 0.08 * torch.randn(n, 2, generator=g)
    if name == "8gaussians":
        k = torch.randint(8, (n,), generator=g).float() * (2 * math.pi / 8)
        centres = torch.stack([torch.cos(k), torch.sin(k)], 1) * 2.0
        return centres + 0.12 * torch.randn(n, 2, generator=g)
    raise ValueError(f"data must be one of {DATASETS}, got {name!r}")


class Potential(nn.Module):
    """phi(x): R^2 -> R (an MLP); forward returns the field f = grad phi with EqM's signature (x, t, y)."""
    num_classes = 1  # unconditional: every label is the null label

    def __init__(self, width=128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, 1))

    def energy(self, x):
        """E(x) = -phi(x): low on the data."""
        return -self.net(x).squeeze(-1)

    def forward(self, x, t=None, y=None, train=False):
        with torch.enable_grad():
            x_in = x if x.requires_grad else x.detach().requires_grad_(True)
            phi = self.net(x_in).sum()
            (f,) = torch.autograd.grad(phi, x_in, create_graph=train)
        return f


def train(data="moons", steps=2000, batch=512, lr=3e-3, seed=0, log=None):
    """A Potential trained with the EqM objective on `data`; returns (model, final loss)."""
    torch.manual_seed(seed)
    model = Potential()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed + 1)
    loss = None
    for step in range(steps):
        x1 = toy_data(data, batch, g)
        loss = eqm_training_losses(model, x1, {}, train=True)["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log and (step + 1) % max(steps // 5, 1) == 0:
            log(f"step {step + 1}: loss {loss.item():.4f}")
    return model.eval(), float(loss.detach())


def trajectories(model, n=256, steps=40, stepsize=0.02, seed=0):
    """GD paths from N(0, I): (steps, n, 2), the start included."""
    x = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))
    engine = Engine(model, x.shape, "cpu", sampler="gd", stepsize=stepsize)
    path = [x]
    for _ in range(steps - 1):
        path.append(engine.run(path[-1], None, steps=2)[0])
    return torch.stack(path)


def plot(model, data, path, out_png, lim=3.0):
    """Energy contours, field arrows, data and trajectories in one PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    u = torch.linspace(-lim, lim, 200)
    gx, gy = torch.meshgrid(u, u, indexing="xy")
    grid = torch.stack([gx.flatten(), gy.flatten()], 1)
    with torch.no_grad():
        e = model.energy(grid).view(200, 200)
    fig, ax = plt.subplots(figsize=(6, 6), dpi=110)
    ax.contourf(gx, gy, e - e.min(), levels=30, cmap="viridis")
    q = torch.linspace(-lim, lim, 21)
    qx, qy = torch.meshgrid(q, q, indexing="xy")
    f = model(torch.stack([qx.flatten(), qy.flatten()], 1)).detach()
    ax.quiver(qx.flatten(), qy.flatten(), f[:, 0], f[:, 1], color="w", alpha=0.5, width=0.002)
    ax.scatter(data[:, 0], data[:, 1], s=2, c="k", alpha=0.3, label="data")
    p = path.numpy()
    for i in range(min(p.shape[1], 40)):
        ax.plot(p[:, i, 0], p[:, i, 1], c="tab:orange", lw=0.7, alpha=0.8)
    ax.scatter(p[-1, :, 0], p[-1, :, 1], s=6, c="tab:red", label="GD samples")
    ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal", title="EqM 2-D: energy landscape, GD trajectories")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


def gif(path, data, out_gif, lim=3.0, size=240):
    """Frames of the samples descending (PIL, no extra dependency)."""
    from PIL import Image, ImageDraw

    def px(pts):
        return ((pts + lim) / (2 * lim) * (size - 1)).numpy()
    frames = []
    d = px(data)
    for k in range(0, path.shape[0], max(path.shape[0] // 40, 1)):
        im = Image.new("RGB", (size, size), "white")
        draw = ImageDraw.Draw(im)
        for x, y in d[:500]:
            draw.point((x, size - 1 - y), fill=(160, 160, 160))
        for x, y in px(path[k]):
            draw.ellipse((x - 1.5, size - 1 - y - 1.5, x + 1.5, size - 1 - y + 1.5), fill=(220, 50, 30))
        frames.append(im)
    frames[0].save(out_gif, save_all=True, append_images=frames[1:], duration=80, loop=0)
    return out_gif


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m eqm.toy2d", description=__doc__.splitlines()[0])
    p.add_argument("--data", choices=DATASETS, default="moons")
    p.add_argument("--steps", type=int, default=2000, help="training steps")
    p.add_argument("--sample-steps", type=int, default=40, help="GD steps of the plotted samples")
    p.add_argument("--stepsize", type=float, default=0.02)
    p.add_argument("--out", default="runs/toy2d")
    p.add_argument("--gif", action="store_true", help="also write the descent as an animated GIF")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.steps < 1 or args.sample_steps < 1 or not args.stepsize > 0:
        p.error("--steps and --sample-steps must be >= 1 and --stepsize positive")
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    model, loss = train(args.data, args.steps, seed=args.seed, log=print)
    seconds = time.time() - t0
    path = trajectories(model, steps=args.sample_steps, stepsize=args.stepsize, seed=args.seed)
    data = toy_data(args.data, 2000, torch.Generator().manual_seed(123))
    dist = torch.cdist(path[-1], data).min(1).values.mean().item()
    start = torch.cdist(path[0], data).min(1).values.mean().item()
    summary = {"data": args.data, "train_seconds": seconds, "loss": loss,
               "mean_distance_to_data": {"start": start, "samples": dist},
               "png": plot(model, data, path, os.path.join(args.out, f"{args.data}.png"))}
    if args.gif:
        summary["gif"] = gif(path, data, os.path.join(args.out, f"{args.data}.gif"))
    print(summary)
    return summary


if __name__ == "__main__":
    main()
