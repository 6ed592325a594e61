"""Image folders as datasets: ``root/<domain>/<class>/<image>``, the layout Digits-Five,
Office-Caltech-10, PACS and DomainNet unpack to.

Domain names are the first level of folder names, class names the second (the classes are the
union over domains; a domain may lack some). Images (``.png``, ``.jpg``, ``.jpeg``, any case) are
decoded with Pillow, converted to RGB (or one grey channel), resized to a square of
``image_size`` pixels with bilinear filtering (the aspect ratio is not kept), scaled to [0, 1]
and stored channels-first, (n, C, S, S), as the CNN embedding expects (the MLP flattens it).
Samples are in sorted path order. Hidden files and folders (a leading ``.``) are skipped; any other
file outside the layout is refused.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import numpy as np

from fedmoe.data import Dataset, encode_labels
from fedmoe.data.spec import IMAGE_SIZE
from fedmoe.errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
LAYOUT = "root/<domain>/<class>/<image>.png|jpg|jpeg"
MAX_IMAGES = 5_000_000  # a folder with more images is refused (memory: n·C·S²·4 bytes)


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def is_image(path: Path) -> bool:
    """True for a file whose suffix is an image suffix this reader decodes."""
    return path.suffix.lower() in IMAGE_SUFFIXES


def holds_images(folder: Path) -> bool:
    """True when ``folder`` holds an image file anywhere below it (so it is read as an image
    folder rather than a folder of text)."""
    return any(is_image(p) and p.is_file() for p in folder.rglob("*"))


def _outside(path: Path) -> InputError:
    what = "folder" if path.is_dir() else "file"
    return InputError(
        f"{path}: a {what} outside the image-folder layout {LAYOUT}",
        hint="move or delete it, or hide it with a leading '.'",
    )


def image_files(root: Path) -> list[tuple[str, str, Path]]:
    """(domain, class, path) of every image under ``root``, in sorted path order.

    Raises
    ------
    InputError
        When the root holds no domain folder or no image, or a file or folder sits outside the
        layout.
    """
    if not root.is_dir():
        raise InputError(f"{root}: no such folder", hint="check the --dataset path")
    domains = _visible(root)
    if not domains:
        raise InputError(f"{root}: empty image folder", hint=f"lay it out as {LAYOUT}")
    out: list[tuple[str, str, Path]] = []
    for d in domains:
        if not d.is_dir():
            raise _outside(d)
        for c in _visible(d):
            if not c.is_dir():
                raise _outside(c)
            for f in _visible(c):
                if not (f.is_file() and is_image(f)):
                    raise _outside(f)
                out.append((d.name, c.name, f))
                if len(out) > MAX_IMAGES:
                    raise InputError(f"{root}: more than {MAX_IMAGES:,} images")
    if not out:
        raise InputError(f"{root}: no image in any class folder", hint=f"lay it out as {LAYOUT}")
    return out


def load_image_folder(root: Path, image_size: int = IMAGE_SIZE, grayscale: bool = False) -> Dataset:
    """Read an image folder (see the module docstring).

    Parameters
    ----------
    root
        The folder holding one sub-folder per domain.
    image_size
        Side S of the square every image is resized to.
    grayscale
        One grey channel (Pillow's ``L``: 0.299 R + 0.587 G + 0.114 B) instead of RGB.

    Returns
    -------
    Dataset
        x (n, C, S, S) float32 in [0, 1] with C = 1 or 3; labels and domains from folder names.

    Raises
    ------
    InputError
        When Pillow is missing, the layout is broken, or an image cannot be decoded.
    """
    if importlib.util.find_spec("PIL") is None:
        raise InputError(
            "image folders need Pillow, which is not installed",
            hint="pip install pillow  (or pip install 'fedmoe[data]')",
        )
    from PIL import Image

    files = image_files(root)
    mode = "L" if grayscale else "RGB"
    channels = 1 if grayscale else 3
    x = np.empty((len(files), channels, image_size, image_size), dtype=np.float32)  # (n, C, S, S)
    for i, (_, _, path) in enumerate(files):
        try:
            with warnings.catch_warnings():
                # an image past Pillow's pixel limit is refused, never a warning on the terminal
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as img:
                    img.load()
                    pixels = img.convert(mode).resize(
                        (image_size, image_size), Image.Resampling.BILINEAR
                    )
        except (
            OSError,
            ValueError,
            SyntaxError,
            EOFError,
            Image.DecompressionBombError,
            Image.DecompressionBombWarning,
        ) as exc:
            detail = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            raise InputError(
                f"{path}: not a readable image ({detail})", hint="delete or replace the file"
            ) from None
        arr = np.asarray(pixels, dtype=np.float32) / 255.0  # (S, S) or (S, S, C)
        x[i] = arr[None] if grayscale else arr.transpose(2, 0, 1)
    labels, class_names = encode_labels(np.array([c for _, c, _ in files]), "class", str(root))
    domain, domain_names = encode_labels(np.array([d for d, _, _ in files]), "domain", str(root))
    if len(class_names) < 2:
        raise InputError(
            f"{root}: {len(class_names)} class folder; a classifier needs at least 2",
            hint=f"lay it out as {LAYOUT}",
        )
    return Dataset(root.name, x, labels, domain, class_names, domain_names, True)
