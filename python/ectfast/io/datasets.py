"""Locating 300-W style data: folders of ``NAME.<image>`` + ``NAME.pts`` pairs.

Works for the official 300-W release layout (full-size .jpg/.png images, .pts with or without
header) and for the compact copy in ``../shared/data/300w``.
"""
from __future__ import annotations

import os
from typing import List, Tuple

TRAIN_SUBSETS = ("afw", "helen/trainset", "lfpw/trainset")
VALIDATION_SUBSETS = ("lfpw/testset",)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp")


def find_faces(folder, *, recursive: bool = True, require_image: bool = True) -> List[Tuple[str, str]]:
    """Sorted (image_path, pts_path) pairs under ``folder``. A .pts without an image beside it
    is skipped when ``require_image`` (its image path is '' otherwise)."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise ValueError(f"folder: {folder!r} is not a directory")
    out = []
    walker = os.walk(folder) if recursive else [(folder, [], os.listdir(folder))]
    for dirpath, dirnames, filenames in walker:
        dirnames.sort()
        names = set(filenames)
        for fn in sorted(filenames):
            stem, ext = os.path.splitext(fn)
            if ext.lower() != ".pts":
                continue
            image = ""
            for iext in IMAGE_EXTENSIONS:
                for cand in (stem + iext, stem + iext.upper()):
                    if cand in names:
                        image = os.path.join(dirpath, cand)
                        break
                if image:
                    break
            if image or not require_image:
                out.append((image, os.path.join(dirpath, fn)))
    return out
