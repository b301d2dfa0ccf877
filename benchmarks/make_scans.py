"""Write CT-like scans (the demo's phantom) of a chosen size as NIfTI files, for benchmarks on realistic volumes.

    python benchmarks/make_scans.py -o /tmp/scans -n 4 --scale 2.2     # about 320 x 320 x 210 voxels at 1.5 mm
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunetv2_hiendmae.demo.synthetic import make_case


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-o", "--output", required=True, help="folder for the scans")
    p.add_argument("-n", "--number", type=int, default=4, help="scans (default: %(default)s)")
    p.add_argument("--scale", type=float, default=2.2, help="field of view relative to the demo's (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    a = p.parse_args()
    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(a.seed)
    for i in range(a.number):
        image, _, spacing = make_case(rng, a.scale)
        im = sitk.GetImageFromArray(image)
        im.SetSpacing(spacing)
        sitk.WriteImage(im, str(out / f"scan_{i:03d}.nii.gz"), useCompression=True)
        print(f"{out / f'scan_{i:03d}.nii.gz'}: {image.shape[::-1]} voxels of {[round(s, 2) for s in spacing]} mm")


if __name__ == "__main__":
    main()
