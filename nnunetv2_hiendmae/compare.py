"""Compare nnU-Net validation results of several trainer/plans pairs, fold by fold.

nnU-Net writes ``fold_<f>/validation/summary.json`` for every trained fold; this module reads those
files for each ``TRAINER__PLANS`` entry, so our Hi-End-MAE trainers and nnU-Net's own baselines
(``nnUNetTrainer__nnUNetPlans``, Primus, ResEnc) are compared on exactly the numbers nnU-Net reports.
It prints a table (Dice per class, mean foreground Dice, mean +- std over folds, paired difference to
the first entry with its 95 % paired t interval and a verdict) and writes it as CSV, Markdown and a PNG plot.
The statistics (:func:`paired_difference`, :func:`verdict`) and the rendering helpers serve
``nnUNetv2_hiendmae_study`` as well.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nnunetv2_hiendmae import variants
from nnunetv2_hiendmae.errors import ArgumentParser, UserError, cli_entry
from nnunetv2_hiendmae.fileio import atomic_write_bytes
from nnunetv2_hiendmae.nnunet_paths import crossval_folds, dataset_name, nnunet_folder

DEFAULT_CONFIGURATION = "3d_fullres"
FG_COLUMN = "mean fg Dice"
CI_LEVEL = 0.95
CI_NOTE = ("95 % CI: paired t interval over folds, mean Δ ± t(0.975, n−1)·s/√n of the per-fold differences; "
           "'better' or 'worse' when it excludes 0, else 'not distinguishable at n folds' (not evidence of equality)")
_ENTRY_RE = re.compile(r"^([A-Za-z0-9_.\-]+?)__([A-Za-z0-9_.\-]+)$")
_FOLD_DIR_RE = re.compile(r"^fold_(\d+)$")

ClassKey = tuple  # canonical label/region: (1,) for label 1, (1, 2, 3) for a region


# --------------------------------------------------------------------------------------------- data


@dataclass
class FoldResult:
    """Dice values of one fold's validation set, as nnU-Net's summary.json reports them."""

    fold: int
    class_dice: dict[ClassKey, float]
    fg_dice: float


@dataclass
class EntryResult:
    """All folds found for one ``TRAINER__PLANS`` entry."""

    name: str
    folder: Path
    folds: dict[int, FoldResult]

    def fold_ids(self) -> list[int]:
        """Folds that have a validation summary, sorted."""
        return sorted(self.folds)

    def values(self, column: ClassKey | str) -> dict[int, float]:
        """Per-fold values of one class (ClassKey) or of the mean foreground Dice (FG_COLUMN)."""
        if column == FG_COLUMN:
            return {f: r.fg_dice for f, r in self.folds.items()}
        return {f: r.class_dice.get(column, math.nan) for f, r in self.folds.items()}


@dataclass
class Paired:
    """Paired difference entry - reference over the folds both have (NaN folds dropped), with the 95 % paired t
    interval of its mean (NaN below two folds)."""

    mean: float
    std: float
    folds: list[int]
    ci_low: float = math.nan
    ci_high: float = math.nan


@dataclass
class Comparison:
    """Everything the tool computed; what ``main`` prints and writes, usable from Python too."""

    dataset: str
    configuration: str
    classes: list[ClassKey]
    class_names: dict[ClassKey, str]
    entries: list[EntryResult]
    warnings: list[str] = field(default_factory=list)
    out_dir: Path | None = None
    files: list[Path] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)  # short names for figures (entry_labels); set by __post_init__
    split_source: str | None = None  # the dataset's splits_final.json the folds were checked against, if it has one
    guard: list[str] = field(default_factory=list)  # what the leakage guard said about the pretrained entries

    def __post_init__(self) -> None:
        self.labels = self.labels or entry_labels([e.name for e in self.entries])

    @property
    def columns(self) -> list[ClassKey | str]:
        """Metric columns in table order: every class, then the mean foreground Dice."""
        return [*self.classes, FG_COLUMN]

    def column_name(self, column: ClassKey | str) -> str:
        """Human-readable name of a metric column."""
        return column if isinstance(column, str) else self.class_names[column]

    def mean_std(self, entry: EntryResult, column: ClassKey | str) -> tuple[float, float]:
        """Mean and sample std over the entry's folds of one column."""
        return mean_std(entry.values(column).values())

    def paired(self, entry: EntryResult, column: ClassKey | str) -> Paired:
        """Paired difference of one column between ``entry`` and the first (reference) entry."""
        return paired_difference(entry.values(column), self.entries[0].values(column))


# --------------------------------------------------------------------------------------- statistics


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample std (n-1) ignoring NaN; std is NaN below two values, so one fold shows no spread."""
    arr = np.asarray([v for v in values if not math.isnan(v)], dtype=float)
    if arr.size == 0:
        return math.nan, math.nan
    std = float(np.std(arr, ddof=1)) if arr.size > 1 else math.nan
    return float(np.mean(arr)), std


def t_interval(values: Sequence[float], level: float = CI_LEVEL) -> tuple[float, float]:
    """Student t interval of the mean: ``mean -/+ t_{(1+level)/2, n-1} * s / sqrt(n)`` (sample std ``s``); NaN below
    two values. Over paired per-fold differences this is the paired t interval: with the 2-5 folds of a
    cross-validation it is the honest choice, a bootstrap over so few folds has next to no distinct resamples."""
    from scipy import stats  # here, not at import: the command's --help stays instant

    arr = np.asarray(values, dtype=float)
    if arr.size < 2:
        return math.nan, math.nan
    half = float(stats.t.ppf((1 + level) / 2, arr.size - 1) * np.std(arr, ddof=1) / math.sqrt(arr.size))
    return float(np.mean(arr)) - half, float(np.mean(arr)) + half


def paired_difference(values: dict[int, float], reference: dict[int, float]) -> Paired:
    """Difference per shared fold, then mean/std and the 95 % paired t interval: removes fold-to-fold difficulty
    from the comparison."""
    shared = sorted(set(values) & set(reference))
    diffs = {f: values[f] - reference[f] for f in shared}
    used = [f for f in shared if not math.isnan(diffs[f])]
    m, s = mean_std(diffs[f] for f in used)
    return Paired(m, s, used, *t_interval([diffs[f] for f in used]))


def verdict(p: Paired, name: str, reference: str, metric: str = FG_COLUMN) -> str:
    """One line: ``name`` better / worse than ``reference`` when the 95 % interval of the paired difference excludes
    0, else not distinguishable at this number of folds (which is no evidence of equality)."""
    n = len(p.folds)
    if n == 0:
        return f"{name} vs {reference}: no shared fold, no comparison"
    if n == 1:
        return f"{name} vs {reference}: one shared fold, no interval and no verdict (Δ {metric} {p.mean:+.4f})"
    numbers = f"Δ {metric} {p.mean:+.4f}, 95 % CI [{p.ci_low:+.4f}, {p.ci_high:+.4f}], {n} folds"
    if p.ci_low > 0:
        return f"{name} better than {reference} ({numbers})"
    if p.ci_high < 0:
        return f"{name} worse than {reference} ({numbers})"
    return f"{name} vs {reference}: not distinguishable at {n} folds ({numbers})"


# ------------------------------------------------------------------------------------- locating data


def results_dataset_folder(dataset: str) -> Path:
    """``$nnUNet_results/DatasetXXX_Name`` for an id or name, as nnU-Net resolves it; it must exist."""
    root = nnunet_folder("nnUNet_results")
    name = dataset_name(dataset)
    if not (root / name).is_dir():
        raise UserError(f"dataset {name} has no results folder: {root / name} does not exist")
    return root / name


def parse_entry(value: str) -> tuple[str, str]:
    """``TRAINER__PLANS`` -> (trainer, plans); rejects anything else so typos fail loudly."""
    match = _ENTRY_RE.match(value)
    if match is None or "__" in match.group(2):
        hint = ""
        if value.count("__") == 2:
            hint = " (drop the configuration part; pass it with -c)"
        raise UserError(f"-r value {value!r} is not TRAINER__PLANS, e.g. nnUNetTrainer__nnUNetPlans{hint}")
    return match.group(1), match.group(2)


def entry_folder(dataset_dir: Path, entry: str, configuration: str) -> Path:
    """Folder nnU-Net trains ``entry`` into; names the available ones when it is missing."""
    trainer, plans = parse_entry(entry)
    folder = dataset_dir / f"{trainer}__{plans}__{configuration}"
    if not folder.is_dir():
        available = sorted(p.name for p in dataset_dir.iterdir() if p.is_dir() and p.name.count("__") == 2)
        listing = ", ".join(available) if available else "none"
        raise UserError(f"no results for {entry} with configuration {configuration}: {folder} does not exist "
                        f"(found: {listing})")
    return folder


def fold_dirs(folder: Path) -> dict[int, Path]:
    """Numbered ``fold_<f>`` folders; ``fold_all`` is skipped because it validates on its training data."""
    found = {}
    for p in folder.iterdir():
        match = _FOLD_DIR_RE.match(p.name)
        if match and p.is_dir():
            found[int(match.group(1))] = p
    return dict(sorted(found.items()))


def summary_path(fold_dir: Path) -> Path:
    """Where nnU-Net's final validation writes its metrics."""
    return fold_dir / "validation" / "summary.json"


# -------------------------------------------------------------------------------------- reading data


def canonical_key(key: str) -> ClassKey:
    """summary.json class key ("1" or "(1, 2)") -> tuple, so labels and regions sort and match together.

    Same parsing as nnunetv2.evaluation.evaluate_predictions.key_to_label_or_region, re-done here because
    importing that module pulls in torch and every image reader (seconds of start-up for reading JSON).
    """
    try:
        return (int(key),)
    except ValueError:
        parts = key.replace("(", "").replace(")", "").split(",")
        return tuple(int(p) for p in parts if p.strip())


def _as_float(value: object) -> float:
    """JSON number or null -> float; nnU-Net writes NaN for classes absent from every validation case."""
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"not a number: {value!r}")
    return float(value)


def load_fold(path: Path, fold: int) -> tuple[FoldResult, list[ClassKey]]:
    """Read one summary.json; returns the fold and the classes whose Dice is NaN in it."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        means = data["mean"]
        class_dice = {canonical_key(str(k)): _as_float(v["Dice"]) for k, v in means.items()}
        stored_fg = _as_float(data.get("foreground_mean", {}).get("Dice"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"cannot read {path}: not an nnU-Net summary.json ({type(e).__name__}: {e})") from None
    if not class_dice:
        raise UserError(f"cannot read {path}: it lists no classes under 'mean'")
    nan_classes = [k for k, v in class_dice.items() if math.isnan(v)]
    fg = stored_fg
    if math.isnan(fg):
        # nnU-Net averages with np.mean, so one absent class makes its foreground mean NaN; average the rest
        fg_values = [v for k, v in class_dice.items() if k != (0,) and not math.isnan(v)]
        fg = float(np.mean(fg_values)) if fg_values else math.nan
    return FoldResult(fold, class_dice, fg), nan_classes


def load_label_names(folders: Sequence[Path]) -> dict[ClassKey, str]:
    """Class names from the dataset.json nnU-Net copies into each results folder (first readable one)."""
    for folder in folders:
        try:
            with open(folder / "dataset.json", encoding="utf-8") as f:
                labels = json.load(f)["labels"]
            names = {}
            for name, value in labels.items():
                key = (int(value),) if isinstance(value, (int, float)) else tuple(int(v) for v in value)
                names[key] = str(name)
            return names
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
    return {}


def class_display_names(classes: Sequence[ClassKey], labels: dict[ClassKey, str]) -> dict[ClassKey, str]:
    """Name per class: dataset.json's name, else ``label 1`` / ``region (1, 2)``; always unique."""
    names: dict[ClassKey, str] = {}
    for key in classes:
        fallback = f"label {key[0]}" if len(key) == 1 else f"region {key}"
        name = labels.get(key, fallback)
        names[key] = name if name not in names.values() else f"{name} {fallback}"
    return names


def collect_entry(name: str, folder: Path, folds: Sequence[int] | None,
                  names: dict[ClassKey, str] | None = None) -> tuple[EntryResult, list[str]]:
    """Load the requested (or all) folds of one entry; returns it with warnings about what was skipped."""
    warnings: list[str] = []
    present = fold_dirs(folder)
    wanted = sorted(set(folds)) if folds is not None else list(present)
    results: dict[int, FoldResult] = {}
    for f in wanted:
        if f not in present:
            warnings.append(f"{name}: fold {f} missing (no {folder.name}/fold_{f} folder)")
            continue
        path = summary_path(present[f])
        if not path.is_file():
            warnings.append(f"{name}: fold {f} skipped, {folder.name}/fold_{f}/validation/summary.json not found "
                            "(training not finished?)")
            continue
        result, nan_classes = load_fold(path, f)
        results[f] = result
        for key in nan_classes:
            label = (names or {}).get(key, str(key[0]) if len(key) == 1 else str(key))
            warnings.append(f"{name}: fold {f}: Dice of class {label} is nan (absent from every validation case); "
                            "excluded from that fold's mean fg Dice")
    if not results:
        which = f"folds {' '.join(map(str, wanted))}" if folds is not None else "any fold"
        raise UserError(f"{name}: no validation/summary.json for {which} in {folder}")
    return EntryResult(name, folder, results), warnings


def leakage_guard(entry: EntryResult, dataset: str, strict: bool = False,
                  checked: dict | None = None) -> tuple[list[str], list[str]]:
    """The leakage guard of ``nnUNetv2_hiendmae_plan`` for an entry fine-tuned from a pretrained encoder (its trainer
    loads one and the model folder's ``plans.json`` names the checkpoint in ``pretrain_info``), on the validation
    cases of the folds it is scored on: ``(warnings, notes)``, each line naming the entry; ``([], [])`` for an
    entry without a pretrained encoder (nnU-Net's trainers, a ViT from scratch). ``strict``: UserError on a
    validation case the pretraining saw. ``checked``: the guard's results by checkpoint and folds, shared by the
    entries of one comparison, so that entries fine-tuned from the same checkpoint read the dataset's images once."""
    from nnunetv2_hiendmae import trainers
    from nnunetv2_hiendmae.checkpoint import load_checkpoint
    from nnunetv2_hiendmae.leakage import check_checkpoint

    trainer = getattr(trainers, parse_entry(entry.name)[0], None)
    if not getattr(trainer, "load_pretrained", False):
        return [], []
    try:
        checkpoint = json.loads((entry.folder / "plans.json").read_text())["pretrain_info"]["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError):
        return [], [f"{entry.name}: its plans.json names no pretraining checkpoint: the leakage guard cannot check "
                    "what the encoder saw"]
    if not checkpoint or not Path(checkpoint).is_file():
        return [], [f"{entry.name}: its pretraining checkpoint {checkpoint} is not there: the leakage guard cannot "
                    "check what the encoder saw"]
    checked = {} if checked is None else checked
    key = (checkpoint, tuple(entry.fold_ids()))
    if key not in checked:
        try:
            checked[key] = check_checkpoint(load_checkpoint(checkpoint)["pretrain"], dataset, strict,
                                            scored_folds=entry.fold_ids())
        except UserError as e:
            raise UserError(f"{entry.name}: {e}") from None
    warnings, notes = checked[key]
    return [f"{entry.name}: {line.strip()}" for line in warnings], [f"{entry.name}: {n}" for n in notes]


def fold_set_warnings(entries: Sequence[EntryResult]) -> list[str]:
    """Say plainly when entries were evaluated on different folds, since their means then differ in kind."""
    sets = {e.name: e.fold_ids() for e in entries}
    if len({tuple(v) for v in sets.values()}) <= 1:
        return []
    listing = "; ".join(f"{n}: {' '.join(map(str, v))}" for n, v in sets.items())
    warnings = [f"folds differ between entries ({listing}); mean ± std is over each entry's own folds, "
                "paired differences use only the folds shared with the first entry"]
    ref = set(entries[0].folds)
    for e in entries[1:]:
        if not ref & set(e.folds):
            warnings.append(f"{e.name} shares no fold with {entries[0].name}: no paired difference")
    return warnings


# ----------------------------------------------------------------------------------------- rendering


def entry_labels(entries: Sequence[str]) -> list[str]:
    """Short names of ``TRAINER__PLANS`` entries for figures and tables: the arm (pretrained ViT, ViT from scratch,
    nnU-Net default, frozen pretrained ViT, ...), plus its schedule and label budget only where the entries differ in
    them, plus the plans where that is what tells two apart; always unique."""
    parsed = [parse_entry(e) for e in entries]
    parts = [variants.describe(trainer) for trainer, _ in parsed]
    shown = [i == 0 or len({p[i] for p in parts}) > 1 for i in range(3)]  # the arm; schedule, budget if they differ
    labels = [", ".join(bit for bit, show in zip(p, shown) if show and bit) for p in parts]
    plans_of: dict[str, set[str]] = {}
    for label, (_, plans) in zip(labels, parsed):
        plans_of.setdefault(label, set()).add(plans)
    labels = [f"{label} ({plans})" if len(plans_of[label]) > 1 else label for label, (_, plans) in zip(labels, parsed)]
    return [f"{label} #{i + 1}" if labels.count(label) > 1 else label for i, label in enumerate(labels)]


def csv_number(x: float) -> str:
    """CSV number: 10 significant digits, far beyond Dice's meaning but free of float noise like ...0000002."""
    return "nan" if math.isnan(x) else f"{x:.10g}"


def fmt_mean_std(mean: float, std: float, signed: bool = False) -> str:
    """``0.8123 ± 0.0100`` for Markdown; just the mean when there is only one fold."""
    if math.isnan(mean):
        return "nan"
    m = f"{mean:+.4f}" if signed else f"{mean:.4f}"
    return m if math.isnan(std) else f"{m} ± {std:.4f}"


def fmt_interval(p: Paired) -> str:
    """``+0.0475 [-0.3019, +0.3969]``: the mean paired difference and its 95 % interval (none below two folds)."""
    if math.isnan(p.mean):
        return "nan"
    return f"{p.mean:+.4f}" if math.isnan(p.ci_low) else f"{p.mean:+.4f} [{p.ci_low:+.4f}, {p.ci_high:+.4f}]"


def render_csv(comp: Comparison) -> str:
    """One row per entry and fold, plus ``mean`` and ``std`` rows, and ``ci95_low``/``ci95_high`` rows holding the
    paired differences' 95 % interval in the delta columns: both per-fold and aggregate numbers."""
    columns = comp.columns
    header = ["entry", "arm", "fold", "n_folds", "folds", "paired_folds"]
    for c in columns:
        name = comp.column_name(c)
        header += [f"Dice {name}" if c != FG_COLUMN else FG_COLUMN, f"delta {name}"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    ref = comp.entries[0]
    for i, (entry, label) in enumerate(zip(comp.entries, comp.labels)):
        for f in entry.fold_ids():
            row = [entry.name, label, str(f), "1", str(f), str(f) if (i > 0 and f in ref.folds) else ""]
            for c in columns:
                v = entry.values(c)[f]
                delta = csv_number(v - ref.values(c)[f]) if (i > 0 and f in ref.folds) else ""
                row += [csv_number(v), delta]
            writer.writerow(row)
        folds = " ".join(map(str, entry.fold_ids()))
        paired_folds = " ".join(map(str, comp.paired(entry, FG_COLUMN).folds)) if i > 0 else ""
        for stat in ("mean", "std", "ci95_low", "ci95_high"):
            if stat.startswith("ci95") and i == 0:
                continue
            row = [entry.name, label, stat, str(len(entry.folds)), folds, paired_folds]
            for c in columns:
                value = ""
                if stat in ("mean", "std"):
                    value = csv_number(comp.mean_std(entry, c)[stat == "std"])
                delta = ""
                if i > 0:
                    p = comp.paired(entry, c)
                    delta = csv_number({"mean": p.mean, "std": p.std, "ci95_low": p.ci_low,
                                        "ci95_high": p.ci_high}[stat])
                row += [value, delta]
            writer.writerow(row)
    return buf.getvalue()


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Markdown pipe table lines."""
    esc = [[cell.replace("|", "\\|") for cell in r] for r in [header, *rows]]
    lines = ["| " + " | ".join(esc[0]) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in esc[1:]]
    return lines


def render_markdown(comp: Comparison, notes: bool = True) -> str:
    """Human-readable report: summary table, paired differences per class with their 95 % intervals, a verdict per
    entry, mean fg Dice per fold, notes."""
    ref = comp.entries[0]
    lines = [f"# Validation Dice: {comp.dataset}, {comp.configuration}", "",
             "Mean ± sample std over folds (nnU-Net `fold_<f>/validation/summary.json`"
             + (f", folds of `{comp.split_source}`" if comp.split_source else "") + "). "
             f"Δ = paired difference to {ref.name} over the folds both have.", ""]
    header = ["arm", "entry", "folds", *[comp.column_name(c) for c in comp.classes], FG_COLUMN, f"Δ {FG_COLUMN}"]
    rows = []
    for i, (e, label) in enumerate(zip(comp.entries, comp.labels)):
        cells = [label, e.name, " ".join(map(str, e.fold_ids()))]
        cells += [fmt_mean_std(*comp.mean_std(e, c)) for c in comp.columns]
        if i == 0:
            cells.append("reference")
        else:
            p = comp.paired(e, FG_COLUMN)
            cells.append(f"{fmt_mean_std(p.mean, p.std, signed=True)} (n={len(p.folds)})" if p.folds
                         else "no shared fold")
        rows.append(cells)
    lines += markdown_table(header, rows)

    if len(comp.entries) > 1:
        lines += ["", f"## Paired difference to {comp.labels[0]} ({ref.name}), [95 % CI]", ""]
        header = ["arm", "paired folds", *[f"Δ {comp.column_name(c)}" for c in comp.columns]]
        rows = []
        for e, label in zip(comp.entries[1:], comp.labels[1:]):
            paired = [comp.paired(e, c) for c in comp.columns]
            fg_folds = paired[-1].folds
            # a class that is nan in some fold is paired over fewer folds: say so in its cell
            cells = [fmt_interval(p) + ("" if p.folds == fg_folds else f" (n={len(p.folds)})") for p in paired]
            rows.append([label, " ".join(map(str, fg_folds)) or "none", *cells])
        lines += markdown_table(header, rows)
        lines += ["", "## Verdicts", "", f"{CI_NOTE}.", ""]
        lines += [f"- {verdict(comp.paired(e, FG_COLUMN), label, comp.labels[0])}"
                  for e, label in zip(comp.entries[1:], comp.labels[1:])]

    all_folds = sorted(set().union(*(e.folds for e in comp.entries)))
    lines += ["", f"## {FG_COLUMN} per fold", ""]
    rows = [[label, *[f"{e.folds[f].fg_dice:.4f}" if f in e.folds else "—" for f in all_folds]]
            for e, label in zip(comp.entries, comp.labels)]
    lines += markdown_table(["arm", *[f"fold {f}" for f in all_folds]], rows)

    if comp.guard:
        lines += ["", "## Leakage guard", ""] + [f"- {line}" for line in comp.guard]
    if notes and comp.warnings:
        lines += ["", "## Notes", ""] + [f"- {w}" for w in comp.warnings]
    return "\n".join(lines) + "\n"


def comparison_figure(comp: Comparison):
    """Bar chart of mean fg Dice (± std over folds, each fold a labelled dot; an entry with one fold says so under its
    name instead of drawing a zero-width error bar) and per-class grouped bars; entries named by their short labels
    (:func:`entry_labels`), the trainer names being in the tables.

    Uses the Agg canvas directly instead of pyplot so no window opens and no global backend is changed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(comp.entries)
    show_classes = 1 < len(comp.classes) <= 40
    width = 3 + 1.1 * n + (4 + 0.35 * n * len(comp.classes) if show_classes else 0)
    fig = Figure(figsize=(min(max(width, 7), 30), 5.5))
    FigureCanvasAgg(fig)
    colors = [f"C{i % 10}" for i in range(n)]
    ax = fig.add_subplot(1, 2 if show_classes else 1, 1)
    x = np.arange(n)
    stats = [comp.mean_std(e, FG_COLUMN) for e in comp.entries]
    spread = [not math.isnan(s) for _, s in stats]
    ax.bar(x, [m for m, _ in stats], color=colors, alpha=0.8)
    ax.errorbar(x[spread], [m for (m, _), ok in zip(stats, spread) if ok],
                yerr=[s for (_, s), ok in zip(stats, spread) if ok], fmt="none", ecolor="black", capsize=4)
    for i, e in enumerate(comp.entries):
        folds = e.fold_ids()
        offsets = np.linspace(-0.2, 0.2, len(folds)) if len(folds) > 1 else [0.0]
        for off, f in zip(offsets, folds):
            ax.scatter(i + off, e.folds[f].fg_dice, color="black", s=14, zorder=3)
            ax.annotate(f"fold {f}", (i + off, e.folds[f].fg_dice), textcoords="offset points", xytext=(3, 2),
                        fontsize=7)
    ticks = [label if ok or not e.folds else f"{label}\n(1 fold: no spread)"
             for label, e, ok in zip(comp.labels, comp.entries, spread)]
    ax.set_xticks(x)
    ax.set_xticklabels(ticks, rotation=30 if n > 5 else 0, ha="right" if n > 5 else "center", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("mean foreground Dice (validation)")
    ax.set_title("mean fg Dice: mean ± std over folds, dots = folds", fontsize=10)

    if show_classes:
        ax2 = fig.add_subplot(1, 2, 2)
        cx = np.arange(len(comp.classes))
        bw = 0.8 / n
        for i, (e, label) in enumerate(zip(comp.entries, comp.labels)):
            ms = [comp.mean_std(e, c) for c in comp.classes]
            pos = cx - 0.4 + bw * (i + 0.5)
            ax2.bar(pos, [m for m, _ in ms], bw, color=colors[i], alpha=0.8, label=label)
            has = [not math.isnan(s) for _, s in ms]
            ax2.errorbar(pos[has], [m for (m, _), ok in zip(ms, has) if ok],
                         yerr=[s for (_, s), ok in zip(ms, has) if ok], fmt="none", ecolor="black", capsize=2)
        ax2.set_xticks(cx)
        ax2.set_xticklabels([comp.class_names[c] for c in comp.classes], rotation=30, ha="right", fontsize=8)
        ax2.set_ylim(0, 1.05)
        ax2.set_ylabel("Dice (validation)")
        ax2.set_title("Dice per class: mean ± std over folds (none with one fold)", fontsize=10)
    bottom = 0.0
    if show_classes:
        # legend below both panels so it never hides bars that reach Dice 1
        ncol = min(n, 4)
        fig.legend(*ax2.get_legend_handles_labels(), loc="lower center", ncol=ncol, fontsize=8, frameon=False)
        bottom = 0.05 * math.ceil(n / ncol)
    fig.suptitle(f"{comp.dataset} — {comp.configuration}")
    fig.tight_layout(rect=(0, bottom, 1, 1))
    return fig


def render_png(comp: Comparison) -> bytes:
    """:func:`comparison_figure` as PNG bytes."""
    buf = io.BytesIO()
    comparison_figure(comp).savefig(buf, format="png", dpi=110)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------- writing


def write_files(files: dict[Path, bytes]) -> None:
    """Write each file atomically (a crash never leaves a half-written one); a failure is one line."""
    try:
        for target, data in files.items():
            atomic_write_bytes(target, data)
    except OSError as e:
        raise UserError(f"cannot write results to {next(iter(files)).parent}: {e}") from None


def prepare_out_dir(out_dir: Path) -> None:
    """Create the output folder, reporting a clash with a file as a user error rather than a traceback."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output path {out_dir} exists and is not a directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output folder {out_dir}: {e}") from None


# ---------------------------------------------------------------------------------------------- API


def compare(dataset: str | int, entries: Sequence[str], configuration: str = DEFAULT_CONFIGURATION,
            folds: Sequence[int] | None = None, out_dir: str | Path | None = None,
            write: bool = True, strict: bool = False) -> Comparison:
    """Load every entry's fold summaries, compute the table and (if ``write``) save CSV, Markdown and PNG.

    ``entries`` are ``TRAINER__PLANS`` strings; the first one is the reference for paired differences.
    ``folds`` restricts the folds (default: every fold of the dataset's ``splits_final.json`` in
    ``$nnUNet_preprocessed``, where it has one, else every ``fold_<f>`` folder found; a fold the file lacks is refused:
    nnU-Net made a random split of its own for it). ``out_dir`` defaults to
    ``$nnUNet_results/<Dataset>/hiendmae_compare_<configuration>``. Every entry fine-tuned from a pretrained encoder
    goes through the leakage guard (:func:`leakage_guard`; ``strict``: a leak is an error). Raises UserError on bad
    input before anything is written.
    """
    if not entries:
        raise UserError("give at least one -r TRAINER__PLANS entry")
    for e in entries:
        parse_entry(e)
    if len(set(entries)) != len(entries):
        dup = next(e for e in entries if list(entries).count(e) > 1)
        raise UserError(f"-r value {dup!r} is given more than once")
    if folds is not None:
        try:
            folds = [int(f) for f in folds]
        except (TypeError, ValueError):
            folds = []
        if not folds or any(f < 0 for f in folds):
            raise UserError("-f needs one or more non-negative fold numbers, e.g. -f 0 1 2 3 4")
    dataset_dir = results_dataset_folder(str(dataset))
    name = dataset_dir.name
    preprocessed = os.environ.get("nnUNet_preprocessed")  # results copied to another machine may come without it
    split_source = None
    if preprocessed and (Path(preprocessed) / name / "splits_final.json").is_file():
        folds, split_source = crossval_folds(Path(preprocessed) / name, folds)
    folders = [entry_folder(dataset_dir, e, configuration) for e in entries]
    labels = load_label_names(folders)

    loaded: list[EntryResult] = []
    warnings: list[str] = []
    for e, folder in zip(entries, folders):
        result, w = collect_entry(e, folder, folds, labels)
        loaded.append(result)
        warnings += w
    warnings += fold_set_warnings(loaded)
    guard: list[str] = []
    checked: dict = {}
    for entry in loaded:
        leaks, notes = leakage_guard(entry, name, strict, checked)
        warnings += leaks
        guard += leaks[:1] + notes  # the report names the leak once; the warnings list every case

    keys = set().union(*(r.class_dice for e in loaded for r in e.folds.values()))
    classes = sorted(keys)
    comp = Comparison(name, configuration, classes, class_display_names(classes, labels), loaded, warnings,
                      split_source=split_source, guard=guard)

    if write:
        target = Path(out_dir) if out_dir is not None else dataset_dir / f"hiendmae_compare_{configuration}"
        payload = {target / "comparison.csv": render_csv(comp).encode("utf-8"),
                   target / "comparison.md": render_markdown(comp).encode("utf-8"),
                   target / "comparison.png": render_png(comp)}
        prepare_out_dir(target)
        write_files(payload)
        comp.out_dir = target
        comp.files = list(payload)
    return comp


# ---------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface of ``nnUNetv2_hiendmae_compare``."""
    p = ArgumentParser(
        prog="nnUNetv2_hiendmae_compare",
        description="Compare nnU-Net validation Dice of several trainer/plans pairs (ours and nnU-Net's own "
                    "baselines) from $nnUNet_results/<Dataset>/<TRAINER>__<PLANS>__<CONFIG>/fold_<f>/validation/"
                    "summary.json. Prints a Markdown table and writes comparison.csv, comparison.md and "
                    "comparison.png.",
        epilog="Values are mean ± sample std (n-1) over the folds found. The Δ columns are paired differences "
               "to the first -r entry, computed fold by fold over the folds both entries have, with their 95 % "
               "paired t interval (mean Δ ± t(0.975, n-1)·s/√n) and a verdict: better or worse when the interval "
               "excludes 0, else not distinguishable at that number of folds. The figure names entries by short "
               "arm names (pretrained ViT, ViT from scratch, nnU-Net default, ...); the tables give both. Classes "
               "whose Dice is nan (absent from every validation case) are reported as nan and left out of that "
               "fold's mean fg Dice. Warnings about missing or differing folds go to stderr and into comparison.md.",
    )
    p.add_argument("-d", "--dataset", required=True,
                   help="dataset id (e.g. 4) or full name (e.g. Dataset004_Hippocampus); must have a folder in "
                        "$nnUNet_results")
    p.add_argument("-c", "--configuration", default=DEFAULT_CONFIGURATION,
                   help=f"nnU-Net configuration the entries were trained with (default: {DEFAULT_CONFIGURATION})")
    p.add_argument("-r", "--entries", nargs="+", required=True, metavar="TRAINER__PLANS",
                   help="one or more trainer/plans pairs joined by a double underscore, e.g. "
                        "nnUNetTrainer__nnUNetPlans nnUNetTrainer__nnUNetResEncUNetMPlans; the first one is the "
                        "reference for the paired differences")
    p.add_argument("-f", "--folds", nargs="+", type=int, metavar="F",
                   help="only use these folds, e.g. -f 0 1 2 3 4 (default: every fold of the dataset's "
                        "splits_final.json in $nnUNet_preprocessed, and a fold it lacks is refused; without that file, "
                        "every fold_<f> folder found; fold_all is never used because it validates on its own "
                        "training data)")
    p.add_argument("-o", "--output-dir", type=Path, metavar="DIR",
                   help="where to write comparison.csv/.md/.png (default: "
                        "$nnUNet_results/<Dataset>/hiendmae_compare_<configuration>)")
    p.add_argument("--strict", action="store_true",
                   help="refuse the comparison when the pretraining of an entry's encoder saw a validation case of "
                        "its folds (leakage guard, docs/finetuning.md; default: a warning, also in comparison.md)")
    return p


@cli_entry
def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: parse flags, run :func:`compare`, print the table and warnings."""
    args = build_parser().parse_args(argv)
    comp = compare(args.dataset, args.entries, args.configuration, args.folds, args.output_dir, strict=args.strict)
    for w in comp.warnings:
        print(f"warning: {w}", file=sys.stderr)
    for note in (line for line in comp.guard if line not in comp.warnings):
        print(f"note: {note}")
    print(render_markdown(comp, notes=False), end="")  # the notes just went to stderr
    print(f"\nwrote {', '.join(f.name for f in comp.files)} to {comp.out_dir}")


if __name__ == "__main__":
    main()
