"""pretrain/data.py on the real nnU-Net-preprocessed fixture datasets (990 labelled, 991 unlabelled pool) and on small
fake preprocessed datasets whose body is known."""
from __future__ import annotations

import dataclasses
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import copy_preprocessed_dataset
from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params, infer_dataset_class, nnUNetDatasetBlosc2
from nnunetv2.utilities.crossval_split import generate_crossval_split

from nnunetv2_hiendmae.errors import UserError
from pretrain.data import PretrainCrops, device_batches, make_loader, pretrain_metadata, resolve_sources

CONFIG = "3d_fullres"


@pytest.fixture(scope="module")
def sources(preprocessed_dataset):
    return resolve_sources([str(preprocessed_dataset["id"]), str(preprocessed_dataset["unlabelled_id"])])


def _listing(folder: Path) -> list[tuple[str, int, float]]:
    return sorted((str(p), p.stat().st_size, p.stat().st_mtime) for p in folder.rglob("*"))


def _edit_json(path: Path, edit) -> None:
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj))


# ---------------------------------------------------------------------------------------------------- shapes, padding

def crops(sources, crop, k: int, items: int, **kw) -> PretrainCrops:
    """K crops of one size per case, as Hi-End-MAE and MAE ask for."""
    return PretrainCrops(sources, {"crops": (k, crop)}, items, **kw)


@pytest.mark.parametrize("crop", [(16, 32, 32), (16, 32, 48), (32, 48, 48), (8, 8, 8)])
def test_item_shape_is_k_crops_of_exact_size(sources, crop):
    ds = crops(sources, crop, 3, 4, seed=0)
    assert len(ds) == 4
    for i in range(len(ds)):
        x = ds[i]["crops"]
        assert x.shape == (3, 1, *crop) and x.dtype == torch.float32
        assert torch.isfinite(x).all()


def test_several_kinds_of_views_and_compact_dtype(sources):
    """GL-MAE asks for global and local views of one case, MiM for one crop twice the patch; float16 halves the bytes
    moved and keeps nnU-Net's normalised intensities to float16 precision."""
    views = {"global": (2, (24, 40, 40)), "local": (3, (16, 32, 32))}
    full, half = (PretrainCrops(sources, views, 4, seed=5, dtype=d)[1] for d in ("float32", "float16"))
    assert set(full) == {"global", "local"}
    assert full["global"].shape == (2, 1, 24, 40, 40) and full["local"].shape == (3, 1, 16, 32, 32)
    assert half["local"].dtype == torch.float16
    torch.testing.assert_close(half["local"].float(), full["local"], rtol=1e-3, atol=1e-3)


def test_crop_larger_than_case_holds_the_whole_case_padded_with_the_ct_floor(sources):
    src = dataclasses.replace(sources[0], identifiers=sources[0].identifiers[:1])
    data = infer_dataset_class(src.folder)(src.folder).load_case(src.identifiers[0])[0][:]
    props = src.plans["foreground_intensity_properties_per_channel"]["0"]
    floor = (props["percentile_00_5"] - props["mean"]) / props["std"]
    crop = (32, 64, 64)
    assert all(c > n for c, n in zip(crop, data.shape[1:]))
    x = crops([src], crop, 4, 1)[0]["crops"].numpy()
    for k in range(4):
        assert x[k].min() == pytest.approx(floor, abs=1e-4)
        assert (x[k] > floor + 1e-3).sum() == (data > floor + 1e-3).sum()  # the whole case is inside the crop
        assert np.isclose(x[k], floor, atol=1e-4).sum() >= np.prod(crop) - data[0].size  # the rest is padding


# ---------------------------------------------------------------------------------------------------- determinism

def test_items_are_a_function_of_seed_epoch_rank_and_index(sources):
    make = lambda **kw: crops(sources, (16, 32, 32), 2, 8, **kw)  # noqa: E731
    a, b = make(seed=3), make(seed=3)
    item = lambda ds, i: ds[i]["crops"]  # noqa: E731
    assert torch.equal(item(a, 5), item(b, 5)) and torch.equal(item(a, 5), item(a, 5))
    assert not torch.equal(item(a, 5), item(a, 6))
    assert not torch.equal(item(a, 5), item(make(seed=4), 5))
    assert not torch.equal(item(a, 5), item(make(seed=3, rank=1, world_size=2), 5))
    assert not torch.equal(item(a, 5), item(a, 8 + 5))  # item 5 of epoch 1
    clone = pickle.loads(pickle.dumps(a))  # spawn workers get a pickled copy without the opened datasets
    assert clone._datasets is None and torch.equal(item(clone, 13), item(a, 13))


def test_one_loader_streams_the_epochs_from_the_start_epoch_as_the_main_process_would(sources):
    """The run keeps one loader iterator: its batches cross epochs without a restart, start at a resumed run's epoch,
    and with workers equal what the main process reads itself."""
    ds = crops(sources, (16, 32, 32), 2, 6, seed=1)  # 3 batches of 2 per epoch
    with_workers, in_process = (iter(make_loader(ds, 2, n, "cpu", start_epoch=1)) for n in (2, 0))
    a, b = [next(with_workers) for _ in range(6)], [next(in_process) for _ in range(6)]  # epochs 1 and 2
    for k, (x, y) in enumerate(zip(a, b)):
        assert x["crops"].shape == (2, 2, 1, 16, 32, 32)
        assert torch.equal(x["crops"], y["crops"])
        assert torch.equal(x["crops"], torch.stack([ds[6 + 2 * k + i]["crops"] for i in range(2)]))
    with pytest.raises(ValueError, match="does not divide"):
        make_loader(ds, 4, 0, "cpu")  # a batch would span two epochs


def test_device_batches_yields_the_loader_batches_in_order(sources):
    ds = crops(sources, (16, 32, 32), 2, 4, seed=2, dtype="float16")
    plain = iter(make_loader(ds, 2, 0, "cpu"))
    moved = device_batches(make_loader(ds, 2, 0, "cpu"), torch.device("cpu"))
    for _ in range(3):
        x, y = next(moved), next(plain)
        assert x["crops"].device.type == "cpu" and x["crops"].dtype == torch.float16
        assert torch.equal(x["crops"], y["crops"])
    assert list(device_batches(iter([]), torch.device("cpu"))) == []


# ---------------------------------------------------------------------------------------------------- reading

class _Spy:
    """Wraps a case array: records how many elements each read returns and forbids materialising it whole."""

    def __init__(self, arr, log: list):
        self.arr, self.log, self.shape = arr, log, arr.shape

    def __getitem__(self, key):
        out = self.arr[key]
        self.log.append(np.size(out))
        return out

    def __array__(self, *args, **kwargs):
        raise AssertionError("the whole case was materialised")


def test_reads_only_crop_regions_and_draws_from_all_datasets(sources, monkeypatch):
    reads, cases = [], []
    original = nnUNetDatasetBlosc2.load_case

    def spying_load_case(self, identifier):
        data, seg, prev, props = original(self, identifier)
        cases.append(identifier)
        return _Spy(data, reads), _Spy(seg, reads), prev, props

    monkeypatch.setattr(nnUNetDatasetBlosc2, "load_case", spying_load_case)
    crop = (8, 16, 16)
    ds = crops(sources, crop, 4, 40, seed=0)
    assert len(ds.cases) == sum(len(s.identifiers) for s in sources) == 9
    for i in range(len(ds)):
        ds[i]
    assert max(reads) == np.prod(crop)  # single voxels for centre choice, one crop-sized read per crop
    assert sum(r == np.prod(crop) for r in reads) == 40 * 4
    assert {c.split("_")[0] for c in cases} == {"case", "unlabelled"}  # 990: case_XXX, 991: unlabelled_scans__pool_XXX


# ---------------------------------------------------------------------------------------------------- body centres

BODY = (slice(6, 18), slice(10, 30), slice(10, 30))  # 12.5 % of a (24, 40, 40) case, >= 4 voxels from each edge


def _known_body_dataset(root: Path, template: Path, dataset_id: int, kind: str) -> str:
    """A fake preprocessed dataset of two cases whose body is the box BODY, intensities as nnU-Net would leave them
    for a CT (clip floor outside), per-image z-score (low noisy background) or masked z-score (0 outside) channel."""
    name = f"Dataset{dataset_id:03d}_Body{kind}"
    base = root / name
    folder = base / "nnUNetPlans_3d_fullres"
    folder.mkdir(parents=True)
    shutil.copy(template / "dataset.json", base / "dataset.json")
    plans = json.loads((template / "nnUNetPlans.json").read_text())
    plans["configurations"] = {CONFIG: plans["configurations"][CONFIG]}
    scheme = "CTNormalization" if kind == "ct" else "ZScoreNormalization"
    plans["configurations"][CONFIG].update(data_identifier=folder.name, normalization_schemes=[scheme],
                                           use_mask_for_norm=[kind == "mask"])
    (base / "nnUNetPlans.json").write_text(json.dumps(plans))
    p = plans["foreground_intensity_properties_per_channel"]["0"]
    rng = np.random.default_rng(dataset_id)
    shape = (1, 24, 40, 40)
    blocks, chunks = comp_blosc2_params(shape, (8, 16, 16))
    for c in range(2):
        seg = np.zeros(shape, np.int8)
        if kind == "ct":
            data = np.full(shape, (p["percentile_00_5"] - p["mean"]) / p["std"], np.float32)
            data[(0, *BODY)] = rng.normal(1.0, 0.3, size=(12, 20, 20))
        elif kind == "sample":
            data = rng.normal(-0.8, 0.05, size=shape).astype(np.float32)
            data[(0, *BODY)] = rng.normal(1.0, 0.3, size=(12, 20, 20))
        else:
            data = np.zeros(shape, np.float32)
            data[(0, *BODY)] = rng.normal(0.0, 1.0, size=(12, 20, 20))  # intensity alone cannot tell
            seg[:] = -1
            seg[(0, *BODY)] = 0
        nnUNetDatasetBlosc2.save_case(data, seg, {"spacing": [1.0, 1.0, 1.0]}, str(folder / f"c_{c}"),
                                      chunks=chunks, blocks=blocks, chunks_seg=chunks, blocks_seg=blocks)
    return name


@pytest.mark.parametrize("kind", ["ct", "sample", "mask"])
def test_crops_are_centred_in_the_body_far_more_often_than_chance(preprocessed_dataset, tmp_path, monkeypatch, kind):
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    name = _known_body_dataset(tmp_path, preprocessed_dataset["preprocessed"], 980, kind)
    src = resolve_sources([name])
    inside = {"ct": lambda v: v > 0.0, "sample": lambda v: v > 0.0, "mask": lambda v: v != 0.0}[kind]

    def centre_in_body_fraction(body_prob: float) -> float:
        ds = crops(src, (8, 8, 8), 8, 40, seed=0, body_prob=body_prob)
        centres = torch.cat([ds[i]["crops"][:, 0, 4, 4, 4] for i in range(len(ds))]).numpy()  # the centre voxels
        return float(np.mean(inside(centres)))

    chance = 12 * 20 * 20 / (24 * 40 * 40)
    assert centre_in_body_fraction(0.0) < 2 * chance
    assert centre_in_body_fraction(0.75) > 0.7  # 0.75 * ~0.99 + 0.25 * chance ~ 0.77
    assert centre_in_body_fraction(1.0) > 0.95


def test_body_locations_in_the_case_properties_give_the_centres_without_probing(preprocessed_dataset, tmp_path,
                                                                              monkeypatch):
    """Cases preprocessed by nnUNetv2_hiendmae_preprocess_unlabeled carry body locations: centres come from them (no
    voxel is read to judge a candidate), and with body_prob 1 every centre is one of them."""
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    name = _known_body_dataset(tmp_path, preprocessed_dataset["preprocessed"], 979, "ct")
    folder = tmp_path / name / "nnUNetPlans_3d_fullres"
    locations = np.array([[7, 12, 12], [16, 27, 20], [10, 15, 25]], dtype=np.int16)
    for pkl in folder.glob("*.pkl"):
        props = pickle.loads(pkl.read_bytes())
        pkl.write_bytes(pickle.dumps({**props, "body_locations": locations}))
    reads = []
    original = nnUNetDatasetBlosc2.load_case

    def spying_load_case(self, identifier):
        data, seg, prev, props = original(self, identifier)
        return _Spy(data, reads), _Spy(seg, reads), prev, props

    src = resolve_sources([name])
    cases = infer_dataset_class(str(folder))(str(folder))
    values = {float(cases.load_case(c)[0][(0, *loc)]) for c in src[0].identifiers for loc in locations.tolist()}
    centres = crops(src, (1, 1, 1), 6, 10, seed=0, body_prob=1.0)  # a 1^3 crop is its centre voxel
    assert {float(centres[i]["crops"][k].item()) for i in range(10) for k in range(6)} <= values
    monkeypatch.setattr(nnUNetDatasetBlosc2, "load_case", spying_load_case)
    ds = crops(src, (4, 4, 4), 6, 10, seed=0, body_prob=1.0)
    for i in range(len(ds)):
        ds[i]
    assert reads and min(reads) == 4 ** 3  # only crop reads: no single-voxel probes


# ---------------------------------------------------------------------------------------------------- folds

def test_fold_uses_only_its_training_cases_and_writes_nothing(preprocessed_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    base = copy_preprocessed_dataset(preprocessed_dataset["preprocessed"], tmp_path, 982)  # no splits_final.json
    before = _listing(base)
    src = resolve_sources(["982"], fold=1)[0]
    for i in range(4):
        crops([src], (8, 16, 16), 1, 4)[i]
    assert _listing(base) == before  # nnU-Net's default split is made in memory, never written
    everything = sorted(resolve_sources(["982"])[0].identifiers)
    expected = generate_crossval_split(everything, seed=12345, n_splits=5)[1]["train"]
    assert src.identifiers == sorted(expected) and len(src.identifiers) == 5
    assert all(type(k) is str for k in src.identifiers)


def test_fold_reads_splits_final_json_and_rejects_out_of_range(preprocessed_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    base = copy_preprocessed_dataset(preprocessed_dataset["preprocessed"], tmp_path, 981)
    (base / "splits_final.json").write_text(json.dumps([{"train": ["case_004", "case_001"], "val": ["case_000"]}]))
    assert resolve_sources(["981"], fold=0)[0].identifiers == ["case_001", "case_004"]
    with pytest.raises(UserError, match=r"fold 1 is out of range.*splits_final\.json has folds 0-0"):
        resolve_sources(["981"], fold=1)


# ---------------------------------------------------------------------------------------------------- metadata

def test_metadata_schema_and_weights_only_round_trip(preprocessed_dataset, sources, tmp_path):
    plans = json.loads((preprocessed_dataset["preprocessed"] / "nnUNetPlans.json").read_text())
    meta = pretrain_metadata(sources, "nnUNetPlans", CONFIG)
    assert set(meta) == {"datasets", "plans", "configuration", "spacing", "transpose_forward", "normalization_schemes",
                         "use_mask_for_norm", "foreground_intensity_properties_per_channel", "channel_names",
                         "in_channels", "fold"}
    assert meta["spacing"] == plans["configurations"][CONFIG]["spacing"]
    assert meta["normalization_schemes"] == ["CTNormalization"] and meta["use_mask_for_norm"] == [False]
    assert meta["foreground_intensity_properties_per_channel"] == plans["foreground_intensity_properties_per_channel"]
    assert meta["transpose_forward"] == plans["transpose_forward"]
    assert meta["channel_names"] == {"0": "CT"} and meta["in_channels"] == 1 and meta["fold"] is None
    assert (meta["plans"], meta["configuration"]) == ("nnUNetPlans", CONFIG)
    names = [preprocessed_dataset["name"], preprocessed_dataset["unlabelled_name"]]
    assert [d["name"] for d in meta["datasets"]] == names
    assert [d["num_cases"] for d in meta["datasets"]] == [6, 3]
    assert set(meta["datasets"][0]) == {"name", "plans", "configuration", "data_identifier", "num_cases", "spacing",
                                        "normalization_schemes", "use_mask_for_norm", "channel_names",
                                        "foreground_intensity_properties_per_channel", "transpose_forward"}
    assert meta["datasets"][0]["data_identifier"] == plans["configurations"][CONFIG]["data_identifier"]
    torch.save({"pretrain": meta}, tmp_path / "m.pth")
    assert torch.load(tmp_path / "m.pth", weights_only=True)["pretrain"] == meta
    fold0 = resolve_sources([str(preprocessed_dataset["id"])], fold=0)
    assert pretrain_metadata(fold0, "nnUNetPlans", CONFIG)["fold"] == 0


# ---------------------------------------------------------------------------------------------------- bad input

def test_unset_or_missing_preprocessed_folder(preprocessed_dataset, monkeypatch, tmp_path):
    monkeypatch.delenv("nnUNet_preprocessed")
    with pytest.raises(UserError, match="nnUNet_preprocessed is not set"):
        resolve_sources(["990"])
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "nope"))
    with pytest.raises(UserError, match="does not exist"):
        resolve_sources(["990"])


def test_unknown_dataset_plans_or_configuration(preprocessed_dataset):
    with pytest.raises(UserError, match="dataset '979' not found"):
        resolve_sources(["979"])
    with pytest.raises(UserError, match="dataset 'abc' not found"):
        resolve_sources(["abc"])
    missing = preprocessed_dataset["preprocessed"].parent / "Dataset978_Nothing"
    with pytest.raises(UserError, match=f"{missing} not found; `nnUNetv2_plan_and_preprocess -d 978 -c 3d_fullres`"):
        resolve_sources(["Dataset978_Nothing"])
    plans_file = preprocessed_dataset["preprocessed"] / "NoSuchPlans.json"
    with pytest.raises(UserError, match=f"plans file {plans_file} not found.*nnUNetv2_plan_and_preprocess -d 990"):
        resolve_sources(["990"], plans="NoSuchPlans")
    with pytest.raises(UserError, match="configuration 'nope' is not in .*nnUNetPlans.json; available: .*3d_fullres"):
        resolve_sources(["990"], configuration="nope")


def test_missing_or_empty_data_folder(preprocessed_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    base = copy_preprocessed_dataset(preprocessed_dataset["preprocessed"], tmp_path, 982)
    data = base / "nnUNetPlans_3d_fullres"
    hint = "nnUNetv2_preprocess -d 982 -plans_name nnUNetPlans -c 3d_fullres"
    for f in data.iterdir():
        f.unlink()
    with pytest.raises(UserError, match=f"{data} is empty.*{hint}"):
        resolve_sources(["982"])
    data.rmdir()
    with pytest.raises(UserError, match=f"{data} not found.*{hint}"):
        resolve_sources(["982"])


def test_channel_count_mismatch(preprocessed_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    copy_preprocessed_dataset(preprocessed_dataset["preprocessed"], tmp_path, 983)
    two = copy_preprocessed_dataset(preprocessed_dataset["preprocessed"], tmp_path, 984)
    _edit_json(two / "dataset.json", lambda d: d.update(channel_names={"0": "CT", "1": "PET"}))
    with pytest.raises(UserError, match="different channel counts: Dataset983_Copy has 1, Dataset984_Copy has 2"):
        resolve_sources(["983", "984"])


def test_bad_crop_size(sources):
    with pytest.raises(UserError, match="3 positive sizes"):
        crops(sources, (96, 96), 1, 1)
