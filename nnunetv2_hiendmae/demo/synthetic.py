"""A small, seeded, CT-like synthetic dataset in nnU-Net raw format (for the demo and the tests).

Each case is an abdomen-like phantom: air around a body (fat rim, soft tissue with texture), a spine, and three
labelled organs with distinct HU ranges (1 liver, 2 spleen, 3 kidneys), at anisotropic, jittered spacing, with
varying body size and organ positions. Unlabelled cases are plain image files in a folder of their own (no labels,
not in nnUNet_raw), as a user's pool of scans would be: ``nnUNetv2_hiendmae_preprocess_unlabeled`` turns them into
pretraining data.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import gaussian_filter

LABELS = {"background": 0, "liver": 1, "spleen": 2, "kidney": 3}


def ellipsoid(zz, yy, xx, centre, radii) -> np.ndarray:
    """Voxels (grids ``zz, yy, xx`` in mm) inside the axis-aligned ellipsoid of ``centre``, ``radii`` (z, y, x; mm)."""
    return (((zz - centre[0]) / radii[0]) ** 2 + ((yy - centre[1]) / radii[1]) ** 2
            + ((xx - centre[2]) / radii[2]) ** 2 <= 1)


def make_case(rng: np.random.Generator,
              scale: float = 1.0) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """One phantom: ``(image HU [z,y,x] float32, labels [z,y,x] uint8, spacing (x, y, z) mm)``."""
    spacing = (float(rng.uniform(2.7, 3.3)), float(rng.uniform(2.7, 3.3)), float(rng.uniform(4.5, 5.5)))
    fov = np.array([rng.uniform(130, 160), rng.uniform(200, 240), rng.uniform(200, 240)]) * scale  # z, y, x in mm
    shape = tuple(int(round(f / s)) for f, s in zip(fov, spacing[::-1]))
    zz, yy, xx = np.meshgrid(*[(np.arange(n) - n / 2 + 0.5) * s for n, s in zip(shape, spacing[::-1])], indexing="ij")

    body_r = np.array([fov[1] * rng.uniform(0.30, 0.38), fov[2] * rng.uniform(0.38, 0.45)])
    body_c = rng.uniform(-8, 8, size=2) * scale
    radial = ((yy - body_c[0]) / body_r[0]) ** 2 + ((xx - body_c[1]) / body_r[1]) ** 2
    body = radial <= 1
    img = np.full(shape, -1000.0)
    img[body] = 40.0
    img[body & (radial > 0.8)] = -100.0  # subcutaneous fat

    seg = np.zeros(shape, np.uint8)
    s = scale * rng.uniform(0.85, 1.15)
    organs = [  # (label, HU, centre (z, y, x) relative to body, radii mm)
        (1, 65.0, (rng.uniform(-10, 10), -0.1 * body_r[0], -0.45 * body_r[1]),
         (45 * s, 0.45 * body_r[0], 0.35 * body_r[1])),
        (2, 110.0, (rng.uniform(-10, 10), 0.05 * body_r[0], 0.55 * body_r[1]),
         (30 * s, 0.25 * body_r[0], 0.15 * body_r[1])),
        (3, 170.0, (rng.uniform(-15, 5), 0.45 * body_r[0], -0.25 * body_r[1]),
         (28 * s, 0.15 * body_r[0], 0.10 * body_r[1])),
        (3, 170.0, (rng.uniform(-15, 5), 0.45 * body_r[0], 0.25 * body_r[1]),
         (28 * s, 0.15 * body_r[0], 0.10 * body_r[1])),
    ]
    for label, hu, (cz, cy, cx), radii in organs:
        jitter = rng.uniform(-6, 6, size=2) * scale
        m = ellipsoid(zz, yy, xx, (cz, body_c[0] + cy + jitter[0], body_c[1] + cx + jitter[1]), radii) & body
        img[m] = hu + rng.normal(0, 5)
        seg[m] = label
    spine = (((yy - body_c[0] - 0.75 * body_r[0]) ** 2 + (xx - body_c[1]) ** 2) <= (12 * scale) ** 2) & body
    img[spine] = 700.0
    seg[spine] = 0

    texture = gaussian_filter(rng.normal(0, 1, shape), sigma=1.5) * 40.0
    img = img + np.where(body, texture, 0) + rng.normal(0, 12, shape)
    return img.astype(np.float32), seg, spacing


def write_image(arr: np.ndarray, spacing: tuple[float, float, float], path: Path) -> None:
    """``arr [z, y, x]`` as a compressed image with ``spacing (x, y, z)`` in mm (SimpleITK: NIfTI by the ending)."""
    im = sitk.GetImageFromArray(arr)
    im.SetSpacing(spacing)
    sitk.WriteImage(im, str(path), useCompression=True)


def _dataset_json(folder: Path, labels: dict, n: int) -> None:
    (folder / "dataset.json").write_text(json.dumps(
        {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": n, "file_ending": ".nii.gz"}, indent=2))


Case = tuple[np.ndarray, np.ndarray, tuple[float, float, float]]  # image [z,y,x], labels [z,y,x], spacing (x,y,z)


def make_datasets(raw_root: Path, dataset_id: int, name: str = "HiEndDemo", n_labelled: int = 20,
                  n_unlabelled: int = 10, n_test: int = 4, seed: int = 0, scale: float = 1.0,
                  pool: Path | None = None, case: Callable[[np.random.Generator], Case] | None = None,
                  labels: dict | None = None) -> dict[str, Path]:
    """Write ``Dataset{id}_{name}`` (labelled + imagesTs/labelsTs) under ``raw_root`` and, if ``n_unlabelled``, the
    unlabelled scans ``pool_XXX.nii.gz`` into ``pool`` (default: ``unlabelled_scans`` beside ``raw_root``).
    Cases come from ``case(rng)`` (default: :func:`make_case` at ``scale``, with :data:`LABELS`), drawn in that order
    from one generator seeded with ``seed``. Returns their folders."""
    rng = np.random.default_rng(seed)
    case = case or partial(make_case, scale=scale)
    out = {"labelled": raw_root / f"Dataset{dataset_id:03d}_{name}"}
    lab = out["labelled"]
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (lab / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n_labelled + n_test):
        img, seg, sp = case(rng)
        split = "Tr" if i < n_labelled else "Ts"
        write_image(img, sp, lab / f"images{split}" / f"case_{i:03d}_0000.nii.gz")
        write_image(seg, sp, lab / f"labels{split}" / f"case_{i:03d}.nii.gz")
    _dataset_json(lab, labels or LABELS, n_labelled)
    if n_unlabelled:
        out["unlabelled"] = unl = pool or raw_root.parent / "unlabelled_scans"
        unl.mkdir(parents=True, exist_ok=True)
        for i in range(n_unlabelled):
            img, _, sp = case(rng)
            write_image(img, sp, unl / f"pool_{i:03d}.nii.gz")
    return out
