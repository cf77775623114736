"""Re-measure an export: held-out correspondence mIoU as training validation does, and the
denoising gain per timestep on benchmark cases.

    python scripts/validate_export.py [--ckpt FOLDER] [--measure correspondence denoising_gain]
        correspondence: [--val-length 256] [--timestep 300]
        denoising gain: [--cases 100] [--timesteps 10 50 100 200 400 700]
                        [--references whole crop other]
                        [--bench-dir DIR | --namespace benchmark --bench-seed 0] [--plot PNG]
                        [--baseline FOLDER | --baseline JSON]
        [--out JSON]

Correspondence: rebuilds the LightningModule from the folder's model.yaml, loads its (EMA)
weights and runs one validation epoch over the synthetic alignment-mode validation set (same
seed as training), then prints the per-block table next to the two trivial baselines. This is
how the numbers in checkpoints/tiny_synthetic/MODEL_CARD.md are reproduced on any machine.

Denoising gain (models/denoising_gain.py): the target noised to each t, one denoiser forward,
its x0 prediction pasted into the mask; PSNR in the mask's box and gms in the mask against the
target, for the noisy input and the x0 prediction, and their difference. Cases: ``--bench-dir``
(those with a target.png), else ``--cases`` synthetic cases written as eval.py writes them, from
the "benchmark" seed namespace (no training or validation item), or "validation" for choices.
With ``whole`` and ``other`` (another case's reference, same noise) both measured, the gain
with the case's own reference minus with another's is paired per case: how much the denoiser
draws from the right reference (0 for one that ignores it). With ``--baseline``, a second
export is scored on the same cases and noise and the gain differences (export minus baseline)
are paired per case, with bootstrap 95% intervals: the test a retrained model passes before it
replaces the shipped one. A baseline already scored (an ``--out`` JSON of this script, measured
on the same cases, timesteps, references and noise) is read instead of scored again.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from data.benchmark import load_benchmark, write_synthetic_benchmark
from data.datamodule import PairDataModule
from evaluation.denoising_gain import REFERENCES, GainConfig, measure_cases
from evaluation.figures import denoising_gain_curve
from evaluation.paired import paired_difference
from evaluation.report import format_summary
from models.denoising_gain import DEFAULT_TIMESTEPS, format_table
from models.export import CONFIG, DEFAULT_EXPORT, load_pipeline, read_weights

MEASURES = ("correspondence", "denoising_gain")
DEFAULT_CASES = 100


def correspondence(args: argparse.Namespace) -> dict:
    """One validation epoch of the export's module; prints and returns its per-block table."""
    cfg = OmegaConf.load(args.ckpt / CONFIG)
    cfg.ema_decay = None  # the export already holds the EMA weights
    if args.timestep is not None:
        cfg.val_timestep = args.timestep
    module = instantiate(cfg)
    weights = read_weights(args.ckpt)
    for name in ("denoiser", "reference_encoder"):
        prefix = f"{name}."
        getattr(module, name).load_state_dict(
            {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)})
    image_size = int(cfg.denoiser.config.sample_size) if cfg.denoiser.get("config") else 512
    data = PairDataModule(image_size=image_size, val_length=args.val_length,
                          batch_size=args.batch_size)
    trainer = pl.Trainer(accelerator=args.accelerator, devices=1, logger=False,
                         enable_checkpointing=False, enable_model_summary=False)
    trainer.validate(module, datamodule=data)
    result = {"metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
              "val_table": module.val_table, "export_dir": args.ckpt, "checkpoint_dir": None,
              "log_dir": None, "global_step": "(export)"}
    print(format_summary(result).replace("Training finished", f"Validation of {args.ckpt}"))
    return module.val_table


def denoising_gain(args: argparse.Namespace) -> dict:
    """The denoising gain of the export on benchmark cases; prints a table per reference."""
    use_cuda = args.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    pipe = load_pipeline(args.ckpt, "cuda" if use_cuda else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        bench = args.bench_dir
        if bench is None:
            bench = Path(tmp)
            write_synthetic_benchmark(bench, args.cases or DEFAULT_CASES, args.bench_seed,
                                      pipe.image_size, pipe.reference_encoder.image_size,
                                      namespace=args.namespace)
        cases, _ = load_benchmark(bench)
    cases = cases[: args.cases] if args.bench_dir is not None and args.cases else cases
    cfg = GainConfig(timesteps=args.timesteps, references=args.references, seed=args.seed,
                     batch_size=args.gain_batch_size)
    measured_on = ({"bench_dir": str(args.bench_dir)} if args.bench_dir is not None else
                   {"namespace": args.namespace, "bench_seed": args.bench_seed,
                    "num": args.cases or DEFAULT_CASES})
    saved_baseline = args.baseline is not None and args.baseline.is_file()
    if saved_baseline:  # refused before the scoring, where the settings alone tell
        scored_baseline(args.baseline, {"timesteps": list(args.timesteps), "seed": args.seed,
                                        "cases": measured_on})
    section = measure_cases(pipe, cases, cfg, progress=True, per_case=True)
    section["cases"] = measured_on
    section["device"] = "cuda" if use_cuda else f"cpu ({torch.get_num_threads()} threads)"
    for ref, node in section["references"].items():
        print(f"\nDenoising gain of {args.ckpt}, {ref} reference, {node['num_cases']} case(s) "
              f"({section['prediction_type']}, PSNR capped at {section['psnr_cap']:g} dB):")
        print(format_table(node["rows"]) if node["rows"] else "  no case")
    refs = section["references"]
    if "whole" in refs and refs.get("other", {}).get("num_cases"):  # one case has no other
        section["reference_use"] = reference_use(section)
        print(format_paired(section["reference_use"], "\nGain with the case's own reference "
                            "minus with another case's (same noise, paired per case, "
                            "bootstrap 95%):", ("other reference", "other_gain"),
                            ("own reference", "own_gain")))
    if args.plot:
        print(f"plot: {denoising_gain_curve(section, args.plot)}")
    if args.baseline is not None:
        baseline = (scored_baseline(args.baseline, section) if saved_baseline else
                    measure_cases(load_pipeline(args.baseline, "cuda" if use_cuda else "cpu"),
                                  cases, cfg, progress=True, per_case=True))
        section["versus_baseline"] = versus_baseline(section, baseline, str(args.baseline))
        print(format_paired(section["versus_baseline"]["rows"], "\nGain minus that of "
                            f"{args.baseline} (same cases and noise, paired per case, bootstrap "
                            "95%):", ("baseline", "baseline_gain"), ("this export", "gain")))
    return section


MEASURED_ALIKE = ("timesteps", "seed", "psnr_cap", "space", "image_size", "crop_margin", "cases")


def scored_baseline(path: Path, section: dict) -> dict:
    """The denoising-gain section of an earlier ``--out`` JSON, refused unless it was measured
    as ``section`` is (the settings and references it holds, the same cases), so that the
    pairing is per case and noise."""
    saved = json.loads(path.read_text()).get("denoising_gain")
    if saved is None:
        raise SystemExit(f"--baseline {path}: no denoising_gain section")
    for key in MEASURED_ALIKE:
        if key in section and saved.get(key) != section[key]:
            raise SystemExit(f"--baseline {path}: measured with {key}={saved.get(key)!r}, "
                             f"this run with {section.get(key)!r}")
    for ref, node in section.get("references", {}).items():
        cases = saved["references"].get(ref, {}).get("per_case")
        if cases is None or set(cases) != set(node["per_case"]):
            raise SystemExit(f"--baseline {path}: does not hold the {ref}-reference scores of "
                             f"this run's {len(node['per_case'])} cases")
    return saved


def per_case_gains(node: dict, metric: str) -> dict[str, list[float]]:
    """{case: [gain per timestep]} of one reference's ``per_case`` table."""
    return {case: [x - n for x, n in zip(s[f"{metric}_x0"], s[f"{metric}_noisy"], strict=True)]
            for case, s in node["per_case"].items()}


def paired_gains(a_node: dict, b_node: dict, timesteps: list[int], reference: str,
                 keys: tuple[str, str]) -> list[dict]:
    """Per metric and t: b's gain minus a's, paired over the cases both scored; the two mean
    gains under ``keys`` (a's, b's)."""
    rows = []
    for metric in ("psnr", "gms"):
        a_gains, b_gains = per_case_gains(a_node, metric), per_case_gains(b_node, metric)
        cases = sorted(set(a_gains) & set(b_gains))
        for k, t in enumerate(timesteps):
            a = [a_gains[c][k] for c in cases]  # PSNR is capped, so every value is finite
            b = [b_gains[c][k] for c in cases]
            rows.append({"reference": reference, "metric": metric, "t": t,
                         keys[0]: sum(a) / len(a), keys[1]: sum(b) / len(b),
                         **paired_difference(a, b)})
    return rows


def versus_baseline(section: dict, baseline: dict, name: str) -> dict:
    """Gain of the export minus the baseline's, paired per case, per reference, metric and t."""
    return {"baseline": name, "rows": [
        row for ref, node in section["references"].items()
        for row in paired_gains(baseline["references"][ref], node, section["timesteps"], ref,
                                ("baseline_gain", "gain"))]}


def reference_use(section: dict) -> list[dict]:
    """Gain with each case's own whole reference minus with another case's (``other``): how
    much the denoiser draws from the right reference; 0 for one that ignores it."""
    refs = section["references"]
    return paired_gains(refs["other"], refs["whole"], section["timesteps"], "whole",
                        ("other_gain", "own_gain"))


def format_paired(rows: list[dict], title: str, a: tuple[str, str], b: tuple[str, str]) -> str:
    """Markdown table of paired gain rows; ``a`` and ``b`` are (column title, row key), the
    difference b minus a."""
    lines = [title, f"| reference | metric | t | {a[0]} | {b[0]} | difference | 95% interval "
             "| cases better |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r["ci95"]
        lines.append(f"| {r['reference']} | {r['metric']} | {r['t']} | {r[a[1]]:+.3f} "
                     f"| {r[b[1]]:+.3f} | {r['mean_difference']:+.3f} | [{lo:+.3f}, {hi:+.3f}] "
                     f"| {r['b_better_cases']}/{r['cases']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, default=DEFAULT_EXPORT)
    parser.add_argument("--measure", nargs="+", choices=MEASURES, default=list(MEASURES))
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--out", type=Path, default=None,
                        help="write {correspondence, denoising_gain} (those measured) as JSON")
    group = parser.add_argument_group("correspondence")
    group.add_argument("--val-length", type=int, default=256)
    group.add_argument("--batch-size", type=int, default=128,
                       help="as in training: the validation noise is drawn per batch")
    group.add_argument("--timestep", type=int, default=None, help="default: the export's")
    group = parser.add_argument_group("denoising gain")
    group.add_argument("--timesteps", type=int, nargs="+", default=list(DEFAULT_TIMESTEPS))
    group.add_argument("--cases", type=int, default=None,
                       help=f"synthetic cases to write (default {DEFAULT_CASES}); with "
                            "--bench-dir: the first N (default all)")
    group.add_argument("--bench-dir", type=Path, default=None,
                       help="a benchmark folder (docs/benchmark_format.md) instead")
    group.add_argument("--namespace", choices=("benchmark", "validation"), default="benchmark",
                       help="seed namespace of the synthetic cases (validation: for choices)")
    group.add_argument("--bench-seed", type=int, default=0, help="as eval.py's bench_seed")
    group.add_argument("--references", nargs="+", choices=REFERENCES, default=list(REFERENCES))
    group.add_argument("--seed", type=int, default=0, help="per-case noise seed base")
    group.add_argument("--gain-batch-size", type=int, default=16)
    group.add_argument("--plot", type=Path, default=None, help="write the gain figure (PNG)")
    group.add_argument("--baseline", type=Path, default=None,
                       help="another export to score on the same cases and noise, or the --out "
                            "JSON of one scored so; prints and writes the paired gain "
                            "differences (this export minus it)")
    args = parser.parse_args(argv)
    if args.cases is not None and args.cases < 1:
        parser.error("--cases must be >= 1")

    export = args.ckpt.resolve()
    result: dict = {  # the export relative to the working directory when it lies inside it
        "export": str(export.relative_to(Path.cwd()) if export.is_relative_to(Path.cwd())
                      else export),
        "command": " ".join(["validate_export.py", *(sys.argv[1:] if argv is None else argv)]),
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    if "correspondence" in args.measure:
        result["correspondence"] = correspondence(args)
    if "denoising_gain" in args.measure:
        result["denoising_gain"] = denoising_gain(args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
