"""MQAR (multi-query associative recall): the generator's examples, training on them with train.py
--task=mqar (exact resume, accuracy at evaluation) and eval.py --task=mqar on the checkpoint."""
import json
import math

import numpy as np
import pytest
import torch

import eval as evaluate_cli
import sample
import train
from model import LM, ModelConfig
from prepare_data import mqar_examples
from reference import TINY_MODEL_ARGS, newest_checkpoint, train_in_process, train_log


@pytest.mark.parametrize("seq_len, pairs, vocab", [(64, 4, 256), (33, 8, 40), (512, 64, 8192)])
def test_examples_hold_pairs_and_one_query_for_each_key(seq_len, pairs, vocab):
    inputs, targets = mqar_examples(50, seq_len, pairs, vocab, seed=3)
    assert inputs.shape == targets.shape == (50, seq_len)
    for x, y in zip(inputs, targets):
        keys, values = x[:2 * pairs:2], x[1:2 * pairs:2]
        assert len(set(keys)) == pairs and keys.min() >= 1 and keys.max() < vocab // 2
        assert len(set(values)) == pairs and values.min() >= vocab // 2 and values.max() < vocab
        assert (y[:2 * pairs] == -1).all()
        queries = np.flatnonzero(y >= 0)
        assert len(queries) == pairs and ((queries - 2 * pairs) % 2 == 0).all()   # each at the start of a slot
        answer = dict(zip(keys, values))
        assert sorted(x[queries]) == sorted(keys)               # every key asked once
        assert all(y[p] == answer[x[p]] for p in queries)
        rest = np.ones(seq_len, dtype=bool)
        rest[:2 * pairs] = rest[queries] = False
        assert x[rest].min() >= 0 and x[rest].max() < vocab
    # the rest is random tokens: the value after its query no more often than chance
    queries = targets >= 0
    after = np.roll(queries, 1, axis=1)
    assert (inputs[after] == targets[queries]).mean() < 0.1
    rest = np.ones(inputs.shape, dtype=bool)
    rest[:, :2 * pairs] = False
    rest[queries] = False
    assert len(np.unique(inputs[rest])) > min(vocab, rest.sum()) // 4


def test_examples_are_reproducible_and_seeds_differ():
    a, b, c = (mqar_examples(20, 64, 4, 256, seed) for seed in ([0, 0], [0, 0], [0, 1]))
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    assert not np.array_equal(a[0], c[0])


def test_query_distances_follow_the_power_law():
    """Slot j is drawn with weight (j + 1)^(a - 1): with a = 0.01 the first slot is chosen far more often
    than the last, and with a = 1 (uniform weights) about as often."""
    def first_and_last(power_a):
        _, targets = mqar_examples(4000, 72, 4, 256, seed=1, power_a=power_a)
        slots = (np.argwhere(targets >= 0)[:, 1] - 8) // 2      # the 32 slots after 4 pairs
        counts = np.bincount(slots, minlength=32)
        return counts[0], counts[-1]
    first, last = first_and_last(0.01)
    assert first > 5 * last
    first, last = first_and_last(1.0)
    assert 0.7 < first / last < 1.4


def test_examples_need_room_for_the_queries():
    with pytest.raises(ValueError, match="seq_len >= 64"):
        mqar_examples(1, 63, 16, 8192, seed=0)
    with pytest.raises(ValueError, match="at least 1 key-value pair; got 0"):
        mqar_examples(1, 64, 0, 8192, seed=0)
    with pytest.raises(ValueError, match="vocab_size >= 34"):
        mqar_examples(1, 64, 16, 32, seed=0)


MQAR = ["carve_shakespeare", *TINY_MODEL_ARGS, "--warmup_steps=2", "--lr=3e-3", "--log_interval=1",
        "--eval_interval=4", "--task=mqar", "--seq_len=32", "--mqar_pairs=4", "--vocab_size=64",
        "--mqar_train_examples=100", "--mqar_test_examples=40", "--batch_tokens=256", "--micro_batch_size=4",
        "--lr_decay_steps=8"]


def test_training_resumes_exactly_and_eval_scores_the_checkpoint(tmp_path, capsys):
    """train.py --task=mqar: a run split at step 4 continues bit for bit (the example order is a function
    of the step); the evaluation logs accuracy, the record keeps it; eval.py recomputes it on the same
    test set, and checks its argument against the task."""
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    train_in_process([*MQAR, f"--out_dir={full}", "--max_steps=8"])
    train_in_process([*MQAR, f"--out_dir={split}", "--max_steps=4"])
    train_in_process([*MQAR, f"--out_dir={split}", "--max_steps=8", "--init_from=resume"])
    losses = lambda out: {r["step"]: r["loss"] for r in train_log(out) if "loss" in r}  # noqa: E731
    assert losses(split) == losses(full) and sorted(losses(full)) == list(range(1, 9))
    a, b = newest_checkpoint(full)["model"], newest_checkpoint(split)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    record = json.load(open(tmp_path / "full" / "meta.json"))
    assert record["task"] == "mqar" and 0 <= record["val_acc"] <= 1 and record["val_bpb"] is None
    assert newest_checkpoint(full)["config"]["mqar_pairs"] == 4
    capsys.readouterr()
    evaluate_cli.main(["--out_dir", full, "--task", "mqar", "--json", "--device", "cpu"])
    result = json.loads(capsys.readouterr().out)
    assert result["examples"] == 40 and result["mqar_pairs"] == 4
    assert result["accuracy"] == pytest.approx(record["val_acc"], abs=1e-9)
    assert len(result["accuracy_by_query_order"]) == 4   # every example asks each key once: equal counts
    assert sum(result["accuracy_by_query_order"]) / 4 == pytest.approx(result["accuracy"], abs=1e-12)
    # train.py's first- and last-query accuracies, computed apart from eval.py's by-order ones
    assert record["val_acc_first_query"] == pytest.approx(result["accuracy_by_query_order"][0], abs=1e-9)
    assert record["val_acc_last_query"] == pytest.approx(result["accuracy_by_query_order"][-1], abs=1e-9)
    with pytest.raises(SystemExit, match="trained on MQAR"):
        evaluate_cli.main(["--out_dir", full])
    with pytest.raises(SystemExit, match="seq_len >= 64"):
        evaluate_cli.main(["--out_dir", full, "--task", "mqar", "--mqar_pairs", "16"])
    with pytest.raises(SystemExit, match="trained on MQAR, which has no text to continue: score it with"):
        sample.main(["--out_dir", full, "--device", "cpu"])


def test_gates_on_an_mqar_checkpoint_score_recall_with_and_without_the_content_shift(tmp_path, capsys):
    """eval.py --task=gates on an MQAR run: the gate statistics over its test examples, and the accuracy
    as --task=mqar gives it, then with U zeroed in every CARVE layer, equal to that accuracy computed
    apart on a copy of the model whose U is zeroed."""
    from eval import mqar_accuracy
    out = str(tmp_path / "mqar")
    train_in_process([*MQAR, f"--out_dir={out}", "--max_steps=4"])
    capsys.readouterr()
    evaluate_cli.main(["--out_dir", out, "--task", "mqar", "--json", "--device", "cpu"])
    accuracy = json.loads(capsys.readouterr().out)["accuracy"]
    evaluate_cli.main(["--out_dir", out, "--task", "gates", "--json", "--device", "cpu", "--batch_size", "16"])
    result = json.loads(capsys.readouterr().out)
    assert result["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert [row["mixer"] for row in result["layers"]] == ["carve", "carve"]
    assert all(row["U_norm"] > 0 and 0 < row["erase_rate"] < 1 for row in result["layers"])
    checkpoint = newest_checkpoint(out)
    model = LM(ModelConfig.from_dict(checkpoint["model_config"]))
    model.load_state_dict(checkpoint["model"])
    with torch.no_grad():
        for block in model.blocks:
            block.mixer.content_up.zero_()
    inputs, targets = train.mqar_split(checkpoint["config"], "test")
    right, total = mqar_accuracy(model.eval(), inputs, targets, 40, "cpu", torch.autocast("cpu", enabled=False))
    assert result["accuracy_without_content_shift"] == pytest.approx(right.sum() / total.sum(), abs=1e-12)
    evaluate_cli.main(["--out_dir", out, "--task", "gates", "--device", "cpu"])
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("accuracy ")


def test_accuracy_by_query_order_shows_elimination():
    """A model right on each example's last query only (what recall by elimination gives) scores 1 there
    and 0 on the others: the accuracy by query order separates it from recall."""
    from eval import mqar_accuracy
    inputs, targets = mqar_examples(30, 64, 4, 256, seed=5)

    def last_query_only(x):   # one batch of all 30 examples
        logits = torch.zeros(*x.shape, 256)
        for row, t in enumerate(targets):
            last = np.flatnonzero(t >= 0)[-1]
            logits[row, last, t[last]] = 1.0
        return logits, None

    right, total = mqar_accuracy(last_query_only, inputs, targets, 30, "cpu", torch.autocast("cpu", enabled=False))
    assert list(total) == [30] * 4 and list(right) == [0, 0, 0, 30]


def test_training_evaluation_scores_first_and_last_query_apart():
    """train.evaluate on a model right on each example's last query only (recall by elimination):
    accuracy 1/pairs, 0 on the first query, 1 on the last; the loss is the cross-entropy of its logits
    over the scored positions alone."""
    import train
    config = {**train.load_config(["mqar"]), "seq_len": 64, "mqar_pairs": 4, "vocab_size": 256,
              "mqar_train_examples": 8, "mqar_test_examples": 30, "micro_batch_size": 7}
    pairs = config["mqar_pairs"]

    data = train.MQARData(config)
    targets_of = {tuple(x): y for x, y in zip(*data.test)}   # the stand-in knows each test example's answers

    class LastQueryOnly(torch.nn.Module):
        def forward(self, x, y=None, sparse_targets=False):
            logits = torch.zeros(*x.shape, 256)
            for row in range(len(x)):
                target = targets_of[tuple(x[row].tolist())]
                last = np.flatnonzero(target >= 0)[-1]
                logits[row, last, target[last]] = 1.0
            return logits, (torch.tensor(0.0) if y is not None else None)

    result = train.evaluate(LastQueryOnly(), data, config, 0, 1, torch.device("cpu"),
                            torch.autocast("cpu", enabled=False))
    assert result["val_acc"] == pytest.approx(1 / pairs)
    assert (result["val_acc_first_query"], result["val_acc_last_query"]) == (0.0, 1.0)
    # uniform over 256 ids at the other queries; at the last, logit 1 on the answer and 0 on the 255 others
    want = ((pairs - 1) * math.log(256) + math.log(math.e + 255) - 1) / pairs
    assert result["val_loss"] == pytest.approx(want, rel=1e-6)


def test_task_errors(tmp_path):
    with pytest.raises(SystemExit, match="task='copy'"):
        train_in_process([*MQAR, "--task=copy", f"--out_dir={tmp_path / 'a'}", "--max_steps=1"])
    with pytest.raises(SystemExit, match="task='mqar'.*seq_len >= 64"):
        train_in_process([*MQAR, "--mqar_pairs=16", f"--out_dir={tmp_path / 'b'}", "--max_steps=1"])


def test_the_mqar_config_trains(tmp_path):
    """configs/mqar.py as a user runs it, shrunk to one step: the examples, the model and the accuracy."""
    out = str(tmp_path / "mqar")
    train_in_process(["mqar", "--d_model=32", "--mlp_hidden=64", "--head_k_dim=16", "--head_v_dim=16",
                      "--batch_tokens=512", "--micro_batch_size=2", "--max_steps=1", "--warmup_steps=1",
                      "--mqar_train_examples=16", "--mqar_test_examples=4", f"--out_dir={out}"])
    record = json.load(open(tmp_path / "mqar" / "meta.json"))
    assert record["task"] == "mqar" and record["model_config"]["vocab_size"] == 8192 and 0 <= record["val_acc"] <= 1


def test_the_sweep_trains_each_cell_once_and_tables_the_best_learning_rate(tmp_path, capsys, monkeypatch):
    """scripts/mqar_sweep.py over two learning rates: each run trains once (a second sweep skips it),
    the table keeps the better learning rate, and the plot is drawn."""
    from reference import load_script, second_call_output
    sweep = load_script("mqar_sweep")
    out = tmp_path / "sweep"
    argv = [f"--out_dir={out}", "--mixers=carve", "--widths=32", "--pairs=2", "--lrs=1e-3,1e-2", "--seeds=1",
            "--parallel=2", "--seq_len=32", "--vocab_size=64", "--mqar_train_examples=64", "--mqar_test_examples=8",
            "--batch_tokens=256", "--micro_batch_size=8", "--max_steps=2", "--mlp_hidden=64", "--chunk_size=16",
            "--eval_interval=2", "--warmup_steps=1"]
    sweep.main(argv)
    rows = json.load(open(out / "results.json"))["rows"]
    accuracies = [json.load(open(out / f"carve_d32_p2_lr{lr}_seed1" / "meta.json"))["val_acc"] for lr in ("0.001", "0.01")]
    assert len(rows) == 1 and rows[0]["accuracy_mean"] == max(accuracies) and rows[0]["seeds"] == 1
    assert rows[0]["seeds_learnt"] == (max(accuracies) > sweep.LEARNT)
    monkeypatch.setattr(sweep, "LEARNT", min(accuracies) - 1e-9)   # a bar every run clears: the count must see it
    sweep.main([*argv, "--report"])
    assert json.load(open(out / "results.json"))["rows"][0]["seeds_learnt"] == 1
    capsys.readouterr()
    best = json.load(open(out / f"carve_d32_p2_lr{('0.001', '0.01')[accuracies.index(max(accuracies))]}_seed1"
                          / "meta.json"))
    assert (rows[0]["first_query_mean"], rows[0]["last_query_mean"]) == (best["val_acc_first_query"],
                                                                        best["val_acc_last_query"])
    assert (out / "mqar.png").read_bytes()[:4] == b"\x89PNG"
    for record in out.glob("*/meta.json"):   # records of a train.py from before the first- and last-query accuracies
        json.dump({k: v for k, v in json.load(open(record)).items() if not k.endswith("_query")}, open(record, "w"))
    table = second_call_output(sweep, argv, out, capsys)
    assert "| carve | 32 | 2 | 1 |" in table and table.rstrip().endswith("| - | - |")
    # --report over a larger grid: the finished runs' table, and the runs of seed 2 named but not started
    sweep.main([*argv, "--seeds=1,2", "--report"])
    printed = capsys.readouterr()
    assert "| carve | 32 | 2 | 1 |" in printed.out
    assert ("--report: 2 of 4 runs not finished at max_steps=2, not in the table (none trained): "
            "carve_d32_p2_lr0.001_seed2, carve_d32_p2_lr0.01_seed2") in printed.err
    assert not list(out.glob("*_seed2"))
    # --report without the --max_steps the runs trained to: it names the one they have
    with pytest.raises(SystemExit, match="none of the grid's 2 runs"):
        sweep.main([a for a in argv if a != "--max_steps=2"] + ["--report"])
    assert "not finished at max_steps=4000, not in the table (none trained); they trained to max_steps=2: pass " \
        "that --max_steps: carve_d32_p2_lr0.001_seed1, carve_d32_p2_lr0.01_seed1" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="none of the grid's 2 runs in .*nowhere has finished"):
        sweep.main([*argv, f"--out_dir={tmp_path / 'nowhere'}", "--report"])
    # a variant sent into the baseline's folder is refused, not reported as the baseline's runs
    with pytest.raises(SystemExit, match=r"2 run\(s\) in .*sweep were trained with other settings than these: "
                                         r"carve_d32_p2_lr0.001_seed1 \(content_rank: 16 there vs 0 now\)"):
        sweep.main([*argv, "--content_rank=0", "--report"])
    # runs that reached a shorter grid's max_steps on a longer schedule are not that grid's runs
    with pytest.raises(SystemExit, match=r"learning-rate schedule \(lr_decay_steps or max_steps\): 2 there vs 1 now"):
        sweep.main([a for a in argv if a != "--max_steps=2"] + ["--max_steps=1", "--report"])


def test_a_failed_run_is_listed_with_its_error(tmp_path, capsys):
    """A run whose train.py stops is listed at the end with train.py's one-line error, and the sweep exits
    non-zero."""
    from reference import load_script
    sweep = load_script("mqar_sweep")
    with pytest.raises(SystemExit, match="none of the grid's 1 runs"):
        sweep.main([f"--out_dir={tmp_path}", "--mixers=carve", "--widths=32", "--pairs=2", "--lrs=1e-3", "--seeds=1",
                    "--init_from=bogus"])
    log_path = tmp_path / "carve_d32_p2_lr0.001_seed1" / "train.log"
    assert (f"carve_d32_p2_lr0.001_seed1: failed (exit 1: error: init_from must be 'scratch' or 'resume', got "
            f"'bogus'; see {log_path})") in capsys.readouterr().err


def test_the_sweep_refuses_the_keys_its_grid_sets(tmp_path, capsys):
    """--lr and --seed are not abbreviations of --lrs and --seeds, and --d_model or --mqar_pairs would
    contradict the run folder's name: each stops the sweep before anything is written."""
    from reference import load_script
    sweep = load_script("mqar_sweep")
    for override in ("--lr=1e-3", "--seed=3", "--d_model=32", "--mqar_pairs=8"):
        with pytest.raises(SystemExit):
            sweep.main([f"--out_dir={tmp_path}", "--mixers=carve", "--widths=32", "--pairs=2", override])
        assert f"{override!r}: the grid sets mixer, d_model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sweep.main([f"--out_dir={tmp_path}", "--parallel=0"])
    assert "--parallel=0: must be at least 1" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
