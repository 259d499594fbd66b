"""data/cache.py: the temporary folders of generations that died are cleaned up, those of live ones kept."""
import os


def test_a_killed_generation_leaves_no_temp_folder_behind(tmp_path):
    """A generation killed midway left its temp folder forever. The next generation in
    the same cache removes the temp folders of dead processes, never those of a running one."""
    import subprocess
    import sys
    from densecl_fast.data import cache
    final = str(tmp_path / "set-a")
    killed = ("import os, sys; from densecl_fast.data.cache import build_once\n"
              "def build(tmp):\n"
              "    open(os.path.join(tmp, 'half'), 'w').close()\n"
              "    os._exit(9)\n"
              "build_once(sys.argv[1], build, 'test set', sys.argv[2])\n")
    r = subprocess.run([sys.executable, "-c", killed, final, str(tmp_path)], cwd=os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))))
    assert r.returncode == 9
    left = [n for n in os.listdir(tmp_path) if ".tmp-" in n]
    assert len(left) == 1 and os.path.isfile(os.path.join(tmp_path, left[0], "half"))
    assert left[0].startswith(f".set-a.tmp-{cache._host()}-")
    # Kept: a generation running here (pid alive), one whose lock is held (e.g. from another pid
    # namespace under the same host name: its pid means nothing here), a fresh one of another host, an
    # old locked one of another host, a fresh one of the code before the pid was in the name, and a
    # user's folder that only looks alike. Removed: the killed one, an old unlocked one of another
    # host, a day-old one of the code before.
    host = cache._host()
    dead_pid = left[0].split("-")[-2]
    running = tmp_path / f".set-b.tmp-{host}-{os.getpid()}-abc123"
    locked = tmp_path / f".set-h.tmp-{host}-{dead_pid}-abc123"
    other, other_locked = tmp_path / f".set-c.tmp-{host}x-{dead_pid}-abc123", tmp_path / f".set-i.tmp-{host}x-1-abc"
    other_old = tmp_path / f".set-j.tmp-{host}x-{dead_pid}-abc123"
    old_legacy, new_legacy, mine = tmp_path / ".set-d.tmp-k2j4_x9q", tmp_path / ".set-e.tmp-p0o9i8u7", tmp_path / "set-f.tmp-1"
    for d in (running, locked, other, other_locked, other_old, old_legacy, new_legacy, mine):
        d.mkdir()
    for d, age in ((old_legacy, cache.LEGACY_TEMP_AGE_S), (other_old, cache.OTHER_HOST_TEMP_AGE_S),
                   (other_locked, cache.OTHER_HOST_TEMP_AGE_S)):
        t = os.path.getmtime(d) - age - 60
        os.utime(d, (t, t))
    holders = [cache._lock(str(d)) for d in (locked, other_locked)]
    assert [state for _, state in holders] == ["free", "free"]

    def build(tmp):
        open(os.path.join(tmp, cache.MARKER), "w").close()
    try:
        assert cache.build_once(str(tmp_path / "set-g"), build, "test set", str(tmp_path)) == str(tmp_path / "set-g")
    finally:
        for fd, _ in holders:
            os.close(fd)
    kept = (running, locked, other, other_locked, new_legacy, mine)
    assert sorted(os.listdir(tmp_path)) == sorted([p.name for p in kept] + ["set-g"])
    assert not os.path.exists(final)  # the killed set is generated again on its next use, from scratch
    assert cache.build_once(final, build, "test set", str(tmp_path)) == final and cache.is_complete(final)
