"""
Plots as PNG files from train.py runs and eval.py results (needs matplotlib: pip install matplotlib).

    python plot.py curves out/carve_shakespeare out/gdn2_shakespeare -o curves.png
    python plot.py mqar out/mqar_sweep/*_seed* -o mqar.png    # accuracy against key-value pairs and width
    python plot.py passkey carve.json gdn2.json -o passkey.png

curves: the training loss and the validation loss / bits per byte / accuracy against tokens seen,
one line per run directory (its log.jsonl); runs of one folder whose names differ only in a trailing
`_seedN` are one line, their mean, with the range of the seeds shaded. A name found in two folders is
two lines, each labelled with its folder.

mqar: each run directory's newest record (meta.json of a train.py --task=mqar run): the final
accuracy against mqar_pairs, one line per (mixer, d_model), and against d_model, one line per (mixer,
mqar_pairs); several runs of one setting (seeds, learning rates: the best learning rate counts, as in
Zoology) show as the mean over seeds of each seed's best, with error bars of their standard deviation,
and each seed's best as a dot right of the mean (a run mostly either learns or stays at chance, so a
mean of 0.66 can be two seeds that learnt and one that did not). CARVE runs with --content_rank=0 are
a mixer of their own, "carve (content_rank 0)", and runs of one mixer that differ in another setting
(a variant's key, seq_len) are told apart by it: "carve [seq_len=512]".

passkey: files of `eval.py --task=passkey --json` output; accuracy against context length (mean over
depths), one line per file (files of one folder named alike but for a trailing `_seedN`: one line, their
mean, with the range of the seeds shaded), and beside it accuracy against the number of filler blocks
between the needle and the question (the distance the key must be carried).

gates: files of `eval.py --task=gates --json` lines, one line per checkpoint of a run (eval.py --step):
each layer's erase rate against the checkpoint's step, and for CARVE the mean |Delta| with the 5th-95th
percentiles of Delta and how far D moved from its start, one line per (file, layer). Compare a CARVE and a
GDN-2 run on the same text:

    for s in 1000 2000 3000; do python eval.py --out_dir=out/carve --task=gates --step=$s --json >> carve.jsonl; done
    python plot.py gates carve.jsonl gdn2.jsonl -o gates.png
"""
import argparse
import json
import os
import re
import sys
from collections import defaultdict
from typing import NamedTuple, Optional

import numpy as np

SEED_SUFFIX = re.compile(r"_seed\d+$")


def fail(message):
    raise SystemExit(f"plot.py: error: {message}")


def read_log(run_dir):
    path = os.path.join(run_dir, "log.jsonl")
    if not os.path.isfile(path):
        fail(f"{path} not found: give run directories of train.py")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_record(run_dir):
    path = os.path.join(run_dir, "meta.json")
    if not os.path.isfile(path):
        fail(f"{path} not found: the run has no checkpoint yet")
    with open(path) as f:
        return json.load(f)


def file_labels(paths, are_files=True):
    """{path: its name (a file's without the extension)}, or the path relative to here where two share that
    name (out/seed1/carve.json and out/seed2/carve.json, carve.json and carve.jsonl, or a study's run and
    its ablation's of one name are two lines). A run folder's name keeps its dots (carve_lr0.002)."""
    names = [os.path.basename(os.path.splitext(path)[0] if are_files else os.path.normpath(path)) for path in paths]
    return {path: name if names.count(name) == 1 else os.path.relpath(path) for path, name in zip(paths, names)}


def seed_groups(paths, are_files):
    """{label: [paths]}: paths that differ only in a trailing _seedN (before a file's extension) are one
    group, however each is spelt (relative or absolute), labelled as file_labels labels the group."""
    groups = defaultdict(list)
    for path in paths:
        stem, extension = os.path.splitext(os.path.abspath(path)) if are_files else (os.path.abspath(path), "")
        groups[SEED_SUFFIX.sub("", stem) + extension].append(path)
    labels = file_labels(list(groups), are_files)
    return {labels[group]: members for group, members in groups.items()}


def curves(run_dirs):
    """{label: {metric: (tokens [n], values [seeds, n])}} of each group of runs that differ only in their
    seed suffix; metrics: loss and the validation ones the runs logged. Runs of one group are cut to the
    steps they all logged."""
    result = {}
    for label, dirs in seed_groups(run_dirs, are_files=False).items():
        per_metric = defaultdict(list)
        for run_dir in dirs:
            rows = read_log(run_dir)
            tokens_per_step = read_record(run_dir)["config"]["batch_tokens"]
            series = defaultdict(dict)
            for row in rows:
                for metric in ("loss", "val_loss", "val_bpb", "val_acc"):
                    if row.get(metric) is not None:
                        series[metric][row["step"]] = row[metric]
            for metric, points in series.items():
                per_metric[metric].append((points, tokens_per_step))
        result[label] = {}
        for metric, runs in per_metric.items():
            if len(runs) < len(dirs):
                continue
            steps = sorted(set.intersection(*(set(points) for points, _ in runs)))
            values = np.array([[points[s] for s in steps] for points, _ in runs])
            result[label][metric] = (np.array(steps) * runs[0][1], values)
    return result


class MqarRun(NamedTuple):
    """An MQAR run's setting and the test accuracy of its newest record, overall and on each example's
    first and last query alone (None in a record of a train.py from before they were kept)."""
    mixer: str
    d_model: int
    pairs: int
    seed: int
    lr: float
    accuracy: float
    first_query: Optional[float]
    last_query: Optional[float]


def mixer_label(config):
    """The mixer as the plot names it: CARVE without its content shift is not CARVE."""
    without_content = "carve" in config["mixer"] and config.get("content_rank") == 0
    return config["mixer"] + (" (content_rank 0)" if without_content else "")


# Config keys that do not make two MQAR runs of one mixer different experiments: the plot's own axes and
# what the sweep derives from the width, the seed and the learning rate (the best of which counts), and the
# keys of where and how a run computes and reports (train.py's RESUME_MAY_CHANGE but the run's length, kept
# here so that plot.py needs numpy alone). Any other key on which runs of one mixer differ (a fork's variant,
# another seq_len or max_steps) is written into their label, so that they are not averaged or taken the best of.
SAME_MODEL_KEYS = {"mixer", "content_rank", "d_model", "n_head", "head_k_dim", "head_v_dim", "mqar_pairs", "seed",
                   "lr", "out_dir", "init_from", "data_dir", "eval_interval", "eval_tokens", "log_interval",
                   "keep_checkpoints", "device", "compile", "activation_checkpointing", "micro_batch_size",
                   "max_skipped_steps", "peak_tflops", "wandb_log", "wandb_project", "wandb_run_name"}


def mqar_points(run_dirs):
    """[MqarRun] of the newest record of each MQAR run, its mixer labelled by mixer_label and by the keys on
    which it differs from other runs of that label (not SAME_MODEL_KEYS), e.g. 'carve [seq_len=512]'."""
    records = []
    for run_dir in run_dirs:
        record = read_record(run_dir)
        if record.get("task") != "mqar":
            fail(f"{run_dir} is not a train.py --task=mqar run (its meta.json says task {record.get('task')!r})")
        records.append(record)
    by_label = defaultdict(list)
    for record in records:
        by_label[mixer_label(record["config"])].append(record["config"])
    differing = {}   # a key a record lacks (older code) does not count: its absence is not another value
    for label, configs in by_label.items():
        keys = set.intersection(*map(set, configs)) - SAME_MODEL_KEYS
        differing[label] = sorted(k for k in keys if len({repr(c[k]) for c in configs}) > 1)
    points = []
    for record in records:
        config, label = record["config"], mixer_label(record["config"])
        if differing[label]:
            label += " [" + ", ".join(f"{k}={config[k]}" for k in differing[label]) + "]"
        points.append(MqarRun(label, config["d_model"], config["mqar_pairs"], config["seed"], config["lr"],
                              record["val_acc"], record.get("val_acc_first_query"), record.get("val_acc_last_query")))
    return points


class MqarSetting(NamedTuple):
    mixer: str
    d_model: int
    pairs: int


def best_over_learning_rates(points):
    """{MqarSetting: [the MqarRun of the best learning rate, one per seed]}."""
    best = {}
    for run in points:
        key = (run.mixer, run.d_model, run.pairs, run.seed)
        if key not in best or run.accuracy > best[key].accuracy:
            best[key] = run
    by_setting = defaultdict(list)
    for (mixer, width, pairs, seed), run in sorted(best.items()):
        by_setting[MqarSetting(mixer, width, pairs)].append(run)
    return by_setting


def passkey_points(paths, by="context"):
    """{label: (values of `by`, accuracy [files, values])} of eval.py --task=passkey --json files. By
    context: the mean over depths; by filler_blocks_after_needle: over every context and depth with that
    many blocks between the needle and the question (files from an eval.py that did not count them are
    left out). Files of one folder whose names differ only in a trailing _seedN (carve_seed1.json,
    carve_seed2.json) are one label, a row each (NaN where a file lacks the value), as plot.py curves
    groups runs."""
    by_file = {}
    for path in paths:
        groups = defaultdict(list)
        try:
            with open(path) as f:
                rows = json.loads(f.read().strip().splitlines()[-1])["accuracy"]
            for row in rows:
                if by == "context" or by in row:
                    groups[row[by]].append(row["accuracy"])
        except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
            fail(f"{path}: not the JSON line of eval.py --task=passkey --json ({e!r})")
        if groups:
            by_file[path] = {value: np.mean(accuracies) for value, accuracies in groups.items()}
    result = {}
    for label, all_files in seed_groups(paths, are_files=True).items():   # from every file: the same in both panels
        files = [path for path in all_files if path in by_file]
        if not files:
            continue
        values = sorted(set().union(*(by_file[path] for path in files)))
        result[label] = (values, np.array([[by_file[path].get(v, np.nan) for v in values] for path in files]))
    return result


CARVE_GATE_KEYS = ("delta_abs_mean", "delta_p5", "delta_p95", "D_moved")


def gate_points(paths):
    """{(file label, layer): {key: ([checkpoint steps], [values])}} of eval.py --task=gates --json lines, by
    step: erase_rate for every layer, and each CARVE_GATE_KEYS key a layer's lines hold (lines of an older
    eval.py lack D_moved)."""
    points, labels = defaultdict(lambda: defaultdict(list)), file_labels(paths)
    for path in paths:
        label = labels[path]
        try:
            with open(path) as f:
                lines = sorted((json.loads(line) for line in f if line.strip()), key=lambda r: r["checkpoint_step"])
            if not lines:
                fail(f"{path} is empty: no lines of eval.py --task=gates --json (did every eval.py call fail?)")
            for line in lines:
                for row in line["layers"]:
                    series = points[(label, row["layer"])]
                    for key in ("erase_rate", *(key for key in CARVE_GATE_KEYS if key in row)):
                        series[key].append((line["checkpoint_step"], row[key]))
        except (OSError, ValueError, KeyError, TypeError) as e:
            fail(f"{path}: not lines of eval.py --task=gates --json ({e})")
    return {where: {key: tuple(map(list, zip(*pairs))) for key, pairs in series.items()}
            for where, series in points.items()}


def draw_curves(plt, run_dirs):
    """Training loss and each validation metric against tokens seen, a line per run (seeds averaged)."""
    from matplotlib.ticker import EngFormatter
    data = curves(run_dirs)
    metrics = [m for m in ("loss", "val_loss", "val_bpb", "val_acc") if any(m in d for d in data.values())]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    # a run keeps one colour in every panel, though a panel skips the runs that lack its metric
    colours = {label: f"C{i % 10}" for i, label in enumerate(data)}
    legend = {}
    for ax, metric in zip(axes[0], metrics):
        for label, series in data.items():
            if metric in series:
                tokens, values = series[metric]
                n = len(values)
                name = label + (f" ({n} seeds)" if n > 1 else "")
                legend[name] = ax.plot(tokens, values.mean(0), marker="." if len(tokens) < 30 else None,
                                       color=colours[label])[0]
                if n > 1:
                    ax.fill_between(tokens, values.min(0), values.max(0), color=colours[label], alpha=0.2)
        ax.set_xlabel("tokens seen")
        ax.xaxis.set_major_formatter(EngFormatter())   # 200k, 1M: raw counts run into each other
        ax.set_title(metric.replace("_", " "))
    # one legend of every run, right of the panels: in every panel, nine runs' labels covered the curves
    axes[0][-1].legend(legend.values(), legend.keys(), loc="upper left", bbox_to_anchor=(1.02, 1),
                       borderaxespad=0)
    return fig


def draw_mqar(plt, run_dirs):
    """MQAR accuracy against key-value pairs and against d_model: a line per mixer and other setting."""
    settings = best_over_learning_rates(mqar_points(run_dirs))
    # a panel for each of pairs and width that takes more than one value (one point a line says nothing):
    # (the setting on the x axis, the one that tells its lines apart, their labels)
    by_pairs = ("pairs", "d_model", "key-value pairs", "d_model")
    by_width = ("d_model", "pairs", "d_model", "pairs")
    panels = [panel for panel in (by_pairs, by_width)
              if len({getattr(setting, panel[0]) for setting in settings}) > 1] or [by_pairs]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    colours = {mixer: f"C{i}" for i, mixer in enumerate(sorted({setting.mixer for setting in settings}))}
    for ax, (x_axis, line_key, x_label, line_label) in zip(axes[0], panels):
        lines = defaultdict(list)
        for setting, runs in settings.items():
            lines[(setting.mixer, getattr(setting, line_key))].append(
                (getattr(setting, x_axis), [run.accuracy for run in runs]))
        styles = {other: style for other, style in zip(sorted({other for _, other in lines}), ("-", "--", ":", "-."))}
        for line_number, ((mixer, other), rows) in enumerate(sorted(lines.items())):
            rows.sort()
            # a mixer keeps its colour in both panels; the other setting (width or pairs) is the line style
            ax.errorbar([r[0] for r in rows], [np.mean(r[1]) for r in rows], yerr=[np.std(r[1]) for r in rows],
                        marker="o", capsize=3, color=colours[mixer], linestyle=styles.get(other, "-"),
                        label=f"{mixer}, {line_label} {other}")
            # the seeds, right of their mean and each line at its own distance, so that no mean marker
            # or other line's seeds cover them (runs at one accuracy, often 0, are common)
            nudge = 2 ** (0.05 * (line_number + 1))
            seeds = [(x * nudge, accuracy) for x, accuracies in rows for accuracy in accuracies]
            ax.scatter(*zip(*seeds), s=16, color=colours[mixer], alpha=0.6, linewidths=0, zorder=3)
        ax.set_xscale("log", base=2)
        ticks = sorted({getattr(setting, x_axis) for setting in settings})
        ax.set_xticks(ticks, [str(tick) for tick in ticks])   # 64, not 2^6
        if len(ticks) == 1:   # else the axis spans only the mean and its seeds, and the seeds sit at its edge
            ax.set_xlim(ticks[0] / 2, ticks[0] * 2)
        ax.minorticks_off()
        ax.set_xlabel(x_label)
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"MQAR: accuracy against {'model width' if x_axis == 'd_model' else 'key-value pairs'}")
        ax.legend(fontsize=8)
    return fig


def draw_gates(plt, files):
    """Erase rate, |Delta| and D's distance from its start against the checkpoint step, a line per layer."""
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    points = gate_points(files)
    # a layer keeps its colour and a file (run) its line style: default colours repeat after ten lines
    styles = {label: style for label, style in zip(sorted({label for label, _ in points}), ("-", "--", ":", "-."))}
    for (label, layer), series in sorted(points.items()):
        look = dict(marker="o", markersize=3, color=f"C{layer % 10}", linestyle=styles.get(label, "-"),
                    label=f"{label}, layer {layer}")
        axes[0].plot(*series["erase_rate"], **look)
        if "delta_abs_mean" in series:
            axes[1].plot(*series["delta_abs_mean"], **look)
            axes[1].fill_between(*series["delta_p5"], series["delta_p95"][1], color=look["color"], alpha=0.15)
        if "D_moved" in series:
            axes[2].plot(*series["D_moved"], **look)
    axes[0].set_title("erase rate: mean of sigmoid(b_logit + Delta)")
    axes[1].set_title("CARVE: mean |Delta| (shaded: Delta's 5th to 95th percentile)")
    axes[2].set_title("CARVE: D's distance from its start, |D - D_0| / |D_0|")
    for ax in axes:
        ax.set_xlabel("checkpoint step")
        if ax.lines:   # a GDN-2 run alone leaves the CARVE panels empty
            ax.legend(fontsize=7)
    return fig


def draw_passkey(plt, files):
    """Passkey accuracy against context and against the filler between needle and question."""
    by_context, by_filler = passkey_points(files), passkey_points(files, "filler_blocks_after_needle")
    colours = {label: f"C{i % 10}" for i, label in enumerate(by_context)}   # a file's colour in both panels
    fig, axes = plt.subplots(1, 2 if by_filler else 1, figsize=(12 if by_filler else 6, 4), squeeze=False)
    panels = [(by_context, "log", "context (tokens)", "accuracy (mean over depths)",
               "passkey retrieval against context"),
              (by_filler, "symlog", "filler blocks between needle and question",
               "accuracy (mean over contexts and depths)", "passkey retrieval against distance")]
    for ax, (points, scale, x_label, y_label, title) in zip(axes[0], panels):
        ticks = set()
        for label, (values, accuracy) in points.items():
            seeds = len(accuracy)
            ax.plot(values, np.nanmean(accuracy, axis=0), marker="o", color=colours[label],
                    label=label + (f" ({seeds} seeds)" if seeds > 1 else ""))
            if seeds > 1:
                ax.fill_between(values, np.nanmin(accuracy, axis=0), np.nanmax(accuracy, axis=0),
                                color=colours[label], alpha=0.2)
            ticks.update(values)
        # log for contexts (1K-8K); symlog for blocks, which start at 0 and run to ~90 at 8K bytes
        ax.set_xscale(scale, base=2, **({"linthresh": 1} if scale == "symlog" else {}))
        if scale == "symlog" and ticks:
            ticks = [0] + [2 ** i for i in range(int(max(ticks)).bit_length() + 1) if 2 ** i <= 2 * max(ticks)]
        ax.set_xticks(sorted(ticks), [str(int(tick)) for tick in sorted(ticks)])   # 1024, not 2^10
        ax.minorticks_off()
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(title)
        ax.legend()
    return fig


PLOTS = {"curves": draw_curves, "mqar": draw_mqar, "passkey": draw_passkey, "gates": draw_gates}


def draw(kind, inputs, output):
    """plot.py KIND: the figure of `inputs` (run folders or eval.py JSON files) into the PNG `output`."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        fail("matplotlib is not installed: pip install matplotlib")
    folder = os.path.dirname(output)
    if folder and not os.path.isdir(folder):
        fail(f"-o {output}: the folder {folder} does not exist")
    fig = PLOTS[kind](plt, inputs)
    fig.tight_layout()
    # curves: grown to take in its legend, outside the panels
    fig.savefig(output, dpi=120, bbox_inches="tight" if kind == "curves" else None)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("kind", choices=list(PLOTS))
    parser.add_argument("inputs", nargs="+", help="run directories (curves, mqar) or JSON files (passkey, gates)")
    parser.add_argument("-o", "--output", default=None, help="PNG file (default: KIND.png)")
    args = parser.parse_args(argv)
    output = args.output or f"{args.kind}.png"
    draw(args.kind, args.inputs, output)
    print(f"wrote {output}", file=sys.stderr)


if __name__ == "__main__":
    main()
