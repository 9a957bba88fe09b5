"""Choose the prior's default sampling settings on VALIDATION slices, and store them in its config.json.

    python bench/choose_sampling.py --data-dir ../shared/data/alzheimer4class --json bench/results/choose_sampling.json

For every (temperature, top-p) on a small grid (--temperatures, --top-ps): N samples with the selection seed, then the classifier
two-sample test against real *validation* slices (bench/generation_quality.py --reference val). The setting
with the lowest C2ST accuracy wins (ties: the higher temperature, then the larger top-p, i.e. the less
truncation). It is written under ``"sampling"`` in the prior's config.json, with keys named like
``brainvq.sampling.sample_codes``'s arguments; the demo and the generation benchmark start from it. Test slices
are never looked at; the report uses another sampling seed and the train slices.
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import generation_quality  # noqa: E402

from brainvq.checkpoint import CONFIG_NAME, read_config  # noqa: E402
from brainvq.io import atomic_write_json, write_report  # noqa: E402

SELECTION_SEED = 1   # sampling seed of the selection runs; the report (generation_quality) uses seed 0
TEMPERATURES = (1.0, 0.9, 0.8)
TOP_PS = (1.0, 0.95, 0.9)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vqvae", default=str(generation_quality.ROOT / "checkpoints/vqvae"))
    p.add_argument("--pixelcnn", default=str(generation_quality.ROOT / "checkpoints/pixelcnn"))
    p.add_argument("--data-dir")
    p.add_argument("--n", type=int, default=128, help="samples per setting (and real val slices per half)")
    p.add_argument("--temperatures", default=",".join(map(str, TEMPERATURES)), help="comma-separated grid")
    p.add_argument("--top-ps", default=",".join(map(str, TOP_PS)), help="comma-separated grid (1 = off)")
    p.add_argument("--write", action=argparse.BooleanOptionalAction, default=True,
                   help="store the winner in the prior's config.json")
    p.add_argument("--json")
    args = p.parse_args(argv)
    runs = []
    grid = [tuple(float(v) for v in text.split(",")) for text in (args.temperatures, args.top_ps)]
    for temperature, top_p in itertools.product(*grid):
        figures = generation_quality.main([
            "--vqvae", args.vqvae, "--pixelcnn", args.pixelcnn, *(["--data-dir", args.data_dir] if args.data_dir else []),
            "--n", str(args.n), "--reference", "val", "--no-controls", "--seed", str(SELECTION_SEED),
            "--temperature", str(temperature), "--top-p", str(top_p)])
        runs.append({"temperature": temperature, "top_p": top_p, "c2st_accuracy_vs_val": figures["c2st_accuracy"],
                     "texture": figures["texture_samples"]})
    best = min(runs, key=lambda r: (r["c2st_accuracy_vs_val"], -r["temperature"], -r["top_p"]))
    chosen = {"temperature": best["temperature"], "top_k": None, "top_p": best["top_p"]}
    if args.write:
        config = read_config(args.pixelcnn)
        atomic_write_json(Path(args.pixelcnn) / CONFIG_NAME, {**config, "sampling": chosen})
    return write_report({"selection_seed": SELECTION_SEED, "n": args.n, "reference": "val",
                         "grid": {"temperature": grid[0], "top_p": grid[1]}, "runs": runs,
                         "chosen": chosen, "written": bool(args.write)}, args.json)


if __name__ == "__main__":
    main()
