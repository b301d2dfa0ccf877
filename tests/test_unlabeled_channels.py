"""A pool of CT and MR channels: each channel is normalised as its own modality (--modality CT MR), and a CT window
given to several channels under one modality is refused in one line instead of clipping the MR channel."""
from __future__ import annotations

import json

import numpy as np
from conftest import run_cli

from nnunetv2_hiendmae.demo.synthetic import make_case

CMD = "nnUNetv2_hiendmae_preprocess_unlabeled"
SMALL = ["--spacing", "4", "4", "4", "--patch-size", "16", "32", "32", "-np", "1"]


def test_ct_and_mr_channels_are_each_normalised_as_their_modality(nnunet_dirs, tmp_path):
    import SimpleITK as sitk
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    images = tmp_path / "ct_mr"
    images.mkdir()
    rng = np.random.default_rng(3)
    for i in range(2):
        ct = make_case(rng, 0.5)[0]  # HU
        mr = (ct + 1000) * rng.uniform(0.8, 1.2)  # positive, in the hundreds to thousands: far outside a CT window
        for channel, array in enumerate((ct, mr)):
            image = sitk.GetImageFromArray(array.astype(np.float32))
            image.SetSpacing((3.0, 3.0, 5.0))
            sitk.WriteImage(image, str(images / f"case{i}_{channel:04d}.nii.gz"))

    refused = run_cli(CMD, "-i", str(images), "-d", "975", "--ct-window", "-175", "250", *SMALL)
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and lines == [
        "error: --ct-window with one --modality for a pool of 2 channels would clip every channel at the CT window: "
        "give the modality of each channel, e.g. --modality CT CT or --modality CT MR"], refused.stderr
    assert not list(nnunet_dirs["nnUNet_preprocessed"].glob("Dataset975_*"))

    run_cli(CMD, "-i", str(images), "-d", "975", "--ct-window", "-175", "250", "--modality", "CT", "MR", *SMALL,
            check=True)  # the advice, followed
    folder = next(nnunet_dirs["nnUNet_preprocessed"].glob("Dataset975_*"))
    assert json.loads((folder / "dataset.json").read_text())["channel_names"] == {"0": "CT", "1": "MR"}
    data = nnUNetDatasetBlosc2(str(folder / "nnUNetPlans_3d_fullres"))
    for case in data.identifiers:
        x = np.asarray(data.load_case(case)[0][:])
        ct, mr = x[0], x[1]
        assert ct.min() >= -1e-6 and ct.max() <= 1 + 1e-6  # HU -175..250 mapped to 0..1
        assert abs(mr.mean()) < 0.05 and abs(mr.std() - 1) < 0.05  # per-image z-score, not clipped
        assert (mr >= mr.max() - 1e-6).mean() < 0.01
