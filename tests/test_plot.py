"""plot.py: what each plot reads from runs and results (seed groups, the best learning rate a seed,
passkey means), and that each kind writes a PNG."""
import json
import os

import numpy as np
import pytest

import plot
from reference import TINY_MODEL_ARGS, train_in_process

MQAR = ["carve_shakespeare", *TINY_MODEL_ARGS, "--task=mqar", "--seq_len=32", "--vocab_size=64",
        "--mqar_train_examples=64", "--mqar_test_examples=8", "--batch_tokens=256", "--micro_batch_size=8",
        "--max_steps=4", "--eval_interval=2", "--log_interval=1", "--warmup_steps=1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Four MQAR runs: carve with 2 and 4 pairs at two seeds (two learning rates at 4 pairs), attn at 2."""
    root = tmp_path_factory.mktemp("runs")
    made = {}
    for name, extra in {"carve_p2_seed1": ["--mqar_pairs=2", "--seed=1"],
                        "carve_p2_seed2": ["--mqar_pairs=2", "--seed=2"],
                        "carve_p4_lr_seed1": ["--mqar_pairs=4", "--seed=1", "--lr=1e-2"],
                        "attn_p2_seed1": ["--mqar_pairs=2", "--seed=1", "--mixer=attn"]}.items():
        made[name] = str(root / name)
        train_in_process([*MQAR, *extra, f"--out_dir={made[name]}"])
    return made


def test_curves_group_seeds(runs):
    data = plot.curves([runs["carve_p2_seed1"], runs["carve_p2_seed2"], runs["attn_p2_seed1"]])
    assert set(data) == {"carve_p2", "attn_p2"}
    tokens, values = data["carve_p2"]["loss"]
    assert list(tokens) == [256, 512, 768, 1024] and values.shape == (2, 4)
    logged = [[r["loss"] for r in plot.read_log(runs[name]) if "loss" in r] for name in ("carve_p2_seed1",
                                                                                         "carve_p2_seed2")]
    assert np.array_equal(values, np.array(logged))
    assert data["carve_p2"]["val_acc"][1].shape == (2, 2) and "val_bpb" not in data["carve_p2"]


def test_curves_keep_one_name_in_two_folders_apart(runs, tmp_path, monkeypatch):
    import shutil
    for folder in ("study", "ablation", "a/study", "b/study"):
        for seed in (1, 2):
            shutil.copytree(runs[f"carve_p2_seed{seed}"], tmp_path / folder / f"carve_p2_seed{seed}")
    monkeypatch.chdir(tmp_path)
    data = plot.curves(["study/carve_p2_seed1", str(tmp_path / "study" / "carve_p2_seed2"),  # one folder, two spellings
                        "ablation/carve_p2_seed1", "a/study/carve_p2_seed1", "b/study/carve_p2_seed1",
                        runs["attn_p2_seed1"]])
    assert set(data) == {"study/carve_p2", "ablation/carve_p2", "a/study/carve_p2", "b/study/carve_p2", "attn_p2"}
    assert data["study/carve_p2"]["loss"][1].shape[0] == 2 and data["a/study/carve_p2"]["loss"][1].shape[0] == 1


def test_mqar_takes_the_best_learning_rate_of_each_seed():
    runs = [plot.MqarRun("carve", 64, 8, 1, 1e-3, 0.5, 0.4, 0.6), plot.MqarRun("carve", 64, 8, 1, 3e-3, 0.7, 0.6, 0.8),
            plot.MqarRun("carve", 64, 8, 2, 1e-3, 0.6, None, None), plot.MqarRun("gdn2", 64, 8, 1, 1e-3, 0.2, 0.1, 0.3)]
    assert plot.best_over_learning_rates(runs) == {("carve", 64, 8): [runs[1], runs[2]], ("gdn2", 64, 8): [runs[3]]}


def test_mqar_points_read_the_records(runs):
    (run,) = plot.mqar_points([runs["carve_p4_lr_seed1"]])
    assert (run.mixer, run.d_model, run.pairs, run.seed, run.lr) == ("carve", 32, 4, 1, 1e-2)
    record = json.load(open(os.path.join(runs["carve_p4_lr_seed1"], "meta.json")))
    assert (run.accuracy, run.first_query, run.last_query) == (record["val_acc"], record["val_acc_first_query"],
                                                               record["val_acc_last_query"])


def test_mqar_keeps_carve_without_its_content_shift_apart():
    assert plot.mixer_label({"mixer": "carve", "content_rank": 0}) == "carve (content_rank 0)"
    assert plot.mixer_label({"mixer": "carve,attn", "content_rank": 0}) == "carve,attn (content_rank 0)"
    assert plot.mixer_label({"mixer": "carve", "content_rank": 16}) == "carve"
    assert plot.mixer_label({"mixer": "gdn2", "content_rank": 0}) == "gdn2"   # content_rank means nothing to it


def test_mqar_keeps_a_variant_apart_from_its_baseline(runs, tmp_path):
    """A run of a variant (here a conv_size of 2, as a fork's new key would be) beside the same setting of
    the baseline: two labels, each run its own best, not the better of the two taken as one model."""
    import shutil
    variant = tmp_path / "variant_p4_seed1"
    shutil.copytree(runs["carve_p4_lr_seed1"], variant)
    record = json.load(open(variant / "meta.json"))
    record["config"]["conv_size"] = 2
    record["val_acc"] = 1.0
    json.dump(record, open(variant / "meta.json", "w"))
    points = plot.mqar_points([runs["carve_p4_lr_seed1"], str(variant), runs["attn_p2_seed1"]])
    assert [p.mixer for p in points] == ["carve [conv_size=4]", "carve [conv_size=2]", "attn"]
    best = plot.best_over_learning_rates(points)
    assert best[("carve [conv_size=2]", 32, 4)][0].accuracy == 1.0
    assert best[("carve [conv_size=4]", 32, 4)][0].accuracy == points[0].accuracy


def test_mqar_draws_each_seed_as_a_dot(runs, tmp_path, monkeypatch):
    import matplotlib.collections
    import matplotlib.figure
    figures = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: figures.append(fig))
    plot.draw("mqar", list(runs.values()), str(tmp_path / "m.png"))
    ax = figures[0].axes[0]
    dots = [c for c in ax.collections if isinstance(c, matplotlib.collections.PathCollection)]
    accuracies = sorted(run.accuracy for run in plot.mqar_points(list(runs.values())))
    assert sorted(y for dot in dots for _, y in dot.get_offsets()) == pytest.approx(accuracies)
    # right of their mean (pairs 2 or 4), each line at its own distance, drawn over the lines and markers
    offsets = {round(x, 6) for dot in dots for x, _ in dot.get_offsets()}
    assert all(x > 4 or 2 < x < 4 for x in offsets) and len({x for x in offsets if x < 4}) == 2
    assert min(dot.get_zorder() for dot in dots) > max(line.get_zorder() for line in ax.lines)


def test_passkey_means_over_depths_and_over_equal_distances(tmp_path):
    """By context: the mean over depths; by the filler between needle and question: the mean over every
    context and depth with that many blocks; a file from before eval.py counted them has no distance
    line; two files of one name in two folders are two lines."""
    path = tmp_path / "carve.json"
    rows = [{"context": c, "depth": d, "accuracy": a, "filler_blocks_after_needle": f} for c, d, a, f in
            [(1024, 0, 1.0, 10), (1024, 100, 0.5, 0), (2048, 0, 0.0, 21), (2048, 100, 0.25, 0)]]
    path.write_text("progress on stderr does not land here\n" + json.dumps({"accuracy": rows}) + "\n")
    def points(paths, by="context"):
        return {label: (values, accuracy.tolist()) for label, (values, accuracy) in
                plot.passkey_points([str(p) for p in paths], by).items()}

    assert points([path]) == {"carve": ([1024, 2048], [[0.75, 0.125]])}
    assert points([path], "filler_blocks_after_needle") == {"carve": ([0, 10, 21], [[0.375, 1.0, 0.0]])}
    (tmp_path / "old").mkdir()
    older = tmp_path / "old" / "carve.json"
    older.write_text(json.dumps({"accuracy": [{key: row[key] for key in ("context", "depth", "accuracy")}
                                              for row in rows]}))
    both = points([path, older])
    assert len(both) == 2 and list(both.values())[0] == list(both.values())[1]
    assert len(set(plot.file_labels([str(path), str(path) + "l"]).values())) == 2   # carve.json and carve.jsonl
    assert list(points([path, older], "filler_blocks_after_needle")) == [list(both)[0]]
    # two seeds of one model: one label, a row each; a distance only one seed reached is NaN in the other
    second = tmp_path / "carve_seed2.json"
    second.write_text(json.dumps({"accuracy": [{**row, "accuracy": 1.0, "filler_blocks_after_needle": 1}
                                               for row in rows[:2]]}))
    (tmp_path / "carve_seed1.json").write_text(path.read_text())
    seeds = plot.passkey_points([str(tmp_path / "carve_seed1.json"), str(second)], "filler_blocks_after_needle")
    values, accuracy = seeds["carve"]
    assert list(seeds) == ["carve"] and values == [0, 1, 10, 21]
    assert np.array_equal(accuracy, [[0.375, np.nan, 1.0, 0.0], [np.nan, 1.0, np.nan, np.nan]], equal_nan=True)


def gates_file(path, steps):
    """Lines as eval.py --task=gates --json prints them, one a checkpoint (out of order), two CARVE layers."""
    lines = [{"checkpoint_step": s, "layers": [
        {"layer": i, "mixer": "carve", "erase_rate": 0.5 + 0.01 * s + i, "delta_abs_mean": 0.1 * s,
         "delta_p5": -0.2 * s, "delta_p50": 0.0, "delta_p95": 0.2 * s, "U_norm": 1.0, "D_norm": 1.0,
         "D_moved": 0.001 * s}
        for i in range(2)]} for s in steps]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


def test_gates_follow_each_layer_over_checkpoints(tmp_path):
    points = plot.gate_points([gates_file(tmp_path / "carve.jsonl", [20, 10])])
    assert sorted(points) == [("carve", 0), ("carve", 1)]
    assert points[("carve", 1)]["erase_rate"] == ([10, 20], [1.6, 1.7])
    assert points[("carve", 0)]["delta_p95"] == ([10, 20], [2.0, 4.0])
    assert points[("carve", 0)]["D_moved"] == ([10, 20], [0.01, 0.02])
    older = tmp_path / "older.jsonl"   # lines of an eval.py before D_moved, then one with it
    lines = open(gates_file(tmp_path / "new.jsonl", [30])).read()
    older.write_text("".join(json.dumps({**json.loads(line), "layers": [
        {k: v for k, v in row.items() if k != "D_moved"} for row in json.loads(line)["layers"]]}) + "\n"
        for line in open(gates_file(tmp_path / "old.jsonl", [10, 20]))) + lines)
    mixed = plot.gate_points([str(older)])[("older", 0)]
    assert mixed["erase_rate"][0] == [10, 20, 30] and mixed["D_moved"] == ([30], [0.03])
    (tmp_path / "bad.jsonl").write_text('{"checkpoint_step": 1}\n')
    with pytest.raises(SystemExit, match="not lines of eval.py --task=gates --json"):
        plot.gate_points([str(tmp_path / "bad.jsonl")])


def test_each_kind_writes_a_png(runs, tmp_path):
    passkey, older_passkey = tmp_path / "p.json", tmp_path / "older_p.json"
    passkey.write_text(json.dumps({"accuracy": [{"context": 1024, "depth": 0, "accuracy": 1.0,
                                                 "filler_blocks_after_needle": 10}]}))
    older_passkey.write_text(json.dumps({"accuracy": [{"context": 1024, "depth": 0, "accuracy": 1.0}]}))
    gates = gates_file(tmp_path / "g.jsonl", [1, 2])
    for kind, inputs in (("curves", list(runs.values())), ("mqar", list(runs.values())), ("passkey", [str(passkey)]),
                         ("older_passkey", [str(older_passkey)]), ("gates", [gates])):
        out = tmp_path / f"{kind}.png"
        plot.main([kind.replace("older_", ""), *inputs, "-o", str(out)])
        png = out.read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        width = int.from_bytes(png[16:20], "big")   # the IHDR chunk's width: 120 dpi a figure inch
        if kind != "curves":   # its width follows the metrics the runs logged
            # mqar: one panel of 5.5 inches, against pairs; the runs share one width, so none against width;
            # passkey: against context and against distance, or only the first where no distances were counted
            assert width == {"mqar": 5.5, "gates": 16, "passkey": 12, "older_passkey": 6}[kind] * 120, (kind, width)


def test_gates_give_a_layer_its_colour_and_a_run_its_line_style(tmp_path, monkeypatch):
    import matplotlib.figure
    figures = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: figures.append(fig))
    plot.draw("gates", [gates_file(tmp_path / "seed1.jsonl", [1, 2]), gates_file(tmp_path / "seed2.jsonl", [1, 2])],
              str(tmp_path / "g.png"))
    looks = {line.get_label(): (line.get_color(), line.get_linestyle()) for line in figures[0].axes[0].lines}
    assert looks["seed1, layer 0"][0] == looks["seed2, layer 0"][0] != looks["seed1, layer 1"][0]
    assert looks["seed1, layer 0"][1] == looks["seed1, layer 1"][1] != looks["seed2, layer 0"][1]


def test_curves_keep_a_runs_colour_and_list_every_run_once(tmp_path, runs, monkeypatch):
    """A text run (bits per byte, no accuracy) beside an MQAR run (accuracy, no bits per byte): one legend
    names both, and each run has one colour in every panel it appears in."""
    import matplotlib.figure
    figures = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: figures.append(fig))
    text = tmp_path / "text_run"
    text.mkdir()
    (text / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0}, {"step": 2, "val_loss": 4.5, "val_bpb": 6.5}]))
    (text / "meta.json").write_text(json.dumps({"config": {"batch_tokens": 256}}))
    plot.draw("curves", [str(text), runs["attn_p2_seed1"]], str(tmp_path / "c.png"))
    axes = figures[0].axes
    assert [ax.get_title() for ax in axes] == ["loss", "val loss", "val bpb", "val acc"]
    assert [t.get_text() for t in axes[-1].get_legend().get_texts()] == ["text_run", "attn_p2"]
    text_colours = {axes[0].lines[0].get_color(), axes[1].lines[0].get_color(), axes[2].lines[0].get_color()}
    mqar_colours = {axes[0].lines[1].get_color(), axes[1].lines[1].get_color(), axes[3].lines[0].get_color()}
    assert len(text_colours) == len(mqar_colours) == 1 and text_colours != mqar_colours


def test_errors(tmp_path, runs):
    with pytest.raises(SystemExit, match="log.jsonl not found"):
        plot.curves([str(tmp_path)])
    with pytest.raises(SystemExit, match="not the JSON line"):
        (tmp_path / "bad.json").write_text("{")
        plot.passkey_points([str(tmp_path / "bad.json")])
    with pytest.raises(SystemExit, match="not the JSON line.*'context'"):
        (tmp_path / "no_context.json").write_text(json.dumps({"accuracy": [{"depth": 0, "accuracy": 1.0}]}))
        plot.passkey_points([str(tmp_path / "no_context.json")])
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(SystemExit, match="empty.jsonl is empty: no lines of eval.py --task=gates"):
        plot.gate_points([str(tmp_path / "empty.jsonl")])
    with pytest.raises(SystemExit, match="the folder .*nowhere does not exist"):
        plot.draw("curves", [runs["attn_p2_seed1"]], str(tmp_path / "nowhere" / "x.png"))
