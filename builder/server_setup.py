"""Where a tritonserver comes from and what its process needs to run outside NVIDIA's container.

The bundle in nvidia-pytriton needs three fixes: a Python backend stub matching the running
interpreter, the bundle's shared libraries on LD_LIBRARY_PATH (the stub and backend find them
through an $ORIGIN-relative RPATH that breaks once copied), and this interpreter's import path
for the Python models, so that they import numpy, torch, ... from here (stub_python_env says how).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import platform
import shutil
import signal
import site
import socket
import sys
import sysconfig
from pathlib import Path

INSTALL_HINT = "no tritonserver on PATH and nvidia-pytriton is not installed: pip install '.[server]'"


def find_tritonserver() -> tuple[Path, Path | None]:
    """Return (tritonserver binary, bundle root or None when it comes from PATH)."""
    on_path = shutil.which("tritonserver")
    if on_path:
        return Path(on_path), None
    # Located, not imported: only its server files are used, not pytriton's Python API (whose
    # imports need packages a serving machine may lack).
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(INSTALL_HINT)
    bundle = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    binary = bundle / "bin" / "tritonserver"
    if not binary.is_file():
        raise FileNotFoundError(f"nvidia-pytriton has no server binary at {binary}; {INSTALL_HINT}")
    return binary, bundle


def free_ports(count: int) -> list[int]:
    """Ask the kernel for `count` distinct free TCP ports (held open together so none repeats)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def python_import_path() -> list[str]:
    """This interpreter's site-packages and the folders its .pth files add (editable installs).

    Site directories and .pth entries come after the standard library on sys.path, while the
    script's own folder or pytest's rootdir come first; only the former belong on PYTHONPATH.
    """
    site_dirs = set(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        site_dirs.add(site.getusersitepackages())
    first = next((i for i, p in enumerate(sys.path) if p in site_dirs), None)
    if first is None:
        return [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    return [p for p in dict.fromkeys(sys.path[first:]) if os.path.isdir(p)]


def parent_death_signal():
    """A function for Popen's preexec_fn: the child gets SIGTERM when the process that started it dies.

    Without this a test run killed hard (or a crashed parent) leaves tritonserver holding its ports
    and memory. Linux only; the signal fires when the *thread* that started the server exits, so
    start servers from a thread that outlives them (the main thread in tests and `serve-repo`).
    prctl is looked up here, in the parent: loading libraries between fork and exec can deadlock.
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    PR_SET_PDEATHSIG = 1
    return lambda: prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _prepend_env(env: dict, key: str, paths: list[str]) -> None:
    parts = [p for p in paths if p] + ([env[key]] if env.get(key) else [])
    env[key] = os.pathsep.join(parts)


def bundle_backends(bundle: Path, workdir: Path) -> Path:
    """Writable copy of the bundle's backends with the stub for the running Python version."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = bundle / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise FileNotFoundError(f"nvidia-pytriton has no Python backend stub for Python {version} ({stub})")
    backends = workdir / "backends"
    shutil.copytree(bundle / "backends", backends, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(stub, backends / "python" / stub.name)
    return backends


def model_import_path() -> list[str]:
    """Where the models look for packages: the caller's PYTHONPATH first, as in the caller's own
    sys.path, then this interpreter's site-packages, so the models import what the caller imports."""
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p] + python_import_path()
    return list(dict.fromkeys(paths))


def stub_python_env(workdir: Path) -> Path:
    """A minimal virtual environment whose site-packages point at model_import_path(); returns its bin/.

    The Python 3.12 stub of nvidia-pytriton starts its interpreter isolated (sys.flags.isolated):
    PYTHONPATH is ignored and the models get the site-packages of whichever Python the stub's
    libpython belongs to, e.g. a system numpy 2 where this process runs numpy 1 from elsewhere.
    Isolated or not, the embedded interpreter still finds its prefix the way `python3` does: the
    first `python3` on PATH, and a pyvenv.cfg beside it makes that a venv. So the server's PATH
    starts with this folder's bin/, and a .pth file in its site-packages lists the import path.
    """
    env_dir = workdir / "stub-python"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    base = Path(os.path.realpath(getattr(sys, "_base_executable", sys.executable)))
    bin_dir = env_dir / "bin"
    site_packages = env_dir / "lib" / f"python{version}" / "site-packages"
    bin_dir.mkdir(parents=True)
    site_packages.mkdir(parents=True)
    (bin_dir / "python3").symlink_to(base)
    (env_dir / "pyvenv.cfg").write_text(
        f"home = {base.parent}\ninclude-system-site-packages = false\nversion = {platform.python_version()}\n"
    )
    (site_packages / "caller-import-path.pth").write_text("".join(f"{p}\n" for p in model_import_path()))
    return bin_dir


def server_environment(bundle: Path | None, stub_bin: Path | None = None) -> dict:
    """The server's environment: this one, plus where the models find packages and the bundle's libraries."""
    env = os.environ.copy()
    # Read by stubs that honour the environment (a server from PATH, the bundle's older stubs).
    env["PYTHONPATH"] = os.pathsep.join(model_import_path())
    if stub_bin:
        _prepend_env(env, "PATH", [str(stub_bin)])
    libs = [str(bundle.parent.parent / "nvidia_pytriton.libs")] if bundle else []
    # The stub links libpython3.X: take this interpreter's (pyenv, conda) over the system's, so
    # the models run on the same Python build and standard library as the caller.
    libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    if libdir and soname and os.path.exists(os.path.join(libdir, soname)):
        libs.append(libdir)
    _prepend_env(env, "LD_LIBRARY_PATH", libs)
    return env


def bundled_stub_problem(bundle: Path | None) -> str | None:
    """Why the bundle's Python backend stub would fail here, or None.

    The stub of nvidia-pytriton 0.7.0 (python_backend 2.51) is built against numpy 1: under
    numpy 2 it aborts decoding any BYTES (string) input ('unpack_from requires a buffer of at
    least ...'), which every request to a built repository has: refusing to start says so at
    once. Reproduced with Python 3.12 and numpy 2.5 on the CPU machine, gone with numpy 1.26.
    The models import this process's numpy (stub_python_env), so this process's numpy decides.
    """
    if bundle is None:
        return None
    try:
        import numpy
    except ImportError:
        return None
    if int(numpy.__version__.split(".")[0]) >= 2:
        return (
            f"numpy {numpy.__version__} is installed, but the Python backend stub bundled with nvidia-pytriton "
            "0.7.0 aborts on string (BYTES) inputs under numpy 2: install numpy<2 for this Python"
        )
    return None
