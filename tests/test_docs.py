"""The manual agrees with the code: every config key is in docs/config.md with its default, every
command of README.md's and docs/'s command blocks names an entry point whose `--help` works and
options and keys that exist, and every relative link points to a file (and heading) that exists."""
import dataclasses
import os
import re
import shlex
import subprocess
import sys

import pytest

from densecl_fast.config import Config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
DOCS = os.path.join(ROOT, "docs")
CONFIG_MD = os.path.join(DOCS, "config.md")
# Packages of this repository: `python -m X` with X in one of them is one of our entry points.
OUR_PACKAGES = ("densecl_fast", "perf", "kernels")
# Entry points with sub-commands: the sub-command is part of what --help is asked of.
SUBCOMMANDS = {"-m densecl_fast.eval", "densecl-eval"}


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def console_scripts():
    """{command: "module:function"} of pyproject.toml's [project.scripts] (the commands of an install)."""
    section = re.search(r"^\[project\.scripts\]\n(.*?)(?=^\[|\Z)", _read(os.path.join(ROOT, "pyproject.toml")),
                        flags=re.S | re.M)
    return dict(re.findall(r'^([\w-]+)\s*=\s*"([\w.]+:\w+)"', section.group(1), flags=re.M)) if section else {}


SCRIPTS = console_scripts()


def _doc_files():
    return [README] + sorted(os.path.join(DOCS, f) for f in os.listdir(DOCS) if f.endswith(".md"))


# ---------------------------------------------------------------- config keys and their defaults

def config_defaults(cls=Config, prefix=""):
    """{dotted key: default} of every leaf of the config dataclasses (nested sections walked)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            value = f.default
        else:
            value = f.default_factory()
        if dataclasses.is_dataclass(value):
            out.update(config_defaults(type(value), prefix + f.name + "."))
        else:
            out[prefix + f.name] = value
    return out


def documented_keys():
    """{key: default cell} of the rows of docs/config.md's tables whose first cell is one backticked key."""
    rows = {}
    for line in _read(CONFIG_MD).splitlines():
        m = re.match(r"^\|\s*`([A-Za-z_][\w.]*)`\s*\|([^|]*)\|", line)
        if m:
            rows[m.group(1)] = m.group(2).strip()
    return rows


def default_matches(cell, value):
    """The documented default (the cell's first word: '67108864 (64 MiB)' -> '67108864') is the value."""
    word = cell.split(" (")[0].strip().strip("`")
    if value is None:
        return word == "null"
    if isinstance(value, bool):
        return word == str(value).lower()
    if isinstance(value, (int, float)):
        try:
            return float(word) == float(value)
        except ValueError:
            return False
    if value == "":
        return word in ('""', "''")
    return word == str(value)


def test_config_defaults_walks_nested_sections():
    keys = config_defaults()
    assert keys["data.dali.decoder"] == "auto" and keys["model.arch"] and "data.dali" not in keys
    assert default_matches("67108864 (64 MiB)", 64 << 20) and not default_matches("1e-3", 1e-4)
    assert default_matches('""', "") and default_matches("null", None) and not default_matches("true", False)


def test_every_config_key_is_documented_with_its_default():
    documented = documented_keys()
    problems = []
    for key, value in config_defaults().items():
        if key not in documented:
            problems.append(f"{key} (default {value!r}) is missing from docs/config.md")
        elif not default_matches(documented[key], value):
            problems.append(f"{key}: docs/config.md says default {documented[key]!r}, the code has {value!r}")
    assert not problems, "docs/config.md is out of date:\n  " + "\n  ".join(problems)


def test_docs_config_lists_no_key_the_code_lacks():
    known = config_defaults()
    stale = [k for k in documented_keys() if "." in k and k not in known]
    assert not stale, f"docs/config.md documents keys densecl_fast/config.py does not have: {stale}"


# ---------------------------------------------------------------- commands of the command blocks

def command_lines(path):
    """The commands of a file's ```bash blocks: comments dropped, `\\` continuations joined, `&&` split."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", _read(path), flags=re.S):
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            try:
                tokens = shlex.split(line, comments=True)
            except ValueError as e:
                raise AssertionError(f"{os.path.relpath(path, ROOT)}: cannot split {line!r}: {e}")
            part = []
            for tok in tokens + ["&&"]:
                if tok in ("&&", "||", ";"):
                    if part:
                        commands.append(part)
                    part = []
                else:
                    part.append(tok)
    return commands


def entry_point(tokens):
    """(entry, args) of one of our entry points, e.g. ('-m densecl_fast.eval knn', [...]) or
    ('launch/pretrain.py', [...]); None for other programs (pip, pytest, ...)."""
    while tokens and re.match(r"^[A-Z_][A-Z0-9_]*=", tokens[0]):  # VAR=value prefixes
        tokens = tokens[1:]
    if not tokens:
        return None
    prog = os.path.basename(tokens[0])
    if prog in SCRIPTS:
        entry, args = prog, tokens[1:]
        if entry in SUBCOMMANDS and args and not args[0].startswith("-"):
            entry, args = f"{entry} {args[0]}", args[1:]
        return entry, args
    if prog in ("torchrun", "deepspeed"):
        modules = [i for i, t in enumerate(tokens) if t in ("-m", "--module")]
        if modules and len(tokens) > modules[0] + 1:  # torchrun -m MODULE / deepspeed --module MODULE
            i = modules[0] + 1
            return (f"-m {tokens[i]}", tokens[i + 1:]) if tokens[i].split(".")[0] in OUR_PACKAGES else None
        scripts = [i for i, t in enumerate(tokens) if t.endswith(".py")]
        if not scripts:
            return None
        i = scripts[0]
        return tokens[i], tokens[i + 1:]
    if not re.match(r"^python(3(\.\d+)?)?$", prog) or len(tokens) < 2:
        return None
    if tokens[1] == "-m":
        module = tokens[2]
        if module.split(".")[0] not in OUR_PACKAGES:
            return None
        entry, args = f"-m {module}", tokens[3:]
        if entry in SUBCOMMANDS and args and not args[0].startswith("-"):
            entry, args = f"{entry} {args[0]}", args[1:]
        return entry, args
    if tokens[1].endswith(".py"):
        return tokens[1], tokens[2:]
    return None


def collect_entries():
    """{entry: [(file, args), ...]} over README.md and docs/*.md."""
    entries = {}
    for path in _doc_files():
        for tokens in command_lines(path):
            found = entry_point(tokens)
            if found:
                entries.setdefault(found[0], []).append((os.path.relpath(path, ROOT), found[1]))
    return entries


ENTRIES = collect_entries()
README_ENTRIES = {e for e, uses in ENTRIES.items() if any(f == "README.md" for f, _ in uses)}


def test_readme_names_the_main_entry_points():
    for entry in ("launch/pretrain.py", "-m densecl_fast.export", "launch/reproduce.py", "-m perf"):
        assert entry in README_ENTRIES, f"README.md's command blocks lost {entry}"
    assert any(e.startswith("-m densecl_fast.eval ") for e in README_ENTRIES)
    assert entry_point(["torchrun", "--nproc_per_node", "8", "launch/pretrain.py", "a=1"]) == \
        ("launch/pretrain.py", ["a=1"])
    assert entry_point(["python", "-m", "densecl_fast.eval", "knn", "--k", "20"]) == \
        ("-m densecl_fast.eval knn", ["--k", "20"])
    assert entry_point(["pip", "install", "-e", "."]) is None
    assert entry_point(["densecl-eval", "knn", "--k", "20"]) == ("densecl-eval knn", ["--k", "20"])
    assert entry_point(["torchrun", "--nproc_per_node", "8", "-m", "densecl_fast.pretrain", "a=1"]) == \
        ("-m densecl_fast.pretrain", ["a=1"])
    assert entry_point(["deepspeed", "--module", "densecl_fast.pretrain", "a=1"]) == ("-m densecl_fast.pretrain", ["a=1"])


def test_every_console_script_is_documented():
    """The installed commands are in README.md's command blocks and docs/install.md's."""
    assert set(SCRIPTS) >= {"densecl-pretrain", "densecl-reproduce", "densecl-eval", "densecl-export"}, SCRIPTS
    install_md = {e.split()[0] for e, uses in ENTRIES.items() if any(f == "docs/install.md" for f, _ in uses)}
    for name in SCRIPTS:
        assert name in {e.split()[0] for e in README_ENTRIES}, f"README.md's command blocks lack {name}"
        assert name in install_md, f"docs/install.md's command blocks lack {name}"


def test_readme_keeps_the_test_command():
    # .ci/run and CI run exactly this command from README.md.
    assert "```bash\npython -m pytest -q\n```" in _read(README)


@pytest.mark.parametrize("entry", sorted(ENTRIES))
def test_documented_command_parses(entry):
    """`--help` of the entry point exits 0, and every --option and section.key=value the docs pass it exists."""
    uses = ENTRIES[entry]
    where = ", ".join(sorted({f for f, _ in uses}))
    if entry.split()[0] in SCRIPTS:  # what the installed script runs: its function, with its name as argv[0]
        name, rest = entry.split()[0], entry.split()[1:]
        module, function = SCRIPTS[name].split(":")
        cmd = [sys.executable, "-c", f"import sys; sys.argv[0] = {name!r}; from {module} import {function}; "
               f"sys.exit({function}())", *rest]
    else:
        if not entry.startswith("-m "):
            script = entry.split()[0]
            assert os.path.isfile(os.path.join(ROOT, script)), f"{where}: {script} does not exist"
        cmd = [sys.executable, *entry.split()]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([*cmd, "--help"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (f"`python {entry} --help` (used in {where}) exited {proc.returncode}:\n"
                                  f"{proc.stderr[-2000:]}")
    help_text = proc.stdout
    keys = config_defaults()
    problems = []
    for path, args in uses:
        for arg in args:
            if arg.startswith("--") and len(arg) > 2:
                option = arg.split("=", 1)[0]
                if not re.search(re.escape(option) + r"(?![\w-])", help_text):
                    problems.append(f"{path}: option {option} is not in `python {entry} --help`")
            m = re.match(r"^((model|data|optim|train|deepspeed)\.[\w.]+)=", arg)
            if m and m.group(1) not in keys:
                problems.append(f"{path}: {m.group(1)} is not a config key (densecl_fast/config.py)")
    assert not problems, f"`{entry}` commands in the docs are stale:\n  " + "\n  ".join(problems)


# ---------------------------------------------------------------- relative links

def github_anchor(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped (not - and _), spaces to -."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path):
    text = re.sub(r"```.*?```", "", _read(path), flags=re.S)
    return {github_anchor(m) for m in re.findall(r"^#+\s+(.*)$", text, flags=re.M)}


def test_relative_links_point_to_existing_files_and_headings():
    broken = []
    for path in _doc_files():
        text = re.sub(r"```.*?```", "", _read(path), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+:", target):
                continue  # https:, mailto:
            file_part, _, anchor = target.partition("#")
            dest = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
            rel = os.path.relpath(path, ROOT)
            if not os.path.exists(dest):
                broken.append(f"{rel}: link {target} -> {os.path.relpath(dest, ROOT)} does not exist")
            elif anchor and dest.endswith(".md") and anchor not in anchors(dest):
                broken.append(f"{rel}: link {target}: no heading #{anchor} in {os.path.relpath(dest, ROOT)}")
    assert not broken, "broken links:\n  " + "\n  ".join(broken)
