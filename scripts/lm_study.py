"""
The language-modelling comparison of docs/RESULTS.md: mixers at equal parameters, each at several
learning rates and seeds, trained by train.py on the same data for the same tokens with the same
optimiser; then each mixer's validation bits per byte at its best learning rate (mean ± std over
seeds), the table of every learning rate, and the curves.

    python prepare_data.py --source /tmp/kjv.txt shakespeare    # the Bible (README, "Offline machines") and the plays
    python scripts/lm_study.py --out_dir=out/lm_study --mixers=carve,gdn2,attn --params=12e6 \\
        --lrs=1e-3,2e-3,4e-3 --seeds=1,2,3 --parallel=4
    python scripts/lm_study.py ... --max_steps=600 --data_dir=data/shakespeare_byte   # other train.py keys, every run
    python scripts/lm_study.py ... --report     # the table of the runs that finished; none trains

Runs start from configs/study_lm.py. Each mixer gets the SwiGLU width (mlp_hidden, a multiple of 16)
that brings the parameters in its blocks to --params; a mixer that cannot come within 2% stops the
study before anything trains. Each run's score is the lowest validation bits per byte it logged: on a
small corpus seen several times the models overfit at different points, so the
best point counts, and the curves show the rest. A mixer's best learning rate is the one with the
lowest mean over seeds. Runs are resumable and skipped once finished (as in scripts/mqar_sweep.py,
whose runner this uses), so the study can be stopped and spread over several sessions. The table goes
to stdout and OUT_DIR/results.json; the curves of each mixer at its best learning rate to
OUT_DIR/curves.png when matplotlib is installed.
"""
import argparse
import itertools
import os
import sys
from typing import NamedTuple

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "scripts")]   # the repository's modules and mqar_sweep.py beside this

import plot  # noqa: E402
import train  # noqa: E402
from model import LM, ModelConfig  # noqa: E402
from mqar_sweep import finished, numbers, parse_arguments, publish, train_runs  # noqa: E402

BASE_CONFIG = "study_lm"
STUDY_KEYS = ("mixer", "mlp_hidden", "lr", "min_lr", "seed", "out_dir")   # set per run here, not by overrides
PARAMS_TOLERANCE = 0.02
WIDTH_STEP = 16


def block_params(config, mixer, mlp_hidden):
    """Parameters in the blocks (LM.num_params) of the config's model with this mixer and MLP width."""
    with torch.device("meta"):   # shapes only: nothing is allocated
        model = LM(ModelConfig.from_dict({**config, "mixer": mixer.replace("+", ","), "mlp_hidden": mlp_hidden,
                                          "vocab_size": config["vocab_size"] or 256}))
    return model.num_params()


class MatchedWidth(NamedTuple):
    mlp_hidden: int
    params: int   # in the blocks


def matched_mlp_hidden(config, mixer, target):
    """MatchedWidth: the multiple of WIDTH_STEP whose model comes closest to `target`
    parameters in its blocks (they grow linearly with mlp_hidden)."""
    low, high = block_params(config, mixer, WIDTH_STEP), block_params(config, mixer, 2 * WIDTH_STEP)
    per_unit = (high - low) / WIDTH_STEP
    hidden = max(WIDTH_STEP, WIDTH_STEP * round((WIDTH_STEP + (target - low) / per_unit) / WIDTH_STEP))
    params = block_params(config, mixer, hidden)
    if abs(params / target - 1) > PARAMS_TOLERANCE:
        raise SystemExit(f"lm_study.py: error: --mixers {mixer}: the closest model has {params:,} parameters in its "
                         f"blocks (mlp_hidden={hidden}), not within {PARAMS_TOLERANCE:.0%} of --params={target:,.0f}; "
                         f"change --params, --d_model or --n_layer")
    return MatchedWidth(hidden, params)


def run_dir(out_dir, mixer, lr, seed):
    return os.path.join(out_dir, f"{mixer}_lr{lr:g}_seed{seed}")


def run_args(mixer, mlp_hidden, lr, seed, directory, overrides):
    return [BASE_CONFIG, f"--mixer={mixer.replace('+', ',')}", f"--mlp_hidden={mlp_hidden}", f"--lr={lr}",
            f"--min_lr={lr / 10:g}", f"--seed={seed}", f"--out_dir={directory}", *overrides]


def best_val_bpb(directory):
    """(lowest validation bits per byte the run logged, tokens seen then)."""
    rows = [row for row in plot.read_log(directory) if row.get("val_bpb") is not None]
    best = min(rows, key=lambda row: row["val_bpb"])
    return best["val_bpb"], best["step"] * plot.read_record(directory)["config"]["batch_tokens"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default="out/lm_study")
    parser.add_argument("--mixers", default="carve,gdn2,attn", help="'+' joins a hybrid's pattern: carve+attn")
    parser.add_argument("--params", type=float, default=12e6,
                        help="parameters in the blocks of every model (default: %(default).0f)")
    parser.add_argument("--lrs", default="1e-3,2e-3,4e-3")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--parallel", type=int, default=1, help="runs at once (default: %(default)s)")
    parser.add_argument("--report", action="store_true", help="the table of the study's finished runs; train none")
    args, overrides = parse_arguments(parser, argv, STUDY_KEYS, "--mixers, --params, --lrs, --seeds, --out_dir")
    mixers = args.mixers.split(",")
    lrs, seeds = numbers(args.lrs, float, "lrs"), numbers(args.seeds, int, "seeds")
    base = train.load_config([BASE_CONFIG, *overrides])
    widths = {mixer: matched_mlp_hidden(base, mixer, args.params) for mixer in mixers}
    grid = list(itertools.product(mixers, lrs, seeds))
    for mixer, lr, seed in grid:   # every run's config is checked before the first one starts
        train.load_config(run_args(mixer, widths[mixer].mlp_hidden, lr, seed, "unused", overrides))
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    if not args.report:
        # and the data, where the runs (started in the repository) will look: else every run fails alike
        train.TokenData(os.path.join(ROOT, base["data_dir"]), base["seq_len"], base["seed"])
        for mixer, width in widths.items():
            log(f"{mixer}: mlp_hidden {width.mlp_hidden}, {width.params:,} parameters in the blocks")
        log(f"{len(grid)} runs into {args.out_dir}, {args.parallel} at a time")
    runs = []
    for mixer, lr, seed in grid:
        directory = run_dir(args.out_dir, mixer, lr, seed)
        runs.append((run_args(mixer, widths[mixer].mlp_hidden, lr, seed, directory, overrides), directory))
    failures = train_runs(runs, base["max_steps"], args.parallel, log, args.report)

    rows, best_dirs = [], []
    for mixer in mixers:
        per_lr = {}
        for lr in lrs:
            dirs = [run_dir(args.out_dir, mixer, lr, seed) for seed in seeds]
            dirs = [d for d in dirs if finished(d, base["max_steps"])]
            if dirs:
                bpb, tokens = zip(*[best_val_bpb(d) for d in dirs])
                per_lr[lr] = {"dirs": dirs, "bpb": bpb, "tokens": tokens}
        if not per_lr:
            continue
        best_lr = min(per_lr, key=lambda lr: np.mean(per_lr[lr]["bpb"]))
        best_dirs += per_lr[best_lr]["dirs"]
        for lr, result in per_lr.items():
            rows.append({"mixer": mixer, "mlp_hidden": widths[mixer].mlp_hidden, "params": widths[mixer].params,
                         "lr": lr, "best_lr": lr == best_lr, "seeds": len(result["bpb"]),
                         "val_bpb_mean": float(np.mean(result["bpb"])), "val_bpb_std": float(np.std(result["bpb"])),
                         "tokens_at_best_mean": float(np.mean(result["tokens"]))})
    if not rows:
        raise SystemExit(f"lm_study.py: error: none of the study's {len(grid)} runs in {args.out_dir} has finished")
    def tokens(count):   # tiny test runs see thousands: 0.0M would hide them
        return f"{count / 1e6:.1f}M" if count >= 1e6 else f"{count:,.0f}"
    table = [[row["mixer"], f"{row['params']:,}", row["mlp_hidden"],
              f"**{row['lr']:g}**" if row["best_lr"] else f"{row['lr']:g}", row["seeds"],
              f"{row['val_bpb_mean']:.4f} ± {row['val_bpb_std']:.4f}", tokens(row["tokens_at_best_mean"])]
             for row in rows]
    publish(args.out_dir, {"overrides": overrides, "params_target": args.params, "rows": rows},
            ["mixer", "parameters in blocks", "mlp_hidden", "lr", "seeds", "best val bpb, mean ± std",
             "tokens at best"], table, ("curves", best_dirs, "curves.png"), log)
    if failures:
        raise SystemExit(f"lm_study.py: {len(failures)} of {len(grid)} runs failed (listed above)")


if __name__ == "__main__":
    main()
