"""eval.py logger=wandb (offline): figures, tables and headline numbers land in a wandb run,
the export's training run when it records one; failures to log fail the evaluation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from data.provenance import write_training_data
from evaluation.tracker import (
    TRACKER,
    init_kwargs,
    read_tracker_record,
    wandb_table,
    write_tracker_record,
)
from models.export import DEFAULT_EXPORT
from tests.conftest import compose_config
from tests.wandb_offline import OfflineRun, offline_runs, read_finished_run

QUICK = ["logger=wandb", "bench_cases=8", "sweep.num_timesteps=3", "refinement.num_steps=5",
         "sweep.bootstrap=20", "num_threads=1", "progress=false", "qualitative.num_cases=2",
         "sweep.compare_readouts=[]", "refinement.methods=[input,telea,aligned_crop]",
         "denoising_gain.timesteps=[50,400]"]
FIGURES = {"heatmap_mask", "heatmap_box", "timestep_curve", "layer_curve", "qualitative",
           "denoising_gain"}


@pytest.fixture(autouse=True)
def offline_wandb(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def _shipped_copy(root: Path) -> Path:
    """The shipped pipeline folder's weights and config, with the training_data.yaml train.py
    writes."""
    out = root / "export"
    out.mkdir(parents=True)
    for name in ("unet", "reference_encoder", "scheduler"):
        shutil.copytree(DEFAULT_EXPORT / name, out / name)
    for name in ("model_index.json", "model.yaml"):
        shutil.copy2(DEFAULT_EXPORT / name, out / name)
    write_training_data(compose_config([]).data, out)
    return out


def _evaluate(overrides: list[str], run_dir: Path) -> Path:
    import eval as eval_script

    cfg = compose_config([*QUICK, *overrides], config_name="eval")
    previous = torch.get_num_threads()
    try:
        return eval_script.evaluate(cfg, run_dir)
    finally:
        torch.set_num_threads(previous)


def _only_run(run_dir: Path) -> OfflineRun:
    folders = offline_runs(run_dir)
    assert len(folders) == 1, folders
    return read_finished_run(folders[0])


def _table(run: OfflineRun, key: str) -> dict:
    (row,) = [r for r in run.history if key in r]
    assert row[key]["_type"] == "table-file"
    return json.loads((run.folder / "files" / row[key]["path"]).read_text())


@pytest.fixture(scope="module")
def linked(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, OfflineRun]:
    """One small eval of a copy of the shipped export that records no wandb run."""
    root = tmp_path_factory.mktemp("linked")
    export = _shipped_copy(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        path = _evaluate([f"ckpt_path={export}"], root / "run")
    return export, json.loads(path.read_text()), _only_run(root / "run")


def test_eval_without_a_recorded_run_logs_a_new_run_linked_to_the_export(linked) -> None:
    export, report, run = linked
    assert run.job_type == "eval" and run.project == "refine-by-align" and run.exit_code == 0
    assert report["meta"]["tracker"]["id"] == run.run_id
    assert report["meta"]["tracker"]["mode"] == "offline"
    # the run's config names the export and what trained it
    assert run.config["eval"]["export"] == str(export.resolve())
    assert run.config["eval"]["training_data"]["train"]["namespace"] == "train"
    assert run.config["eval"]["tracker_record"] is None
    assert run.config["eval"]["settings"]["sweep"]["num_timesteps"] == 3


def test_eval_logs_the_figures_tables_and_headline_numbers(linked) -> None:
    _, report, run = linked
    assert set(report["figures"]) == FIGURES
    for name in FIGURES:  # the PNGs figures.py wrote, logged as images
        (row,) = [r for r in run.history if f"eval/{name}" in r]
        image = row[f"eval/{name}"]
        assert image["_type"] == "image-file"
        logged = run.folder / "files" / image["path"]
        assert logged.read_bytes() == (Path(report["meta"]["run_dir"]) /
                                       report["figures"][name]).read_bytes()

    corr = report["correspondence"]
    headline = _table(run, "eval/correspondence")
    assert headline["columns"] == ["method", "mIoU mask", "mIoU box"]
    assert headline["data"][0][1:] == pytest.approx([corr["best"]["miou_mask"],
                                                     corr["best"]["miou_box"]])
    assert [r[0] for r in headline["data"][-3:]] == [f"baseline: {n}" for n in corr["baselines"]]
    cells = _table(run, "eval/sweep_cells")
    assert len(cells["data"]) == len(corr["timesteps"]) * len(corr["layers"])
    refinement = _table(run, "eval/refinement")
    assert [r[0] for r in refinement["data"]] == list(report["refinement"])
    psnr = refinement["columns"].index("psnr")
    assert refinement["data"][1][psnr] == pytest.approx(report["refinement"]["telea"]["psnr"])
    for key in ("eval/correspondence_in_sample", "eval/topk", "eval/readouts",
                "eval/refinement_by_category"):
        assert _table(run, key)["data"]

    summary = run.summary
    assert summary["eval/t_star"] == report["alignment"]["timestep"] == corr["best"]["t"]
    assert summary["eval/block_star"] == report["alignment"]["block"] == corr["best"]["layer"]
    assert summary["eval/miou_mask"] == pytest.approx(corr["best"]["miou_mask"])
    assert summary["eval/deployed/miou_box"] == pytest.approx(corr["deployed"]["miou_box"])
    assert summary["eval/baseline/whole_reference/miou_mask"] == pytest.approx(
        corr["baselines"]["whole_reference"]["miou_mask"])
    assert summary["eval/refinement/aligned_crop/psnr"] == pytest.approx(
        report["refinement"]["aligned_crop"]["psnr"])
    assert summary["eval/data_provenance"] == "disjoint"
    rows = report["denoising_gain"]["references"]["whole"]["rows"]
    assert len(_table(run, "eval/denoising_gain_whole")["data"]) == len(rows)
    assert summary[f"eval/denoising_gain/whole/psnr_t{rows[0]['t']}"] == pytest.approx(
        rows[0]["psnr_gain"])
    assert {"report.json", "report.md", "alignment.yaml"} <= set(run.files)
    assert not (run.folder / "files" / "report.json").is_symlink()


def test_eval_logs_into_the_training_run_the_export_records(tmp_path: Path) -> None:
    from pytorch_lightning.loggers import WandbLogger

    export = _shipped_copy(tmp_path)
    training = WandbLogger(project="rba-tracker-test", name="train",
                           save_dir=str(tmp_path / "train"), offline=True)
    training.log_metrics({"train/loss": 1.0}, step=1)
    assert write_tracker_record([training], export) == export / TRACKER
    train_id = training.experiment.id
    training.experiment.finish()
    record = read_tracker_record(export)
    assert record["id"] == train_id and record["project"] == "rba-tracker-test"
    assert record["mode"] == "offline" and train_id in Path(record["run_dir"]).name
    assert read_finished_run(Path(record["run_dir"])).run_id == train_id

    path = _evaluate([f"ckpt_path={export}", "run_refinement=false"], tmp_path / "run")
    run = _only_run(tmp_path / "run")
    assert run.run_id == train_id and run.project == "rba-tracker-test"
    assert run.folder.name.endswith(f"-{train_id}")  # `wandb sync` merges it into the run
    assert run.job_type == "" and run.exit_code == 0
    assert record["next_step"] >= 1 and run.history[0]["_step"] == record["next_step"]
    report = json.loads(path.read_text())
    assert report["meta"]["tracker"]["id"] == train_id
    assert run.config["eval"]["tracker_record"]["id"] == train_id
    assert run.summary["eval/t_star"] == report["alignment"]["timestep"]
    assert "eval/heatmap_mask" in run.history_keys()


def test_a_failure_to_log_fails_the_eval_naming_wandb_and_the_stage(
        tmp_path: Path, linked, monkeypatch: pytest.MonkeyPatch) -> None:
    import eval as eval_script
    from evaluation import tracker

    export, report, _ = linked
    done = Path(report["meta"]["run_dir"])

    def finished_evaluation(cfg, run_dir: Path, tracker=None) -> Path:
        shutil.copytree(done, run_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns("wandb"))
        return run_dir / "report.json"

    def broken(_report: dict) -> dict:
        raise RuntimeError("table went missing")

    monkeypatch.setattr(eval_script, "run_evaluation", finished_evaluation)
    monkeypatch.setattr(tracker, "report_tables", broken)
    with pytest.raises(eval_script.EvalError,
                       match="stage 'wandb log'.*tables: RuntimeError: table went missing") as err:
        _evaluate([f"ckpt_path={export}"], tmp_path / "run")
    assert err.value.report == tmp_path / "run" / "report.json"
    run = _only_run(tmp_path / "run")
    assert run.exit_code == 1 and "table went missing" in run.summary["eval/error"]


def test_bad_tracker_settings_are_refused_before_evaluating(tmp_path: Path) -> None:
    import eval as eval_script

    with pytest.raises(eval_script.EvalError, match="stage 'wandb init'.*wandb only.*csv"):
        eval_script.evaluate(compose_config(["logger=many"], config_name="eval"),
                             tmp_path / "many")
    export = tmp_path / "export"
    export.mkdir()
    (export / TRACKER).write_text("wandb: {project: p}\n")
    with pytest.raises(eval_script.EvalError, match=f"stage 'wandb init'.*{TRACKER}.*id"):
        eval_script.evaluate(compose_config(["logger=wandb", f"ckpt_path={export}"],
                                            config_name="eval"), tmp_path / "bad")
    assert not offline_runs(tmp_path / "bad") and not (tmp_path / "bad" / "report.json").exists()


def test_which_run_eval_logs_into(tmp_path: Path) -> None:
    node = {"_target_": "pytorch_lightning.loggers.WandbLogger", "project": "mine",
            "name": "eval", "save_dir": "elsewhere", "offline": True, "log_model": False}
    record = {"id": "trainrun", "project": "theirs", "entity": "team"}
    new = init_kwargs(node, None, tmp_path)
    assert new == {"project": "mine", "name": "eval", "dir": str(tmp_path), "mode": "offline",
                   "job_type": "eval"}
    resumed = init_kwargs(node, record, tmp_path)  # the training run's place and name
    assert resumed == {"project": "theirs", "entity": "team", "id": "trainrun",
                       "resume": "allow", "dir": str(tmp_path), "mode": "offline"}
    chosen = init_kwargs({**node, "id": "byhand"}, record, tmp_path)
    assert chosen["id"] == "byhand" and chosen["project"] == "mine" and "name" not in chosen


def test_wandb_table_moves_notes_out_of_numeric_columns() -> None:
    table = wandb_table((["method", "psnr", "cells"],
                         [["a", 12.5, ""], ["b", "not available (no weights)", 3]]))
    assert table.columns == ["method", "psnr", "cells", "notes"]
    assert table.data == [["a", 12.5, None, ""],
                          ["b", None, 3, "psnr: not available (no weights)"]]


def test_train_records_no_tracker_without_a_wandb_logger(tmp_path: Path) -> None:
    from pytorch_lightning.loggers import CSVLogger

    assert write_tracker_record([CSVLogger(str(tmp_path))], tmp_path) is None
    assert read_tracker_record(tmp_path) is None and not (tmp_path / TRACKER).exists()


@pytest.mark.slow
def test_train_py_records_its_wandb_run_and_eval_logs_into_it(tmp_path: Path) -> None:
    """The real hand-over: train.py logger=wandb -> export/tracker.yaml -> eval.py (about a
    minute on 2 cores; the fast tests above cover each side with a real WandbLogger)."""
    import wandb

    from train import train

    cfg = compose_config(["data.image_size=32", "data.batch_size=4", "data.num_workers=0",
                          "data.val_length=4", "model.val_sample_steps=2",
                          "model.val_num_samples=2", "trainer.max_steps=1",
                          "trainer.val_check_interval=1", "logger=wandb",
                          "callbacks.progress_bar.refresh_rate=0"])
    cfg.paths.output_dir = str(tmp_path / "train")
    export = Path(train(cfg)["export_dir"])
    wandb.finish()  # what the end of the train.py process does
    record = read_tracker_record(export)
    training = read_finished_run(Path(record["run_dir"]))
    assert training.run_id == record["id"] and "val/loss" in training.history_keys()

    _evaluate([f"ckpt_path={export}", "bench_cases=4", "run_refinement=false"],
              tmp_path / "eval")
    run = _only_run(tmp_path / "eval")
    assert run.run_id == record["id"] and "eval/heatmap_mask" in run.history_keys()
