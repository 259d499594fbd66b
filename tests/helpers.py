"""Shared by the trainer and reliability tests: the override list of a tiny, deterministic CPU run."""


def tiny(out_dir, data_cache, *extra):
    return [
        "model.arch=resnet18", "model.hid_dim=32", "model.out_dim=16", "model.queue_len=64", "model.bn_group_size=4",
        "data.source=synthetic", "data.image_size=64", "data.synthetic_images=32", "data.synthetic_resolution=80",
        "data.num_workers=0", f"data.cache_dir={data_cache}",
        "optim.epochs=2", "optim.batch_size=8", f"train.out_dir={out_dir}", "train.log_every=1",
        "train.tensorboard=false", "train.progress=false", "train.deterministic=true", "train.ckpt_every_epochs=1",
        *extra,
    ]
