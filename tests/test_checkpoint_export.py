"""Checkpoint -> pipeline folder (models/checkpoint.py): golden against train.py's own export."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from models.checkpoint import MODEL_CONFIG_KEY, export_checkpoint
from models.export import load_pipeline, read_weights
from tests.conftest import compose_config
from tests.test_training import FAST

REPO = Path(__file__).resolve().parents[1]
PREFIXES = ("denoiser.", "reference_encoder.")


class SaveTrainedWeights(pl.Callback):
    """Saves the module's own (non-EMA) inference weights when fitting ends."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        torch.save({k: v.detach().clone() for k, v in pl_module.state_dict().items()
                    if k.startswith(PREFIXES)}, self.path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 2-step tiny run through train.py's train(): checkpoints every step, its export."""
    from train import train

    out = tmp_path_factory.mktemp("run")
    raw = out / "trained_weights.pt"
    cfg = compose_config(FAST + [
        "trainer.max_steps=2", "trainer.val_check_interval=2", "logger=csv",
        "callbacks.model_checkpoint.every_n_train_steps=1", "callbacks.progress_bar.refresh_rate=0",
        "+callbacks.save_trained._target_=tests.test_checkpoint_export.SaveTrainedWeights",
        f"+callbacks.save_trained.path={raw}"])
    cfg.paths.output_dir = str(out)
    cfg.export_dir = str(out / "export")
    result = train(cfg)
    return {"cfg": cfg, "checkpoints": Path(result["checkpoint_dir"]), "export": out / "export",
            "raw": torch.load(raw), "out": out}


def _weights(export_dir: Path) -> dict[str, torch.Tensor]:
    return read_weights(export_dir)


def _assert_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_train_exports_the_ema_weights_of_its_last_checkpoint(trained):
    """Read independently of the module: EMAModel keeps one shadow tensor per trainable
    parameter, in the order of the denoiser's then the encoder's parameters."""
    from hydra.utils import instantiate

    state = torch.load(trained["checkpoints"] / "last.ckpt", weights_only=False)
    module = instantiate(trained["cfg"].model)
    names = [n for n, p in module.named_parameters() if p.requires_grad and n.startswith(PREFIXES)]
    shadow = state["ema"]["shadow_params"]
    assert len(names) == len(shadow) and state["ema"]["optimization_step"] == 2
    exported = _weights(trained["export"])
    for name, tensor in zip(names, shadow, strict=True):
        assert torch.equal(exported[name], tensor), name
    assert any(not torch.equal(exported[n], state["state_dict"][n]) for n in names)


def test_last_and_step_checkpoints_export_the_ema_weights_train_exports(trained, tmp_path):
    golden = _weights(trained["export"])
    for name in ("last.ckpt", "step0000002.ckpt"):
        out = export_checkpoint(trained["checkpoints"] / name, tmp_path / name)
        _assert_equal(_weights(out), golden)
        want = OmegaConf.load(trained["export"] / "model.yaml")
        assert OmegaConf.load(out / "model.yaml") == want
        source = json.loads((out / "source.json").read_text())
        assert source["weights"] == "ema" and source["global_step"] == 2
        assert source["model_config"] == "checkpoint"
    load_pipeline(tmp_path / "last.ckpt")  # loads as a pipeline
    # an earlier step is another model
    early = _weights(export_checkpoint(trained["checkpoints"] / "step0000001.ckpt",
                                       tmp_path / "early"))
    assert any(not torch.equal(early[k], golden[k]) for k in golden)


def test_raw_option_exports_the_trained_weights(trained, tmp_path):
    out = export_checkpoint(trained["checkpoints"] / "last.ckpt", tmp_path / "raw", ema=False)
    raw = _weights(out)
    _assert_equal(raw, trained["raw"])
    golden = _weights(trained["export"])
    assert any(not torch.equal(raw[k], golden[k]) for k in golden)  # EMA differs from raw
    assert json.loads((out / "source.json").read_text())["weights"] == "raw"


def _without_config(trained, run: Path) -> Path:
    """last.ckpt minus its embedded config, inside a Hydra-like run folder ``run``."""
    state = torch.load(trained["checkpoints"] / "last.ckpt", weights_only=False)
    del state[MODEL_CONFIG_KEY]
    (run / "checkpoints").mkdir(parents=True)
    torch.save(state, run / "checkpoints" / "last.ckpt")
    return run / "checkpoints" / "last.ckpt"


def test_config_from_the_hydra_run_folder_or_a_clear_refusal(trained, tmp_path):
    ckpt = _without_config(trained, tmp_path / "run")
    with pytest.raises(ValueError, match="no model config"):
        export_checkpoint(ckpt, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    # what Hydra saves: unresolved, with hydra-only interpolations outside the model
    hydra_cfg = trained["cfg"].copy()
    hydra_cfg.paths.output_dir = "${hydra:runtime.output_dir}"
    (tmp_path / "run" / ".hydra").mkdir()
    OmegaConf.save(hydra_cfg, tmp_path / "run" / ".hydra" / "config.yaml")
    out = export_checkpoint(ckpt, tmp_path / "from_hydra")
    _assert_equal(_weights(out), _weights(trained["export"]))
    assert json.loads((out / "source.json").read_text())["model_config"].endswith("config.yaml")


def _cli():
    spec = importlib.util.spec_from_file_location("export_checkpoint_script",
                                                  REPO / "scripts" / "export_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_cli_exports_and_refuses_loudly(trained, tmp_path, capsys):
    main = _cli()
    main([str(trained["checkpoints"] / "last.ckpt"), "--out", str(tmp_path / "cli"), "--raw"])
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"export: {tmp_path / 'cli'}"
    _assert_equal(_weights(tmp_path / "cli"), trained["raw"])
    ckpt = _without_config(trained, tmp_path / "run")
    with pytest.raises(SystemExit, match="no model config"):
        main([str(ckpt), "--out", str(tmp_path / "no")])
    # an export's model.yaml serves as the config
    main([str(ckpt), "--out", str(tmp_path / "given"), "--config",
          str(trained["export"] / "model.yaml")])
    _assert_equal(_weights(tmp_path / "given"), _weights(trained["export"]))


def test_eval_takes_a_checkpoint_directly(trained, tmp_path):
    import eval as eval_script

    ckpt = trained["checkpoints"] / "last.ckpt"
    cfg = compose_config([f"ckpt_path={ckpt}", "bench_cases=2", "bench_seed=5",
                          "sweep.num_timesteps=2", "sweep.topk=[1]", "run_refinement=false",
                          "progress=false", "num_threads=1", "qualitative.num_cases=1"],
                         config_name="eval")
    previous = torch.get_num_threads()
    try:
        path = eval_script.evaluate(cfg, tmp_path / "eval")
    finally:
        torch.set_num_threads(previous)
    report = json.loads(path.read_text())
    assert report["meta"]["checkpoint"] == str(ckpt)
    assert report["counts"]["sweep_cases"] == 2
    _assert_equal(_weights(tmp_path / "eval" / "export"), _weights(trained["export"]))


@pytest.mark.slow
def test_fsdp_sharded_checkpoint_exports_the_trained_weights(tmp_path):
    """trainer=fsdp on 2 CPU processes (tests/cpu_fsdp.py): the sharded last.ckpt directory
    exports the weights train.py exported (no EMA under FSDP)."""
    import torch.multiprocessing as mp

    from tests.test_ddp import WORLD, _free_port, _fsdp_rank

    overrides = ["model.ema_decay=null", "model.val_sample_steps=1", "model.val_num_samples=1",
                 "data.num_workers=0", "data.batch_size=2", "data.val_length=2", "logger=csv",
                 "callbacks.progress_bar.refresh_rate=0", "trainer=fsdp",
                 "trainer.accelerator=cpu", f"trainer.devices={WORLD}", "trainer.max_steps=2",
                 "trainer.val_check_interval=2", "callbacks.model_checkpoint.every_n_train_steps=2",
                 "trainer.strategy._target_=tests.cpu_fsdp.CPUFSDPStrategy"]
    out = tmp_path / "fsdp"
    mp.start_processes(_fsdp_rank, args=(_free_port(), overrides, str(out)), nprocs=WORLD,
                       start_method="spawn")
    results = torch.load(out / "rank0.pt", weights_only=False)
    ckpt = Path(results["checkpoint_dir"]) / "last.ckpt"
    assert ckpt.is_dir()
    exported = export_checkpoint(ckpt, tmp_path / "export")
    assert json.loads((exported / "source.json").read_text())["weights"] == "raw"
    _assert_equal(_weights(exported), _weights(out / "export"))
    shutil.rmtree(out)
