"""Configuration: dataclasses, YAML presets and `key=value` overrides through OmegaConf.

`load_config("smoke", ["optim.epochs=2"])` -> a validated `Config`. Presets live in
`densecl_fast/configs/*.yaml`; any other YAML path works too. Unknown keys and wrongly typed
values are errors (OmegaConf structured configs), and `validate` checks the values.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List, Optional

from omegaconf import OmegaConf

PRESET_DIR = os.path.join(os.path.dirname(__file__), "configs")


@dataclass
class ModelConfig:
    arch: str = "resnet50"            # resnet18 | resnet34 | resnet50 | resnet101
    hid_dim: int = 2048               # neck hidden width (both branches)
    out_dim: int = 128                # projection width = queue feature size
    queue_len: int = 65536            # K, entries per queue; multiple of the global batch
    momentum: float = 0.999           # key encoder EMA
    temperature: float = 0.2
    loss_lambda: float = 0.5          # weight of the dense loss: (1-λ)·global + λ·dense
    dense_warmup_iters: int = 0       # λ = 0 for these many first iterations (0 = recipe)
    bn_group_size: int = 32           # single process: BN statistics over groups of this many
                                      # images (key batch shuffled first); 0 = whole batch
    bn: str = "shuffle"               # several ranks: shuffle (the recipe's cross-rank shuffle-BN, per-rank
                                      # statistics) | group (per-rank grouped BN, per-rank shuffle) |
                                      # sync (SyncBatchNorm over the global batch; CUDA; not the recipe).
                                      # One process: grouped BN with a whole-batch shuffle in every mode


@dataclass
class DaliConfig:
    """data.dali.<key>: the DALI loader's knobs (densecl_fast/data/dali); ignored by the torch backend."""
    decoder: str = "auto"                    # auto (mixed on CUDA, cpu otherwise) | mixed | cpu
    hw_decoder_load: float = 0.65            # share of JPEGs sent to the hardware JPEG decoder (A100/H100)
    device_memory_padding: int = 64 << 20    # nvJPEG device buffer per thread: no regrowth up to ~20 MP
    host_memory_padding: int = 32 << 20      # nvJPEG pinned host buffers per thread (x2)
    preallocate_width_hint: int = 0          # HW decoder preallocation (0 = DALI's default)
    preallocate_height_hint: int = 0
    prefetch: int = 2                        # batches prepared ahead
    hue: str = "auto"                        # auto (exact on GPU, linear on CPU) | exact (HSV, as
                                             # torchvision) | linear (fn.hue: ~10x cheaper on a CPU)
    shuffle_buffer: int = 1024               # webdataset shards: samples in the reader's shuffle buffer


@dataclass
class DataConfig:
    source: str = "synthetic"         # "synthetic" | image folder | .txt file list | fashion-mnist:ROOT[#test]
                                      # | fashion-mnist-mosaics:ROOT[#test,train=N,test=N,size=S]
                                      # | shards glob (dali)
    max_images: int = 0               # use only the first N images of the source (0 = all)
    root: str = ""                    # base folder for relative paths in a file list
    backend: str = "auto"             # auto | torch | dali (auto: DALI on CUDA when installed)
    image_size: int = 224             # output crop size of each view
    min_scale: float = 0.2            # RandomResizedCrop area range (min_scale, 1)
    jitter_prob: float = 0.8          # ColorJitter's probability per view (the MoCo-v2 recipe's)
    jitter_strength: float = 1.0      # factor on its strengths: brightness/contrast/saturation 0.4, hue 0.1;
                                      # in [JITTER_STRENGTH_MIN, 2.5]
    grayscale_prob: float = 0.2       # RandomGrayscale's probability per view
    blur_prob: float = 0.5            # GaussianBlur's probability per view
    num_workers: int = 8              # torch DataLoader workers / DALI CPU threads
    synthetic_images: int = 512       # size of the built-in data set
    synthetic_resolution: int = 160   # its image side in pixels
    cache_dir: str = "~/.cache/densecl_fast"   # where the built-in data set is generated
    dali: DaliConfig = field(default_factory=DaliConfig)   # data.backend=dali only


@dataclass
class OptimConfig:
    epochs: int = 200
    batch_size: int = 256             # global batch (all ranks together)
    lr: float = 0.03                  # per 256 images; scaled linearly with the global batch
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.0        # linear warm-up before the cosine
    min_lr: float = 0.0               # cosine ends here
    max_steps: int = 0                # stop after this many steps (0 = run all epochs)


@dataclass
class TrainConfig:
    out_dir: str = "runs/densecl"
    seed: int = 0                     # 0 .. MAX_SEED
    device: str = "auto"              # auto | cpu | cuda
    precision: str = "auto"           # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32
    channels_last: bool = True
    compile: bool = False             # torch.compile the encoders' repeated regions (engines/compiling.py)
    compile_scope: str = "blocks"     # blocks (each residual block and the neck, compiled in place) | encoders
                                      # (each encoder as one graph: slower to compile)
    compile_mode: str = "default"     # torch.compile mode of the regions: default | reduce-overhead (CUDA
                                      # graphs) | max-autotune | max-autotune-no-cudagraphs
    compile_cache: bool = True        # save/load the compile artifacts (checkpoint folder, data.cache_dir)
    cudnn_benchmark: bool = True      # CUDA: cuDNN autotuning (shapes are fixed); off with deterministic
    kernels: str = "auto"             # auto | triton | reference
    ckpt_every_epochs: int = 10
    ckpt_every_steps: int = 0         # also every N steps (0 = off)
    keep_last: int = 3
    log_every: int = 10
    resume: str = ""                  # "" | auto | path to a checkpoint
    init_from: str = ""               # start a fresh run from these weights (densecl_fast.weights formats)
    deterministic: bool = False       # torch deterministic algorithms (for exact-resume tests)
    tensorboard: bool = True
    progress: bool = True             # tqdm progress bar
    engine: str = "auto"              # auto | single | ddp | fsdp | deepspeed (densecl_fast/engines); auto:
                                      # deepspeed under the deepspeed launcher, ddp under torchrun on >1 rank
    # Online kNN monitor (densecl_fast/monitor.py): off while knn_data is empty.
    knn_data: str = ""                # labelled data as the eval tool's --data: a folder with class
                                      # sub-folders, a labelled .txt list, fashion-mnist:ROOT,
                                      # fashion-mnist-mosaics:ROOT (label: the class most quadrants hold)
    knn_val: str = ""                 # a separate evaluation folder / list (else the data's own split)
    knn_every_epochs: int = 1         # evaluate every N epochs (0 = not by epochs)
    knn_every_steps: int = 0          # and/or every N steps (0 = not by steps)
    knn_max_bank: int = 2000          # the first N images of the training split form the bank
    knn_max_val: int = 1000           # the first N images of the evaluation split are classified
    knn_image_size: int = 0           # feature image size (0 = data.image_size)
    knn_k: int = 20                   # neighbours (T = 0.07, the eval tool's weighted vote)


@dataclass
class DeepSpeedSection:
    """train.engine=deepspeed only. The JSON is densecl_fast/engines/ds_configs/ds_zero<zero_stage>.json unless `config` names one;
    batch sizes, optimizer and precision always come from this config (a JSON that contradicts them is an error)."""
    config: str = ""                  # path of a DeepSpeed JSON config ("" = densecl_fast/engines/ds_configs/ds_zero<zero_stage>.json)
    zero_stage: Optional[int] = None  # 0 | 1 | 2; overrides the JSON's zero_optimization.stage (None: the JSON's, or 1)


@dataclass
class Config:
    name: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)


JITTER_STRENGTH_MIN = 1e-6          # data.jitter_strength's floor (see validate_augmentation)
# train.seed's bound: integers exact in JSON (metrics, state.json, report.json); seed * 1000 + rank (the
# key-shuffle generator's seed) stays inside the 64 bits torch's generators take; non-negative, as
# numpy's SeedSequence (the low-shot draws) needs.
MAX_SEED = 2 ** 53 - 1
ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")    # model.arch: torchvision's ResNets
ENGINES = ("single", "ddp", "fsdp", "deepspeed")               # train.engine, besides auto (engines/)
COMPILE_SCOPES = ("blocks", "encoders")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")   # torch.compile's


class ConfigError(ValueError):
    pass


def scaled_lr(optim: OptimConfig, batch: Optional[int] = None) -> float:
    """The learning rate of a global batch of `batch` images (default optim.batch_size): optim.lr is
    per 256 images, scaled linearly with the batch."""
    return optim.lr * (optim.batch_size if batch is None else batch) / 256


# Presets that were removed -> why, and what to use instead (a one-line ConfigError, not "unknown config").
REMOVED_PRESETS = {
    "fashion_mnist_scenes": "the Fashion-MNIST scenes were removed (they could not rank trunks: "
                            "docs/real-data-checks.md); use --config fashion_mnist_mosaic "
                            "(data fashion-mnist-mosaics:ROOT)",
}


def list_presets() -> List[str]:
    return sorted(f[:-5] for f in os.listdir(PRESET_DIR) if f.endswith(".yaml"))


def load_config(preset_or_path: Optional[str] = "smoke", overrides: Optional[List[str]] = None) -> Config:
    base = OmegaConf.structured(Config)
    layers = [base]
    if preset_or_path:
        path = preset_or_path
        if not os.path.exists(path):
            path = os.path.join(PRESET_DIR, preset_or_path + ".yaml")
        if not os.path.exists(path) and preset_or_path in REMOVED_PRESETS:
            raise ConfigError(f"--config {preset_or_path}: {REMOVED_PRESETS[preset_or_path]}")
        if not os.path.exists(path):
            raise ConfigError(f"unknown config {preset_or_path!r}: not a file, and not one of the presets "
                              f"{', '.join(list_presets())}")
        try:
            loaded = OmegaConf.load(path)
        except Exception as e:  # yaml.YAMLError (with line and column), UnicodeDecodeError, OSError
            raise ConfigError(f"--config {path}: not valid YAML: {one_line(e)}") from None
        if not isinstance(loaded, type(OmegaConf.create({}))) and loaded is not None:
            raise ConfigError(f"--config {path}: the file must hold a mapping of sections (model:, data:, ...)")
        layers.append(loaded if loaded is not None else OmegaConf.create({}))
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must look like key=value, got {bad}")
        layers.append(OmegaConf.from_dotlist(list(overrides)))
    for layer in layers[1:]:
        check_renamed_keys(layer)
    try:
        merged = OmegaConf.merge(*layers)
    except Exception as e:  # omegaconf raises several types; all mean a bad key or value
        raise ConfigError(f"invalid config: {one_line(e)}") from e
    cfg: Config = OmegaConf.to_object(merged)
    validate(cfg)
    check_environment(cfg)
    return cfg


def check_renamed_keys(layer) -> None:
    """A renamed key (in a YAML file, an override or a checkpoint's saved config) is a ConfigError
    naming its new key, not OmegaConf's bare "not in ModelConfig". Nothing is migrated: before 1.0
    a config or checkpoint of an earlier checkout is redone, not converted."""
    layer = OmegaConf.create(layer) if isinstance(layer, dict) else layer
    if OmegaConf.select(layer, "model.sync_bn") is not None:
        raise ConfigError("model.sync_bn was replaced by model.bn=shuffle|sync|group (shuffle: the recipe's "
                          "cross-rank shuffle-BN, the default; sync: SyncBatchNorm); remove model.sync_bn")
    data = OmegaConf.select(layer, "data")
    for key in DaliConfig.__dataclass_fields__:
        if OmegaConf.is_dict(data) and "dali_" + key in data:
            raise ConfigError(f"data.dali_{key} was replaced by data.dali.{key} (the DALI keys are one section)")


def one_line(e: BaseException) -> str:
    """An exception as one line: OmegaConf's and YAML's messages span several (key, position)."""
    text = " ".join(part.strip() for part in str(e).splitlines() if part.strip())
    return text or type(e).__name__


def check_environment(cfg: Config, world_size: Optional[int] = None) -> None:
    """What depends on this machine and launch, checked before any data or model is built:
    CUDA for train.device / precision / kernels, and the per-process batch against
    model.bn_group_size (world size from WORLD_SIZE, as torchrun and the deepspeed launcher set)."""
    import torch

    t, m, o = cfg.train, cfg.model, cfg.optim

    def need(cond, msg):
        if not cond:
            raise ConfigError(msg)

    if world_size is None:
        try:
            world_size = max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))
        except ValueError:
            world_size = 1
    cuda = torch.cuda.is_available()
    need(cuda or t.device != "cuda", "train.device=cuda but no CUDA device is available; use train.device=cpu or auto")
    on_cuda = cuda and t.device != "cpu"
    need(on_cuda or t.precision != "fp16",
         "train.precision=fp16 needs a CUDA device; use bf16 or fp32 on the CPU (or train.precision=auto)")
    if t.kernels == "triton":
        from . import kernels
        from .kernels import dispatch
        if not kernels.HAS_TRITON:
            raise ConfigError(f"train.kernels=triton but {dispatch.triton_unavailable('cpu')}; use auto or reference")
        if not on_cuda:
            reason = dispatch.triton_unavailable(torch.device("cpu"))
            need(not reason, f"train.kernels=triton: {reason}; use train.kernels=auto or reference")
    need(o.batch_size % world_size == 0,
         f"optim.batch_size={o.batch_size} (the global batch) is not divisible by {world_size} processes")
    per = o.batch_size // world_size
    need(m.bn != "sync" or on_cuda,
         "model.bn=sync (SyncBatchNorm) needs CUDA; use model.bn=shuffle (the recipe) or group on the CPU")
    grouped = not (world_size > 1 and m.bn == "sync")  # SyncBatchNorm replaces the groups
    need(not grouped or m.bn_group_size <= 0 or m.bn_group_size >= per or per % m.bn_group_size == 0,
         f"optim.batch_size={o.batch_size} gives {per} images per process, not a multiple of "
         f"model.bn_group_size={m.bn_group_size}; change one of them (bn_group_size=0: the whole batch)")
    # The fewest values per channel a BatchNorm sees in training: its images x the C5 map (stride 32;
    # every stride-2 layer rounds up). One value normalises to the BN bias whatever the image: the
    # trunk's output no longer depends on its input (one BatchNorm2d per group refuses this).
    side = -(-cfg.data.image_size // 32)
    images = o.batch_size if not grouped else per if m.bn_group_size <= 0 else min(m.bn_group_size, per)
    if images * side * side <= 1:
        what = (f"optim.batch_size={o.batch_size} with model.bn=sync" if not grouped else
                f"optim.batch_size={o.batch_size} on {world_size} process(es) with model.bn_group_size=0 (BN over "
                f"each process's batch)" if m.bn_group_size <= 0 else f"model.bn_group_size={m.bn_group_size}")
        raise ConfigError(f"{what} normalises 1 image per BatchNorm, and at data.image_size={cfg.data.image_size} "
                          f"C5 is 1x1: 1 value per channel, so every image gets the same C5 features; use groups "
                          f"of at least 2 images (or data.image_size > 32)")


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_from_dict(d: dict) -> Config:
    """A saved config (checkpoint), validated."""
    check_renamed_keys(d)
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), d))
    validate(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg))


def validate_dali(s: DaliConfig) -> None:
    """Also called by the DALI loader: a DataConfig built in code reaches it without `validate`."""
    def need(cond, msg):
        if not cond:
            raise ConfigError(msg)

    need(s.decoder in ("auto", "mixed", "cpu"), f"data.dali.decoder={s.decoder!r}: use auto, mixed or cpu")
    need(s.hue in ("auto", "exact", "linear"), f"data.dali.hue={s.hue!r}: use auto, exact or linear")
    need(0.0 <= s.hw_decoder_load <= 1.0, f"data.dali.hw_decoder_load={s.hw_decoder_load} must be in [0, 1]")
    need(s.prefetch >= 1 and s.shuffle_buffer >= 1, "data.dali.prefetch and data.dali.shuffle_buffer must be >= 1")
    need(min(s.device_memory_padding, s.host_memory_padding, s.preallocate_width_hint,
             s.preallocate_height_hint) >= 0,
         "data.dali.device_memory_padding, host_memory_padding and preallocate_*_hint must be >= 0")


def validate_augmentation(d: DataConfig) -> None:
    """Also called by the loaders (through `transforms.Augmentation.of`), like `validate_dali`."""
    for key in ("jitter_prob", "grayscale_prob", "blur_prob"):
        if not 0.0 <= getattr(d, key) <= 1.0:
            raise ConfigError(f"data.{key}={getattr(d, key)} must be in [0, 1]")
    # Above 2.5 the brightness and contrast factors 1 +- 0.4 * strength would go below 0: torchvision
    # clips them there, the DALI graph does not. At or below 2^-54 / 0.4 (~1.4e-16) 1 +- 0.4 * strength
    # rounds to 1 and torchvision's ColorJitter drops brightness, contrast and saturation with their
    # random draws, moving every later draw of the view (the DALI draws would not move): a floor far
    # above that, where the jitter changes no 8-bit pixel anyway, keeps both backends on the same draws.
    if not JITTER_STRENGTH_MIN <= d.jitter_strength <= 2.5:
        raise ConfigError(f"data.jitter_strength={d.jitter_strength} must be in [{JITTER_STRENGTH_MIN:g}, 2.5] (2.5: "
                          f"the brightness and contrast factors reach 0; data.jitter_prob=0 turns the jitter off)")


def validate(cfg: Config) -> None:
    m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.train

    def need(cond, msg):
        if not cond:
            raise ConfigError(msg)

    need(m.arch in ARCHS, f"model.arch={m.arch!r}: use resnet18/34/50/101")
    need(0.0 <= m.momentum < 1.0, f"model.momentum={m.momentum} must be in [0, 1)")
    need(m.temperature > 0, f"model.temperature={m.temperature} must be > 0")
    need(0.0 <= m.loss_lambda <= 1.0, f"model.loss_lambda={m.loss_lambda} must be in [0, 1]")
    need(m.queue_len > 0 and m.out_dim > 0 and m.hid_dim > 0, "model.queue_len, out_dim, hid_dim must be > 0")
    need(m.dense_warmup_iters >= 0 and m.bn_group_size >= 0, "model.dense_warmup_iters and bn_group_size must be >= 0")
    need(m.bn in ("shuffle", "sync", "group"), f"model.bn={m.bn!r}: use shuffle, sync or group")
    need(t.engine in ("auto", *ENGINES), f"train.engine={t.engine!r}: use auto, {', '.join(ENGINES[:-1])} or {ENGINES[-1]}")
    need(cfg.deepspeed.zero_stage in (None, 0, 1, 2),
         f"deepspeed.zero_stage={cfg.deepspeed.zero_stage}: use 0, 1 or 2 (ZeRO-3 shards parameters, which the "
         f"momentum encoder's update does not support)")
    need(d.backend in ("auto", "torch", "dali"), f"data.backend={d.backend!r}: use auto, torch or dali")
    need(d.image_size >= 32, f"data.image_size={d.image_size} must be >= 32 (C5 is image_size/32 on a side)")
    need(0.0 < d.min_scale <= 1.0, f"data.min_scale={d.min_scale} must be in (0, 1]")
    validate_augmentation(d)
    need(d.num_workers >= 0, "data.num_workers must be >= 0")
    need(d.max_images >= 0, f"data.max_images={d.max_images} must be >= 0 (0 = all)")
    validate_dali(d.dali)
    need(o.epochs > 0 and o.batch_size > 0, "optim.epochs and optim.batch_size must be > 0")
    need(o.lr > 0 and o.weight_decay >= 0 and o.momentum >= 0, "optim.lr must be > 0, weight_decay and momentum >= 0")
    need(m.queue_len % o.batch_size == 0,
         f"model.queue_len={m.queue_len} must be a multiple of the global batch optim.batch_size={o.batch_size}")
    need(t.device in ("auto", "cpu", "cuda"), f"train.device={t.device!r}: use auto, cpu or cuda")
    need(t.precision in ("auto", "bf16", "fp16", "fp32"), f"train.precision={t.precision!r}: use auto, bf16, fp16 or fp32")
    need(t.kernels in ("auto", "triton", "reference"), f"train.kernels={t.kernels!r}: use auto, triton or reference")
    need(t.compile_scope in COMPILE_SCOPES, f"train.compile_scope={t.compile_scope!r}: use {' or '.join(COMPILE_SCOPES)}")
    need(t.compile_mode in COMPILE_MODES, f"train.compile_mode={t.compile_mode!r}: use {', '.join(COMPILE_MODES)}")
    need(t.keep_last >= 1, "train.keep_last must be >= 1")
    need(t.log_every >= 1, f"train.log_every={t.log_every} must be >= 1")
    need(t.ckpt_every_epochs >= 1, f"train.ckpt_every_epochs={t.ckpt_every_epochs} must be >= 1 "
         "(a value above optim.epochs saves only the last step)")
    need(t.ckpt_every_steps >= 0, f"train.ckpt_every_steps={t.ckpt_every_steps} must be >= 0 (0 = off)")
    need(o.max_steps >= 0 and o.warmup_epochs >= 0 and o.min_lr >= 0,
         "optim.max_steps, optim.warmup_epochs and optim.min_lr must be >= 0")
    need(bool(str(t.out_dir).strip()), "train.out_dir is empty: give the run directory")
    need(0 <= t.seed <= MAX_SEED, f"train.seed={t.seed} must be in 0..{MAX_SEED} (2^53 - 1)")
    need(min(t.knn_every_epochs, t.knn_every_steps) >= 0, "train.knn_every_epochs and knn_every_steps must be >= 0")
    need(not str(t.knn_data).strip() or t.knn_every_epochs or t.knn_every_steps,
         "train.knn_data is set but train.knn_every_epochs and knn_every_steps are both 0; set one (or clear knn_data)")
    need(t.knn_max_bank >= 1 and t.knn_max_val >= 1 and t.knn_k >= 1,
         "train.knn_max_bank, knn_max_val and knn_k must be >= 1")
    need(t.knn_image_size == 0 or t.knn_image_size >= 32, f"train.knn_image_size={t.knn_image_size}: 0 (= data.image_size) or >= 32")
