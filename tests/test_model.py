"""DenseCL model semantics, re-derived independently of densecl_fast.model."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from densecl_fast import recipe
from densecl_fast.bn import GroupBatchNorm2d
from densecl_fast.config import ConfigError, ModelConfig, load_config
from densecl_fast.model import DenseCL, DenseCLNeck


def tiny_cfg(**kw):
    base = dict(arch="resnet18", hid_dim=32, out_dim=16, queue_len=24, bn_group_size=0)
    base.update(kw)
    return ModelConfig(**base)


def plain_bn_copy(module):
    """Deep copy with every GroupBatchNorm2d turned back into a torchvision-style BatchNorm2d."""
    module = copy.deepcopy(module)

    def swap(m):
        for name, child in m.named_children():
            if isinstance(child, GroupBatchNorm2d):
                bn = nn.BatchNorm2d(child.num_features, child.eps, child.momentum)
                bn.load_state_dict(child.state_dict())
                bn.train(child.training)
                setattr(m, name, bn)
            else:
                swap(child)
    swap(module)
    return module


def encode(enc, x):
    """Independent encoder pass: trunk -> (C5, global, dense grid, pooled dense), all float64."""
    c5 = enc.backbone(x)
    g = enc.neck.mlp(c5.mean((2, 3)))
    grid = enc.neck.mlp2(c5)
    return c5.flatten(2).double(), g.double(), grid.flatten(2).double(), grid.mean((2, 3)).double()


def expected_loss(model, im_q, im_k, groups, perm, lam, T):
    """DenseCL loss computed the slow, obvious way (loops, float64) from copies of the state."""
    enc_q = plain_bn_copy(model.encoder_q)
    enc_k = plain_bn_copy(model.encoder_k)
    with torch.no_grad():  # momentum update, parameters only
        for pk, pq in zip(enc_k.parameters(), enc_q.parameters()):
            pk.mul_(model.momentum).add_(pq, alpha=1 - model.momentum)
    n = im_q.shape[0]
    size = n // groups

    def grouped(enc, x):  # BN statistics per group of `size` images: one forward per group
        parts = [encode(enc, x[i * size:(i + 1) * size]) for i in range(groups)]
        return [torch.cat(t) for t in zip(*parts)]

    with torch.no_grad():
        q_b, q, q_grid, _ = grouped(enc_q, im_q)
    with torch.no_grad():
        k_in = im_k[perm]
        k_b, k, k_grid, k2 = grouped(enc_k, k_in)
        inv = torch.argsort(perm)
        k_b, k, k_grid, k2 = k_b[inv], k[inv], k_grid[inv], k2[inv]
    queue, queue2 = model.queue.double(), model.queue2.double()

    def ce(pos, negs):
        logits = torch.cat([pos.view(1), negs]) / T
        return -(logits[0] - torch.logsumexp(logits, 0))

    g_terms, d_terms = [], []
    for b in range(n):
        qv, kv = F.normalize(q[b], dim=0), F.normalize(k[b], dim=0)
        g_terms.append(ce(qv @ kv, qv @ queue))
        for i in range(q_grid.shape[2]):
            sims = [F.normalize(q_b[b, :, i], dim=0) @ F.normalize(k_b[b, :, j], dim=0) for j in range(k_b.shape[2])]
            j_star = max(range(len(sims)), key=lambda j: (sims[j].item(), -j))  # first index on ties
            qi = F.normalize(q_grid[b, :, i], dim=0)
            kj = F.normalize(k_grid[b, :, j_star], dim=0)
            d_terms.append(ce(qi @ kj, qi @ queue2))
    lg, ld = torch.stack(g_terms).mean(), torch.stack(d_terms).mean()
    k2n = F.normalize(k2, dim=1)
    return (1 - lam) * lg + lam * ld, lg, ld, F.normalize(k, dim=1), k2n


@pytest.mark.parametrize("groups,lam", [(1, 0.5), (2, 0.5), (2, 0.0), (1, 0.3)])
def test_loss_matches_independent_derivation(groups, lam):
    torch.manual_seed(0)
    n = 4
    model = DenseCL(tiny_cfg(bn_group_size=n // groups if groups > 1 else 0, loss_lambda=0.5))
    # Make the key encoder differ from the query encoder so the momentum update matters.
    with torch.no_grad():
        for p in model.encoder_k.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.train()
    im_q, im_k = torch.randn(n, 3, 64, 64), torch.randn(n, 3, 64, 64)
    g = torch.Generator()
    g.set_state(model.shuffle_generator("cpu").get_state())
    perm = torch.randperm(n, generator=g) if groups > 1 else torch.arange(n)
    exp, exp_g, exp_d, exp_k, exp_k2 = expected_loss(model, im_q, im_k, groups, perm, lam, model.temperature)
    queue_before = model.queue.clone()

    out = model(im_q, im_k, loss_lambda=lam)
    assert out["loss_single"].item() == pytest.approx(exp_g.item(), rel=1e-4, abs=1e-5)
    assert out["loss_dense"].item() == pytest.approx(exp_d.item(), rel=1e-4, abs=1e-5)
    assert out["loss"].item() == pytest.approx(exp.item(), rel=1e-4, abs=1e-5)
    # Enqueued: the normalised global keys and the normalised pooled dense keys.
    torch.testing.assert_close(model.queue[:, :n].double(), exp_k.T, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.queue2[:, :n].double(), exp_k2.T, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.queue[:, n:], queue_before[:, n:])
    assert int(model.queue_ptr) == n


def test_default_lambda_and_temperature_follow_the_paper():
    cfg = ModelConfig()
    assert (cfg.loss_lambda, cfg.temperature, cfg.momentum, cfg.queue_len, cfg.out_dim) == (0.5, 0.2, 0.999, 65536, 128)
    preset = load_config("densecl_r50_200e_in1k", ["data.source=/x"])
    assert preset.optim.lr == 0.03 and preset.optim.batch_size == 256 and preset.optim.epochs == 200
    assert preset.optim.momentum == 0.9 and preset.optim.weight_decay == 1e-4 and preset.model.arch == "resnet50"
    assert preset.optim.epochs == recipe.RECIPE_EPOCHS  # what the reproduction and perf/ project


def test_gradients_reach_only_the_query_side():
    torch.manual_seed(0)
    model = DenseCL(tiny_cfg(bn_group_size=2))
    model(torch.randn(4, 3, 64, 64), torch.randn(4, 3, 64, 64))["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder_q.parameters())
    assert all(p.grad is None and not p.requires_grad for p in model.encoder_k.parameters())
    assert model.queue.grad is None and not model.queue.requires_grad


def test_momentum_update_is_an_ema_of_parameters_only():
    torch.manual_seed(0)
    model = DenseCL(tiny_cfg(momentum=0.9))
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(torch.randn_like(p))
        model.encoder_k.backbone.bn1.running_mean.fill_(3.0)
    q0 = [p.clone() for p in model.encoder_q.parameters()]
    k0 = [p.clone() for p in model.encoder_k.parameters()]
    model.momentum_update()
    for q, k, k_new in zip(q0, k0, model.encoder_k.parameters()):
        torch.testing.assert_close(k_new, 0.9 * k + 0.1 * q)
    assert torch.all(model.encoder_k.backbone.bn1.running_mean == 3.0)  # buffers are the key's own


def test_enqueue_wraps_around_and_checks_divisibility():
    model = DenseCL(tiny_cfg(queue_len=8))
    for step in range(3):
        k = F.normalize(torch.full((4, 16), float(step + 1)), dim=1)
        model._enqueue(k, -k)
        start = (step * 4) % 8
        torch.testing.assert_close(model.queue[:, start:start + 4], k.T)
        torch.testing.assert_close(model.queue2[:, start:start + 4], -k.T)
        assert int(model.queue_ptr) == (step + 1) * 4 % 8
    bad = DenseCL(tiny_cfg(queue_len=10))
    with pytest.raises(ValueError, match="multiple of the global batch"):
        bad._enqueue(torch.randn(4, 16), torch.randn(4, 16))
    with pytest.raises(ConfigError, match="multiple of the global batch"):
        load_config("smoke", ["model.queue_len=1000", "optim.batch_size=48"])


def test_queues_start_normalised_random():
    model = DenseCL(tiny_cfg())
    torch.testing.assert_close(model.queue.norm(dim=0), torch.ones(24))
    torch.testing.assert_close(model.queue2.norm(dim=0), torch.ones(24))
    assert not torch.allclose(model.queue, model.queue2)


@pytest.mark.parametrize("arch,c5", [("resnet18", 512), ("resnet50", 2048)])
def test_neck_shapes(arch, c5):
    model = DenseCL(tiny_cfg(arch=arch))
    assert model.neck.mlp[0].in_features == c5 and model.neck.mlp2[0].in_channels == c5
    feats = model.backbone(torch.randn(2, 3, 96, 96))
    assert feats.shape == (2, c5, 3, 3)
    g, dense, pooled = model.neck(feats)
    assert g.shape == (2, 16) and dense.shape == (2, 16, 9) and pooled.shape == (2, 16)
    torch.testing.assert_close(pooled, dense.mean(2))  # pooled before normalisation
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.neck.modules())


def test_neck_layout_matches_reference():
    neck = DenseCLNeck(512, 2048, 128)
    assert [type(m) for m in neck.mlp] == [nn.Linear, nn.ReLU, nn.Linear]
    assert [type(m) for m in neck.mlp2] == [nn.Conv2d, nn.ReLU, nn.Conv2d]
    assert neck.mlp[0].out_features == 2048 and neck.mlp2[0].kernel_size == (1, 1)


def test_group_bn_equals_bn_per_group_and_plain_bn_in_eval():
    torch.manual_seed(0)
    gbn = GroupBatchNorm2d(5)
    gbn.weight.data.uniform_(0.5, 1.5)
    gbn.bias.data.uniform_(-1, 1)
    ref = [nn.BatchNorm2d(5) for _ in range(3)]
    for r in ref:
        r.load_state_dict(gbn.state_dict())
    x = torch.randn(6, 5, 4, 3) * 3 + 1
    gbn.groups = 3
    y = gbn(x)
    exp = torch.cat([r(x[2 * i:2 * i + 2]) for i, r in enumerate(ref)])
    torch.testing.assert_close(y, exp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gbn.running_mean, torch.stack([r.running_mean for r in ref]).mean(0))
    torch.testing.assert_close(gbn.running_var, torch.stack([r.running_var for r in ref]).mean(0))
    # channels-last input gives the same result
    torch.testing.assert_close(gbn(x.to(memory_format=torch.channels_last)), exp, rtol=1e-5, atol=1e-5)
    gbn.eval()
    plain = nn.BatchNorm2d(5).eval()
    plain.load_state_dict(gbn.state_dict())
    torch.testing.assert_close(gbn(x), plain(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_group_bn_backward_equals_bn_per_group(dtype):
    """Gradients to the input, weight and bias are those of one BatchNorm2d per group, for
    either memory format and for bf16 activations (as under autocast: fp32 weights)."""
    torch.manual_seed(1)
    gbn = GroupBatchNorm2d(6)
    gbn.weight.data.uniform_(0.5, 1.5)
    gbn.bias.data.uniform_(-1, 1)
    gbn.groups = 4
    for fmt in (torch.contiguous_format, torch.channels_last):
        gbn.zero_grad()
        ref = [nn.BatchNorm2d(6) for _ in range(4)]
        for r in ref:
            r.load_state_dict(gbn.state_dict())
        x = (torch.randn(8, 6, 5, 3) * 3 + 1).to(dtype).contiguous(memory_format=fmt)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y = gbn(x1)
        assert y.dtype == dtype and y.shape == x.shape
        g = torch.randn(y.shape).to(dtype)
        (y.float() * g.float()).sum().backward()
        exp = torch.cat([r(x2.float()[2 * i:2 * i + 2]) for i, r in enumerate(ref)])
        (exp * g.float()).sum().backward()
        tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: the output is rounded to bf16
        torch.testing.assert_close(y.float(), exp, rtol=tol, atol=tol)
        torch.testing.assert_close(x1.grad.float(), x2.grad.float(), rtol=tol, atol=tol)
        ptol = 1e-4 if dtype == torch.float32 else 1e-2  # bf16: sums of bf16-rounded terms
        torch.testing.assert_close(gbn.weight.grad, sum(r.weight.grad for r in ref), rtol=ptol, atol=ptol)
        torch.testing.assert_close(gbn.bias.grad, sum(r.bias.grad for r in ref), rtol=ptol, atol=ptol)


def test_key_batch_is_shuffled_before_grouped_bn():
    """With groups, a key's BN group is a random subset: its features depend on the shuffle."""
    torch.manual_seed(0)
    model = DenseCL(tiny_cfg(bn_group_size=2))
    im = torch.randn(8, 3, 64, 64)
    perms = set()
    for _ in range(5):
        g = torch.Generator()
        g.set_state(model.shuffle_generator("cpu").get_state())
        perms.add(tuple(torch.randperm(8, generator=g).tolist()))
        model(im, im)
    assert len(perms) > 1
    with pytest.raises(ValueError, match="bn_group_size"):
        DenseCL(tiny_cfg(bn_group_size=4))(torch.randn(6, 3, 64, 64), torch.randn(6, 3, 64, 64))


def test_loss_is_log_k_plus_one_for_uninformative_features():
    """Sanity: identical logits everywhere -> every InfoNCE term is log(K + 1)."""
    from densecl_fast import kernels
    q = F.normalize(torch.ones(3, 16), dim=1)
    queue = F.normalize(torch.ones(16, 24), dim=0)
    l_pos = (q * q).sum(1)
    assert kernels.queue_infonce(q, l_pos, queue, 0.2).item() == pytest.approx(math.log(25), rel=1e-5)


def test_fused_kernels_in_the_training_step_match_the_references():
    """The model's step through the Triton kernels (interpreter on CPU) equals the reference step."""
    from densecl_fast import kernels
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = DenseCL(tiny_cfg(bn_group_size=2)).to(dev)
    im_q, im_k = torch.randn(4, 3, 64, 64, device=dev), torch.randn(4, 3, 64, 64, device=dev)
    results = {}
    try:
        for backend in ("reference", "triton"):
            m = copy.deepcopy(model)
            kernels.set_backend(backend)
            assert kernels.active_backend(dev) == backend
            out = m(im_q, im_k)
            out["loss"].backward()
            results[backend] = (out, [p.grad for p in m.encoder_q.parameters()], m.queue.clone())
    finally:
        kernels.set_backend("auto")
    (ref, ref_g, ref_queue), (tri, tri_g, tri_queue) = results["reference"], results["triton"]
    for k in ("loss", "loss_single", "loss_dense"):
        torch.testing.assert_close(tri[k], ref[k], rtol=1e-5, atol=1e-6)
    # Gradients relative to each tensor's largest entry: both steps now differ in the grouped BN
    # too (Triton kernels vs ATen per group on the CPU), whose backward passes fp32 rounding through
    # 20 layers of few values (2 images of 2 x 2 at layer4); each step is ~1.5e-5 from a
    # float64 step, so 1e-4 of the scale means "the same gradient".
    for a, b in zip(tri_g, ref_g):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max()
    torch.testing.assert_close(tri_queue, ref_queue)


def test_backbone_state_dict_loads_into_torchvision():
    import torchvision
    model = DenseCL(tiny_cfg())
    net = torchvision.models.resnet18(weights=None)
    missing, unexpected = net.load_state_dict(model.backbone.state_dict(), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    torch.testing.assert_close(net.layer4[1].conv2.weight, model.backbone.layer4[1].conv2.weight)


def test_takes_the_model_section_of_a_config():
    with pytest.raises(TypeError, match="ModelConfig"):
        DenseCL(load_config("smoke", []))


def test_whole_model_compiles_as_one_graph_with_its_stage_ranges():
    """`stages.stage` inside forward does not break the graph (Dynamo drops the default ranges)."""
    model = DenseCL(tiny_cfg(queue_len=8)).train()
    x = torch.randn(2, 3, 32, 32)
    out = torch.compile(model, fullgraph=True, backend="eager")(x, x.flip(0))
    assert torch.isfinite(out["loss"])


def test_gather_many_is_one_collective_and_gives_each_tensor_back(monkeypatch):
    """Two fake ranks: rank r contributes x + r. Mixed dtypes and shapes come back exactly."""
    import torch.distributed as dist
    from densecl_fast import model as model_mod

    calls = []

    def all_gather(out, x):
        calls.append(x.dtype)
        for r, o in enumerate(out):
            o.copy_(x + r)

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 2)
    monkeypatch.setattr(dist, "all_gather", all_gather)
    a = torch.randn(3, 4, 5).bfloat16()
    b = torch.randn(3, 2)
    ga, gb = model_mod.concat_all_gather_many(a, b)
    assert calls == [torch.float32]
    assert ga.dtype == torch.bfloat16 and ga.shape == (6, 4, 5) and gb.shape == (6, 2)
    assert torch.equal(ga[:3], a) and torch.equal(gb[:3], b) and torch.equal(gb[3:], b + 1)
    assert torch.equal(ga[3:], (a.float() + 1).bfloat16())
