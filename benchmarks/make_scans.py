"""Write CT-like scans (the demo's phantom) of a chosen size as NIfTI files, for benchmarks on realistic volumes.

Written with nibabel, which the GPU machine has (its SimpleITK is an import-only stand-in): preprocess them there with
``nnUNetv2_hiendmae_preprocess_unlabeled --reader NibabelIOWithReorient``.

    python benchmarks/make_scans.py -o /tmp/scans -n 4 --scale 2.2     # about 320 x 320 x 210 voxels at 1.5 mm
"""
from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np

from nnunetv2_hiendmae.demo.synthetic import make_case


def write_scans(out: Path, number: int, scale: float, seed: int = 0) -> list[Path]:
    """``number`` phantoms at ``scale`` as ``out/scan_XXX.nii.gz``; prints each one's size."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(number):
        image, _, spacing = make_case(rng, scale)  # image [z, y, x], spacing (x, y, z) as SimpleITK orders them
        paths.append(out / f"scan_{i:03d}.nii.gz")
        nib.save(nib.Nifti1Image(image.transpose(2, 1, 0), np.diag([*spacing, 1.0])), paths[-1])
        print(f"{paths[-1]}: {image.shape[::-1]} voxels of {[round(s, 2) for s in spacing]} mm")
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-o", "--output", required=True, help="folder for the scans")
    p.add_argument("-n", "--number", type=int, default=4, help="scans (default: %(default)s)")
    p.add_argument("--scale", type=float, default=2.2,
                   help="field of view relative to the demo's (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    a = p.parse_args()
    write_scans(Path(a.output), a.number, a.scale, a.seed)


if __name__ == "__main__":
    main()
