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
    sync_bn: bool = True              # distributed on CUDA: SyncBatchNorm across ranks


@dataclass
class DataConfig:
    source: str = "synthetic"         # "synthetic" | image folder | .txt file list | shards glob (dali)
    root: str = ""                    # base folder for relative paths in a file list
    backend: str = "auto"             # auto | torch | dali (auto: DALI on CUDA when installed)
    image_size: int = 224             # output crop size of each view
    min_scale: float = 0.2            # RandomResizedCrop area range (min_scale, 1)
    num_workers: int = 8              # torch DataLoader workers / DALI CPU threads
    synthetic_images: int = 512       # size of the built-in data set
    synthetic_resolution: int = 160   # its image side in pixels
    cache_dir: str = "~/.cache/densecl_fast"   # where the built-in data set is generated
    # DALI backend only (see densecl_fast/data/dali_loader.py: DaliOptions)
    dali_decoder: str = "auto"        # auto (mixed on CUDA, cpu otherwise) | mixed | cpu
    dali_hw_decoder_load: float = 0.65    # share of JPEGs sent to the hardware JPEG decoder
    dali_device_memory_padding: int = 64 << 20
    dali_host_memory_padding: int = 32 << 20
    dali_preallocate_width_hint: int = 0
    dali_preallocate_height_hint: int = 0
    dali_prefetch: int = 2            # batches prepared ahead
    dali_hue: str = "auto"            # auto (exact on GPU, linear on CPU) | exact | linear
    dali_shuffle_buffer: int = 1024   # webdataset shards: samples in the reader's shuffle buffer


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
    seed: int = 0
    device: str = "auto"              # auto | cpu | cuda
    precision: str = "auto"           # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32
    channels_last: bool = True
    compile: bool = False             # torch.compile the encoders
    kernels: str = "auto"             # auto | triton | reference
    ckpt_every_epochs: int = 10
    ckpt_every_steps: int = 0         # also every N steps (0 = off)
    keep_last: int = 3
    log_every: int = 10
    resume: str = ""                  # "" | auto | path to a checkpoint
    deterministic: bool = False       # torch deterministic algorithms (for exact-resume tests)
    tensorboard: bool = True
    progress: bool = True             # tqdm progress bar


@dataclass
class Config:
    name: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


class ConfigError(ValueError):
    pass


def list_presets() -> List[str]:
    return sorted(f[:-5] for f in os.listdir(PRESET_DIR) if f.endswith(".yaml"))


def load_config(preset_or_path: Optional[str] = "smoke", overrides: Optional[List[str]] = None) -> Config:
    base = OmegaConf.structured(Config)
    layers = [base]
    if preset_or_path:
        path = preset_or_path
        if not os.path.exists(path):
            path = os.path.join(PRESET_DIR, preset_or_path + ".yaml")
        if not os.path.exists(path):
            raise ConfigError(f"unknown config {preset_or_path!r}: not a file, and not one of the presets "
                              f"{', '.join(list_presets())}")
        layers.append(OmegaConf.load(path))
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must look like key=value, got {bad}")
        layers.append(OmegaConf.from_dotlist(list(overrides)))
    try:
        merged = OmegaConf.merge(*layers)
    except Exception as e:  # omegaconf raises several types; all mean a bad key or value
        raise ConfigError(f"invalid config: {e}") from e
    cfg: Config = OmegaConf.to_object(merged)
    validate(cfg)
    return cfg


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_from_dict(d: dict) -> Config:
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), d))
    validate(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg))


def validate(cfg: Config) -> None:
    m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.train

    def need(cond, msg):
        if not cond:
            raise ConfigError(msg)

    need(m.arch in ("resnet18", "resnet34", "resnet50", "resnet101"), f"model.arch={m.arch!r}: use resnet18/34/50/101")
    need(0.0 <= m.momentum < 1.0, f"model.momentum={m.momentum} must be in [0, 1)")
    need(m.temperature > 0, f"model.temperature={m.temperature} must be > 0")
    need(0.0 <= m.loss_lambda <= 1.0, f"model.loss_lambda={m.loss_lambda} must be in [0, 1]")
    need(m.queue_len > 0 and m.out_dim > 0 and m.hid_dim > 0, "model.queue_len, out_dim, hid_dim must be > 0")
    need(m.dense_warmup_iters >= 0 and m.bn_group_size >= 0, "model.dense_warmup_iters and bn_group_size must be >= 0")
    need(d.backend in ("auto", "torch", "dali"), f"data.backend={d.backend!r}: use auto, torch or dali")
    need(d.image_size >= 32, f"data.image_size={d.image_size} must be >= 32 (C5 is image_size/32 on a side)")
    need(0.0 < d.min_scale <= 1.0, f"data.min_scale={d.min_scale} must be in (0, 1]")
    need(d.num_workers >= 0, "data.num_workers must be >= 0")
    need(d.dali_decoder in ("auto", "mixed", "cpu"), f"data.dali_decoder={d.dali_decoder!r}: use auto, mixed or cpu")
    need(d.dali_hue in ("auto", "exact", "linear"), f"data.dali_hue={d.dali_hue!r}: use auto, exact or linear")
    need(0.0 <= d.dali_hw_decoder_load <= 1.0, f"data.dali_hw_decoder_load={d.dali_hw_decoder_load} must be in [0, 1]")
    need(d.dali_prefetch >= 1 and d.dali_shuffle_buffer >= 1, "data.dali_prefetch and dali_shuffle_buffer must be >= 1")
    need(o.epochs > 0 and o.batch_size > 0, "optim.epochs and optim.batch_size must be > 0")
    need(o.lr > 0 and o.weight_decay >= 0 and o.momentum >= 0, "optim.lr must be > 0, weight_decay and momentum >= 0")
    need(m.queue_len % o.batch_size == 0,
         f"model.queue_len={m.queue_len} must be a multiple of the global batch optim.batch_size={o.batch_size}")
    need(t.device in ("auto", "cpu", "cuda"), f"train.device={t.device!r}: use auto, cpu or cuda")
    need(t.precision in ("auto", "bf16", "fp16", "fp32"), f"train.precision={t.precision!r}: use auto, bf16, fp16 or fp32")
    need(t.kernels in ("auto", "triton", "reference"), f"train.kernels={t.kernels!r}: use auto, triton or reference")
    need(t.keep_last >= 1, "train.keep_last must be >= 1")
