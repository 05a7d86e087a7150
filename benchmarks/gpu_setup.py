"""The setup stage of ``tools/gpu_check.sh``, on a machine that reaches no network.

    python -m benchmarks.gpu_setup --repo ROOT --wheels ROOT/.whl --work DIR [--dry-run]

1. array-api-compat: kept if it imports; else installed from its wheel in ``--wheels`` (filled
   beforehand with ``pip download array-api-compat --no-deps -d .whl``), or, where pip cannot
   install it, unpacked onto PYTHONPATH (a pure-Python wheel is a zip of the package).
2. memcore: kept if it imports from this tree; else ``pip install --no-index --no-deps
   --no-build-isolation -e ROOT``, which needs nothing from the network when the machine has a
   setuptools able to build editable wheels (64 or later, with ``bdist_wheel``: setuptools 70.1
   or later, or the ``wheel`` package). Where that is missing or the install fails, the tree is
   copied to ``DIR/tree`` laid out as it installs (``package-dir`` of pyproject.toml: spec/ as
   memcore/spec, ...), with a ``.dist-info`` holding the backends' entry points, and the later
   stages run from there with it on PYTHONPATH.

Writes ``DIR/env.sh`` (``PYTHONPATH`` and ``RUN_ROOT`` for the later stages) and
``DIR/setup.json`` (what was found and done). ``--dry-run`` installs nothing: it reports what
it would do, and builds and checks the copied tree without switching to it.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata

from .harness import write_json

FILL = "pip download array-api-compat --no-deps -d .whl"
# prints what an import of this tree finds, as JSON (run in a child, so that what this process
# has imported does not count)
PROBE = ("import json, array_api_compat, memcore, memcore.spec, memcore.backends, "
         "memcore.kernels\n"
         "from importlib.metadata import entry_points\n"
         "print(json.dumps({'memcore': memcore.__file__, 'array_api_compat': "
         "array_api_compat.__version__, 'backends': sorted(e.name for e in "
         "entry_points(group='memcore.backends'))}))")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _release(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def editable_backend() -> str | None:
    """Why setuptools here cannot build an editable install offline, or None if it can."""
    have = _version("setuptools")
    if have is None or importlib.util.find_spec("setuptools") is None:
        return "setuptools is not installed"
    if _release(have) < (64,):
        return f"setuptools {have} predates editable wheels (64)"
    if _release(have) < (70, 1) and importlib.util.find_spec("wheel") is None:
        return f"setuptools {have} needs the wheel package for bdist_wheel, which is missing"
    return None


def probe(python: str, cwd: str, pythonpath: list[str]) -> dict:
    """What ``python`` imports from ``cwd`` with ``pythonpath`` in front: memcore's file, the
    backends registered, or the error."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(pythonpath + [p for p in [env.get("PYTHONPATH")] if p])
    run = subprocess.run([python, "-c", PROBE], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=120)
    if run.returncode != 0:
        return {"error": run.stderr.strip()[-1500:]}
    return json.loads(run.stdout.strip().splitlines()[-1])


def serves(found: dict, root: str) -> bool:
    """Whether a probe imported memcore from ``root`` with the torch backend registered."""
    where = os.path.realpath(found.get("memcore", "/"))
    return where.startswith(os.path.realpath(root) + os.sep) and "torch" in found.get(
        "backends", [])


def pip(python: str, *args: str) -> tuple[int, str]:
    cmd = [python, "-m", "pip", "install", "--no-index", "--no-deps", *args]
    env = dict(os.environ, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1",
               PIP_NO_INPUT="1", PIP_BREAK_SYSTEM_PACKAGES="1")  # the machine is a bare one
    print("$", " ".join(map(shlex.quote, cmd)), flush=True)
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    print(run.stdout[-2000:], run.stderr[-2000:], sep="", flush=True)
    return run.returncode, (run.stderr or run.stdout).strip()[-1000:]


def _pyproject(repo: str) -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError as e:
            raise RuntimeError("reading pyproject.toml needs Python 3.11 (tomllib) or the "
                               "tomli package") from e
    with open(os.path.join(repo, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def stage_tree(repo: str, dest: str) -> str:
    """Copy ``repo`` to ``dest`` laid out as pyproject.toml installs it (each ``package-dir``
    entry at its package's path), with the tests and benchmarks beside it and a ``.dist-info``
    carrying the entry points, so that ``dest`` on PYTHONPATH imports as the installed
    package. Returns ``dest``."""
    meta = _pyproject(repo)
    mapping = meta["tool"]["setuptools"]["package-dir"]
    if os.path.exists(dest):
        shutil.rmtree(dest)
    os.makedirs(dest)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", ".hypothesis")
    for package in sorted(mapping, key=lambda name: name.count(".")):  # parents first
        shutil.copytree(os.path.join(repo, mapping[package]),
                        os.path.join(dest, *package.split(".")), ignore=skip,
                        dirs_exist_ok=True)
    for extra in ("tests", "benchmarks", "tools"):
        shutil.copytree(os.path.join(repo, extra), os.path.join(dest, extra), ignore=skip)
    shutil.copy2(os.path.join(repo, "pyproject.toml"), dest)
    project = meta["project"]
    info = os.path.join(dest, f"{project['name']}-{project['version']}.dist-info")
    os.makedirs(info)
    with open(os.path.join(info, "METADATA"), "w") as f:
        f.write(f"Metadata-Version: 2.1\nName: {project['name']}\n"
                f"Version: {project['version']}\n")
    with open(os.path.join(info, "entry_points.txt"), "w") as f:
        for group, eps in project.get("entry-points", {}).items():
            f.write(f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) + "\n")
        scripts = project.get("scripts", {})
        if scripts:
            f.write("[console_scripts]\n" + "".join(f"{k} = {v}\n" for k, v in scripts.items()))
    return dest


def setup(repo: str, wheels: str, work: str, dry_run: bool, python: str) -> dict:
    repo, work = os.path.realpath(repo), os.path.realpath(work)
    out = {"python": python, "repo": repo, "dry_run": dry_run, "pythonpath": [],
           "run_root": repo, "ok": False}
    site = os.path.join(work, "site")

    # 1. array-api-compat
    wheel = sorted(glob.glob(os.path.join(wheels, "array_api_compat-*.whl")))
    if importlib.util.find_spec("array_api_compat") is not None:
        out["array_api_compat"] = f"present ({_version('array-api-compat')})"
    elif not wheel:
        out["array_api_compat"] = (f"missing, and {wheels} holds no array_api_compat wheel: "
                                   f"fill it where a registry is reached with `{FILL}`")
    elif dry_run:
        out["array_api_compat"] = f"would install {wheel[-1]}"
    else:
        rc, said = pip(python, wheel[-1])
        if rc == 0:
            out["array_api_compat"] = f"installed from {wheel[-1]}"
        else:
            with zipfile.ZipFile(wheel[-1]) as z:
                z.extractall(site)
            out["pythonpath"].append(site)
            out["array_api_compat"] = f"unpacked to {site} (pip failed: {said[-300:]})"

    # 2. memcore
    found = probe(python, work, out["pythonpath"])
    out["editable_backend"] = editable_backend() or "usable"
    if serves(found, repo):
        out["memcore"] = "present (imports from this tree)"
    elif dry_run:
        out["memcore"] = ("would install editable" if editable_backend() is None else
                          f"would run from a copy ({editable_backend()})")
    elif editable_backend() is None:
        rc, said = pip(python, "--no-build-isolation", "-e", repo)
        found = probe(python, work, out["pythonpath"])
        if rc == 0 and serves(found, repo):
            out["memcore"] = "installed editable"
        else:
            out["memcore"] = f"editable install failed (exit {rc}): {said[-300:]}"
    else:
        out["memcore"] = f"not installed: {editable_backend()}"
    if dry_run or not serves(found, repo):
        # the fallback: built and checked in a dry run, used where the install did not serve
        tree = stage_tree(repo, os.path.join(work, "tree"))
        path = [tree] + out["pythonpath"]
        staged = probe(python, tree, path)
        out["copy"] = {"root": tree, "serves": serves(staged, tree), "probe": staged}
        if not dry_run:
            out["memcore"] += f"; running from a copy at {tree}"
            out["pythonpath"], out["run_root"], found = path, tree, staged
    out["probe"] = found
    out["ok"] = serves(found, out["run_root"]) and (not dry_run or out["copy"]["serves"])
    with open(os.path.join(work, "env.sh"), "w") as f:
        if out["pythonpath"]:
            f.write(f"export PYTHONPATH={shlex.quote(os.pathsep.join(out['pythonpath']))}"
                    f"${{PYTHONPATH:+:$PYTHONPATH}}\n")
        f.write(f"RUN_ROOT={shlex.quote(out['run_root'])}\n")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_setup", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", required=True)
    p.add_argument("--wheels", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    out = setup(args.repo, args.wheels, args.work, args.dry_run, sys.executable)
    for key, value in out.items():
        print(f"{key}: {value}")
    write_json(os.path.join(args.work, "setup.json"), out)
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
