"""Embeddings of whole cases from a trained ViT encoder (the work of ``nnUNetv2_hiendmae_embed``; docs/embeddings.md).

A case is either a set of image files, read by nnU-Net's reader and preprocessed **exactly as the encoder's training
data were** (:func:`pretrain.unlabeled.nnunet_preprocess` with plans built from the checkpoint's settings), or a case
of an nnU-Net-preprocessed dataset, taken as it is. Loader workers read and preprocess the next cases while the
encoder runs (a bounded prefetch: at most two cases per worker wait in memory).

The encoder slides over the whole case with the patch it was trained on (windows aligned to the token grid, steps
from nnU-Net's ``compute_steps_for_sliding_window`` in token units); where windows overlap, their token features are
averaged. A case is padded, centred as nnU-Net's predictor pads, to at least the patch and to whole tokens, with each
channel's lowest value (air for CT, as the pretraining crops are padded). Per case:

- ``mean``: the token map averaged over the **body**, each token weighted by the fraction of its voxels that are body
  (the body rule of the pretraining sampler, :func:`pretrain.unlabeled.body_mask`; padding is never body); a case
  without body voxels averages the tokens over the image instead;
- ``cls``: the CLS token averaged over the windows (Primus has no CLS token: each window's mean normed token, the
  summary GL-MAE's consistency reads there too, averaged over the windows; a ResEnc read from nnssl, whose tokens are
  the voxels of a feature map, has none either: its global average pooling, averaged over the windows);
- with ``tokens``: the token map ``[E, *grid]`` in the axis order of the image as nnU-Net's reader returns it, with
  ``token_spacing`` and ``token_origin`` (mm, same axes; :func:`token_geometry` says what they mean) and
  ``token_body`` (the body fraction of each token).
"""
from __future__ import annotations

import itertools
import json
import math
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from nnunetv2_hiendmae.errors import UserError
from nnunetv2_hiendmae.fileio import atomic_write, atomic_write_json
from nnunetv2_hiendmae.precision import autocast
from nnunetv2_hiendmae.vit import tokens_to_volume
from pretrain.trained_encoder import TrainedEncoder
from pretrain.unlabeled import (
    Case,
    Report,
    Settings,
    body_mask,
    nnunet_preprocess,
    plans_for,
    read_case,
    record_skipped,
)

SETTINGS_FILE = "embed_settings.json"
TABLE = "embeddings"  # .parquet with pyarrow, else .csv
BODY_SEED = 0  # body threshold sampling of non-CT channels (pretrain.unlabeled.body_mask)
POOLS = ("mean", "cls")


@dataclass(frozen=True)
class Options:
    """How cases are embedded; everything but ``batch_size`` changes the numbers and goes into the run's settings."""

    pool: tuple[str, ...] = POOLS
    tokens: bool = False
    step_size: float = 0.5
    batch_size: int = 4  # windows per forward pass
    precision: str = "fp32"  # resolved: fp32, bf16 or fp16


# ---------------------------------------------------------------------------------------------- the sliding window

def window_starts(grid: Sequence[int], patch_grid: Sequence[int], step_size: float) -> list[tuple[int, int, int]]:
    """Start of every window, in tokens, tiling a token ``grid`` (each axis at least ``patch_grid``): nnU-Net's
    ``compute_steps_for_sliding_window`` in token units, so that every window lies on the case's token grid."""
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

    steps = compute_steps_for_sliding_window(tuple(grid), tuple(patch_grid), step_size)
    return list(itertools.product(*steps))


@torch.inference_mode()
def embed_volume(encoder: torch.nn.Module, image: torch.Tensor, patch: Sequence[int], step_size: float,
                 batch_size: int, precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """``image [C, *S]`` (``S`` whole tokens and at least ``patch`` per axis) -> ``(tokens [E, *S / token],
    cls [E])``, float32 on the image's device: the final normed token features of every window, averaged where windows
    overlap, and the CLS token averaged over the windows (Primus, without one: each window's mean normed token, what
    GL-MAE's consistency reads there too)."""
    token = encoder.token_size
    grid = [s // t for s, t in zip(image.shape[1:], token)]
    patch_grid = [p // t for p, t in zip(patch, token)]
    starts = window_starts(grid, patch_grid, step_size)
    total = torch.zeros(encoder.embed_dim, *grid, device=image.device)
    count = torch.zeros(grid, device=image.device)
    cls = torch.zeros(encoder.embed_dim, device=image.device)
    for i in range(0, len(starts), batch_size):
        batch = starts[i:i + batch_size]
        crops = torch.stack([image[(slice(None), *(slice(g * t, g * t + p) for g, t, p in zip(s, token, patch)))]
                             for s in batch])  # [B, C, *patch]
        with autocast(image.device, precision):
            normed, _ = encoder(crops)  # [B, P+N, E], P = 1 (CLS) for the ViT, 0 for Primus
        normed = normed.float()
        features = tokens_to_volume(normed, patch_grid)  # [B, E, *patch_grid]
        for s, f in zip(batch, features):
            where = tuple(slice(g, g + p) for g, p in zip(s, patch_grid))
            total[(slice(None), *where)] += f
            count[where] += 1
        cls += encoder.pooled(normed).sum(0)
    return total / count, cls / len(starts)


# ------------------------------------------------------------------------------------------------ preparing a case

def pad_for_windows(data: np.ndarray, patch: Sequence[int], token: Sequence[int]) -> tuple[np.ndarray, list[int]]:
    """``[C, *S]`` padded, centred, to whole tokens and at least ``patch`` per axis, with each channel's lowest value:
    ``(padded, voxels added before the case on each axis)``."""
    target = [max(p, math.ceil(n / t) * t) for n, p, t in zip(data.shape[1:], patch, token)]
    before = [(m - n) // 2 for n, m in zip(data.shape[1:], target)]
    widths = [(b, m - n - b) for n, m, b in zip(data.shape[1:], target, before)]
    padded = np.stack([np.pad(c, widths, constant_values=c.min()) for c in data]) if any(map(any, widths)) else data
    return padded, before


def token_fraction(mask: np.ndarray, token: Sequence[int]) -> np.ndarray:
    """``[*S]`` boolean (``S`` whole tokens) -> ``[*S / token]`` float32: the fraction of each token's voxels set."""
    g = [s // t for s, t in zip(mask.shape, token)]
    return mask.reshape(g[0], token[0], g[1], token[1], g[2], token[2]).mean((1, 3, 5), dtype=np.float32)


def token_geometry(props: dict, shape: Sequence[int], before: Sequence[int], token: Sequence[int],
                   transpose_forward: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Where the token map lies in the image as nnU-Net's reader returns it: ``(token_spacing [3], token_origin [3])``
    in mm, in the reader's axis order (``props["spacing"]``'s).

    ``token_origin`` is the centre of token (0, 0, 0), measured from the centre of the image's first voxel;
    ``token_spacing`` the distance between neighbouring token centres. Token ``(i, j, k)`` is centred on voxel index
    ``(token_origin + (i, j, k) * token_spacing) / spacing`` of the image. It follows nnU-Net's preprocessing back:
    the crop to the nonzero region (``bbox_used_for_cropping``), the resampling, which maps the cropped region's
    extent edge to edge onto the resampled ``shape`` (so a resampled voxel is ``cropped extent / shape``, the target
    spacing up to nnU-Net's rounding of the shape), and ``before``, the padding of :func:`pad_for_windows`.
    ``props`` are nnU-Net's properties of the case (``spacing``, ``bbox_used_for_cropping``,
    ``shape_after_cropping_and_before_resampling``); ``shape`` the preprocessed shape, transposed as the data.
    """
    original = [float(props["spacing"][a]) for a in transpose_forward]  # mm, transposed axes
    cropped = props["shape_after_cropping_and_before_resampling"]
    voxel = [n * s / m for n, s, m in zip(cropped, original, shape)]
    spacing = [t * v for t, v in zip(token, voxel)]
    origin = [(box[0] - 0.5) * s - b * v + ts / 2
              for box, s, b, v, ts in zip(props["bbox_used_for_cropping"], original, before, voxel, spacing)]
    back = [list(transpose_forward).index(a) for a in range(3)]
    return np.array([spacing[i] for i in back]), np.array([origin[i] for i in back])


def prepare(name: str, source: list[str], data: np.ndarray, props: dict, settings: Settings,
            token: Sequence[int]) -> dict:
    """A preprocessed case ``[C, *S]`` (``settings``' axes and normalisation; their ``patch_size``, the windows') made
    ready for :func:`embed_volume`: padded image, body and image fraction per token, token geometry."""
    image, before = pad_for_windows(np.asarray(data, dtype=np.float32), settings.patch_size, token)
    inside = np.zeros(image.shape[1:], dtype=bool)
    inside[tuple(slice(b, b + n) for b, n in zip(before, data.shape[1:]))] = True
    body = inside & body_mask(image, settings, BODY_SEED)
    spacing, origin = token_geometry(props, data.shape[1:], before, token, settings.transpose_forward)
    return {"name": name, "source": source, "image": torch.from_numpy(image),
            "token_body": torch.from_numpy(token_fraction(body, token)),
            "token_image": torch.from_numpy(token_fraction(inside, token)),
            "token_spacing": spacing, "token_origin": origin}


def _reason(e: Exception, what: str) -> str:
    text = str(e).strip().splitlines()
    return f"failed in {what} ({type(e).__name__}: {text[0][:150] if text else 'no message'})"


class ImageCases(Dataset):
    """Item ``i``: case ``i`` read by nnU-Net's reader, preprocessed with ``plans`` (the encoder's training data's
    preprocessing) and prepared; or ``{name, source, error}`` when it cannot be used."""

    def __init__(self, cases: list[Case], settings: Settings, plans: dict, token: Sequence[int]):
        self.cases, self.settings, self.plans, self.token = cases, settings, plans, tuple(token)

    def __len__(self) -> int:
        return len(self.cases)

    def name(self, i: int) -> str:
        return self.cases[i].name

    def __getitem__(self, i: int) -> dict:
        case = self.cases[i]
        try:
            data, props = read_case(case, self.settings.reader)
            if data.shape[0] != self.settings.channels:
                raise ValueError(f"has {data.shape[0]} channels, the encoder {self.settings.channels}")
        except ValueError as e:
            return {"name": case.name, "source": case.files, "error": str(e)}
        try:
            data, props = nnunet_preprocess(data, props, self.plans)
            return prepare(case.name, case.files, data, props, self.settings, self.token)
        except Exception as e:  # noqa: BLE001 - one bad case must never stop the run; it is reported
            return {"name": case.name, "source": case.files, "error": _reason(e, "preprocessing")}


class PreprocessedCases(Dataset):
    """Item ``i``: case ``identifiers[i]`` of an nnU-Net-preprocessed data folder, as it is, prepared; ``settings``
    describe the folder's preprocessing, their ``patch_size`` the windows."""

    def __init__(self, folder: str, identifiers: list[str], settings: Settings, token: Sequence[int]):
        from nnunetv2.training.dataloading.nnunet_dataset import file_ending_dataset_mapping, infer_dataset_class

        self.folder, self.identifiers, self.settings, self.token = folder, identifiers, settings, tuple(token)
        self.dataset_class = infer_dataset_class(folder)
        self.ending = next(e for e, c in file_ending_dataset_mapping.items() if c is self.dataset_class)
        self._dataset = None  # nnU-Net's dataset object, made in each worker

    def __getstate__(self):
        return {**self.__dict__, "_dataset": None}

    def __len__(self) -> int:
        return len(self.identifiers)

    def name(self, i: int) -> str:
        return self.identifiers[i]

    def __getitem__(self, i: int) -> dict:
        name = self.identifiers[i]
        if self._dataset is None:
            self._dataset = self.dataset_class(self.folder, self.identifiers)
        source = [str(Path(self.folder) / f"{name}.{self.ending}")]
        try:
            data, _, _, props = self._dataset.load_case(name)
            return prepare(name, source, np.asarray(data[:]), props, self.settings, self.token)
        except Exception as e:  # noqa: BLE001 - one bad case must never stop the run; it is reported
            return {"name": name, "source": source, "error": _reason(e, "loading")}


# ------------------------------------------------------------------------------------------------------ the outputs

def pooled_mean(tokens: torch.Tensor, token_body: torch.Tensor, token_image: torch.Tensor) -> torch.Tensor:
    """``[E, *G]`` -> ``[E]``: tokens weighted by their body fraction, or by their image fraction without body."""
    weight = token_body if token_body.sum() > 0 else token_image
    return (tokens * weight).sum(dim=(1, 2, 3)) / weight.sum()


def case_arrays(item: dict, tokens: torch.Tensor, cls: torch.Tensor, options: Options,
                transpose_forward: Sequence[int]) -> dict[str, np.ndarray]:
    """What ``OUT/<case>.npz`` holds (module docstring); the token map transposed back to the reader's axes."""
    arrays = {"source": np.array(item["source"])}
    if "mean" in options.pool:
        arrays["mean"] = pooled_mean(tokens, item["token_body"].to(tokens.device),
                                     item["token_image"].to(tokens.device)).cpu().numpy()
    if "cls" in options.pool:
        arrays["cls"] = cls.cpu().numpy()
    if options.tokens:
        back = [list(transpose_forward).index(a) for a in range(3)]
        arrays.update(tokens=tokens.permute(0, *[b + 1 for b in back]).cpu().numpy(),
                      token_body=item["token_body"].permute(*back).numpy(),
                      token_spacing=np.asarray(item["token_spacing"], dtype=np.float64),
                      token_origin=np.asarray(item["token_origin"], dtype=np.float64))
    return arrays


def write_table(out: Path) -> Path:
    """``OUT/embeddings.parquet`` (with pyarrow) or ``.csv``, rewritten atomically from every ``OUT/*.npz``: one row
    per case (``case``, ``source``: its files joined by ``;``, then ``mean_0`` ... and ``cls_0`` ...)."""
    import pandas as pd

    rows = []
    for path in sorted(out.glob("*.npz")):
        with np.load(path) as z:
            row = {"case": path.stem, "source": ";".join(str(s) for s in z["source"])}
            for pool in POOLS:
                if pool in z.files:
                    row.update({f"{pool}_{i}": float(v) for i, v in enumerate(z[pool])})
        rows.append(row)
    table = pd.DataFrame(rows, columns=None if rows else ["case", "source"])
    try:
        import pyarrow  # noqa: F401 - only whether it is there

        path, other = out / f"{TABLE}.parquet", out / f"{TABLE}.csv"
        atomic_write(path, lambda f: table.to_parquet(f, index=False))
    except ImportError:
        path, other = out / f"{TABLE}.csv", out / f"{TABLE}.parquet"
        atomic_write(path, lambda f: f.write(table.to_csv(index=False, float_format="%.9g").encode()))
    other.unlink(missing_ok=True)  # an earlier run's table in the other format is not complete any more
    return path


# ---------------------------------------------------------------------------------------------------------- the run

@dataclass
class Timing:
    """Seconds of the run: in the encoder (incl. writing a case's file), and waiting for the loader's next case."""

    encoder: float = 0.0
    waiting: float = 0.0
    cases: int = 0

    def summary(self) -> str:
        total = self.encoder + self.waiting
        rate = f"{self.cases / total:.3g} cases/s" if total > 0 and self.cases else "no case embedded"
        return (f"{rate} ({self.cases} in {total:.1f} s); the encoder waited {self.waiting:.1f} s for reading and "
                f"preprocessing")


def run_settings(trained: TrainedEncoder, dataset: ImageCases | PreprocessedCases, options: Options) -> dict:
    """What the outputs in a folder depend on; a resumed run must have the same (``embed_settings.json``)."""
    preprocessing = {k: v for k, v in asdict(dataset.settings).items() if k != "source"}
    return json.loads(json.dumps({
        "encoder_sha256": trained.fingerprint, "encoder": trained.description,
        "data": "image files" if isinstance(dataset, ImageCases) else dataset.settings.source,
        "preprocessing": preprocessing, "step_size": options.step_size,
        "pool": list(options.pool), "tokens": options.tokens, "precision": options.precision}))


def check_output(out: Path, run_info: dict) -> None:
    """Refuse a file, a folder with .npz files of another origin, or embeddings made otherwise."""
    if out.exists() and not out.is_dir():
        raise UserError(f"-o {out} is a file; give a folder")
    stored = out / SETTINGS_FILE
    if stored.is_file():
        before = json.loads(stored.read_text())
        changed = [k for k in run_info if before.get(k) != run_info[k]]
        if changed:
            raise UserError(f"{out} holds embeddings made with other settings ({', '.join(changed)} differ): use "
                            f"another -o, or the settings in {stored}")
    elif out.is_dir() and any(out.glob("*.npz")):
        raise UserError(f"{out} holds .npz files that nnUNetv2_hiendmae_embed did not write: choose another -o")


def embed(dataset: ImageCases | PreprocessedCases, trained: TrainedEncoder, out: Path, options: Options,
          run_info: dict, device: torch.device, processes: int) -> tuple[Report, Timing, Path]:
    """Embed every case of ``dataset`` that has no ``.npz`` in ``out`` yet, with ``processes`` loader workers reading
    ahead; then write the table and ``skipped.json``. Returns the report, the timing and the table (``out`` itself
    when nothing could be embedded: the folder is then removed if this run created it)."""
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / SETTINGS_FILE, run_info)
    encoder = trained.encoder.to(device)
    patch, transpose_forward = dataset.settings.patch_size, dataset.settings.transpose_forward
    report, timing = Report(verb="embedded"), Timing()
    todo = Subset(dataset, [i for i in range(len(dataset)) if not (out / f"{dataset.name(i)}.npz").is_file()])
    loader = DataLoader(todo, batch_size=None, num_workers=processes, pin_memory=device.type == "cuda",
                        prefetch_factor=2 if processes else None)
    bar = tqdm(total=len(todo), desc="embedding", unit="case", dynamic_ncols=True, file=sys.stderr)
    cases = iter(loader)
    while True:
        t0 = time.perf_counter()
        item = next(cases, None)
        t1 = time.perf_counter()
        timing.waiting += t1 - t0
        if item is None:
            break
        if "error" in item:
            report.skipped[item["name"]] = {"files": list(item["source"]), "reason": item["error"]}
            tqdm.write(f"skipped {item['name']}: {item['error']}", file=sys.stderr)
        else:
            tokens, cls = embed_volume(encoder, item["image"].to(device, non_blocking=True), patch,
                                       options.step_size, options.batch_size, options.precision)
            arrays = case_arrays(item, tokens, cls, options, transpose_forward)
            atomic_write(out / f"{item['name']}.npz", lambda f, a=arrays: np.savez(f, **a))
            report.done += 1
            timing.cases += 1
            timing.encoder += time.perf_counter() - t1
        bar.set_postfix(skipped=len(report.skipped))
        bar.update(1)
    bar.close()
    done = sorted(p.stem for p in out.glob("*.npz"))
    report.already = len(done) - report.done
    if created and not done:  # nothing usable: leave no folder that a later run would have to match
        shutil.rmtree(out)
        return report, timing, out
    record_skipped(out / "skipped.json", done, report.skipped)
    return report, timing, write_table(out)


# ------------------------------------------------------------------------------------------------------ the inputs

def image_cases(cases: list[Case], trained: TrainedEncoder, reader: str | None) -> ImageCases:
    """Image files, preprocessed as the encoder's training data were (``reader`` replaces the encoder's own)."""
    settings = trained.settings if reader is None else replace(trained.settings, reader=reader)
    return ImageCases(cases, settings, plans_for("embedding", settings, [0.0, 0.0, 0.0]), trained.encoder.token_size)


def ct_statistics(settings: Settings) -> list[dict]:
    """The intensity properties that nnU-Net's ``CTNormalization`` uses, of each CT channel."""
    return [settings.intensity[str(c)] for c, s in enumerate(settings.normalization_schemes) if s == "CTNormalization"]


def preprocessed_cases(dataset: str, plans: str, configuration: str,
                       trained: TrainedEncoder) -> tuple[PreprocessedCases, list[str]]:
    """The cases of an nnU-Net-preprocessed dataset, taken as they are, and a note for each way in which their
    preprocessing differs from that of the encoder's training data (axis order, spacing, normalisation)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunetv2_hiendmae.plans import same, to_dataset_axes
    from pretrain.data import resolve_sources
    from pretrain.unlabeled import settings_from_plans

    src = resolve_sources([dataset], plans, configuration)[0]
    channels, want = len(src.channel_names), trained.settings
    if channels != want.channels:
        raise UserError(f"{src.dataset_name} has {channels} channels, the encoder {want.channels}")
    manager = PlansManager(str(Path(src.folder).parent / f"{plans}.json"))
    tf = list(manager.transpose_forward)
    patch = to_dataset_axes(want.patch_size, want.transpose_forward, tf)
    settings = settings_from_plans(manager, configuration, channels, patch,
                                   f"{src.dataset_name} ({plans}, {configuration})")
    spacing = to_dataset_axes(want.spacing, want.transpose_forward, tf)
    notes = []
    if tf != list(want.transpose_forward):
        notes.append(f"axis order (transpose_forward) {tf}, the encoder's data {list(want.transpose_forward)}")
    if not same(settings.spacing, spacing):
        notes.append(f"spacing {settings.spacing}, the encoder's data {spacing}")
    if settings.normalization_schemes != want.normalization_schemes:
        notes.append(f"normalisation {settings.normalization_schemes}, the encoder's data "
                     f"{want.normalization_schemes}")
    elif not same(ct_statistics(settings), ct_statistics(want)):
        notes.append("CTNormalization with other intensity properties (clip and z-score) than the encoder's data")
    return PreprocessedCases(src.folder, src.identifiers, settings, trained.encoder.token_size), notes
