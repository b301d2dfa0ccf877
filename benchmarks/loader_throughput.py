"""What a pretraining loader worker spends per crop, and what it moves, side by side in one run (CPU only).

Per crop, on the cases of the datasets given: choosing a body-centred centre from the case's ``body_locations``
(datasets from nnUNetv2_hiendmae_preprocess_unlabeled) versus by probing candidate voxels (nnU-Net's own datasets);
reading the crop (blosc2, only the chunks it touches); and the per-crop CPU augmentation the workers did before it
moved to the training device. Then whole loaders: crops per second per worker as the loader is now (reads only;
float32 as on a CPU, and float16 as for a GPU in bf16/fp16) and with that CPU augmentation added back (as before),
and the bytes per crop moved in each dtype. One JSON line.

    python benchmarks/loader_throughput.py -d 503 --patch-size 96 96 96 --num-workers 1
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from _measure import device_name

from pretrain.augment import reference_augment
from pretrain.data import PretrainCrops, make_loader, resolve_sources


class WithCpuAugmentation(PretrainCrops):
    """The loader as it was: every crop augmented in the worker."""

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng(index)
        views = super().__getitem__(index)
        return {k: torch.from_numpy(np.stack([np.ascontiguousarray(reference_augment(rng, c)) for c in v.numpy()]))
                for k, v in views.items()}


def per_crop_ms(ds: PretrainCrops, n: int) -> dict:
    """Milliseconds per crop for each step a worker takes, over ``n`` crops of random cases."""
    size = ds.views["crops"][1]
    rng = np.random.default_rng(0)
    t = {"centre_from_body_locations": 0.0, "centre_by_probing": 0.0, "read": 0.0, "cpu_augmentation": 0.0}
    with_locations = 0
    for i in range(n):
        _, s, j = ds._pick(i)
        data, seg, _, props = ds._nnunet_dataset(s).load_case(ds.sources[s].identifiers[j])
        thresholds = ds._thresholds(s, j, data)
        body = props.get("body_locations")
        if body is not None:
            t0 = time.perf_counter()
            ds._centre(rng, s, data, seg, thresholds, body)
            t["centre_from_body_locations"] += time.perf_counter() - t0
            with_locations += 1
        t0 = time.perf_counter()
        centre = ds._centre(rng, s, data, seg, thresholds, None)
        t["centre_by_probing"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        crop = ds._crop(s, data, centre, size)
        t["read"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        np.ascontiguousarray(reference_augment(rng, crop))
        t["cpu_augmentation"] += time.perf_counter() - t0
    out = {k: round(1000 * v / n, 3) for k, v in t.items()}
    out["centre_from_body_locations"] = round(1000 * t["centre_from_body_locations"] / max(1, with_locations), 3) \
        if with_locations else None
    return out


def loader_crops_per_s(ds: PretrainCrops, batch_size: int, num_workers: int, n_batches: int) -> float:
    loader = iter(make_loader(ds, batch_size, num_workers, "cpu"))
    first = next(loader)  # worker start-up does not count
    crops = sum(v.shape[0] * v.shape[1] for v in first.values())
    t0 = time.perf_counter()
    for _ in range(n_batches):
        next(loader)
    return n_batches * crops / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", "--datasets", nargs="+", required=True, help="nnU-Net dataset ids (needs nnUNet_preprocessed)")
    p.add_argument("--patch-size", type=int, nargs=3, default=[96, 96, 96], help="crop size (default: 96 96 96)")
    p.add_argument("--crops-per-volume", type=int, default=8, help="crops per loaded case (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=2, help="cases per batch (default: %(default)s)")
    p.add_argument("--num-workers", type=int, default=1, help="loader worker processes (default: %(default)s)")
    p.add_argument("--batches", type=int, default=8, help="timed batches per loader (default: %(default)s)")
    p.add_argument("--crops", type=int, default=64, help="crops timed step by step (default: %(default)s)")
    a = p.parse_args()

    torch.set_num_threads(1)
    sources = resolve_sources(a.datasets)
    views = {"crops": (a.crops_per_volume, tuple(a.patch_size))}
    items = (a.batches + 1) * a.batch_size
    result = {"datasets": [s.dataset_name for s in sources], "patch_size": a.patch_size,
              "crops_per_volume": a.crops_per_volume, "num_workers": a.num_workers,
              "device_name": device_name(torch.device("cpu")), "torch": torch.__version__,
              "per_crop_ms": per_crop_ms(PretrainCrops(sources, views, a.crops, seed=0), a.crops)}
    now = loader_crops_per_s(PretrainCrops(sources, views, items, seed=0), a.batch_size, a.num_workers, a.batches)
    half = loader_crops_per_s(PretrainCrops(sources, views, items, seed=0, dtype="float16"), a.batch_size,
                              a.num_workers, a.batches)
    before = loader_crops_per_s(WithCpuAugmentation(sources, views, items, seed=0), a.batch_size, a.num_workers,
                                a.batches)
    voxels = int(np.prod(a.patch_size))
    result["loader"] = {"crops_per_s_per_worker_now": round(now / max(1, a.num_workers), 2),
                        "crops_per_s_per_worker_now_float16": round(half / max(1, a.num_workers), 2),
                        "crops_per_s_per_worker_with_cpu_augmentation": round(before / max(1, a.num_workers), 2),
                        "ratio_now_to_before": round(now / before, 2),
                        "ratio_now_float16_to_before": round(half / before, 2)}
    result["bytes_per_crop"] = {"float32": 4 * voxels, "float16_for_gpu": 2 * voxels}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
