"""Shared by the trainer, reliability and engine tests: the override list of a tiny, deterministic
CPU run, and launch/ scripts loaded as modules (their main() called in-process)."""
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN = os.path.join(ROOT, "launch", "pretrain.py")


def load_script(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def tiny(out_dir, data_cache, *extra):
    return [
        "model.arch=resnet18", "model.hid_dim=32", "model.out_dim=16", "model.queue_len=64", "model.bn_group_size=4",
        "data.source=synthetic", "data.image_size=64", "data.synthetic_images=32", "data.synthetic_resolution=80",
        "data.num_workers=0", f"data.cache_dir={data_cache}",
        "optim.epochs=2", "optim.batch_size=8", f"train.out_dir={out_dir}", "train.log_every=1",
        "train.tensorboard=false", "train.progress=false", "train.deterministic=true", "train.ckpt_every_epochs=1",
        *extra,
    ]
