"""What reading a case costs in ``nnUNetv2_hiendmae_preprocess_unlabeled``, and the share of the two checks added to
it: the completeness check of a NIfTI file (``file_problem``: a .nii.gz decompressed in full) and the content
fingerprint (``content_fingerprint``), against nnU-Net's reader and the whole preprocessing of the case.

    python benchmarks/make_scans.py -o /tmp/bigscans -n 4 --scale 2.4
    python benchmarks/unlabeled_read_cost.py -i /tmp/bigscans
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from nnunetv2_hiendmae.leakage import content_fingerprint
from nnunetv2_hiendmae.presets import ct_window_statistics
from pretrain.unlabeled import (
    Settings,
    file_problem,
    find_cases,
    image_reader,
    plans_for,
    preprocess_case,
)


def seconds(fn, repeats: int = 3) -> float:
    """Best of ``repeats`` wall-clock runs."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", "--input", required=True, help="folder of NIfTI scans (benchmarks/make_scans.py)")
    a = p.parse_args()
    settings = Settings(1, "CT", [1.5, 1.5, 1.5], [0, 1, 2], ["CTNormalization"], [False],
                        {"0": ct_window_statistics(-175.0, 250.0)})
    plans = plans_for("Dataset999_Bench", settings, [0.0, 0.0, 0.0])
    rows = []
    for case in find_cases([a.input]):
        path = case.files[0]
        data, _ = image_reader(path).read_images(case.files)
        with tempfile.TemporaryDirectory() as tmp:
            staging, target = Path(tmp) / "staging", Path(tmp) / "target"
            staging.mkdir()
            target.mkdir()
            whole = seconds(lambda: preprocess_case(case, settings, plans, staging, target), 1)  # noqa: B023
        rows.append((case.name, data.shape[1:], seconds(lambda: image_reader(path).read_images([path])),  # noqa: B023
                     seconds(lambda: file_problem(path)), seconds(lambda: content_fingerprint(data)), whole))  # noqa: B023
    print("| case | voxels | nnU-Net's reader (s) | completeness check (s) | content fingerprint (s) | "
          "whole case (s) | checks' share |")
    print("|---|---|---|---|---|---|---|")
    for name, shape, read, check, fingerprint, whole in rows:
        print(f"| {name} | {' × '.join(map(str, shape))} | {read:.3f} | {check:.3f} | {fingerprint:.3f} | "
              f"{whole:.2f} | {(check + fingerprint) / whole:.1%} |")
    shares = [(c + f) / w for _, _, _, c, f, w in rows]
    print(f"mean share of the whole case: {np.mean(shares):.1%}")


if __name__ == "__main__":
    main()
