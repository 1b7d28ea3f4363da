"""scripts/lm_study.py on a CPU: equal parameters per mixer, each run trained once, the best learning rate
per mixer by its mean over seeds, and the refusal of a target no model width can meet."""
import json

import pytest

import prepare_data
from reference import load_script, second_call_output

TINY = ["--n_layer=1", "--d_model=32", "--n_head=2", "--head_k_dim=16", "--head_v_dim=16", "--chunk_size=16",
        "--content_rank=4", "--seq_len=32", "--batch_tokens=256", "--micro_batch_size=8", "--max_steps=3",
        "--warmup_steps=1", "--eval_interval=1", "--eval_tokens=256", "--log_interval=1"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    (root / "text.txt").write_text("To be, or not to be, that is the question.\n" * 400, encoding="utf-8")
    prepare_data.main(["--source", str(root / "text.txt"), "--out_dir", str(root / "data")])
    return root / "data"


def test_study_matches_parameters_trains_once_and_picks_each_mixers_best_lr(tmp_path, capsys, data_dir):
    study = load_script("lm_study")
    out = tmp_path / "study"
    argv = [f"--out_dir={out}", "--mixers=carve,attn", "--params=40000", "--lrs=1e-3,3e-2", "--seeds=1",
            "--parallel=2", f"--data_dir={data_dir}", *TINY]
    study.main(argv)
    rows = json.load(open(out / "results.json"))["rows"]
    assert [(r["mixer"], r["lr"]) for r in rows] == [("carve", 1e-3), ("carve", 3e-2), ("attn", 1e-3), ("attn", 3e-2)]
    for row in rows:
        assert abs(row["params"] / 40000 - 1) <= 0.02 and row["mlp_hidden"] % 16 == 0
        log = out / f"{row['mixer']}_lr{row['lr']:g}_seed1" / "log.jsonl"
        logged = [json.loads(line)["val_bpb"] for line in open(log) if json.loads(line).get("val_bpb") is not None]
        assert len(logged) >= 3 and row["val_bpb_mean"] == min(logged)
    for mixer in ("carve", "attn"):
        mine = [r for r in rows if r["mixer"] == mixer]
        assert [r["best_lr"] for r in mine].count(True) == 1
        assert next(r for r in mine if r["best_lr"])["val_bpb_mean"] == min(r["val_bpb_mean"] for r in mine)
    assert rows[0]["mlp_hidden"] != rows[2]["mlp_hidden"]   # attention's layer is smaller: a wider MLP
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "| carve |" in second_call_output(study, argv, out, capsys)
    # --report over more seeds: the finished runs' table, seed 2's runs named and not started
    study.main([*argv, "--seeds=1,2", "--report"])
    printed = capsys.readouterr()
    assert "| carve |" in printed.out and "--report: 4 of 8 runs not finished" in printed.err
    assert not list(out.glob("*_seed2"))


def test_a_target_no_width_can_meet_is_refused_before_training(tmp_path, tmp_path_factory, data_dir):
    with pytest.raises(SystemExit, match="--mixers carve: the closest model has .* not within 2% of --params=100"):
        load_script("lm_study").main([f"--out_dir={tmp_path}", "--mixers=carve", "--params=100",
                                      f"--data_dir={data_dir}", *TINY])
    assert not list(tmp_path.iterdir())
    missing = tmp_path_factory.mktemp("no_data") / "kjv_shakespeare_byte"
    with pytest.raises(SystemExit, match="kjv_shakespeare_byte/meta.json not found.*--source /tmp/kjv.txt shakespeare"):
        load_script("lm_study").main([f"--out_dir={tmp_path}", "--mixers=carve", "--params=1e6",
                                      f"--data_dir={missing}", *TINY])
    assert not list(tmp_path.iterdir())


def test_keys_the_study_sets_cannot_be_overridden(tmp_path, data_dir, capsys):
    """mlp_hidden would undo the matching; --lr and --seed are not abbreviations of --lrs and --seeds."""
    for override in ("--mlp_hidden=64", "--lr=1e-3", "--seed=3"):
        with pytest.raises(SystemExit):
            load_script("lm_study").main([f"--out_dir={tmp_path}", "--mixers=carve", "--params=40000",
                                          f"--data_dir={data_dir}", override, *TINY])
        assert f"{override!r}: the grid sets mixer, mlp_hidden, lr" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_a_runs_score_is_its_lowest_val_bpb_not_its_last(tmp_path):
    study = load_script("lm_study")
    rows = [{"step": 2, "val_bpb": 3.0}, {"step": 4, "val_bpb": 2.0}, {"step": 6, "val_bpb": 2.5}]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "meta.json").write_text(json.dumps({"config": {"batch_tokens": 100}}))
    assert study.best_val_bpb(str(tmp_path)) == (2.0, 400)
