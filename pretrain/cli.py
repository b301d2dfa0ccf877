"""``nnUNetv2_hiendmae_pretrain``: Self-supervised pretraining of a 3D ViT on nnU-Net preprocessed datasets."""
from __future__ import annotations

import argparse
import dataclasses
import os
import textwrap
from collections.abc import Sequence

from nnunetv2_hiendmae.errors import ArgumentParser, UserError, cli_entry
from nnunetv2_hiendmae.presets import PRECISIONS, PRESETS
from pretrain import methods
from pretrain.config import CHANGEABLE_ON_RESUME, PretrainConfig

EPILOG = """\
examples:
  nnUNetv2_hiendmae_pretrain -d 1 2 3 -o $nnUNet_results/hiendmae_vit_b16
  nnUNetv2_hiendmae_pretrain -d 1 -o OUT --method gl_mae --global-views 2 --local-views 6
  nnUNetv2_hiendmae_pretrain --resume -o OUT                 # continue OUT with its own settings
  torchrun --nproc_per_node=4 $(which nnUNetv2_hiendmae_pretrain) -d 1 -o OUT --batch-size 6

Reads $nnUNet_preprocessed/DatasetXXX_*/<plans>_<configuration>/ (nnUNetv2_plan_and_preprocess, or
nnUNetv2_hiendmae_preprocess_unlabeled for image folders without labels). Writes into OUT_DIR: checkpoint_latest.pth
(atomically, every --checkpoint-minutes and at the end), checkpoint_final.pth, training_log_*.txt, progress.png and
reconstruction_epoch_*.png. Every method's checkpoint fine-tunes the same way (nnUNetv2_hiendmae_plan -pt ...).
Each method's reference recipe on the ViT (the defaults of --lr, --warmup-epochs and --epochs; AdamW betas 0.9/0.95):
{recipes}
{resume}
"""


def _default(name: str):
    f = {f.name: f for f in dataclasses.fields(PretrainConfig)}[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_method_flags(p: argparse.ArgumentParser) -> dict[str, str]:
    """One group per method; a setting shared by several methods is one flag (in the first method's group) whose
    help names every method's default. Returns ``dest -> setting name``."""
    declared: dict[str, list[tuple[str, dataclasses.Field]]] = {}
    for name in methods.METHODS:
        for f in methods.settings_fields(name):
            declared.setdefault(f.name, []).append((name, f))
    groups = {}
    for name, m in methods.METHODS.items():
        flags = [_flag(f.name) for f in methods.settings_fields(name)]
        groups[name] = p.add_argument_group(f"--method {name}: {m.title}", "settings: " + ", ".join(flags))
    dests = {}
    for setting, users in declared.items():
        owner, f = users[0]
        defaults = sorted({str(u.default) for _, u in users})
        if defaults == ["None"]:  # the help says what the default is
            where = ", ".join(n for n, _ in users) if len(users) > 1 else ""
        elif len(defaults) == 1:
            where = f"default: {defaults[0]}" if len(users) == 1 else \
                f"{', '.join(n for n, _ in users)}; default: {defaults[0]}"
        else:
            where = "; ".join(f"{n}: default {u.default}" for n, u in users)
        kind = {"float": float, "int": int, "str": str}.get(str(f.type).split(" |")[0], int)
        kwargs = {"metavar": setting.upper(), **{k: f.metadata[k] for k in ("choices", "nargs", "metavar")
                                                  if k in f.metadata}}
        if "choices" in kwargs:
            del kwargs["metavar"]
        dest = f"method__{setting}"
        groups[owner].add_argument(_flag(setting), dest=dest, type=kind,
                                   help=f"{f.metadata['help']}" + (f" ({where})" if where else ""), **kwargs)
        dests[dest] = setting
    return dests


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, str]]:
    p = ArgumentParser(prog="nnUNetv2_hiendmae_pretrain", description=__doc__.split(":", 1)[1].strip(),
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                       argument_default=argparse.SUPPRESS)  # only what is given reaches the config (resume)
    d = _default
    run = p.add_argument_group("run")
    run.add_argument("-d", "--datasets", nargs="+",
                     help="dataset ids or names (DatasetXXX_Name) to pretrain on; all must have the same channel count "
                          "(required to start a run)")
    run.add_argument("-o", "--output-dir", required=True, help="folder for checkpoints, log and figures")
    run.add_argument("--method", choices=list(methods.METHODS),
                     help=f"pretraining method; its settings are listed below (default: {d('method')})")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in OUT_DIR from checkpoint_latest.pth with its stored settings (model, "
                          "optimiser, schedule, epoch, RNG); an error if OUT_DIR holds no run")
    run.add_argument("--auto-resume", action="store_true",
                     help="resume if OUT_DIR holds a run, else start one (for cluster jobs that are re-queued)")
    run.add_argument("--estimate", action="store_true",
                     help="build the run as the other flags ask, time a few steps of the model and of the loader on "
                          "the real data and device, print what the whole run will cost (crops/s and which one "
                          "limits, time per epoch, wall time and device-hours for --epochs, for WORLD_SIZE ranks if "
                          "set, peak memory, checkpoint and data size, compilation) and stop; writes nothing")
    run.add_argument("--json", action="store_true", help="with --estimate: print the figures as one JSON object")
    data = p.add_argument_group("data")
    data.add_argument("-p", "--plans", help=f"plans identifier whose preprocessed data is read (default: {d('plans')})")
    data.add_argument("-c", "--configuration",
                      help=f"nnU-Net configuration whose data is read (default: {d('configuration')})")
    data.add_argument("--patch-size", nargs=3, type=int, metavar=("X", "Y", "Z"),
                      help="crop size in voxels, in nnU-Net's (transposed) axis order; each a multiple of the token "
                           f"size (default: {' '.join(map(str, d('patch_size')))})")
    data.add_argument("--batch-size", type=int,
                      help=f"volumes loaded per iteration and GPU (default: {d('batch_size')})")
    data.add_argument("--fold", type=int,
                      help="pretrain only on the training cases of this nnU-Net fold (splits_final.json), so a later "
                           "cross-validation on the same dataset is not leaked (default: all cases)")
    data.add_argument("--skip-bad-cases", action="store_true",
                      help="leave out preprocessed cases that cannot be read (truncated or corrupt files), with a note "
                           "in the log, instead of refusing to start (default: every case is checked at the start and "
                           "a bad one stops the run before it starts)")
    data.add_argument("--num-workers", type=int, default=argparse.SUPPRESS,
                      help="data-loading worker processes per GPU, 0 = load in the main process (default: "
                           f"min(8, CPU cores) = {min(8, os.cpu_count() or 1)})")
    data.add_argument("--loader-memory-gib", type=float,
                      help="host memory per GPU for the batches in flight between the workers and the GPU: fewer "
                           "batches per worker (fewer workers when a batch is larger than this over --num-workers) "
                           "so that they fit, once in shared memory (/dev/shm; a container needs --shm-size of at "
                           "least this times the GPUs) and once in pinned memory; --estimate prints both "
                           f"(default: {d('loader_memory_gib')})")
    evaluation = p.add_argument_group("is the pretraining working? (held-out loss, downstream probe)")
    evaluation.add_argument("--val-cases", metavar="N",
                            help="cases held out of training, on whose fixed views and masks every loss of the method "
                                 "is scored (val_* in the log, the history and progress.png): a count, or a fraction "
                                 "such as 0.05 (default: 5 %% of the cases, at least 1 and at most 50; none for fewer "
                                 "than 10 cases; 0: none). Drawn once from --seed; listed in the log and the "
                                 "checkpoint")
    evaluation.add_argument("--val-every", type=int,
                            help=f"score the held-out cases every N epochs and after the last (default: "
                                 f"{d('val_every')})")
    evaluation.add_argument("--probe-dataset", metavar="DATASET",
                            help="a labelled nnU-Net-preprocessed dataset with the run's channel count (one of the "
                                 "pretraining datasets or another): every --probe-every epochs and after the last, a "
                                 "linear probe on the frozen encoder's tokens is fitted on fixed crops of the "
                                 "--probe-fold's training cases and its mean foreground Dice on the fold's validation "
                                 "cases is logged "
                                 "(probe_dice), plotted, and keeps checkpoint_best.pth for the best score (default: no "
                                 "probe)")
    evaluation.add_argument("--probe-fold", type=int,
                            help=f"nnU-Net fold of --probe-dataset whose training cases fit the probe and whose "
                                 f"validation cases score it (default: {d('probe_fold')})")
    evaluation.add_argument("--strict", action="store_true", dest="probe_strict",
                            help="refuse to start when a validation case of the probe's fold is among the pretraining "
                                 "cases (compared by content, as nnUNetv2_hiendmae_plan does); without it, a warning "
                                 "in the log and in checkpoint_best.pth")
    evaluation.add_argument("--probe-every", type=int,
                            help="probe every N epochs and after the last (default: 10 %% of --epochs, at least every "
                                 "50 epochs)")
    model = p.add_argument_group("model")
    model.add_argument("--arch", choices=list(PRESETS),
                       help="encoder preset: vit_b16 (768/12/12, 16^3 tokens), vit_l16 (1536/12/16), "
                            "vit_l12 (1536/12/16, 12^3 tokens, the released model), vit_tiny (CPU tests/demo); "
                            "Primus (EVA blocks, 8^3 tokens, nnU-Net's transformer): primus_s (396/12/6), primus_b "
                            "(792/12/12), primus_m (864/16/12), primus_l (1056/24/16), primus_tiny (CPU tests) "
                            f"(default: {d('arch')})")
    model.add_argument("--pos-embed", choices=["sincos", "learned"],
                       help="ViT position embedding: fixed 3D sin-cos (reference) or learned (default: sincos for "
                            "the ViT; Primus has only its learned one, with rotary embeddings)")
    optim = p.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, help="training epochs (default: the method's recipe, below)")
    optim.add_argument("--iters-per-epoch", type=int,
                       help="iterations per epoch (default: cases / (batch-size x GPUs), "
                            "i.e. each volume once per epoch)")
    optim.add_argument("--lr", type=float,
                       help="peak learning rate of AdamW (betas 0.9/0.95; 0.9/0.98 on Primus), used as given "
                            "(default: the method's recipe, below; for MAE scaled with the views per optimiser step "
                            "over all GPUs)")
    optim.add_argument("--warmup-epochs", type=int,
                       help="linear warm-up epochs before the cosine decay (default: the method's recipe, below)")
    optim.add_argument("--weight-decay", type=float,
                       help=f"AdamW weight decay; biases, norms, tokens and position embeddings get none "
                            f"(default: {d('weight_decay')})")
    optim.add_argument("--grad-clip", type=float,
                       help="clip the gradient norm to this value (default: off, as the reference)")
    optim.add_argument("--accum-steps", type=int,
                       help="accumulate gradients over this many iterations per optimiser step "
                            f"(default: {d('accum_steps')})")
    optim.add_argument("--seed", type=int, help=f"random seed (reference: 41) (default: {d('seed')})")
    hw = p.add_argument_group("hardware and output")
    hw.add_argument("--device", choices=["auto", "cuda", "cpu"], help="default: auto = cuda if available, else cpu")
    hw.add_argument("--precision", choices=list(PRECISIONS),
                    help="autocast precision: auto = bf16 on GPUs that compute it natively (compute capability "
                         ">= 8.0: A100, H100), fp16 on older ones (V100, T4), fp32 on CPU; fp16 uses a GradScaler "
                         "(default: auto)")
    hw.add_argument("--compile", dest="compile", action="store_true",
                    help="torch.compile the model (default: on for CUDA, off on CPU)")
    hw.add_argument("--no-compile", dest="compile", action="store_false", help="do not torch.compile the model")
    hw.add_argument("--checkpoint-minutes", type=float,
                    help="write checkpoint_latest.pth at most every N minutes (and after the last epoch); 0 = every "
                         f"epoch; a kill loses at most the work since (default: {d('checkpoint_minutes')})")
    hw.add_argument("--dist-timeout-minutes", type=float,
                    help="with several ranks (torchrun): how long a rank waits for the others before the run stops; "
                         "a fresh run's one-off work (content fingerprints of every case, shared by the ranks, then "
                         f"the held-out views and probe data on rank 0) must fit in it "
                         f"(default: {d('dist_timeout_minutes')})")
    hw.add_argument("--recon-every", type=int,
                    help=f"write a reconstruction figure every N epochs (default: {d('recon_every')})")
    hw.add_argument("--no-progress-bar", dest="progress_bar", action="store_false",
                    help="disable the per-epoch tqdm bar (e.g. on clusters)")
    resume = (f"On --resume, only these may differ from the stored settings: {_changeable_flags(p)} (a larger "
              "--epochs extends the run, and a new --lr continues a run that diverged: the learning-rate schedule is "
              "re-planned from the point reached).")
    p.epilog = EPILOG.format(recipes=_recipes(), resume=textwrap.fill(resume, 116, break_on_hyphens=False))
    return p, _add_method_flags(p)


def _recipes() -> str:
    lines = []
    for name, m in methods.METHODS.items():
        r = m.recipe
        lr = f"{r.lr:g} x views per step / {r.lr_reference_batch}" if r.lr_reference_batch else f"{r.lr:g}"
        lines.append(f"  {name}: lr {lr}, {r.warmup_epochs} warm-up epochs of {r.epochs} ({r.source})")
    r = methods.PRIMUS_RECIPE
    lines.append(f"  every method on a primus_* encoder: lr {r.lr:g}, {r.warmup_epochs} warm-up epochs of {r.epochs}, "
                 f"AdamW betas {r.betas[0]}/{r.betas[1]} (nnssl's Primus MAE)")
    return "\n".join(lines)


def _changeable_flags(p: argparse.ArgumentParser) -> str:
    """The flags of :data:`CHANGEABLE_ON_RESUME`, as the parser spells them."""
    flags = {}
    for action in p._actions:
        if action.dest in CHANGEABLE_ON_RESUME:
            flags.setdefault(action.dest, []).append(max(action.option_strings, key=len))
    return ", ".join("/".join(flags[name]) for name in CHANGEABLE_ON_RESUME)


def parse(argv: Sequence[str] | None = None) -> tuple[dict, str]:
    """``(given, mode)``: the settings given on the command line as :class:`PretrainConfig` fields (method settings
    under ``method_settings``), and ``new``, ``resume`` or ``auto``."""
    given, mode, _ = _parse(argv)
    return given, mode


def _parse(argv: Sequence[str] | None) -> tuple[dict, str, dict]:
    """:func:`parse`, and the command's own options (``estimate``, ``json``)."""
    parser, method_dests = build_parser()
    given = vars(parser.parse_args(argv))
    options = {"estimate": given.pop("estimate", False), "json": given.pop("json", False)}
    if options["json"] and not options["estimate"]:
        raise UserError("--json goes with --estimate")
    resume, auto = given.pop("resume", False), given.pop("auto_resume", False)
    if resume and auto:
        raise UserError("--resume and --auto-resume exclude each other")
    mode = "resume" if resume else "auto" if auto else "new"
    settings = {method_dests[k]: given.pop(k) for k in list(given) if k in method_dests}
    if settings:
        given["method_settings"] = settings
    if "patch_size" in given:
        given["patch_size"] = list(given["patch_size"])
    if "datasets" in given:
        given["datasets"] = [str(x) for x in given["datasets"]]
    if "num_workers" not in given and mode != "resume":
        given["num_workers"] = min(8, os.cpu_count() or 1)
    return given, mode, options


@cli_entry
def main(argv: list[str] | None = None) -> None:
    given, mode, options = _parse(argv)
    if mode != "resume":
        PretrainConfig(**{"datasets": [], **given})  # bad flags fail here, before torch is imported
    if options["estimate"]:
        return print_estimate(given, mode, as_json=options["json"])
    from pretrain.train import pretrain_from_flags  # heavy imports after argument parsing keep --help fast

    final = pretrain_from_flags(given, mode)
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"pretrained checkpoint: {final}")
        print(f"next: nnUNetv2_hiendmae_plan -d DATASET -pt {final}")


def print_estimate(given: dict, mode: str, as_json: bool) -> None:
    """``--estimate``: the run built as it would be (rank 0 of WORLD_SIZE, not started), timed, nothing written."""
    import json

    from pretrain.estimate import estimate, format_estimate
    from pretrain.train import PretrainRun, config_from_flags

    cfg, resume_from = config_from_flags(given, mode)
    remaining = cfg.epochs - resume_from["train_state"]["epoch"] if resume_from else cfg.epochs
    run = PretrainRun(cfg, planned_ranks=int(os.environ.get("WORLD_SIZE", 1)))
    figures = estimate(run, remaining_epochs=remaining)
    print(json.dumps(figures) if as_json else format_estimate(figures))


if __name__ == "__main__":
    main()
