"""The recipe every projection is of: DenseCL's 200-epoch ImageNet-1k schedule
(configs/densecl_r50_200e_in1k.yaml), as the reproduction's plan and perf/'s report project it."""

IMAGENET_TRAIN_IMAGES = 1_281_167  # ImageNet-1k's train split
RECIPE_EPOCHS = 200                # the schedule's length: the preset's optim.epochs
ASSUMED_SCALING = 0.9              # multi-device efficiency (of N x one device's images/s) when it was not measured
