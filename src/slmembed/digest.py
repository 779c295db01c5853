"""Content digests (sha256) of the files work was made from, so that resumed work is reused only for the same ones.

``weights_sha256`` digests the files a model is read from. Files, not the loaded tensors: a LoRA adapter merged on a
GPU differs in its last bits from the same merge on the CPU, while the same files give the same digest anywhere.
Hashing runs at about 1.7 GB/s (sha256 with the CPU's SHA extensions), 0.2 s for SmolLM2-135M's 270 MB.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes, as hex."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def model_files(folder: Path) -> list[Path]:
    """The files a model is read from in ``folder``, sorted: those at its top level and in its sentence-transformers
    modules' folders (modules.json), but documentation (``*.md``), hidden files and slmembed's own records of checks
    it made on the folder (``slmembed_*``, rewritten when a package changes)."""
    folders = [folder]
    try:
        modules = json.loads((folder / "modules.json").read_text())
        folders += [folder / m["path"] for m in modules if isinstance(m, dict) and isinstance(m.get("path"), str)]
    except (OSError, ValueError):
        pass
    return sorted({f for d in folders if d.is_dir() for f in d.iterdir()  # a set: a module's path may be "" (the top)
                   if f.is_file() and f.suffix != ".md" and not f.name.startswith((".", "slmembed_"))})


def _folder(source: str | Path) -> Path:
    """A model folder, or the cached snapshot of a hub id (which loading it has downloaded)."""
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import snapshot_download  # here: only a hub id pays for its import

    return Path(snapshot_download(str(source), local_files_only=True))


def weights_sha256(sources: Iterable[str | Path]) -> str:
    """One sha256 over the model files (``model_files``) of ``sources``, model folders or hub ids, in order: each
    file's path inside its folder and the sha256 of its bytes."""
    digest = hashlib.sha256()
    for source in sources:
        folder = _folder(source)
        for path in model_files(folder):
            digest.update(f"{path.relative_to(folder)}\0{file_sha256(path)}\n".encode())
        digest.update(b"\n")
    return digest.hexdigest()
