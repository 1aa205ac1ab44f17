"""Typed configuration: dataclasses resolved once from the parsed flags and a preset, then passed down.

Every published flag of train.py / sample_gd.py maps onto a field (`published_args()` spells out the mapping,
which gives back the published Namespace). A preset ("published" for ImageNet, "digits" for the built-in 8x8 digits)
fills what the command line left unset; explicit flags always win. After `TrainConfig.from_args` /
`SampleConfig.from_args` nothing edits the parsed Namespace: a setting only known at run time (the
probed precision, the data's channels, one process with --fsdp) gives a new config (`dataclasses.replace`).

Checkpoints keep the published `args` Namespace (`published_args()`) and add `config`, this as plain data
(`to_dict()`); eqm-sample and eqm.tasks read the model back with `trained_settings(ckpt)`.
"""
import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from eqm import vae as vae_lib
from eqm.latents import vae_factor
from eqm.models import EqM_models

# One table for both CLIs, keyed by flag name: what an unset flag becomes.
PRESETS = {
    "published": dict(model="EqM-XL/2", image_size=256, num_classes=1000, vae="ema", epochs=80, global_batch_size=256,
                      lr=1e-4, ema_decay=0.9999, ckpt_every=50_000, sample_every=10_000, cfg_scale=4.0,
                      sample_stepsize=0.003,  # training grids: GD with the published EqM-B/2 step size
                      stepsize=0.0017,  # eqm-sample: sample_gd.py's default (the EqM-XL/2 NAG-GD setting)
                      num_fid_samples=50_000, max_steps=None),
    "digits": dict(model="EqM-Ti/4",  # 4 tokens of 4x4 pixels: ~3x cheaper a step than Ti/2, as accurate here
                   image_size=8, num_classes=10, vae="none", epochs=80, global_batch_size=64,
                   lr=1e-3,  # a 6-layer model on 1797 images learns fast; 1e-4 needs ~10x the steps
                   ema_decay=0.995,  # 0.9999 averages over 10k steps: longer than a whole CPU run
                   max_steps=1500,  # ~80 s on a free core, ~2.3 min on a busy one; class accuracy 0.98 by then
                   ckpt_every=1000, sample_every=1500, cfg_scale=2.0,
                   sample_stepsize=0.01, stepsize=0.01,  # the sharpest digits at 250 GD steps
                   num_fid_samples=100),
}
PUBLISHED_CT = dict(shape="truncated-linear", a=0.8, lam=4.0)


def preset_name(data_path):
    """"digits" for the built-in digits, else "published"."""
    return "digits" if data_path == "digits" else "published"


@dataclass(frozen=True)
class ModelConfig:
    """The network: what EqM_models[name](...) is built with (all of it is in the checkpoint)."""
    name: str  # registry name (--model), e.g. "EqM-XL/2"
    input_size: int  # the model's input side: the image size, or the image size / the VAE factor for latents
    in_channels: int  # 4 for VAE latents; the image's channels in pixel space
    num_classes: int
    uncond: bool = True  # t = 0 always (EqM); False feeds t like SiT
    ebm: str = "none"  # explicit energy (EqM-E): none | l2 | dot | mean

    @property
    def patch_size(self):
        return int(self.name.split("/")[-1])

    def build(self):
        """A fresh EqM of this configuration (on CPU, reference path)."""
        return EqM_models[self.name](input_size=self.input_size, in_channels=self.in_channels,
                                     num_classes=self.num_classes, uncond=self.uncond, ebm=self.ebm)


@dataclass(frozen=True)
class DataConfig:
    """Where the training images come from and how they become model inputs."""
    data_path: Optional[str]  # an ImageFolder, "digits", or a latent folder from eqm-extract-latents
    image_size: int  # pixels
    vae: str  # "none" (pixel space), ema | mse, or a local folder
    global_batch_size: int = 256
    num_workers: int = 4
    dali: bool = False


@dataclass(frozen=True)
class ObjectiveConfig:
    """The EqM target scale c(t) (eqm.objective) and the dispersive loss."""
    ct_shape: str = "truncated-linear"
    ct_a: float = 0.8
    ct_lam: float = 4.0
    disp: bool = False  # add the dispersive loss (the model returns its activations)


@dataclass(frozen=True)
class OptimConfig:
    """AdamW, EMA and how long to train."""
    lr: float = 1e-4
    ema_decay: float = 0.9999
    grad_clip: Optional[float] = None  # off when None or 0
    epochs: int = 80
    max_steps: Optional[int] = None  # overrides epochs
    fresh_optimizer: bool = False  # with ckpt: weights (and step) only, a new AdamW


@dataclass(frozen=True)
class RuntimeConfig:
    """How the computation runs: device, precision, kernels, compile, processes, seeds, faults."""
    device: Optional[str] = None  # None: cuda when available
    precision: str = "auto"  # auto (probed at start) | fp32 | tf32 | bf16
    fused: Optional[bool] = None  # the Triton ops of kernels/ (eqm.execution ops "triton"); None: on CUDA if they run
    compile: Optional[bool] = None  # torch.compile the step; None: "auto" (where it pays; see eqm.compiling)
    fsdp: bool = False
    threads: Optional[int] = None  # CPU threads; None: probed for the model (eqm.runtime; no flag sets it yet)
    global_seed: int = 0
    dist_timeout: float = 10.0  # minutes
    on_nonfinite: str = "stop"
    max_skips: int = 10


@dataclass(frozen=True)
class SamplingConfig:
    """A sampler and its settings (eqm.sampling.sample keywords)."""
    sampler: str = "gd"
    steps: int = 250
    stepsize: float = 0.0017
    cfg_scale: float = 4.0
    cfg_channels: str = "3"  # "3" (published: latent channels 0-2) or "all"
    mu: float = 0.3
    schedule: str = "constant"
    adam_betas: tuple = (0.9, 0.999)
    temperature: float = 0.05
    ode_method: str = "rk4"
    atol: float = 1e-5
    rtol: float = 1e-5
    stop_grad_norm: Optional[float] = None

    @classmethod
    def from_args(cls, args, **resolved):
        """The sampler flags of eqm-sample and eqm.tasks (--sampler, --mu and add_sampler_options's); `resolved`:
        the values the CLI resolved itself (stepsize, steps, cfg_scale, ...)."""
        flags = dict(sampler=args.sampler, mu=args.mu, schedule=args.schedule, adam_betas=tuple(args.adam_betas),
                     temperature=args.temperature, ode_method=args.ode_method, atol=args.atol, rtol=args.rtol)
        return cls(**{**flags, **resolved})

    def options(self):
        """The eqm.sampling.sample keywords that pick and configure the sampler."""
        return dict(sampler=self.sampler, stepsize=self.stepsize, mu=self.mu, schedule=self.schedule,
                    betas=tuple(self.adam_betas), temperature=self.temperature, method=self.ode_method,
                    atol=self.atol, rtol=self.rtol)


def _preset_value(args, preset, name):
    """The flag's value if given, else the preset's."""
    v = getattr(args, name, None)
    return PRESETS[preset][name] if v is None else v


def input_geometry(model, image_size, vae, error, factor=vae_lib.FACTOR, hint=""):
    """(vae, input_size) with the size checks of both CLIs; `error(msg)` reports a problem (hint: appended to
    a VAE size error); factor: the VAE's downsampling (a latent folder records its own)."""
    if model not in EqM_models:
        error(f"unknown --model {model!r}; choose one of: {', '.join(EqM_models)}")
    patch = int(model.split("/")[-1])
    if vae_lib.is_pixel_space(vae):
        vae, input_size = "none", image_size
    else:
        try:
            input_size = vae_lib.latent_size(image_size, factor)
        except ValueError as e:
            error(f"{e}{hint}")
    if input_size % patch:
        error(f"{model} has patch size {patch}, but its input is {input_size}x{input_size} "
              f"(--image-size {image_size}{'' if vae == 'none' else f' / {factor}'}): pick an image size whose "
              f"model input is divisible by {patch}")
    return vae, input_size


def image_channels(vae, preset):
    """The model's input channels before the data are opened: 4 for VAE latents, 1 for digits, else RGB."""
    return vae_lib.CHANNELS if vae != "none" else 1 if preset == "digits" else 3


def _asdict(cfg):
    """dataclasses.asdict with tuples as lists: plain builtins only."""
    def plain(v):
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v
    return plain(dataclasses.asdict(cfg))


#################################################################################
#                                   Training                                    #
#################################################################################

TRANSPORT_FLAGS = ("path_type", "prediction", "loss_weight", "sample_eps", "train_eps")


@dataclass(frozen=True)
class TrainConfig:
    """Everything eqm-train runs with."""
    model: ModelConfig
    data: DataConfig
    objective: ObjectiveConfig
    optim: OptimConfig
    runtime: RuntimeConfig
    grids: SamplingConfig  # the EMA sample grids made during training
    results_dir: str = "results"
    ckpt: Optional[str] = None  # resume from (or initialise with) this checkpoint
    log_every: int = 100
    ckpt_every: int = 50_000
    sample_every: int = 10_000  # 0: no grids
    wandb: bool = False
    preset: str = "published"
    transport: dict = field(default_factory=dict)  # the published SiT flags: accepted, stored, unused

    @classmethod
    def from_args(cls, args, error, latent_manifest=None):
        """Resolve parsed flags with the preset of their --data-path. error(msg) reports a bad combination;
        latent_manifest: a latent folder's manifest (its VAE, image size and downsampling factor). Device-dependent
        choices (--fused, --compile, --precision auto) stay "auto" (None) until eqm.execution resolves them."""
        preset = preset_name(args.data_path)
        pick = lambda name: _preset_value(args, preset, name)  # noqa: E731
        m = latent_manifest or {}
        image_size = args.image_size if args.image_size is not None else m.get("image_size", pick("image_size"))
        vae_flag = args.vae if args.vae is not None else m.get("vae", pick("vae"))
        model = pick("model")
        factor = vae_factor(latent_manifest) if latent_manifest else vae_lib.FACTOR
        vae, input_size = input_geometry(model, image_size, vae_flag, error, factor,
                                         hint="; or use --vae none for pixel space")
        max_steps = pick("max_steps") if args.epochs is None else args.max_steps  # --epochs beats the digits budget
        return cls(
            model=ModelConfig(model, input_size, image_channels(vae, preset), pick("num_classes"),
                              uncond=args.uncond, ebm=args.ebm),
            data=DataConfig(args.data_path, image_size, vae, pick("global_batch_size"), args.num_workers, args.dali),
            objective=ObjectiveConfig(args.ct_shape, args.ct_a, args.ct_lam, args.disp),
            optim=OptimConfig(pick("lr"), pick("ema_decay"), args.grad_clip, pick("epochs"), max_steps,
                              args.fresh_optimizer),
            runtime=RuntimeConfig(device=args.device, precision=args.precision, fused=args.fused,
                                  compile=args.compile, fsdp=args.fsdp,
                                  global_seed=args.global_seed, dist_timeout=args.dist_timeout,
                                  on_nonfinite=args.on_nonfinite, max_skips=args.max_skips),
            grids=SamplingConfig("gd", args.sample_steps, pick("sample_stepsize"), pick("cfg_scale")),
            results_dir=args.results_dir, ckpt=args.ckpt, log_every=args.log_every, ckpt_every=pick("ckpt_every"),
            sample_every=pick("sample_every"), wandb=args.wandb, preset=preset,
            transport={k: getattr(args, k) for k in TRANSPORT_FLAGS})

    def published_args(self):
        """The argparse Namespace the published train.py stores as `args` (every flag), plus the resolved
        input_size / in_channels and this project's flags."""
        m, d, o, opt, r, g = self.model, self.data, self.objective, self.optim, self.runtime, self.grids
        return argparse.Namespace(
            data_path=d.data_path, results_dir=self.results_dir, model=m.name, image_size=d.image_size,
            num_classes=m.num_classes, epochs=opt.epochs, global_batch_size=d.global_batch_size,
            global_seed=r.global_seed, vae=d.vae, num_workers=d.num_workers, log_every=self.log_every,
            ckpt_every=self.ckpt_every, cfg_scale=g.cfg_scale, wandb=self.wandb, ckpt=self.ckpt, disp=o.disp,
            uncond=m.uncond, ebm=m.ebm, **self.transport,
            max_steps=opt.max_steps, fresh_optimizer=opt.fresh_optimizer, lr=opt.lr, ema_decay=opt.ema_decay,
            precision=r.precision, grad_clip=opt.grad_clip, ct_a=o.ct_a, ct_lam=o.ct_lam, ct_shape=o.ct_shape,
            fused=r.fused, sample_every=self.sample_every, sample_steps=g.steps, sample_stepsize=g.stepsize,
            compile=r.compile, fsdp=r.fsdp, dali=d.dali, device=r.device, on_nonfinite=r.on_nonfinite,
            max_skips=r.max_skips, dist_timeout=r.dist_timeout, input_size=m.input_size, in_channels=m.in_channels)

    def to_dict(self):
        """This config as plain builtins (dicts, lists, str, numbers, None), for checkpoints and loggers."""
        return _asdict(self)

    def replace(self, **parts):
        """A copy with some parts replaced, e.g. cfg.replace(runtime=dataclasses.replace(cfg.runtime, ...))."""
        return dataclasses.replace(self, **parts)


#################################################################################
#                                   Sampling                                    #
#################################################################################

@dataclass(frozen=True)
class TrainedSettings:
    """What a checkpoint says about the run that wrote it: None in every field it does not say."""
    model: ModelConfig
    data: DataConfig
    objective: ObjectiveConfig


def _from_dict(cls, d):
    """cls(**d) for the fields cls has (a checkpoint of another version may hold more or fewer)."""
    return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


def trained_settings(ckpt):
    """The model, data and c(t) a checkpoint was trained with: from its `config` (written here), else from
    the published `args` Namespace (published checkpoints: no input_size / in_channels), else all None."""
    cfg = ckpt.get("config") if isinstance(ckpt, dict) else None
    if isinstance(cfg, dict) and {"model", "data", "objective"} <= set(cfg):
        return TrainedSettings(_from_dict(ModelConfig, cfg["model"]), _from_dict(DataConfig, cfg["data"]),
                               _from_dict(ObjectiveConfig, cfg["objective"]))
    a = ckpt.get("args") if isinstance(ckpt, dict) else None
    a = {} if a is None else dict(vars(a)) if isinstance(a, argparse.Namespace) else dict(a)
    return TrainedSettings(
        ModelConfig(a.get("model"), a.get("input_size"), a.get("in_channels"), a.get("num_classes"),
                    a.get("uncond"), a.get("ebm")),
        DataConfig(a.get("data_path"), a.get("image_size"), a.get("vae")),
        ObjectiveConfig(*(a.get(f"ct_{k}", v) for k, v in PUBLISHED_CT.items())))


NO_CHECKPOINT = TrainedSettings(ModelConfig(None, None, None, None, None, None), DataConfig(None, None, None),
                                ObjectiveConfig())


@dataclass(frozen=True)
class SampleConfig:
    """Everything eqm-sample runs with."""
    model: ModelConfig
    image_size: int
    vae: str
    sampling: SamplingConfig
    runtime: RuntimeConfig
    objective: ObjectiveConfig  # the training run's c(t); its lam scales the default step size
    ckpt: Optional[str] = None
    folder: str = "samples"
    num_fid_samples: int = 50_000
    global_batch_size: int = 256
    per_proc_batch_size: Optional[int] = None
    overwrite: bool = False
    data_path: Optional[str] = None
    preset: str = "published"
    transport: dict = field(default_factory=dict)

    @classmethod
    def from_args(cls, args, error, trained=NO_CHECKPOINT):
        """Explicit flags win, then what the checkpoint was trained with (`trained_settings`), then the preset
        of the data path. error(msg) reports a bad combination; --fused / --compile / --precision stay "auto"
        (None) until eqm.execution resolves them on the device."""
        tm, td = trained.model, trained.data
        first = lambda *vs: next((v for v in vs if v is not None), None)  # noqa: E731
        data_path = first(args.data_path, td.data_path)
        preset = preset_name(data_path)
        pick = lambda name, trained_value=None: first(getattr(args, name), trained_value,  # noqa: E731
                                                       PRESETS[preset][name])
        model, image_size = pick("model", tm.name), pick("image_size", td.image_size)
        vae, input_size = input_geometry(model, image_size, pick("vae", td.vae), error)
        in_channels = first(tm.in_channels, image_channels(vae, preset)) if vae == "none" else vae_lib.CHANNELS
        obj = trained.objective
        stepsize = args.stepsize
        if stepsize is None:  # the field's scale is lam: move as far per step as with the published lam 4
            stepsize = PRESETS[preset]["stepsize"] * PUBLISHED_CT["lam"] / obj.ct_lam
        sampling = SamplingConfig.from_args(args, steps=args.num_sampling_steps, stepsize=stepsize,
                                            cfg_scale=pick("cfg_scale"), cfg_channels=args.cfg_channels,
                                            stop_grad_norm=args.stop_grad_norm)
        runtime = RuntimeConfig(device=args.device, precision=args.precision, fused=args.fused, compile=args.compile,
                                global_seed=args.global_seed, dist_timeout=args.dist_timeout)
        return cls(ModelConfig(model, input_size, in_channels, pick("num_classes", tm.num_classes),
                               first(args.uncond, tm.uncond, True), first(args.ebm, tm.ebm, "none")),
                   image_size, vae, sampling, runtime, obj, args.ckpt, args.folder, pick("num_fid_samples"),
                   args.global_batch_size, args.per_proc_batch_size, args.overwrite, data_path, preset,
                   {k: getattr(args, k) for k in TRANSPORT_FLAGS})

    @property
    def ct(self):
        """The training run's c(t) as {"shape", "a", "lam"} (reported in the summary)."""
        o = self.objective
        return {"shape": o.ct_shape, "a": o.ct_a, "lam": o.ct_lam}

    def published_args(self):
        """The flags as a Namespace: sample_gd.py's names, resolved (for printing and old callers)."""
        m, s, r = self.model, self.sampling, self.runtime
        return argparse.Namespace(
            model=m.name, image_size=self.image_size, num_classes=m.num_classes,
            global_batch_size=self.global_batch_size, global_seed=r.global_seed, vae=self.vae,
            cfg_scale=s.cfg_scale, ckpt=self.ckpt, stepsize=s.stepsize, num_sampling_steps=s.steps,
            folder=self.folder, sampler=s.sampler, mu=s.mu, num_fid_samples=self.num_fid_samples,
            uncond=m.uncond, ebm=m.ebm, **self.transport, per_proc_batch_size=self.per_proc_batch_size,
            cfg_channels=s.cfg_channels, stop_grad_norm=s.stop_grad_norm, schedule=s.schedule,
            adam_betas=s.adam_betas, temperature=s.temperature, ode_method=s.ode_method, atol=s.atol,
            rtol=s.rtol, fused=r.fused, compile=r.compile, precision=r.precision, data_path=self.data_path,
            device=r.device, overwrite=self.overwrite, dist_timeout=r.dist_timeout, input_size=m.input_size,
            in_channels=m.in_channels, ct=self.ct)

    def to_dict(self):
        return _asdict(self)
