"""Our kernels import as `densecl_fast.kernels` however the project is run, and a package called
`kernels` beside it (the PyPI one, or any other first on the path) changes nothing. A wheel installed
away from the checkout has everything its commands read, and its commands and children run.

Each case runs in a fresh interpreter, since the point is which file an import resolves to."""
import json
import os
import shutil
import site
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers import ROOT

OURS = os.path.join(ROOT, "kernels")

# Imports our kernels, runs one of them through the dispatcher (reference backend: no Triton
# interpreter needed), and prints where both names resolved.
PROBE = textwrap.dedent("""
    import json, os, torch
    import densecl_fast, densecl_fast.kernels as ours
    ours.set_backend("reference")
    q = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    queue = torch.nn.functional.normalize(torch.randn(8, 16), dim=0)
    loss = ours.queue_infonce(q, (q * q).sum(1), queue, 0.2)
    assert torch.isfinite(loss), loss
    try:
        import kernels as other
        other = os.path.realpath(other.__file__)
    except ImportError:
        other = None
    print(json.dumps({"package": os.path.realpath(densecl_fast.__file__),
                      "ours": os.path.realpath(ours.__file__), "other": other}))
""")


def probe(cwd, pythonpath=None, installed=True):
    """installed=False: site-packages without their .pth hooks, i.e. no editable install of ours."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(pythonpath)
    cmd = [sys.executable, "-c", PROBE] if installed else \
        [sys.executable, "-S", "-c", f"import sys; sys.path.extend({site.getsitepackages()!r})\n" + PROBE]
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def under(path, folder):
    return os.path.realpath(path).startswith(os.path.realpath(folder) + os.sep)


@pytest.fixture
def impostor(tmp_path):
    """A package named `kernels` first on the path, whose every use fails loudly."""
    pkg = tmp_path / "impostor" / "kernels"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("MARK = 'impostor'\n"
                                     "def __getattr__(name):\n"
                                     "    raise RuntimeError(f'the impostor kernels package was used for {name}')\n")
    return str(tmp_path / "impostor")


def editable_from_here():
    out = subprocess.run([sys.executable, "-c", "import densecl_fast, os; print(os.path.realpath(densecl_fast.__file__))"],
                         cwd="/", capture_output=True, text=True)
    return out.returncode == 0 and under(out.stdout.strip(), ROOT)


@pytest.mark.skipif(not editable_from_here(), reason="this checkout is not the pip install -e one")
def test_editable_install_outside_the_repository(tmp_path, impostor):
    r = probe(str(tmp_path), [impostor])
    assert under(r["package"], ROOT) and under(r["ours"], OURS)
    assert under(r["other"], impostor)


def test_source_tree_from_the_repository_root(impostor):
    """Run from the checkout (how tests, launch/ and perf/ run): the sibling kernels/ folder is ours
    even when another `kernels` comes first on the path."""
    r = probe(ROOT, [impostor])
    assert under(r["ours"], OURS)  # (a bare `import kernels` there finds the folder itself: '' is first on sys.path)


def test_source_checkout_without_install(impostor):
    """No install at all (python run from the checkout): densecl_fast maps the sibling folder itself."""
    r = probe(ROOT, [impostor], installed=False)
    assert under(r["package"], ROOT) and under(r["ours"], OURS)


def test_the_pypi_kernels_package_beside_ours(tmp_path):
    """CI installs the PyPI `kernels` (the dev extra); the whole suite runs beside it."""
    r = probe(str(tmp_path))
    if r["other"] is None:
        pytest.skip("the PyPI kernels package is not installed (pip install -e .[dev] brings it)")
    assert not under(r["other"], OURS), "`import kernels` should be the PyPI package, not our folder"
    assert under(r["ours"], OURS) or under(r["ours"], os.path.dirname(r["package"]))


def source_copy(tmp_path):
    """What pip builds, copied: pip builds in the source folder and would leave build/ in the checkout."""
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    src.mkdir()
    for name in ("pyproject.toml", "setup.py"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    for folder in ("densecl_fast", "kernels"):
        shutil.copytree(os.path.join(ROOT, folder), src / folder, ignore=ignore)
    return src


def pip_install_target(src, target, *options):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # pip's own sys.path is the point
    return subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *options,
                           "--target", str(target), str(src)], capture_output=True, text=True, timeout=600,
                          cwd=str(src.parent), env=env)


def check_installed(src, target):
    """Every package of the source tree is installed, ours as densecl_fast.kernels, none as `kernels`."""
    assert (target / "densecl_fast" / "kernels" / "queue_infonce_triton.py").is_file()
    assert not (target / "kernels").exists(), "no top-level `kernels` may be installed"
    for init in (src / "densecl_fast").rglob("__init__.py"):
        assert (target / init.relative_to(src)).is_file(), init
    assert (target / "densecl_fast" / "configs" / "smoke.yaml").is_file()


@pytest.mark.slow
def test_normal_install(tmp_path, impostor):
    """pip install (not editable) into a folder: densecl_fast/kernels is a real sub-package there,
    used from anywhere; from the repository root the source tree wins, with its own kernels."""
    src, target = source_copy(tmp_path), tmp_path / "site"
    build = pip_install_target(src, target)  # pip's default: an isolated PEP 517 build (pyproject.toml)
    assert build.returncode == 0, build.stderr[-3000:]
    check_installed(src, target)
    r = probe(str(tmp_path), [str(target), impostor])
    assert under(r["package"], target) and under(r["ours"], target / "densecl_fast" / "kernels")
    assert under(r["other"], impostor)
    r = probe(ROOT, [str(target), impostor])
    assert under(r["ours"], OURS)


def _setuptools_major():
    from importlib.metadata import PackageNotFoundError, version
    try:
        return int(version("setuptools").split(".")[0])
    except (PackageNotFoundError, ValueError):
        return 0


@pytest.mark.skipif(_setuptools_major() < 64, reason="needs setuptools >= 64 here (pyproject.toml's build requirement)")
def test_build_without_isolation_beside_the_pypi_kernels(tmp_path):
    """A build in this environment, where the PyPI `kernels` (the dev extra) registers an egg_info
    plugin: the legacy setup.py path (pip 23's choice without pyproject.toml when `wheel` is
    installed, or --no-build-isolation) put the source root on sys.path, so the plugin's
    `kernels._internals` was looked for in our kernels/ folder and the install failed."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    found = subprocess.run([sys.executable, "-c", "import importlib.util as u; s = u.find_spec('kernels'); "
                            "print(s.origin if s else '')"], cwd=str(tmp_path), env=env, capture_output=True, text=True)
    if not found.stdout.strip() or under(found.stdout.strip(), OURS):
        pytest.skip("the PyPI kernels package is not installed (pip install -e .[dev] brings it)")
    src, target = source_copy(tmp_path), tmp_path / "site"
    build = pip_install_target(src, target, "--no-build-isolation")
    assert build.returncode == 0, build.stderr[-3000:]
    check_installed(src, target)


# ---- a wheel installed into a fresh environment, used outside the checkout -------------------------

SCRIPTS = ("densecl-pretrain", "densecl-reproduce", "densecl-eval", "densecl-export")

# Run by the fresh environment's interpreter, in a folder outside the checkout: the two ways the
# reproduction starts the pretraining CLI as a child, two steps each. The probe's (this interpreter,
# no launcher) trains with train.engine=deepspeed, whose default JSON is package data; a run with
# --nproc > 1 starts torchrun (here over one rank, the one-process scaling probe's form).
CHILDREN = textwrap.dedent("""
    import argparse, json, os, subprocess, sys
    import densecl_fast
    from densecl_fast.reproduce.probe import probe_command
    from densecl_fast.reproduce.runs import child_env, run_training
    tiny = json.loads(sys.argv[1])
    out = {"package": os.path.realpath(densecl_fast.__file__)}
    cmd = probe_command(argparse.Namespace(config="smoke", nproc=1),
                        tiny + ["train.engine=deepspeed", "train.out_dir=ds"], 1)
    child = subprocess.run(cmd, env=child_env(), capture_output=True, text=True)
    out["probe_child"] = {"cmd": cmd, "rc": child.returncode, "log": child.stdout + child.stderr}
    sys.stdout.flush()
    out["torchrun_child"] = run_training(argparse.Namespace(config="smoke", nproc=2), tiny + ["train.out_dir=tr"], 1)
    print(json.dumps(out))
""")


def site_dirs():
    """The test environment's site-packages folders (also those a .pth file of it adds)."""
    return [p for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages") and os.path.isdir(p)]


@pytest.mark.slow
def test_wheel_installed_outside_the_checkout_trains_and_starts_children(tmp_path, data_cache):
    """`pip install` of the wheel (no launch/ folder, no source tree): the console scripts exist, the
    DeepSpeed engine finds its default config, and the reproduction's pretraining children start."""
    from helpers import tiny
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    src, dist = source_copy(tmp_path), tmp_path / "dist"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(dist), str(src)], capture_output=True, text=True, timeout=300,
                           cwd=str(tmp_path), env=env)
    assert build.returncode == 0, build.stderr[-3000:]
    # every folder the wheel ships is a listed package: setuptools warns a user about the others
    assert "Package would be ignored" not in build.stdout + build.stderr, build.stderr[-3000:]
    (wheel,) = dist.glob("densecl_fast-*.whl")

    # A fresh environment that reuses this one's packages: path lines in a .pth add the folders
    # without running their own .pth files, so this environment's editable densecl_fast stays out.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py, bin_dir = str(venv / "bin" / "python"), venv / "bin"
    purelib = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(purelib, "_test_environment.pth"), "w") as f:
        f.write("\n".join(site_dirs()) + "\n")
    # --ignore-installed: pip sees this environment's densecl_fast through the .pth and must not touch it
    install = subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed",
                              str(wheel)], capture_output=True, text=True, timeout=300, cwd=str(tmp_path), env=env)
    assert install.returncode == 0, install.stderr[-3000:]
    for name in SCRIPTS:
        assert (bin_dir / name).is_file(), f"no console script {name}"
    assert (Path(purelib) / "densecl_fast" / "engines" / "ds_configs" / "ds_zero1.json").is_file()

    work = tmp_path / "elsewhere"
    work.mkdir()
    run_env = dict(env, PATH=str(bin_dir) + os.pathsep + env.get("PATH", ""), OMP_NUM_THREADS="1")
    overrides = [o for o in tiny("unused", data_cache, "optim.max_steps=2") if not o.startswith("train.out_dir=")]
    r = subprocess.run([py, "-c", CHILDREN, json.dumps(overrides)], cwd=str(work), env=run_env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert under(res["package"], purelib), f"the checkout was imported, not the wheel: {res['package']}"
    probe_child = res["probe_child"]
    assert probe_child["rc"] == 0, probe_child["log"][-4000:]
    assert "engine deepspeed (ZeRO-1, 1 rank" in probe_child["log"]
    assert "densecl_fast.pretrain" in probe_child["cmd"] and not any(c.endswith(".py") for c in probe_child["cmd"])
    assert res["torchrun_child"]["status"] == "finished" and res["torchrun_child"]["step"] == 2, res
    assert any((work / "ds" / "checkpoints").iterdir()) and (work / "tr" / "metrics.jsonl").is_file()


def test_children_of_a_checkout_find_its_package(monkeypatch):
    """A checkout run without install (launch/reproduce.py puts it on its own sys.path only): the
    reproduction's `python -m densecl_fast.pretrain` children get it on PYTHONPATH; an install's
    site-packages is left to the interpreter."""
    from densecl_fast.reproduce import runs
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    monkeypatch.setattr(runs, "PACKAGE_ROOT", ROOT)
    assert runs.child_env()["PYTHONPATH"].split(os.pathsep) == [ROOT, "/elsewhere"]
    monkeypatch.setattr(runs, "PACKAGE_ROOT", site.getsitepackages()[0])
    assert runs.child_env()["PYTHONPATH"] == "/elsewhere"
    assert runs.pretrain_command("smoke", ["a=1"], 2)[-5:] == ["-m", "densecl_fast.pretrain", "--config", "smoke", "a=1"]
