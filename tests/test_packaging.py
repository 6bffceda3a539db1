"""Packaging: the version, its place in checkpoints, and a wheel that works without the checkout.

The wheel test runs `make dist` (sdist + wheel + `twine check --strict`), checks what the wheel
holds, installs it into a fresh virtual environment outside the checkout (the dependencies come
from the test's own environment through a .pth file, so nothing is downloaded) and runs the
quickstart there on the local backend.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tomllib
import zipfile

import msgpack
import pytest
import torch

import actorgrad as ag
from actorgrad import checkpoint as ck
from actorgrad import errors as E
from actorgrad.__main__ import main as cli_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "actorgrad")


def _version_file() -> str:
    with open(os.path.join(PACKAGE, "_version.py")) as f:
        m = re.search(r'^__version__ = "([^"]+)"$', f.read(), re.M)
    assert m, "actorgrad/_version.py must assign __version__ a plain string (pyproject.toml reads it)"
    return m.group(1)


def test_version_has_one_source():
    assert ag.__version__ == _version_file()
    assert re.fullmatch(r"\d+\.\d+\.\d+([ab]|rc|\.dev|\.post)?\d*", ag.__version__), ag.__version__
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        pyproject = tomllib.load(f)
    assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "actorgrad._version.__version__"}


def test_version_on_the_command_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"actorgrad {ag.__version__}"


# --- checkpoints -------------------------------------------------------------------------


def _entries():
    return [("enc", "torch.nn.modules.linear.Linear", {"update": "sum"}, {"module": {"w": torch.ones(2)}})]


def test_checkpoint_records_the_version(tmp_path):
    ck.write_checkpoint(str(tmp_path / "c"), 3, _entries())
    meta = ck.read_meta(str(tmp_path / "c"))
    assert meta["actorgrad_version"] == ag.__version__
    assert meta["version"] == ck.FORMAT_VERSION


def test_another_version_with_the_same_format_loads_and_says_so(local, tmp_path, monkeypatch, caplog):
    path = str(tmp_path / "c")
    torch.manual_seed(0)
    lin = ag.spawn(torch.nn.Linear(3, 1), name="lin", optimizer=ag.Optim(torch.optim.SGD, lr=0.1))
    want = {k: v.clone() for k, v in lin.state_dict().items()}
    monkeypatch.setattr(ck, "__version__", "0.0.1")  # as if an older actorgrad wrote it
    ag.save(path)
    monkeypatch.undo()
    assert ck.read_meta(path)["actorgrad_version"] == "0.0.1"
    lin.load_state_dict({k: torch.zeros_like(v) for k, v in want.items()})

    with caplog.at_level(logging.WARNING, logger="actorgrad.checkpoint"):
        ag.load(path)
    warned = [r.getMessage() for r in caplog.records if r.name == "actorgrad.checkpoint"]
    assert any("actorgrad 0.0.1" in m and f"actorgrad {ag.__version__}" in m for m in warned), warned
    for k, v in lin.state_dict().items():
        torch.testing.assert_close(v, want[k])


def test_same_version_loads_quietly(tmp_path, caplog):
    ck.write_checkpoint(str(tmp_path / "c"), 1, _entries())
    with caplog.at_level(logging.INFO, logger="actorgrad.checkpoint"):
        ck.read_checkpoint(str(tmp_path / "c"))
    assert not [r for r in caplog.records if r.name == "actorgrad.checkpoint" and r.levelno >= logging.INFO]


def test_a_checkpoint_that_names_no_version_still_reads(tmp_path, caplog):
    path = tmp_path / "c"
    ck.write_checkpoint(str(path), 1, _entries())
    meta_file = path / (path / "LATEST").read_text().strip() / "meta.msgpack"
    meta = msgpack.unpackb(meta_file.read_bytes())
    del meta["actorgrad_version"]  # as written before checkpoints recorded it
    meta_file.write_bytes(msgpack.packb(meta))
    with caplog.at_level(logging.INFO, logger="actorgrad.checkpoint"):
        assert ck.read_checkpoint(str(path))[0]["step"] == 1
    assert any("does not record" in r.getMessage() for r in caplog.records), caplog.records


def test_another_format_version_is_refused_naming_both(tmp_path, monkeypatch):
    monkeypatch.setattr(ck, "__version__", "9.0.0")
    monkeypatch.setattr(ck, "FORMAT_VERSION", ck.FORMAT_VERSION + 1)
    ck.write_checkpoint(str(tmp_path / "c"), 1, _entries())
    monkeypatch.undo()
    with pytest.raises(E.CheckpointError) as err:
        ck.read_meta(str(tmp_path / "c"))
    msg = str(err.value)
    assert f"format version {ck.FORMAT_VERSION + 1}" in msg and "actorgrad 9.0.0" in msg, msg
    assert f"reads format version {ck.FORMAT_VERSION} only" in msg, msg


# --- the wheel -----------------------------------------------------------------------------


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)
    assert out.returncode == 0, f"{cmd} exited with {out.returncode}:\n{out.stdout}\n{out.stderr}"
    return out


def _clean_env(**extra: str) -> dict[str, str]:
    """This environment, minus what would let a child find the checkout or the test venv's packages."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "PYTHONSAFEPATH")}
    env.update(extra)
    return env


def _source_files() -> set[str]:
    """What the wheel must hold of the package: every module and py.typed, by path in the wheel."""
    found = set()
    for d, dirs, files in os.walk(PACKAGE):
        dirs[:] = [x for x in dirs if x != "__pycache__"]
        for f in files:
            if f.endswith(".py") or f == "py.typed":
                found.add(os.path.relpath(os.path.join(d, f), REPO).replace(os.sep, "/"))
    return found


def test_make_dist_builds_a_wheel_that_works_without_the_checkout(tmp_path):
    make = shutil.which("make")
    assert make, "make is needed (CI runs `make test`)"
    version = ag.__version__
    dist = tmp_path / "dist"
    venv_dir = os.path.dirname(os.path.dirname(sys.executable))
    # -o: the install step is make test's business; this test must not reinstall the test venv.
    # Without the MAKEFLAGS of an enclosing `make -j test`: its jobserver is not passed on, and make would warn.
    made = _run([make, "--no-print-directory", "-o", os.path.join(venv_dir, ".installed"), "dist",
                 f"DIST={dist}", f"VENV={venv_dir}"], cwd=REPO,
                env={k: v for k, v in _clean_env().items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")})
    output = made.stdout + made.stderr
    assert not re.search(r"warn|deprecat", output, re.I), output
    assert len(re.findall(r"PASSED", output)) == 2, output

    wheel = dist / f"actorgrad-{version}-py3-none-any.whl"
    sdist = dist / f"actorgrad-{version}.tar.gz"
    assert sorted(os.listdir(dist)) == sorted([wheel.name, sdist.name])

    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        metadata = z.read(f"actorgrad-{version}.dist-info/METADATA").decode()
    missing = _source_files() - names
    assert not missing, f"the wheel lacks {sorted(missing)}"
    assert f"actorgrad-{version}.dist-info/licenses/LICENSE" in names
    assert not {n.split("/")[0] for n in names} - {"actorgrad", f"actorgrad-{version}.dist-info"}, sorted(names)
    for field in (f"Version: {version}", "License-Expression: Apache-2.0", "License-File: LICENSE",
                  "Requires-Python: >=3.11", "Classifier: Typing :: Typed"):
        assert f"\n{field}\n" in metadata, field
    assert "License :: " not in metadata  # a license classifier beside License-Expression is an error
    with tarfile.open(sdist) as t:
        in_sdist = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    assert {"LICENSE", "README.md", "pyproject.toml", "actorgrad/_version.py", "actorgrad/py.typed"} <= in_sdist

    # A fresh venv outside the checkout; torch, Ray and the rest through a .pth, added after the
    # install so that pip sees no actorgrad there. A .pth line adds a directory but does not run
    # the .pth files in it, so the test venv's editable install of the checkout stays out.
    fresh = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(fresh)])
    py = str(fresh / "bin" / "python")
    _run([sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-index", "-q", str(wheel)],
         env=_clean_env(PIP_DISABLE_PIP_VERSION_CHECK="1"))
    fresh_site = _run([py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip()
    with open(os.path.join(fresh_site, "test-deps.pth"), "w") as f:
        f.write(sysconfig.get_path("purelib") + "\n")

    work = tmp_path / "elsewhere"
    work.mkdir()
    shutil.copy(os.path.join(REPO, "examples", "quickstart.py"), work)
    env = _clean_env()
    # One interpreter (each start imports torch): import every module of the installed package, report
    # where it came from, then run the quickstart as a script.
    probe = ("import actorgrad, importlib, importlib.metadata as md, importlib.resources as r, pkgutil, runpy, sys\n"
             "mods = [m.name for m in pkgutil.walk_packages(actorgrad.__path__, 'actorgrad.')]\n"
             "for m in mods: importlib.import_module(m)\n"
             "print('FILE', actorgrad.__file__); print('VERSION', actorgrad.__version__, md.version('actorgrad'))\n"
             "print('TYPED', r.files('actorgrad').joinpath('py.typed').is_file()); print('MODULES', len(mods))\n"
             "sys.argv = ['quickstart.py', '--backend', 'local', '--steps', '3', '--batch', '16']\n"
             "runpy.run_path('quickstart.py', run_name='__main__')\n")
    out = _run([py, "-c", probe], cwd=work, env=env).stdout
    where = re.search(r"^FILE (.+)$", out, re.M).group(1)
    assert os.path.realpath(where).startswith(os.path.realpath(fresh_site) + os.sep), where
    assert not os.path.realpath(where).startswith(os.path.realpath(REPO) + os.sep), where
    assert f"\nVERSION {version} {version}\n" in out and "\nTYPED True\n" in out, out
    assert int(re.search(r"^MODULES (\d+)$", out, re.M).group(1)) >= 10, out
    assert re.search(r"^step\s+3\s+loss_a", out, re.M), out

    assert _run([py, "-m", "actorgrad", "--version"], cwd=work, env=env).stdout.strip() == f"actorgrad {version}"
