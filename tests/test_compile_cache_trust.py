"""A compile artifact is code, so only this user's own signed artifacts are loaded.

The crafted artifacts are built with torch's own cache-artifact format (CacheArtifactFactory +
AppendingByteSerializer, what torch.compiler.save_cache_artifacts writes): (a) an `autotune` entry
whose key is an absolute path (torch writes its content there while loading), (b) inductor /
AOTAutograd entries whose content is a pickle that runs `exec` when inductor unpickles it. The
tests first show that torch's own `load_cache_artifacts` does write (a) and, in the end-to-end
test, that a compile after it does run (b); then that CompileCache writes and runs nothing, with
one warning per artifact and a cold compile, from both folders it reads (the run's checkpoints/
and data.cache_dir/compile/), while a legitimately saved artifact still warm-starts.
"""
import json
import os
import pickle
import stat
import subprocess
import sys

import pytest
import torch
from torch.compiler._cache import CacheArtifactFactory, CacheArtifactManager, _serialize_single_cache
from torch.utils._appending_byte_serializer import AppendingByteSerializer

from densecl_fast import signing
from densecl_fast.config import load_config
from densecl_fast.engines.compiling import CompileCache, CompileSettings
from helpers import ROOT


class Payload:
    """Unpickling this runs `exec` (only `builtins.exec` is named in the pickle)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('code from a compile artifact ran')",)


def serialize(entries: dict) -> bytes:
    """{artifact type: [(key, content bytes)]} in torch's cache-artifact format."""
    CacheArtifactManager._ensure_cache_artifacts_registered()   # what torch's own loader does first
    s = AppendingByteSerializer(serialize_fn=_serialize_single_cache)
    s.extend((t, [CacheArtifactFactory.create(t, k, c) for k, c in items]) for t, items in entries.items())
    return s.to_bytes()


def crafted(target, marker, graph_keys=None) -> bytes:
    """An artifact whose autotune entry writes `target` and whose graph entries run a payload that
    writes `marker`. `graph_keys`: {type: [keys]} of a real compile (so that compiling the same
    graph looks the payload up); default: made-up keys."""
    graph_keys = graph_keys or {"inductor": ["fevilkey0000"], "aot_autograd": ["aevilkey0000"]}
    bomb = pickle.dumps(Payload(str(marker)))
    entries = {t: [(k, bomb) for k in keys] for t, keys in graph_keys.items()}
    entries["autotune"] = [(str(target), b"written by a compile artifact")]
    return serialize(entries)


def files_under(folder) -> list:
    return [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs]


@pytest.fixture
def inductor_dir(tmp_path, monkeypatch):
    """An empty inductor cache folder of this test: what a load puts there, a compile would unpickle."""
    d = tmp_path / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(d))
    return d


def run_cache(tmp_path, warn):
    """The CompileCache a training run builds (CompileCache.for_run): checkpoints/ first, then
    data.cache_dir/compile/."""
    cfg = load_config("smoke", [f"data.cache_dir={tmp_path / 'cache'}"])
    return CompileCache.for_run(cfg, torch.device("cpu"), "fp32", 4, CompileSettings(), "reference",
                                str(tmp_path / "run" / "checkpoints"), warn=warn)


def test_torch_loader_unprotected_writes_the_autotune_path_and_stores_the_payload(tmp_path, inductor_dir):
    """What the fix protects against, with torch's own loader (no CompileCache)."""
    target, marker = tmp_path / "elsewhere" / "target.txt", tmp_path / "marker"
    info = torch.compiler.load_cache_artifacts(crafted(target, marker))
    assert info is not None and info.autotune_artifacts == [str(target)]
    assert target.read_bytes() == b"written by a compile artifact"   # at load time, outside inductor's folder
    # the payload now sits in inductor's cache, to be unpickled by the next compile of that key
    stored = [p for p in files_under(inductor_dir) if open(p, "rb").read() == pickle.dumps(Payload(str(marker)))]
    assert len(stored) == 2, files_under(inductor_dir)
    assert not marker.exists()   # nothing compiled here: the end-to-end test shows it runs


@pytest.mark.parametrize("folder", [0, 1], ids=["checkpoints", "cache_dir_compile"])
@pytest.mark.parametrize("how", ["unsigned", "foreign_key", "signature_of_other_bytes"])
def test_a_crafted_artifact_writes_nothing_runs_nothing_one_warning(tmp_path, inductor_dir, folder, how):
    warnings = []
    cache = run_cache(tmp_path, warnings.append)
    path = cache.paths[folder]
    assert path.endswith(os.path.join("run", "checkpoints", f"compile-{cache.key}.bin") if folder == 0
                         else os.path.join("cache", "compile", f"compile-{cache.key}.bin"))
    target, marker = tmp_path / "target.txt", tmp_path / "marker"
    data = crafted(target, marker)
    os.makedirs(os.path.dirname(path))
    with open(path, "wb") as f:
        f.write(data)
    if how == "foreign_key":    # signed, by someone else's key
        with open(path + ".sig", "w") as f:
            f.write(signing.signature(os.urandom(signing.KEY_BYTES), data))
    elif how == "signature_of_other_bytes":   # this user's signature, moved onto other bytes
        with open(path + ".sig", "w") as f:
            f.write(signing.signature(signing.user_key(), b"an artifact this user did write"))
    assert cache.load() is None and cache.loaded_from is None
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"compile cache {path} not loaded") and warnings[0].endswith("compiling cold")
    assert "\n" not in warnings[0]
    assert not target.exists() and not marker.exists()
    assert files_under(inductor_dir) == []   # nothing a later compile could unpickle: it compiles cold


def test_the_signed_bytes_are_what_load_gets(tmp_path, inductor_dir, monkeypatch):
    """A legitimate artifact is handed to torch unchanged; its signature is over exactly those bytes."""
    good = serialize({"autotune": [("ab/legit.best_config", b'{"num_warps": 4}')]})
    cache = CompileCache("k", [str(tmp_path)])
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (good, None))
    assert cache.save() == [str(tmp_path / "compile-k.bin")]
    assert (tmp_path / "compile-k.bin").read_bytes() == good
    assert (tmp_path / "compile-k.bin.sig").read_text().strip() == signing.signature(signing.user_key(), good)
    got, torch_load = [], torch.compiler.load_cache_artifacts
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", lambda b: got.append(b) or torch_load(b))
    fresh = CompileCache("k", [str(tmp_path)])
    assert fresh.load() is not None and fresh.loaded_from == str(tmp_path / "compile-k.bin") and got == [good]
    assert files_under(inductor_dir) == [str(inductor_dir / "ab" / "legit.best_config")]


# ---- the user's key ---------------------------------------------------------------------------------

def test_key_is_created_once_private_and_kept(tmp_path, monkeypatch):
    monkeypatch.delenv(signing.KEY_ENV)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    path = signing.key_path()
    assert path == str(tmp_path / "config" / "densecl_fast" / "signing-key")
    key = signing.user_key()
    assert len(key) == signing.KEY_BYTES
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    signing._create_key(path)   # a second process racing to create it keeps the first one's key
    assert signing.user_key() == key
    assert os.listdir(os.path.dirname(path)) == ["signing-key"]   # no temp file left


def test_a_key_others_can_read_or_someone_else_owns_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "key"
    monkeypatch.setenv(signing.KEY_ENV, str(path))
    key = signing.user_key()
    # an artifact signed with that key, valid as long as the key is
    (tmp_path / "art").mkdir()
    good = serialize({"autotune": [("ab/x.best_config", b"{}")]})
    (tmp_path / "art" / "compile-k.bin").write_bytes(good)
    (tmp_path / "art" / "compile-k.bin.sig").write_text(signing.signature(key, good))
    os.chmod(path, 0o640)
    with pytest.raises(signing.KeyUnusable, match="mode 640"):
        signing.user_key()
    warnings = []
    cache = CompileCache("k", [str(tmp_path / "art")], warn=warnings.append)
    assert cache.load() is None and len(warnings) == 1 and "compile cache off" in warnings[0]
    os.chmod(path, 0o600)
    assert signing.user_key() == key
    with monkeypatch.context() as m:
        m.setattr(os, "getuid", lambda: os.stat(path).st_uid + 1)
        with pytest.raises(signing.KeyUnusable, match="not by this user"):
            signing.user_key()
    path.write_text("not hex\n")
    with pytest.raises(signing.KeyUnusable, match="hex"):
        signing.user_key()


# ---- end to end: real compiles in fresh processes ---------------------------------------------------

CHILD = r"""
import json, sys, torch
from torch._dynamo.utils import counters
from densecl_fast.engines.compiling import CompileCache
mode, folders = sys.argv[1], sys.argv[2:]
f = torch.compile(lambda x: (x.sin() * 2 + 1).sum(1), backend="inductor", dynamic=False, fullgraph=True)
warnings, cache = [], CompileCache("test", folders, warn=lambda m: warnings.append(m))
if mode == "load":
    cache.load()
elif mode == "torch":   # the unprotected loader
    torch.compiler.load_cache_artifacts(open(folders[0], "rb").read())
error = None
try:
    f(torch.randn(4, 4))
except Exception as e:
    error = type(e).__name__
written = cache.save() if mode == "save" else []
print(json.dumps({"loaded_from": cache.loaded_from, "written": written, "warnings": warnings, "error": error,
                  "counters": {k: dict(counters[k]) for k in ("inductor", "aot_autograd")}}))
"""


def _child(tmp_path, tag, mode, *folders):
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"inductor_{tag}"), "PYTHONPATH": ROOT,
           "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", CHILD, mode, *map(str, folders)], capture_output=True, text=True,
                       timeout=600, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _hits(c):
    return c["inductor"].get("fxgraph_cache_hit", 0) + c["aot_autograd"].get("autograd_cache_hit", 0)


@pytest.mark.slow   # two cold inductor compiles and two short runs in fresh processes: ~2 min on two cores
def test_crafted_artifacts_run_under_torch_but_not_here_and_own_artifacts_warm_start(tmp_path):
    own = tmp_path / "own"
    cold = _child(tmp_path, "a", "save", own)
    legit = own / "compile-test.bin"
    assert cold["written"] == [str(legit)] and (own / "compile-test.bin.sig").exists()
    assert cold["counters"]["inductor"].get("fxgraph_cache_miss", 0) >= 1 and _hits(cold["counters"]) == 0

    # A fresh process with an empty inductor cache loads its own signed artifact: every graph is a hit.
    warm = _child(tmp_path, "b", "load", own)
    assert warm["loaded_from"] == str(legit) and warm["warnings"] == [] and warm["error"] is None
    assert warm["counters"]["inductor"].get("fxgraph_cache_miss", 0) == 0 and _hits(warm["counters"]) >= 1

    # The attack: the same graph keys (a compile of the same code looks them up), a payload as content.
    keys = {t: [a.key for a in arts] for t, arts in CacheArtifactManager.deserialize(legit.read_bytes()).items()}
    target, marker = tmp_path / "target.txt", tmp_path / "marker"
    evil = crafted(target, marker, keys)

    # torch's own loader: the autotune path is written while loading, the payload runs at the compile.
    (tmp_path / "evil.bin").write_bytes(evil)
    _child(tmp_path, "c", "torch", tmp_path / "evil.bin")
    assert target.exists() and marker.read_text() == "code from a compile artifact ran"
    target.unlink()
    marker.unlink()

    # CompileCache, with the artifact in a handed-over run's checkpoints/ (unsigned) and in the shared
    # data.cache_dir/compile/ (signed with another user's key): nothing written, nothing run, cold.
    ckpt, shared = tmp_path / "run" / "checkpoints", tmp_path / "cache" / "compile"
    for folder in (ckpt, shared):
        folder.mkdir(parents=True)
        (folder / "compile-test.bin").write_bytes(evil)
    (shared / "compile-test.bin.sig").write_text(signing.signature(os.urandom(signing.KEY_BYTES), evil))
    guarded = _child(tmp_path, "d", "load", ckpt, shared)
    assert guarded["loaded_from"] is None and guarded["error"] is None
    assert [w.split(" not loaded")[0] for w in guarded["warnings"]] == [
        f"compile cache {ckpt / 'compile-test.bin'}", f"compile cache {shared / 'compile-test.bin'}"]
    assert not target.exists() and not marker.exists()
    assert guarded["counters"]["inductor"].get("fxgraph_cache_miss", 0) >= 1 and _hits(guarded["counters"]) == 0
