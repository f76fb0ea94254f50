"""Build the default PDM shipped in python/ectfast/assets/pdm_300w.npz.

    python tools/build_pdm.py ../shared/data/300w python/ectfast/assets/pdm_300w.npz

Uses the 300-W training folders afw, helen/trainset, lfpw/trainset (2012 faces in the shared
copy). The file holds only the model (mean, basis, eigenvalues), not the shapes.
"""
import sys

import numpy as np

from ectfast.core.pdm import PDM
from ectfast.io.datasets import TRAIN_SUBSETS, find_faces
from ectfast.io.pts import read_pts


def main(root, out, n_components=30):
    paths = [pts for sub in TRAIN_SUBSETS for _, pts in find_faces(f"{root}/{sub}")]
    shapes = np.stack([read_pts(p) for p in paths])
    pdm = PDM.from_shapes(shapes, n_components=n_components)
    pdm.save(out)
    print(f"{len(shapes)} shapes -> {out}: m={pdm.n_components}, noise variance "
          f"{pdm.noise_variance:.4f}, top eigenvalues {np.round(pdm.eigenvalues[:5], 1)}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
