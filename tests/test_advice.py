"""Errors that tell the user what to do next: each piece of advice, followed exactly as printed, works.

The advice is read out of the message (a flag, a command, a path) and applied; the command then runs, or gets past
that error. Commands run in this process (their ``main`` with an argv list) where the advice is not about a process.

Which messages advise a next step, and where each is followed (here unless a module is named):

- nnUNetv2_hiendmae_pretrain: ``--resume`` without a run, "leave out --resume"; a new run on a folder holding one,
  "pass --resume": test_resume_without_a_run_and_a_new_run_on_a_folder_holding_one_advise_what_works. A lock of a run
  on another host, "delete LOCK": test_a_lock_left_by_another_host_advises_deleting_it_which_lets_the_run_start.
  "--json goes with --estimate", "use --device cpu", the "next: nnUNetv2_hiendmae_plan ..." it prints, and
  ``--resume`` with settings the run fixed, "leave them out": test_pretrain_advice_works. Unreadable cases, "pass
  --skip-bad-cases": tests/test_pretrain_runs.py, and for a held-out case
  test_an_unreadable_held_out_case_advises_skip_bad_cases_which_leaves_it_out. Interrupted, "continue with: ...
  --resume -o OUT": tests/test_pretrain_interruptions.py. A climbing or NaN loss, "--resume -o OUT --lr LR":
  tests/test_pretrain_divergence.py.
- nnUNetv2_hiendmae_plan: "drop --arch", "give -pt CHECKPOINT ... or --arch ARCH": test_plan_advice_on_arch_works.
  A checkpoint without ``pretrain.spacing`` / ``patch_size`` / normalisation, "pass --spacing dataset" /
  "--patch-size X Y Z" / "--normalization dataset": test_plan_advice_for_a_checkpoint_without_a_pretrain_value_works.
- A dataset only in nnUNet_raw, "run nnUNetv2_plan_and_preprocess -d ID -c 3d_fullres" (the plans, the study, the
  pretraining, ``--like`` of the unlabelled preprocessing):
  test_commands_on_a_dataset_not_yet_preprocessed_advise_the_nnunet_command_that_lets_each_run; its preprocessed
  data lost, "nnUNetv2_preprocess -d ID -plans_name PLANS -c 3d_fullres" (the pretraining), in the same test.
- nnUNetv2_hiendmae_export: "needs -d DATASET and -p PLANS", "write them with nnUNetv2_hiendmae_plan ...":
  test_export_advice_leads_to_the_file.
- The fine-tuning trainers: plans nnUNetv2_hiendmae_plan did not write, "create them with '...' and pass their name
  with -p"; a checkpoint changed since its plans, "write the plans again with nnUNetv2_hiendmae_plan ...":
  test_trainer_advice_on_plans_works. From-scratch plans, "train them with -tr TWIN"; a pretraining checkpoint given
  to nnU-Net's -pretrained_weights, "nnUNetv2_hiendmae_plan ..., then nnUNetv2_train ... -tr ... -p ...":
  test_trainer_advice_on_scratch_plans_and_on_pretrained_weights_works.
- nnUNetv2_hiendmae_study / nnUNetv2_hiendmae_compare: a fold not in the split file, "choose among them, or leave out
  -f": tests/test_scored_folds.py. The study on plans written for another checkpoint, "pass -p ANOTHER_NAME", and
  a dataset id two datasets share, "give the full name of one" (the names listed):
  test_an_ambiguous_dataset_id_and_plans_of_another_checkpoint_advise_names_that_work.
- nnUNetv2_hiendmae_preprocess_unlabeled: "drop --spacing, --ct-window and --modality", "--ct-window is for CT
  channels (--modality CT, ...)": test_unlabelled_preprocessing_advice_works.
- nnUNetv2_hiendmae_import: "--patch-size N" of a cubic position embedding, "drop --weights-only":
  test_import_advice_works; "pass --force": tests/test_import_reference.py. A reference Hi-End-MAE file given where
  our checkpoint goes, "convert it with nnUNetv2_hiendmae_import -i FILE -o CONVERTED.pth":
  test_a_reference_checkpoint_given_for_ours_advises_the_import_that_makes_it_one.
- The trainers' _recompute variants on Primus plans, "train it with a trainer without _recompute":
  test_a_recompute_trainer_on_primus_plans_advises_the_trainer_without_it_which_trains.
- nnUNetv2_hiendmae_probe, "use -device cpu": test_the_probe_on_cuda_without_a_gpu_advises_the_cpu_which_probes.
- Every command's usage mistake, "(see PROG --help)": tests/test_cli_help.py.

Advice that only names a value to choose ("choose another -o", "choose from A, B") is not run here, nor advice that
needs more than a test can give: a larger /dev/shm ("docker run --shm-size"), several GPUs ("train it on one GPU"),
whole nnUNetv2_train runs (the study's and the demo's "re-run to continue"). A case that breaks during a run,
"--resume -o OUT --skip-bad-cases": followed as printed in tests/test_pretrain_runs.py
(test_a_case_that_stays_broken_is_left_out_by_the_advised_resume_with_skip_bad_cases).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import sys

import pytest
import torch
from conftest import cli_error, copy_preprocessed_dataset, make_trainer, pretrain_args, run_cli, write_checkpoint

from nnunetv2_hiendmae.checkpoint import encoder_state_dict, load_checkpoint
from nnunetv2_hiendmae.errors import UserError
from nnunetv2_hiendmae.export import main as export_main
from nnunetv2_hiendmae.plans import DEFAULT_NAME
from nnunetv2_hiendmae.plans import main as plan_main
from nnunetv2_hiendmae.trainers import nnUNetTrainerHiEndMAE_smoke
from pretrain.cli import main as pretrain_main
from pretrain.lock import LOCK

ADVICE_ID = 962  # a private copy of dataset 990: the advice below writes plans into it


def one_error_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def refused(main, argv: list[str], capsys) -> str:
    """The one ``error:`` line (after any notes) of a command's ``main`` run in this process on ``argv``."""
    code, lines, _ = cli_error(main, argv, capsys)
    errors = [line for line in lines if line.startswith("error: ")]
    assert code == 2 and errors == lines[-1:], lines
    return lines[-1]


def advised_command(message: str, program: str, end: str = "") -> list[str]:
    """The arguments of the ``program`` command a message advises (after the last mention of the program's name, up
    to ``end``), split as a shell splits them."""
    assert program in message, message
    command = message.rsplit(program, 1)[1]
    return shlex.split(command.split(end, 1)[0] if end else command)


@pytest.fixture(scope="module")
def advice_dataset(preprocessed_dataset, nnunet_dirs):
    """The preprocessed folder of a copy of dataset 990 under its own name, for the plans the advice writes."""
    folder = copy_preprocessed_dataset(preprocessed_dataset["preprocessed"], nnunet_dirs["nnUNet_preprocessed"],
                                       ADVICE_ID, "Advice")
    plans = json.loads((folder / "nnUNetPlans.json").read_text())
    (folder / "nnUNetPlans.json").write_text(json.dumps({**plans, "dataset_name": folder.name}))
    return folder


def test_resume_without_a_run_and_a_new_run_on_a_folder_holding_one_advise_what_works(preprocessed_dataset,
                                                                                      tmp_path):
    """--resume on an empty folder: 'leave out --resume' starts the run; the same command again on the folder that now
    holds it: 'pass --resume' continues it."""
    out = tmp_path / "run"
    args = pretrain_args(preprocessed_dataset, out, 1, 1)
    line = one_error_line(run_cli(*args, "--resume"))
    assert line.endswith("check -o, or leave out --resume to start a new run")
    run_cli(*args, check=True)  # --resume left out
    assert load_checkpoint(out / "checkpoint_final.pth")["pretrain"]["epochs_done"] == 1

    longer = pretrain_args(preprocessed_dataset, out, 2, 1)
    line = one_error_line(run_cli(*longer))
    assert "pass --resume to continue it or choose another -o" in line
    resumed = run_cli(*longer, "--resume", check=True)  # the same command, with --resume
    assert "resuming with changed settings: epochs 1 -> 2" in resumed.stdout
    assert load_checkpoint(out / "checkpoint_final.pth")["pretrain"]["epochs_done"] == 2


def test_a_lock_left_by_another_host_advises_deleting_it_which_lets_the_run_start(preprocessed_dataset, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK).write_text(json.dumps({"host": "node-that-crashed", "pid": 4242, "started": "2026-01-01T00:00:00"}))
    args = pretrain_args(preprocessed_dataset, out, 1, 1)
    line = one_error_line(run_cli(*args))
    assert line.endswith(f"(if that run is gone, delete {out / LOCK})")
    path = shlex.split(line.rsplit("delete ", 1)[1].removesuffix(")"))[0]
    os.remove(path)  # as advised
    run_cli(*args, check=True)
    assert (out / "checkpoint_final.pth").is_file() and not (out / LOCK).exists()


def test_pretrain_advice_works(preprocessed_dataset, advice_dataset, tmp_path, monkeypatch, capsys):
    """'--json goes with --estimate' estimates; ``--device cuda`` where torch sees no GPU: 'use --device cpu' runs,
    and the plans command it prints next writes plans; resumed with a setting the run fixed: 'leave them out'
    resumes it."""
    out = tmp_path / "run"
    args = pretrain_args(preprocessed_dataset, out, 1, 1)[1:]
    device = args.index("--device") + 1
    args[device] = "cuda"
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "is_available", lambda: False)
        line = refused(pretrain_main, args, capsys)
        assert line.endswith("use --device cpu")
        flag, value = advised_command(line, "use ")
        args[args.index(flag) + 1] = value
        line = refused(pretrain_main, [*args, "--json"], capsys)
        assert line == "error: --json goes with --estimate"
        pretrain_main([*args, "--json", "--estimate"])
        assert json.loads(capsys.readouterr().out)["fits"] is True
        pretrain_main(args)
    assert load_checkpoint(out / "checkpoint_final.pth")["pretrain"]["epochs_done"] == 1
    plan = advised_command(capsys.readouterr().out.strip().splitlines()[-1], "next: nnUNetv2_hiendmae_plan")
    plan_main([{"DATASET": str(ADVICE_ID)}.get(a, a) for a in plan])
    assert json.loads((advice_dataset / f"{DEFAULT_NAME}.json").read_text())["pretrain_info"]["checkpoint"] == \
        str(out / "checkpoint_final.pth")

    longer = ["-o", str(out), "--resume", "--epochs", "2", "--mask-ratio", "0.6", "--batch-size", "1"]
    line = refused(pretrain_main, longer, capsys)
    changed = re.search(r"these differ: (.*) \(leave them out", line)[1].split(", ")
    assert sorted(c.split(" ")[0] for c in changed) == ["batch_size", "mask_ratio"], line
    for setting in changed:  # left out, as advised: the flag and its value
        at = longer.index("--" + setting.split(" ")[0].replace("_", "-"))
        del longer[at:at + 2]
    pretrain_main(longer)
    assert load_checkpoint(out / "checkpoint_final.pth")["pretrain"]["epochs_done"] == 2


def checkpoint_without(path, folder, key: str):
    """A checkpoint (as the fixtures write) whose pretrain block lacks ``key``."""
    ckpt = load_checkpoint(write_checkpoint(path, folder))
    del ckpt["pretrain"][key]
    torch.save(ckpt, path)
    return str(path)


@pytest.mark.parametrize("missing", ["spacing", "patch_size", "normalization_schemes"])
def test_plan_advice_for_a_checkpoint_without_a_pretrain_value_works(advice_dataset, tmp_path, capsys, missing):
    """The flag the error names in place of the missing value, its placeholders filled in, writes the plans."""
    name = f"A_without_{missing}"
    argv = ["-d", str(ADVICE_ID), "-pt", checkpoint_without(tmp_path / "ckpt.pth", advice_dataset, missing), "-o", name]
    line = refused(plan_main, argv, capsys)
    plan_main(argv + [{"X": "32", "Y": "64", "Z": "64"}.get(f, f) for f in advised_command(line, ": pass ", ", or")])
    plans = json.loads((advice_dataset / f"{name}.json").read_text())
    info, cfg = plans["pretrain_info"], plans["configurations"]["3d_fullres"]
    assert {"spacing": info["spacing"] == "dataset", "patch_size": cfg["patch_size"] == [32, 64, 64],
            "normalization_schemes": info["normalization"] == "dataset"}[missing], line


def test_plan_advice_on_arch_works(advice_dataset, tmp_path, capsys):
    """'drop --arch' (another preset than the checkpoint's) and 'give -pt CHECKPOINT ... or --arch ARCH' (neither
    given), each followed, write the plans."""
    ckpt = str(write_checkpoint(tmp_path / "ckpt.pth", advice_dataset))
    argv = ["-d", str(ADVICE_ID), "-pt", ckpt, "--arch", "vit_b16", "-o", "A_arch"]
    line = refused(plan_main, argv, capsys)
    assert line.endswith(": drop --arch")
    del argv[argv.index("--arch"):argv.index("--arch") + 2]
    plan_main(argv)
    assert json.loads((advice_dataset / "A_arch.json").read_text())["pretrain_info"]["arch"] == "vit_tiny"

    argv = ["-d", str(ADVICE_ID), "-o", "A_scratch"]
    line = refused(plan_main, argv, capsys)
    flag, placeholder = advised_command(line, " or ", " (from-scratch")
    assert (flag, placeholder) == ("--arch", "ARCH"), line
    plan_main(argv + [flag, "vit_tiny"])
    assert json.loads((advice_dataset / "A_scratch.json").read_text())["pretrain_info"]["method"] == "scratch"


def test_export_advice_leads_to_the_file(advice_dataset, tmp_path, capsys):
    """pretrained_weights without plans: 'needs -d DATASET and -p PLANS', then, for plans not yet written, 'write them
    with nnUNetv2_hiendmae_plan ...' (CHECKPOINT filled in): the export then writes its file."""
    ckpt = str(write_checkpoint(tmp_path / "ckpt.pth", advice_dataset))
    target = tmp_path / "weights.pth"
    argv = ["-pt", ckpt, "--format", "pretrained_weights", "-o", str(target)]
    line = refused(export_main, argv, capsys)
    assert "needs -d DATASET and -p PLANS" in line
    argv += ["-d", str(ADVICE_ID), "-p", "A_export"]
    line = refused(export_main, argv, capsys)
    plan_main([ckpt if a == "CHECKPOINT" else a for a in advised_command(line, "nnUNetv2_hiendmae_plan")])
    export_main(argv)
    assert torch.load(target, weights_only=True)["network_weights"]


def test_trainer_advice_on_plans_works(advice_dataset, tmp_path):
    """Plans nnUNetv2_hiendmae_plan did not write: the plans command advised (CHECKPOINT filled in), its plans passed
    by name, train; a checkpoint changed since its plans: the plans command advised, run as printed, trains again."""
    ckpt = str(write_checkpoint(tmp_path / "ckpt.pth", advice_dataset))
    with pytest.raises(UserError) as e:
        make_trainer(nnUNetTrainerHiEndMAE_smoke, advice_dataset, "nnUNetPlans").initialize()
    assert "and pass their name with -p" in str(e.value)
    plan_main([ckpt if a == "CHECKPOINT" else a for a in advised_command(str(e.value), "nnUNetv2_hiendmae_plan", "'")])
    make_trainer(nnUNetTrainerHiEndMAE_smoke, advice_dataset, DEFAULT_NAME).initialize()

    write_checkpoint(tmp_path / "ckpt.pth", advice_dataset, seed=1)  # the same file, other weights
    with pytest.raises(UserError) as e:
        make_trainer(nnUNetTrainerHiEndMAE_smoke, advice_dataset, DEFAULT_NAME).initialize()
    assert "changed since the plans were written" in str(e.value)
    plan_main(advised_command(str(e.value), "write the plans again with nnUNetv2_hiendmae_plan"))
    trainer = make_trainer(nnUNetTrainerHiEndMAE_smoke, advice_dataset, DEFAULT_NAME)
    trainer.initialize()
    loaded = trainer.network.encoder.state_dict()["blocks.0.attn.qkv.weight"]
    assert torch.equal(loaded, encoder_state_dict(load_checkpoint(tmp_path / "ckpt.pth"))["blocks.0.attn.qkv.weight"])


def test_commands_on_a_dataset_not_yet_preprocessed_advise_the_nnunet_command_that_lets_each_run(
        preprocessed_dataset, nnunet_dirs, tmp_path, monkeypatch, capsys):
    """A dataset only in nnUNet_raw (given by name, which nnU-Net's -d does not take): the plans, the study, the
    pretraining and --like of the unlabelled preprocessing each advise the same nnU-Net command; run once as printed
    (with one process: -np/-npfp only set its parallelism), every one of them gets past that error. Its preprocessed
    data deleted: the nnUNetv2_preprocess command the pretraining advises writes it again."""
    from nnunetv2.experiment_planning.plan_and_preprocess_entrypoints import (
        plan_and_preprocess_entry,
        preprocess_entry,
    )

    from nnunetv2_hiendmae.demo.synthetic import make_datasets
    from nnunetv2_hiendmae.study import main as study_main
    from pretrain.unlabeled_cli import main as unlabeled_main

    name = "Dataset963_AdviceRaw"
    make_datasets(nnunet_dirs["nnUNet_raw"], 963, name="AdviceRaw", n_labelled=5, n_unlabelled=0, n_test=0, scale=0.4)
    ckpt = str(write_checkpoint(tmp_path / "ckpt.pth", preprocessed_dataset["preprocessed"]))
    commands = {
        plan_main: ["-d", name, "-pt", ckpt, "-o", "A_raw", "--spacing", "dataset", "--normalization", "dataset"],
        study_main: ["-d", name, "-pt", ckpt, "-f", "0", "--budgets", "100", "--arms", "frozen", "--dry-run"],
        pretrain_main: pretrain_args({"id": name, "unlabelled_id": preprocessed_dataset["unlabelled_id"]},
                                     tmp_path / "run", 1, 1)[1:],
        unlabeled_main: ["-i", str(preprocessed_dataset["unlabelled_scans"]), "-d", "964", "--name", "AdvicePool",
                         "--like", name, "-np", "1"],
    }
    advised = set()
    for main, argv in commands.items():
        line = refused(main, argv, capsys)
        advised.add(tuple(re.search(r"nnUNetv2_plan_and_preprocess((?: -\w+ \w+)+)['`]? (first|creates)", line)[1]
                          .split()))
    assert advised == {("-d", "963", "-c", "3d_fullres")}, advised
    monkeypatch.setattr(sys, "argv", ["nnUNetv2_plan_and_preprocess", *advised.pop(), "-np", "1", "-npfp", "1"])
    plan_and_preprocess_entry()
    pretrain_argv = commands.pop(pretrain_main)
    for main, argv in commands.items():
        main(argv)
    assert (nnunet_dirs["nnUNet_preprocessed"] / name / "A_raw.json").is_file()
    assert (nnunet_dirs["nnUNet_preprocessed"] / "Dataset964_AdvicePool" / "nnUNetPlans.json").is_file()

    # its preprocessed data lost: the pretraining names the nnU-Net command that writes it again
    shutil.rmtree(nnunet_dirs["nnUNet_preprocessed"] / name / "nnUNetPlans_3d_fullres")
    line = refused(pretrain_main, pretrain_argv, capsys)
    monkeypatch.setattr(sys, "argv", ["nnUNetv2_preprocess", *advised_command(line, "nnUNetv2_preprocess", "`"),
                                      "-np", "1"])
    preprocess_entry()
    pretrain_main(pretrain_argv)
    assert load_checkpoint(tmp_path / "run" / "checkpoint_final.pth")["pretrain"]["epochs_done"] == 1


def test_trainer_advice_on_scratch_plans_and_on_pretrained_weights_works(advice_dataset, tmp_path, monkeypatch,
                                                                         capsys):
    """From-scratch plans given to a pretrained trainer: '-tr TWIN' trains them; a pretraining checkpoint given to
    nnU-Net's -pretrained_weights: the plans command, then the trainer and plans named, train (CHECKPOINT, DATASET
    filled in)."""
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

    from nnunetv2_hiendmae import trainers
    from nnunetv2_hiendmae.errors import one_line_errors_in_nnunet_commands

    plan_main(["-d", str(ADVICE_ID), "--arch", "vit_tiny", "-o", "A_tr_scratch"])
    with pytest.raises(UserError) as e:
        make_trainer(nnUNetTrainerHiEndMAE_smoke, advice_dataset, "A_tr_scratch").initialize()
    twin = advised_command(str(e.value), "train them with -tr", ", or")
    make_trainer(getattr(trainers, *twin), advice_dataset, "A_tr_scratch").initialize()

    ckpt = str(write_checkpoint(tmp_path / "ckpt.pth", advice_dataset))
    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    one_line_errors_in_nnunet_commands()
    with pytest.raises(KeyError) as e:
        load_pretrained_weights(torch.nn.Linear(1, 1), ckpt)
    capsys.readouterr()
    sys.excepthook(e.type, e.value, e.tb)
    line = capsys.readouterr().err.strip()
    plans, train = line.split("through plans: ", 1)[1].split(", then ")
    plan_main([{"DATASET": str(ADVICE_ID)}.get(a, a) for a in advised_command(plans, "nnUNetv2_hiendmae_plan")])
    train = advised_command(train, "nnUNetv2_train", " (without")
    trainer = make_trainer(getattr(trainers, train[train.index("-tr") + 1]), advice_dataset,
                           train[train.index("-p") + 1])
    trainer.initialize()
    assert "-pretrained_weights" not in train and trainer.was_initialized


def test_import_advice_works(tmp_path, capsys):
    """A reference checkpoint imported with another patch size than its position embedding's: the --patch-size the
    error names imports it; a file with Python objects and --weights-only: 'drop --weights-only' imports it."""
    import argparse

    from test_import_reference import reference_state_dict, write_reference

    from pretrain.import_reference import main as import_main

    reference = write_reference(tmp_path / "ref.pth", reference_state_dict("sincos"), args=argparse.Namespace())
    argv = ["-i", str(reference), "-o", str(tmp_path / "ours.pth"), "--patch-size", "64"]
    line = refused(import_main, argv, capsys)
    flag, size = advised_command(line, "tokens: ", ")")
    argv[argv.index(flag) + 1] = size
    line = refused(import_main, [*argv, "--weights-only"], capsys)
    assert line.endswith("drop --weights-only to unpickle it (only for files from a trusted source)")
    import_main(argv)  # --weights-only dropped
    assert load_checkpoint(tmp_path / "ours.pth")["pretrain"]["patch_size"] == [int(size)] * 3


def without_flags(argv: list[str], flags: list[str]) -> list[str]:
    """``argv`` less each of ``flags`` and the values that follow it."""
    kept, skipping = [], False
    for a in argv:
        skipping = a in flags or (skipping and not a.startswith("--"))
        if not skipping:
            kept.append(a)
    return kept


def test_unlabelled_preprocessing_advice_works(preprocessed_dataset, nnunet_dirs, capsys):
    """--like with settings of its own: 'drop --spacing, --ct-window and --modality'; a CT window on MR scans:
    '--ct-window is for CT channels (--modality CT, ...)': each followed, the pool is preprocessed."""
    from pretrain.unlabeled_cli import main as unlabeled_main

    scans = ["-i", str(preprocessed_dataset["unlabelled_scans"]), "-np", "1"]
    argv = [*scans, "-d", "965", "--name", "AdviceLike", "--like", "990", "--spacing", "1", "1", "1", "--modality",
            "CT"]
    line = refused(unlabeled_main, argv, capsys)
    unlabeled_main(without_flags(argv, re.findall(r"--[\w-]+", line.split(": drop ", 1)[1])))

    argv = [*scans, "-d", "966", "--name", "AdviceWindow", "--modality", "MR", "--ct-window", "-175", "250"]
    line = refused(unlabeled_main, argv, capsys)
    modality = advised_command(line, "(", ",")
    assert modality == ["--modality", "CT"], line
    unlabeled_main([*without_flags(argv, ["--modality"]), *modality])
    for name in ("Dataset965_AdviceLike", "Dataset966_AdviceWindow"):
        assert (nnunet_dirs["nnUNet_preprocessed"] / name / "nnUNetPlans.json").is_file()


def test_a_reference_checkpoint_given_for_ours_advises_the_import_that_makes_it_one(advice_dataset, tmp_path, capsys):
    """The released Hi-End-MAE layout given to nnUNetv2_hiendmae_plan: the import command the error names, its output
    filled in, makes a checkpoint the plans take."""
    from test_import_reference import reference_state_dict, write_reference

    from pretrain.import_reference import main as import_main

    reference = write_reference(tmp_path / "released.pth", reference_state_dict("sincos"))
    argv = ["-d", str(ADVICE_ID), "-pt", str(reference), "-o", "A_imported", "--spacing", "dataset",
            "--normalization", "dataset"]
    line = refused(plan_main, argv, capsys)
    converted = str(tmp_path / "converted.pth")
    import_main([converted if a == "CONVERTED.pth" else a for a in advised_command(line, "nnUNetv2_hiendmae_import")])
    argv[argv.index("-pt") + 1] = converted
    plan_main(argv)
    assert json.loads((advice_dataset / "A_imported.json").read_text())["pretrain_info"]["checkpoint"] == converted


def test_an_ambiguous_dataset_id_and_plans_of_another_checkpoint_advise_names_that_work(
        preprocessed_dataset, advice_dataset, nnunet_dirs, tmp_path, capsys):
    """Two datasets with one id: the full name of one, as listed, plans it; a study on plans written for another
    checkpoint: '-p ANOTHER_NAME' (a name of its own filled in) plans the study."""
    from nnunetv2_hiendmae.study import main as study_main

    copy_preprocessed_dataset(preprocessed_dataset["preprocessed"], nnunet_dirs["nnUNet_preprocessed"], 967, "Ours")
    (nnunet_dirs["nnUNet_raw"] / "Dataset967_Theirs").mkdir()
    ckpt = str(write_checkpoint(tmp_path / "ckpt.pth", advice_dataset))
    argv = ["-d", "967", "-pt", ckpt, "-o", "A_full_name"]
    line = refused(plan_main, argv, capsys)
    named = re.search(r"ambiguous: (.*) have that id", line)[1].split(", ")
    assert named == ["Dataset967_Ours", "Dataset967_Theirs"], line
    plan_main(["-d", named[0], *argv[2:]])
    assert (nnunet_dirs["nnUNet_preprocessed"] / named[0] / "A_full_name.json").is_file()

    plan_main(["-d", str(ADVICE_ID), "-pt", ckpt, "-o", "A_study"])
    other = str(write_checkpoint(tmp_path / "other.pth", advice_dataset, seed=1))
    argv = ["-d", str(ADVICE_ID), "-pt", other, "-p", "A_study", "-f", "0", "--budgets", "100", "--arms", "frozen",
            "--dry-run"]
    line = refused(study_main, argv, capsys)
    flag, placeholder = advised_command(line, "pass ", " to study")
    argv[argv.index(flag) + 1] = placeholder.replace("ANOTHER_NAME", "A_study_other")
    study_main(argv)
    assert "nnUNetTrainerHiEndMAE_frozen" in capsys.readouterr().out


def test_a_recompute_trainer_on_primus_plans_advises_the_trainer_without_it_which_trains(advice_dataset):
    """Primus has no full-resolution block to recompute: 'a trainer without _recompute', named so, builds it."""
    from nnunetv2_hiendmae import trainers

    plan_main(["-d", str(ADVICE_ID), "--arch", "primus_tiny", "-o", "A_primus"])
    name = "nnUNetTrainerHiEndMAE_scratch_recompute_smoke"
    with pytest.raises(UserError) as e:
        make_trainer(getattr(trainers, name), advice_dataset, "A_primus").initialize()
    without = advised_command(str(e.value), "a trainer without ")[0]
    trainer = make_trainer(getattr(trainers, name.replace(without, "")), advice_dataset, "A_primus")
    trainer.initialize()
    assert type(trainer.network).__name__ == "PrimusNetwork"


def test_the_probe_on_cuda_without_a_gpu_advises_the_cpu_which_probes(advice_dataset, tmp_path, monkeypatch, capsys):
    """-device cuda where torch sees no GPU: the -device the error names probes."""
    from nnunetv2_hiendmae.probe_cli import main as probe_main

    argv = ["-d", str(ADVICE_ID), "-pt", "random:vit_tiny", "--patch-size", "32", "32", "32", "--crops-per-case", "1",
            "--max-cases", "2", "-o", str(tmp_path / "probe"), "-device", "cuda"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = refused(probe_main, argv, capsys)
    flag, value = advised_command(line, "; use ")
    argv[argv.index(flag) + 1] = value
    probe_main(argv)
    assert (tmp_path / "probe" / "probe.csv").is_file()


def test_an_unreadable_held_out_case_advises_skip_bad_cases_which_leaves_it_out(preprocessed_dataset, nnunet_dirs,
                                                                                tmp_path, capsys):
    """A held-out case that cannot be read refuses the run like a training case: '--skip-bad-cases', added, leaves it
    out of the held-out cases and the run ends."""
    from pretrain.data import resolve_sources
    from pretrain.heldout import held_out_cases

    pool = copy_preprocessed_dataset(preprocessed_dataset["unlabelled_preprocessed"],
                                     nnunet_dirs["nnUNet_preprocessed"], 969, "AdvicePool")
    datasets = [str(preprocessed_dataset["id"]), "969"]
    seed, case = next((s, c) for s in range(50) for c in held_out_cases(resolve_sources(datasets), 1, s)
                      if c.startswith(pool.name))  # a seed that holds out a case of the private copy
    data = pool / "nnUNetPlans_3d_fullres" / f"{case.split('/')[1]}.b2nd"
    data.write_bytes(data.read_bytes()[:len(data.read_bytes()) // 2])  # truncated, as a copy cut short is
    out = tmp_path / "run"
    argv = [*pretrain_args(preprocessed_dataset, out, 1, 1)[1:], "--val-cases", "1", "--seed", str(seed)]
    argv[argv.index("-d") + 2] = "969"
    line = refused(pretrain_main, argv, capsys)
    assert f"{case}: unreadable" in line and line.endswith("or pass --skip-bad-cases to leave them out"), line
    pretrain_main([*argv, advised_command(line, "or pass ", " to leave")[0]])
    pretrain = load_checkpoint(out / "checkpoint_final.pth")["pretrain"]
    assert pretrain["epochs_done"] == 1 and case not in pretrain["val_cases"]
