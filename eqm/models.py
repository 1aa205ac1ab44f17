"""EqM: the SiT/DiT transformer with adaLN-Zero, state-dict compatible with the published EqM checkpoints.

Read top to bottom: the hot ops (LayerNorm+modulate, gated residual, attention) are small functions that
run the plain-PyTorch references of kernels/reference.py, or with triton=True the Triton kernels; then the
embedders, the block (a reference forward, and a Triton one that merges each residual add with the adaLN
after it), the final layer, the model (incl. the explicit-energy variant EqM-E), its FLOP count and the
registry. Which ops a model runs is set once, by eqm.execution.use_execution (or EqM(fused=True)).
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import eqm_kernels as kernels  # the references import no Triton; the Triton ops load on first use
from eqm.execution import use_execution
from eqm_kernels.reference import (adaln_modulate_reference, attention_reference, gated_residual,  # noqa: F401
                                   gated_residual_adaln_reference, modulate)

LN_EPS = 1e-6
EBM_TYPES = ("none", "dot", "l2", "mean")


#################################################################################
#                 Hot ops (PyTorch reference, or Triton kernels)                #
#################################################################################

def _matmul_dtype(x):
    """The dtype the Linear after an adaLN reads: the autocast dtype inside autocast, else None (unchanged)."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def adaln_modulate(x, shift, scale, triton=False):
    """LayerNorm (no affine, eps 1e-6) followed by `modulate`."""
    if triton:
        return kernels.adaln_modulate(x, shift, scale, eps=LN_EPS, out_dtype=_matmul_dtype(x))
    return adaln_modulate_reference(x, shift, scale, LN_EPS)


def gated_residual_adaln(x, gate, y, shift, scale, triton=False):
    """(x_new, h): x_new = x + gate * y, then h = adaln_modulate(x_new, shift, scale)."""
    if triton:
        return kernels.gated_residual_adaln(x, gate, y, shift, scale, eps=LN_EPS, out_dtype=_matmul_dtype(x))
    return gated_residual_adaln_reference(x, gate, y, shift, scale, LN_EPS)


def _check_triton_runs(device):
    """ops="triton" never falls back to PyTorch quietly: on a device the kernels cannot run on (a model switched
    by the compat EqM(fused=True) or use_execution, where resolve_execution would have refused) it is an error."""
    if not hasattr(kernels, "attention"):
        raise RuntimeError("the model runs ops='triton' but Triton is not installed (pip install triton, Linux only): "
                           "eqm.execution.use_execution(model, 'reference')")
    if not (device.type == "cuda" or (device.type == "cpu" and kernels.INTERPRET)):
        raise RuntimeError(f"the model runs ops='triton' but the Triton kernels cannot run on {device} (CUDA, or CPU "
                           "under TRITON_INTERPRET=1): eqm.execution.use_execution(model, 'reference')")


def attn_core(q, k, v, triton=False, double_grad=False):
    """softmax(q k^T / sqrt(Dh)) v on (B, H, N, Dh).

    double_grad: the reference written as plain matmul+softmax (SDPA's math backend), twice differentiable
    everywhere (EqM-E training); the SDPA flash/efficient backends are not.
    """
    if double_grad:
        return attention_reference(q, k, v)
    if triton:
        return kernels.attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


#################################################################################
#                     Layers: patch embed, attention, MLP                       #
#################################################################################

class PatchEmbed(nn.Module):
    """(N, C, H, W) -> (N, T, D) with a stride-p convolution; T = (H/p) * (W/p).

    Exposes timm's attributes (patch_size as a pair, num_patches), which code written for the published
    model reads.
    """

    def __init__(self, input_size, patch_size, in_channels, hidden_size):
        super().__init__()
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (input_size // patch_size, input_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection."""

    def __init__(self, dim, num_heads):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x, triton=False, double_grad=False):
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        o = attn_core(qkv[0], qkv[1], qkv[2], triton=triton, double_grad=double_grad)
        return self.proj(o.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    """fc1 -> GELU(tanh) -> fc2."""

    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


#################################################################################
#               Embedding Layers for Timesteps and Class Labels                 #
#################################################################################

class TimestepEmbedder(nn.Module):
    """Scalar t -> [cos(t f), sin(t f)] (256 dims) -> Linear -> SiLU -> Linear."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        """(N,) -> (N, dim) sinusoidal features, cosines first (GLIDE layout)."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t):
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class label -> vector; row `num_classes` is the null label, used for dropout / CFG."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels, force_drop_ids=None):
        """Replace labels by the null label with probability dropout_prob (or where force_drop_ids == 1)."""
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids == 1
        return torch.where(drop, self.num_classes, labels)

    def forward(self, labels, train, force_drop_ids=None):
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


#################################################################################
#                                 Core EqM Model                                #
#################################################################################

class EqMBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.attn = Attention(hidden_size, num_heads)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x, c, double_grad=False, triton=False, pending=None):
        """Reference path (plain PyTorch ops): returns x. With triton=True the kernels/ path: see _forward_triton.
        Everything runs inside this module's call, so wrappers' hooks (FSDP2's all-gather) see it."""
        mod = self.adaLN_modulation(c).chunk(6, dim=1)
        if triton:
            return self._forward_triton(x, mod, pending)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        h = adaln_modulate(x, shift_msa, scale_msa)
        x, h = gated_residual_adaln(x, gate_msa, self.attn(h, double_grad=double_grad), shift_mlp, scale_mlp)
        return gated_residual(x, gate_mlp, self.mlp(h))

    def _forward_triton(self, x, mod, pending):
        """pending = (gate, y) is the previous block's MLP residual, not yet added; it is fused with this block's
        first adaLN, and this block's own MLP residual is returned pending in turn for the next layer.
        Returns (x_prev, x, pending): x_prev is the previous block's completed output."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        if pending is None:
            h = adaln_modulate(x, shift_msa, scale_msa, triton=True)
        else:
            x, h = gated_residual_adaln(x, *pending, shift_msa, scale_msa, triton=True)
        x_prev = x
        x, h = gated_residual_adaln(x, gate_msa, self.attn(h, triton=True), shift_mlp, scale_mlp, triton=True)
        return x_prev, x, (gate_mlp, self.mlp(h))


SiTBlock = EqMBlock  # the published name


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm, then a linear map to p*p*out_channels values per token."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c, pending=None):
        """Head output; with pending = (gate, y) (the Triton path) the last block's residual is added first,
        fused with this adaLN, and (completed x, head output) is returned."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        if pending is None:
            return self.linear(adaln_modulate(x, shift, scale))
        x, h = gated_residual_adaln(x, *pending, shift, scale, triton=True)
        return x, self.linear(h)


class EqM(nn.Module):
    """Equilibrium Matching transformer: x -> time-free gradient field f(x) of the same shape.

    uncond: feed t = 0 to the time embedder (EqM's setting; the embedder's weights still exist).
    ebm: "none" outputs the head directly; "dot"/"mean" (E = sum(f * x)) and "l2" (E = -|f|^2 / 2)
        output grad_x E (EqM-E), computed with autograd even under torch.no_grad().
    fused: compat for ops="triton" (the published signature has no ops). `model.ops` ("reference" or "triton")
        says which ops run: LayerNorm+modulate, the gated residuals and attention through kernels/ for "triton"
        (same weights); eqm.execution.use_execution is the one place that changes it. EqM-E always runs its
        head with the reference ops: its output is a torch.func.grad, and custom ops cannot join a torch.func
        transform (undetectable under torch.compile), so for EqM-E only the objective's Triton loss applies.
    """

    def __init__(
        self,
        input_size=32,
        patch_size=2,
        in_channels=4,
        hidden_size=1152,
        depth=28,
        num_heads=16,
        mlp_ratio=4.0,
        class_dropout_prob=0.1,
        num_classes=1000,
        learn_sigma=True,
        uncond=True,
        ebm="none",
        fused=False,
    ):
        super().__init__()
        if ebm not in EBM_TYPES:
            raise ValueError(f"ebm must be one of {EBM_TYPES}, got {ebm!r}")
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        self.input_size = input_size
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.uncond = uncond
        self.ebm = ebm
        use_execution(self, "triton" if fused else "reference")

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.num_patches = (input_size // patch_size) ** 2
        # Fixed sin-cos embedding, stored as a frozen parameter as in the published checkpoints.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([EqMBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    @property
    def ops(self):
        """"reference" or "triton": the ops this model runs (set by eqm.execution.use_execution)."""
        return self._ops

    @property
    def fused(self):
        """Compat, read-only: ops == "triton" (eqm.execution.use_execution is the one setter)."""
        return self._ops == "triton"

    def initialize_weights(self):
        """Xavier linears with zero bias; adaLN and output layers zeroed, so f = 0 at init."""
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
        self.apply(_basic_init)

        if self.pos_embed.device.type != "meta":
            grid = self.input_size // self.patch_size
            pos = get_2d_sincos_pos_embed(self.hidden_size, grid)
            self.pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))

        w = self.x_embedder.proj.weight.data  # initialised like a Linear, not a Conv2d
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x):
        """(N, T, p*p*c) -> (N, c, H, W); the channel index runs fastest in each token."""
        c, p = self.out_channels, self.patch_size
        h = w = self.input_size // p
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def _check_inputs(self, x, t, y):
        """Clear errors for inputs the model was not built for."""
        if x.dim() != 4:
            raise ValueError(f"x must be (N, C, H, W), got shape {tuple(x.shape)}")
        n, c, h, w = x.shape
        if c != self.in_channels:
            raise ValueError(f"x has {c} channels but the model was built with in_channels={self.in_channels}")
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"input {h}x{w} is not divisible by patch_size {self.patch_size}")
        if h != self.input_size or w != self.input_size:
            raise ValueError(f"input is {h}x{w} but the model was built for {self.input_size}x{self.input_size}; "
                             f"build it with input_size={h} (square inputs only)")
        if y.shape != (n,):
            raise ValueError(f"y must be ({n},) class labels, got shape {tuple(y.shape)}")
        if y.dtype.is_floating_point:
            raise ValueError(f"y must hold integer class labels, got dtype {y.dtype}")
        # Label range: checked eagerly on CPU only (a GPU check would sync; compiled graphs cannot branch on it).
        if (y.device.type == "cpu" and n and not torch.compiler.is_compiling()
                and (y.min() < 0 or y.max() > self.num_classes)):
            raise ValueError(f"labels must lie in [0, {self.num_classes}] ({self.num_classes} = null label), "
                             f"got range [{int(y.min())}, {int(y.max())}]")

    def _head(self, x, t, y, triton=False, double_grad=False):
        """The transformer proper: (first C channels of the head output, per-block activations).

        Labels are dropped in training mode only (self.training), as published. triton: kernels/ ops (not
        twice differentiable under torch.func); double_grad: attention by plain matmul+softmax (EqM-E training).
        """
        x, c = self._embed(x, t, y)
        if triton:
            x, act = self._trunk_triton(x, c)
        else:
            x, act = self._trunk_reference(x, c, double_grad)
        x = self.unpatchify(x)                             # (N, out_channels, H, W)
        if self.learn_sigma:
            x = x[:, : self.in_channels]
        return x, act

    def _embed(self, x, t, y):
        """(tokens (N, T, D) with position embedding, conditioning c (N, D)); t = 0 when uncond or None."""
        if t is None or self.uncond:
            t = torch.zeros(x.shape[0], device=x.device)
        elif t.dim() == 0:
            t = t.expand(x.shape[0])
        return self.x_embedder(x) + self.pos_embed, self.t_embedder(t) + self.y_embedder(y, self.training)

    def _trunk_reference(self, x, c, double_grad):
        """Blocks and final layer with the reference ops: (head tokens, per-block activations)."""
        act = []
        for block in self.blocks:
            x = block(x, c, double_grad=double_grad)
            act.append(x)
        return self.final_layer(x, c), act

    def _trunk_triton(self, x, c):
        """Blocks and final layer with the Triton ops; each residual add is fused with the adaLN that follows it
        (the next block's or the final layer's), so a block's output completes inside the next call."""
        _check_triton_runs(x.device)
        act, pending = [], None
        for i, block in enumerate(self.blocks):
            x_prev, x, pending = block(x, c, triton=True, pending=pending)
            if i:
                act.append(x_prev)
        x_last, x = self.final_layer(x, c, pending=pending)
        act.append(x_last)
        return x, act

    def energy(self, head, x):
        """Per-sample energy E (N,) of EqM-E from the head output and the input."""
        if self.ebm in ("dot", "mean"):  # the published code makes "mean" identical to "dot"
            return (head * x).flatten(1).sum(1)
        if self.ebm == "l2":
            return -0.5 * head.flatten(1).pow(2).sum(1)
        raise ValueError(f"energy needs an explicit-energy model (ebm 'dot', 'l2' or 'mean'), not ebm={self.ebm!r}")

    def _energy_field(self, x, t, y, create_graph):
        """EqM-E: (grad_x E, E, activations), with autograd even under torch.no_grad().

        torch.func.grad differentiates w.r.t. x in any grad mode (the published code returned the raw head
        under no_grad) and traces under torch.compile(fullgraph=True). create_graph (the published `train`)
        keeps grad_x E differentiable for the training double backward, with attention written out as SDPA's
        math backend (what the published training selects for EqM-E); otherwise it is detached, as published.
        It uses the reference ops: custom ops cannot join a torch.func transform.
        """
        double_grad = create_graph and torch.is_grad_enabled()

        def energy_sum(x_in):
            head, act = self._head(x_in, t, y, double_grad=double_grad)
            energy = self.energy(head, x_in)
            return energy.sum(), (energy, act)

        field, (energy, act) = torch.func.grad(energy_sum, has_aux=True)(x)
        return (field if double_grad else field.detach()), energy, act

    def forward(self, x0, t, y, return_act=False, get_energy=False, train=False):
        """Gradient field f(x), shape (N, C, H, W); the published signature and return structure.

        x0: (N, C, H, W) inputs (the published name; not the noise); t: (N,) times (ignored when uncond, may be None); y: (N,) labels.
        return_act: return (f, act), act the list of per-block activations (N, T, D).
        get_energy: return (f, -E), -E (N,) the per-sample energy score (lower = more data-like); zeros for
            ebm="none", whose energy is implicit. return_act is then ignored, as published.
        train: EqM-E only, as published: keep f differentiable (create_graph) for a loss on it. Labels are
            dropped in training mode (model.train()), as published.
        EqM-E: f = grad_x E also under torch.no_grad() (then detached): the one intended difference from the
        published code, which returns the raw head there.
        """
        self._check_inputs(x0, t, y)
        if self.ebm == "none":
            field, act = self._head(x0, t, y, triton=self.ops == "triton")
            energy = torch.zeros(x0.shape[0], dtype=field.dtype, device=field.device) if get_energy else None
        else:
            field, energy, act = self._energy_field(x0, t, y, create_graph=train)
        if get_energy:
            return field, -energy
        return (field, act) if return_act else field

    def forward_with_cfg(self, x, t, y, cfg_scale, return_act=False, get_energy=False, train=False, cfg_channels=3):
        """Classifier-free guidance on a doubled batch: first half conditional labels, second half null.

        As published: only x[: N/2] is used (duplicated), guidance acts on the first 3 channels (all of them
        when there are fewer; cfg_channels="all" guides every channel), the other channels keep each half's
        own prediction, and the return structure follows forward: f, (f, act) or (f, -E) over the doubled batch.
        """
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, y, return_act=return_act, get_energy=get_energy,
                           train=train)
        if isinstance(out, tuple):
            return cfg_combine(out[0], cfg_scale, cfg_channels), out[1]
        return cfg_combine(out, cfg_scale, cfg_channels)

    @property
    def num_params(self):
        """Number of parameters, the frozen pos_embed included (as the published counts)."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_sample(self):
        """Matmul FLOPs of one forward pass for one sample (forward_flops)."""
        return forward_flops(self)


def cfg_combine(out, cfg_scale, cfg_channels=3):
    """CFG on a doubled batch `out` = [cond; uncond]: uncond + s * (cond - uncond) on the guided channels.

    cfg_channels: guide the first min(cfg_channels, C) channels (the published x[:, :3] slice), or "all".
    """
    if cfg_channels != "all" and not (isinstance(cfg_channels, int) and cfg_channels >= 1):
        raise ValueError(f"cfg_channels must be 'all' or a positive channel count, got {cfg_channels!r}")
    n_ch = out.shape[1] if cfg_channels == "all" else min(cfg_channels, out.shape[1])
    guided, rest = out[:, :n_ch], out[:, n_ch:]
    cond, uncond = guided.chunk(2, dim=0)
    half = uncond + cfg_scale * (cond - uncond)
    return torch.cat([torch.cat([half, half], dim=0), rest], dim=1)


#################################################################################
#                                FLOP accounting                                #
#################################################################################

def forward_flops(model):
    """Matmul FLOPs (2 per multiply-add) of one forward pass of `model` (an EqM) on one image.

    With T = (input_size / p)^2 tokens, D hidden, L blocks, M = mlp_ratio * D, C in channels, K = out channels:
      patch embed  2 T (C p^2) D
      per block    2 T D (3D) [qkv] + 2 T D D [proj] + 2 * 2 T D M [mlp] + 2 T^2 D * 2 [q k^T and attn v]
                   + 2 D (6D) [adaLN, once per image, not per token]
      final        2 D (2D) [adaLN] + 2 T D (p^2 K) [linear]
      t embedder   2 * 256 D + 2 D D
    Elementwise work (LayerNorm, softmax, GELU, modulate) is left out, as MFU conventions do; x3 for
    forward+backward. EqM-XL/2 at 32x32 latents: 237 GFLOP (attention scores 3.6% of it).
    """
    p, D, L, C, K = model.patch_size, model.hidden_size, model.depth, model.in_channels, model.out_channels
    T = model.num_patches
    M = model.blocks[0].mlp.fc1.out_features if L else 4 * D
    per_block = 2 * T * D * 3 * D + 2 * T * D * D + 2 * 2 * T * D * M + 2 * 2 * T * T * D + 2 * D * 6 * D
    return (2 * T * C * p * p * D + L * per_block + 2 * D * 2 * D + 2 * T * D * p * p * K
            + 2 * 256 * D + 2 * D * D)


#################################################################################
#                   Sine/Cosine Positional Embedding Functions                  #
#################################################################################

def get_2d_sincos_pos_embed(embed_dim, grid_size, cls_token=False, extra_tokens=0):
    """(grid_size**2, embed_dim) MAE layout, with `extra_tokens` zero rows first when cls_token (published API)."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0)  # w first
    emb = get_2d_sincos_pos_embed_from_grid(embed_dim, grid)
    if cls_token and extra_tokens > 0:
        emb = np.concatenate([np.zeros([extra_tokens, embed_dim]), emb], axis=0)
    return emb


def get_2d_sincos_pos_embed_from_grid(embed_dim, grid):
    """grid (2, ...) of (w, h) positions -> (M, embed_dim): first half encodes grid[0], second half grid[1]."""
    if embed_dim % 2:
        raise ValueError(f"2-D sin-cos position embedding needs an even dimension, got {embed_dim}")
    emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])
    emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])
    return np.concatenate([emb_w, emb_h], axis=1)


def get_1d_sincos_pos_embed_from_grid(embed_dim, pos):
    """(M, embed_dim) = [sin(pos * w), cos(pos * w)], w_k = 1 / 10000^(k / (embed_dim / 2))."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos position embedding needs an even dimension, got {embed_dim}")
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


#################################################################################
#                                   EqM Configs                                 #
#################################################################################

# name -> (depth, hidden_size, num_heads, patch_size). The twelve published sizes, then small CPU sizes.
EqM_configs = {
    f"EqM-{size}/{p}": (depth, hidden, heads, p)
    for size, depth, hidden, heads in [("XL", 28, 1152, 16), ("L", 24, 1024, 16), ("B", 12, 768, 12), ("S", 12, 384, 6)]
    for p in (2, 4, 8)
}
EqM_configs.update({"EqM-Ti/2": (6, 192, 3, 2), "EqM-Ti/4": (6, 192, 3, 4)})


def _build(name, **kwargs):
    depth, hidden, heads, patch = EqM_configs[name]
    return EqM(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch, **kwargs)


# The published registry functions (EqM_XL_2 ... EqM_S_8), plus the small CPU sizes.
def EqM_XL_2(**kwargs): return _build("EqM-XL/2", **kwargs)  # noqa: E704
def EqM_XL_4(**kwargs): return _build("EqM-XL/4", **kwargs)  # noqa: E704
def EqM_XL_8(**kwargs): return _build("EqM-XL/8", **kwargs)  # noqa: E704
def EqM_L_2(**kwargs): return _build("EqM-L/2", **kwargs)  # noqa: E704
def EqM_L_4(**kwargs): return _build("EqM-L/4", **kwargs)  # noqa: E704
def EqM_L_8(**kwargs): return _build("EqM-L/8", **kwargs)  # noqa: E704
def EqM_B_2(**kwargs): return _build("EqM-B/2", **kwargs)  # noqa: E704
def EqM_B_4(**kwargs): return _build("EqM-B/4", **kwargs)  # noqa: E704
def EqM_B_8(**kwargs): return _build("EqM-B/8", **kwargs)  # noqa: E704
def EqM_S_2(**kwargs): return _build("EqM-S/2", **kwargs)  # noqa: E704
def EqM_S_4(**kwargs): return _build("EqM-S/4", **kwargs)  # noqa: E704
def EqM_S_8(**kwargs): return _build("EqM-S/8", **kwargs)  # noqa: E704
def EqM_Ti_2(**kwargs): return _build("EqM-Ti/2", **kwargs)  # noqa: E704
def EqM_Ti_4(**kwargs): return _build("EqM-Ti/4", **kwargs)  # noqa: E704


EqM_models = {
    "EqM-XL/2": EqM_XL_2, "EqM-XL/4": EqM_XL_4, "EqM-XL/8": EqM_XL_8,
    "EqM-L/2": EqM_L_2, "EqM-L/4": EqM_L_4, "EqM-L/8": EqM_L_8,
    "EqM-B/2": EqM_B_2, "EqM-B/4": EqM_B_4, "EqM-B/8": EqM_B_8,
    "EqM-S/2": EqM_S_2, "EqM-S/4": EqM_S_4, "EqM-S/8": EqM_S_8,
    "EqM-Ti/2": EqM_Ti_2, "EqM-Ti/4": EqM_Ti_4,
}


def create_model(name, **kwargs):
    """Build a registry model by name, e.g. create_model("EqM-B/2", input_size=32, num_classes=1000)."""
    if name not in EqM_models:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(EqM_models)}")
    return EqM_models[name](**kwargs)


def config_name(depth, hidden_size, patch_size):
    """Registry name with these sizes (e.g. "EqM-S/2"), or a description when none matches."""
    for name, (d, h, _, p) in EqM_configs.items():
        if (d, h, p) == (depth, hidden_size, patch_size):
            return name
    return f"a custom EqM (hidden {hidden_size}, depth {depth}, patch {patch_size})"
