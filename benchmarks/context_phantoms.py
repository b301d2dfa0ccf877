"""Phantoms whose labels only context tells apart: the positive control of ``pretraining_benefit.py``.

Every case holds a body (soft tissue with texture), a bright landmark (a rod, like a spine) and two organs drawn from
the *same* intensity and texture distribution and of similar size: label 1 always lies on one side of the landmark,
label 2 on the other, at a jittered distance. Body, landmark and organs move by up to a quarter of the field of view
from case to case, so that a voxel's absolute position (in the image or in a crop at a random offset) does not say
which organ it belongs to; only its place relative to the landmark does. A local feature (intensity, texture) can
find "an organ" but cannot name it; a feature that has learned where organs lie relative to the landmark can. The
pretraining's job is exactly that: reconstructing masked regions needs it.

Written in nnU-Net's raw format (a labelled dataset with ``imagesTs``/``labelsTs``) plus a folder of unlabelled scans
of the same kind. Fixed before any measurement with it (docs/benchmarks.md holds the result, whichever way it fell).

    python benchmarks/context_phantoms.py --raw $nnUNet_raw --pool ./context_pool -d 520 --labelled 24 --unlabelled 200
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from nnunetv2_hiendmae.demo.synthetic import ellipsoid, make_datasets

LABELS = {"background": 0, "left_of_landmark": 1, "right_of_landmark": 2}
SPACING = (2.0, 2.0, 3.0)  # x, y, z in mm
SHAPE = (40, 80, 96)  # z, y, x in voxels: 120 x 160 x 192 mm


def make_case(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """One phantom: ``(image HU [z, y, x] float32, labels [z, y, x] uint8, SPACING)``."""
    zz, yy, xx = np.meshgrid(*[(np.arange(n) - n / 2 + 0.5) * s for n, s in zip(SHAPE, SPACING[::-1])],
                             indexing="ij")  # mm from the centre
    img = np.full(SHAPE, -1000.0)
    seg = np.zeros(SHAPE, np.uint8)
    shift = rng.uniform(-1, 1, size=3) * [20, 20, 35]  # the whole arrangement moves: the organs' x ranges overlap
    body = ellipsoid(zz, yy, xx, shift + [0, 0, 0], [80, rng.uniform(55, 65), rng.uniform(60, 70)])
    img[body] = 40.0
    # the landmark: a rod along z, bright
    rod = ((yy - shift[1] - rng.uniform(-4, 4)) ** 2 + (xx - shift[2]) ** 2 <= 7.0 ** 2) & body
    img[rod] = 700.0
    # two organs of one distribution, one on each side of the rod along x, at jittered distances and heights
    for label, side in ((1, -1.0), (2, 1.0)):
        centre = shift + [rng.uniform(-15, 15), rng.uniform(-10, 10), side * rng.uniform(26, 38)]
        radii = rng.uniform(11, 15, size=3) * [1.6, 1.0, 1.0]
        organ = ellipsoid(zz, yy, xx, centre, radii) & body & ~rod
        img[organ] = rng.normal(90.0, 5.0)  # both organs: the same intensity distribution
        seg[organ] = label
    texture = gaussian_filter(rng.normal(0, 1, SHAPE), sigma=1.2) * 30.0
    img = img + np.where(body, texture, 0.0) + rng.normal(0, 10, SHAPE)
    return img.astype(np.float32), seg, SPACING


def make_context_datasets(raw_root: Path, dataset_id: int, pool: Path, n_labelled: int, n_unlabelled: int,
                          n_test: int = 4, seed: int = 0, name: str = "ContextPhantoms") -> Path:
    """Write ``Dataset{id}_{name}`` (imagesTr/labelsTr, imagesTs/labelsTs) under ``raw_root`` and the unlabelled scans
    ``pool/pool_XXX.nii.gz`` (the demo's layout, :func:`make_datasets`); returns the dataset folder."""
    return make_datasets(raw_root, dataset_id, name, n_labelled, n_unlabelled, n_test, seed, pool=pool,
                         case=make_case, labels=LABELS)["labelled"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--raw", type=Path, required=True, help="nnUNet_raw folder to write the labelled dataset into")
    p.add_argument("--pool", type=Path, required=True, help="folder for the unlabelled scans")
    p.add_argument("-d", "--dataset-id", type=int, default=520, help="id of the labelled dataset (default: 520)")
    p.add_argument("--labelled", type=int, default=24, help="labelled training cases (default: 24)")
    p.add_argument("--unlabelled", type=int, default=200, help="unlabelled scans (default: 200)")
    p.add_argument("--test", type=int, default=4, help="held-out test cases (default: 4)")
    p.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    a = p.parse_args()
    print(make_context_datasets(a.raw, a.dataset_id, a.pool, a.labelled, a.unlabelled, a.test, a.seed))


if __name__ == "__main__":
    main()
