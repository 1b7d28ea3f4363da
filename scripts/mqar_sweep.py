"""
A grid of MQAR runs (train.py --task=mqar) as in the Zoology benchmark: mixers x widths x key-value pairs
x learning rates x seeds, each run in its own folder, then a table of the accuracy of each setting (the
best learning rate of each seed; mean and standard deviation over seeds, how many seeds passed
accuracy 0.5, and the means on each example's first and last query, which differ when recall fades with
the query's order) and the plot. With --content_rank=0 the mixer reads "carve (content_rank 0)".

    python scripts/mqar_sweep.py --out_dir=out/mqar_sweep --mixers=carve,gdn2,attn,carve+attn \\
        --widths=64,128,256 --pairs=4,8,16,32,64 --lrs=1e-4,3e-4,1e-3,3e-3 --seeds=1,2,3 --parallel=4
    python scripts/mqar_sweep.py ... --max_steps=2000 --seq_len=512     # other train.py keys, to every run
    python scripts/mqar_sweep.py ... --report      # the table of the runs that finished; none trains

Runs start from configs/mqar.py. A mixer is train.py's `mixer` with '+' for ',' (carve+attn: a hybrid);
each run has heads of min(64, d_model) dimensions, d_model / 64 of them (at least one; --n_head,
--head_k_dim and --head_v_dim set them for every run instead), and min_lr from configs/mqar.py (1e-4)
at every learning rate, as a fixed floor of the cosine schedule. A run that finished (its record at
max_steps) is skipped and one that stopped resumes (train.py --init_from=resume), so the sweep can be
stopped and started again, and spread over several sessions. --parallel runs that many at once (small
models leave a GPU mostly idle). The table goes to stdout and OUT_DIR/results.json; the plot to
OUT_DIR/mqar.png when matplotlib is installed.
"""
import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import plot  # noqa: E402
import train  # noqa: E402

HEAD_DIM = 64
# named in each run's folder, from the grid; an override would contradict the name
SWEEP_KEYS = ("mixer", "d_model", "mqar_pairs", "lr", "seed", "out_dir")
# A run mostly either learns MQAR (0.85 or more) or stays near chance, by the seed: a mean of 0.66 over
# three seeds can be two that learnt and one that did not, so the table also counts the seeds above this.
LEARNT = 0.5


def numbers(text, kind, name):
    try:
        return [kind(item) for item in text.split(",")]
    except ValueError:
        raise SystemExit(f"mqar_sweep.py: error: --{name} takes comma-separated numbers, got {text!r}")


def parse_arguments(parser, argv, grid_keys, chosen_by):
    """The script's own arguments and the train.py --key=value overrides applied to every run; a key that
    the grid sets for each run is refused. Abbreviations are off: else --lr and --seed would be taken,
    silently, for the script's --lrs and --seeds."""
    parser.allow_abbrev = False
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if not o.startswith("--")]
    if bad:
        parser.error(f"unexpected {bad[0]!r}: train.py keys go as --key=value")
    fixed = [o for o in overrides if o[2:].split("=")[0] in grid_keys]
    if fixed:
        parser.error(f"{fixed[0]!r}: the grid sets {', '.join(grid_keys)} for each run ({chosen_by} choose them)")
    if args.parallel < 1:
        parser.error(f"--parallel={args.parallel}: must be at least 1")
    return args, overrides


def run_dir(out_dir, mixer, width, pairs, lr, seed):
    return os.path.join(out_dir, f"{mixer}_d{width}_p{pairs}_lr{lr:g}_seed{seed}")


def run_args(mixer, width, pairs, lr, seed, directory, overrides):
    heads = max(1, width // HEAD_DIM)
    return ["mqar", f"--mixer={mixer.replace('+', ',')}", f"--d_model={width}", f"--n_head={heads}",
            f"--head_k_dim={min(HEAD_DIM, width)}", f"--head_v_dim={min(HEAD_DIM, width)}",
            f"--mqar_pairs={pairs}", f"--lr={lr}", f"--seed={seed}", f"--out_dir={directory}", *overrides]


def record_of(directory):
    """The newest checkpoint record of a run (its meta.json), or None before its first checkpoint."""
    path = os.path.join(directory, "meta.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def finished(directory, max_steps):
    record = record_of(directory)
    return record is not None and record["step"] >= max_steps


def run_one(args, directory, max_steps, log, env):
    """Trains one run to the end (resuming it if it has a checkpoint); its output goes to DIR/train.log."""
    if finished(directory, max_steps):
        return "done before"
    os.makedirs(directory, exist_ok=True)
    resume = ["--init_from=resume"] if train.checkpoint_records(directory) else []
    started = time.time()
    log_path = os.path.join(directory, "train.log")
    with open(log_path, "a") as out:
        result = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args, *resume], cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    if result.returncode != 0:
        with open(log_path) as f:   # train.py's errors are one line, the last (out of GPU memory among them)
            last_line = (f.read().strip().splitlines() or ["no output"])[-1]
        return f"failed (exit {result.returncode}: {last_line}; see {log_path})"
    log(f"{os.path.basename(directory)}: {time.time() - started:.0f} s")
    return "trained"


def check_trained_as_asked(runs):
    """SystemExit naming the runs of `runs` whose folder holds a run trained with other settings than its
    arguments ask for (train.config_conflicts): one done before would be reported as this one, and one
    under way could not resume. A run that counts as done must also have had this learning-rate schedule
    (a run stopped early on a longer one is not this run)."""
    conflicts = []
    for args, directory in runs:
        record = record_of(directory)
        if record is None:
            continue
        wanted = train.load_config(args)
        changed = train.config_conflicts(record["config"], wanted)
        schedule = [train.decay_steps(c) for c in (record["config"], wanted)]
        if record["step"] >= wanted["max_steps"] and schedule[0] != schedule[1]:
            changed["learning-rate schedule (lr_decay_steps or max_steps)"] = tuple(schedule)
        if changed:
            conflicts.append(f"{os.path.basename(directory)} ("
                             + ", ".join(f"{k}: {a!r} there vs {b!r} now" for k, (a, b) in changed.items()) + ")")
    if conflicts:
        raise SystemExit(f"error: {len(conflicts)} run(s) in {os.path.dirname(runs[0][1])} were trained with other "
                         f"settings than these: {'; '.join(conflicts[:3])}" + (" and more" if len(conflicts) > 3 else "")
                         + "; use another --out_dir for these settings")


def train_runs(runs, max_steps, parallel, log, report=False):
    """Trains each (train.py arguments, run directory) of `runs` (run_one), `parallel` at a time, after
    check_trained_as_asked. Returns the [(directory, why)] of the runs that failed, each also logged. With
    report (--report) it trains none and logs the ones not finished instead."""
    check_trained_as_asked(runs)
    if report:
        unfinished = [directory for _, directory in runs if not finished(directory, max_steps)]
        if unfinished:
            names = [os.path.basename(directory) for directory in unfinished]
            records = [record for record in map(record_of, unfinished) if record]
            ends = {record["config"]["max_steps"] for record in records}
            hint = (f"; they trained to max_steps={ends.pop()}: pass that --max_steps"
                    if len(ends) == 1 and max_steps not in ends else "")
            log(f"--report: {len(unfinished)} of {len(runs)} runs not finished at max_steps={max_steps}, not in the "
                f"table (none trained){hint}: {', '.join(names[:5])}"
                + (f" and {len(names) - 5} more" if len(names) > 5 else ""))
        return []
    # runs side by side share the CPU cores: each its share of threads (oversubscribed, OpenMP's spinning
    # threads made two 2-thread runs on 2 cores 10x slower than one)
    env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // parallel)), **os.environ}
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        results = list(pool.map(lambda run: run_one(*run, max_steps, log, env), runs))
    failures = [(directory, why) for (_, directory), why in zip(runs, results) if why.startswith("failed")]
    for directory, why in failures:
        log(f"{os.path.basename(directory)}: {why}")
    return failures


def publish(out_dir, results, header, table, figure, log):
    """The end of a study: results to OUT_DIR/results.json, the table (header, rows of cells) to stdout in
    Markdown, and figure = (plot.py kind, its inputs, file name) drawn into OUT_DIR if there is anything to
    draw and matplotlib is installed (else the table is still there)."""
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    for cells in (header, ["---"] * len(header), *table):
        print("| " + " | ".join(map(str, cells)) + " |")
    kind, inputs, name = figure
    if inputs:
        try:
            plot.draw(kind, inputs, os.path.join(out_dir, name))
        except SystemExit as e:
            log(str(e))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default="out/mqar_sweep")
    parser.add_argument("--mixers", default="carve,gdn2,attn", help="'+' joins a hybrid's pattern: carve+attn")
    parser.add_argument("--widths", default="64,128,256")
    parser.add_argument("--pairs", default="4,8,16,32,64")
    parser.add_argument("--lrs", default="1e-4,3e-4,1e-3,3e-3")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--parallel", type=int, default=1, help="runs at once (default: %(default)s)")
    parser.add_argument("--report", action="store_true", help="the table of the grid's finished runs; train none")
    args, overrides = parse_arguments(parser, argv, SWEEP_KEYS,
                                      "--mixers, --widths, --pairs, --lrs, --seeds, --out_dir")
    mixers = args.mixers.split(",")
    widths, pairs = numbers(args.widths, int, "widths"), numbers(args.pairs, int, "pairs")
    lrs, seeds = numbers(args.lrs, float, "lrs"), numbers(args.seeds, int, "seeds")
    grid = list(itertools.product(mixers, widths, pairs, lrs, seeds))
    for cell in grid:   # every run's config is checked before the first one starts
        train.load_config(run_args(*cell, "unused", overrides))
    max_steps = train.load_config(["mqar", *overrides])["max_steps"]   # the grid's keys leave it as it is
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    if not args.report:
        log(f"{len(grid)} runs into {args.out_dir}, {args.parallel} at a time")
    directories = [run_dir(args.out_dir, *cell) for cell in grid]
    runs = [(run_args(*cell, directory, overrides), directory) for cell, directory in zip(grid, directories)]
    failures = train_runs(runs, max_steps, args.parallel, log, args.report)
    done = [directory for directory in directories if finished(directory, max_steps)]
    if not done:
        raise SystemExit(f"mqar_sweep.py: error: none of the grid's {len(grid)} runs in {args.out_dir} has finished")
    settings = plot.best_over_learning_rates(plot.mqar_points(done))
    def mean(values):   # None when a record predates the first- and last-query accuracies
        return None if None in values else float(np.mean(values))
    rows = [{"mixer": mixer, "d_model": width, "mqar_pairs": pair, "seeds": len(runs),
             "accuracy_mean": float(np.mean([run.accuracy for run in runs])),
             "accuracy_std": float(np.std([run.accuracy for run in runs])),
             "seeds_learnt": sum(run.accuracy > LEARNT for run in runs),
             "first_query_mean": mean([run.first_query for run in runs]),
             "last_query_mean": mean([run.last_query for run in runs])}
            for (mixer, width, pair), runs in sorted(settings.items())]
    table = []
    for row in rows:
        first, last = (f"{row[key]:.3f}" if row[key] is not None else "-" for key in ("first_query_mean",
                                                                                        "last_query_mean"))
        table.append([row["mixer"], row["d_model"], row["mqar_pairs"], row["seeds"],
                      f"{row['accuracy_mean']:.3f} ± {row['accuracy_std']:.3f}", row["seeds_learnt"], first, last])
    publish(args.out_dir, {"overrides": overrides, "lrs": lrs, "rows": rows},
            ["mixer", "d_model", "pairs", "seeds", "accuracy (best lr a seed), mean ± std",
             f"seeds above {LEARNT}", "first query", "last query"], table, ("mqar", done, "mqar.png"), log)
    if failures:
        raise SystemExit(f"mqar_sweep.py: {len(failures)} of {len(grid)} runs failed (listed above)")


if __name__ == "__main__":
    main()
