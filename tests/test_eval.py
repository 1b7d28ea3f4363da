"""eval.py: perplexity and bits per byte of a checkpoint on token files and on raw text."""
import json
import math
import os
from contextlib import nullcontext

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import eval as evaluate_script
import train
from model import LM, ModelConfig
from reference import TINY_MODEL_ARGS, tiny

TINY = [*TINY_MODEL_ARGS, "--seq_len=48", "--micro_batch_size=4", "--batch_tokens=192", "--warmup_steps=2",
        "--lr=3e-3", "--eval_tokens=192", "--log_interval=1", "--eval_interval=3"]


@pytest.fixture(scope="module")
def run(shakespeare, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run") / "out")
    train.main(["carve_shakespeare", *TINY, f"--data_dir={shakespeare}", f"--out_dir={out}", "--max_steps=3"])
    return out


def result_of(args, capsys):
    evaluate_script.main([*args, "--json", "--device", "cpu"])
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def model_of(out_dir):
    checkpoint, record = train.load_newest_checkpoint(out_dir, log=lambda line: None)
    model = LM(ModelConfig.from_dict(record["model_config"]))
    model.load_state_dict(checkpoint["model"])
    return model.eval()


@pytest.mark.parametrize("seq_len", [7, 48, 1000])
def test_text_windows_against_the_model(run, tmp_path, capsys, seq_len):
    """Raw text scored in windows of seq_len tokens (the last one shorter) equals the model's own
    cross-entropy over the same windows, summed; with the byte tokenizer bits per byte is the loss
    in bits, and the bytes are the file's."""
    text = "ROMEO:\nBut soft, what light through yonder window breaks?\nJULIET:\nAy me.\n" * 3
    (tmp_path / "scene.txt").write_text(text)
    result = result_of(["--out_dir", run, "--text", str(tmp_path / "scene.txt"), f"--seq_len={seq_len}"], capsys)
    ids = torch.tensor(list(text.encode()))
    model = model_of(run)
    nats = 0.0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, seq_len):
            window = ids[start:start + seq_len + 1]
            logits = model(window[None, :-1])[0]
            nats += F.cross_entropy(logits[0].double(), window[1:], reduction="sum").item()
    assert result["tokens"] == len(ids) - 1 and result["bytes"] == len(ids) - 1
    assert abs(result["loss"] - nats / (len(ids) - 1)) < 1e-5 * result["loss"]
    assert abs(result["bits_per_byte"] - result["loss"] / math.log(2)) < 1e-9
    assert abs(result["perplexity"] - math.exp(result["loss"])) < 1e-9 * result["perplexity"]


def test_token_files(run, shakespeare, capsys):
    """The run's own val.bin (the default) and a capped train split; the model beats uniform bytes."""
    val = result_of(["--out_dir", run, "--max_tokens=3000"], capsys)
    assert val["tokens"] == 3000 and val["source"] == os.path.join(shakespeare, "val.bin")
    assert val["loss"] < math.log(256)
    assert result_of(["--out_dir", run, "--split=train", "--max_tokens=500"], capsys)["tokens"] == 500
    assert result_of(["--out_dir", run, "--eval_tokens=700"], capsys)["tokens"] == 700   # train.py's name for it


def test_errors(run, tmp_path):
    for args, fragment in ((["--out_dir", str(tmp_path / "none")], "does not exist"),
                           (["--out_dir", run, "--data_dir", str(tmp_path)], "meta.json not found"),
                           (["--out_dir", run, "--text", str(tmp_path / "missing.txt")],
                            f"--text {tmp_path / 'missing.txt'}: no such file"),
                           (["--out_dir", run, "--batch_size=0"], "--batch_size=0: must be at least 1")):
        with pytest.raises(SystemExit) as info:
            evaluate_script.main([*args, "--device", "cpu"])
        assert fragment in str(info.value) and "\n" not in str(info.value), str(info.value)
    with pytest.raises(SystemExit, match="--device=gpu is not a device"):
        evaluate_script.main(["--out_dir", run, "--device", "gpu"])


def test_harness_mistakes_are_one_line(run, tmp_path, monkeypatch):
    """A misspelt task, a task folder that is not there and a dataset the harness cannot fetch: one line each
    (lm-eval's own errors are tracebacks of some twenty lines)."""
    import lm_eval
    harness = ["--out_dir", run, "--task=harness", "--device", "cpu"]
    with pytest.raises(SystemExit, match=r"'wikitxt' is not a task of lm-eval .* \(did you mean wikitext"):
        evaluate_script.main([*harness, "--harness_tasks=wikitxt"])
    with pytest.raises(SystemExit, match="--harness_include '.*nope' is not a folder"):
        evaluate_script.main([*harness, "--harness_tasks=wikitext", f"--harness_include={tmp_path / 'nope'}"])

    def offline(**kwargs):
        raise ConnectionError("Couldn't reach 'EleutherAI/wikitext_document_level' on the Hub")
    monkeypatch.setattr(lm_eval, "simple_evaluate", offline)
    with pytest.raises(SystemExit) as info:
        evaluate_script.main([*harness, "--harness_tasks=wikitext"])
    assert "could not load a dataset (ConnectionError: Couldn't reach" in str(info.value)
    assert "HF_DATASETS_OFFLINE=1" in str(info.value) and "\n" not in str(info.value)


def test_damaged_data_and_settings_are_one_line(run, shakespeare, tmp_path):
    """Token files that train.py refuses in one line, eval.py refuses in the same line (not a traceback from
    the embedding or numpy); so windows too short for a Delta and passkey contexts that cannot hold a needle."""
    def damaged(name, meta=None, val=None):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "meta.json").write_text(meta or open(os.path.join(shakespeare, "meta.json")).read())
        (folder / "val.bin").write_bytes(val if val is not None else b"\x01\x00" * 100)
        return str(folder)
    meta = json.load(open(os.path.join(shakespeare, "meta.json")))
    cases = [(damaged("big_id", val=np.array([5, 300, 7], dtype=np.uint16).tobytes()), "holds token id 300"),
             (damaged("torn", meta='{"tokenizer": "byte"'), "is not valid JSON"),
             (damaged("odd", val=b"\x01\x00\x02"), "is not a whole number of uint16 tokens"),
             (damaged("no_dtype", meta=json.dumps({k: v for k, v in meta.items() if k != "dtype"})),
              "lacks or mangles dtype")]
    for data_dir, fragment in cases:
        with pytest.raises(SystemExit) as info:
            evaluate_script.main(["--out_dir", run, "--data_dir", data_dir, "--device", "cpu"])
        assert fragment in str(info.value) and "\n" not in str(info.value), str(info.value)
    for args, fragment in ((["--task=gates", "--seq_len=16"], "--task=gates: windows of 16 tokens"),
                           (["--task=passkey", "--contexts=1024,50"], "--contexts: 50 tokens cannot hold the needle and the question, 96"),
                           (["--task=passkey", "--depths=150"], "--depths=150: each must be within 0..100")):
        with pytest.raises(SystemExit, match=fragment):
            evaluate_script.main(["--out_dir", run, *args, "--device", "cpu"])


def test_without_content_shift_scores_the_model_with_u_zero(run, capsys, monkeypatch):
    """--without_content_shift evaluates the trained model with U = 0 in every CARVE layer and nothing
    else changed (without the flag, the model as trained); --task=gates, which reports both, refuses it."""
    trained = model_of(run)
    ups = [block.mixer.content_up for block in trained.blocks]
    assert all(up.abs().sum() > 0 for up in ups)   # U starts at 0; three steps moved it
    scored = []
    real_score = evaluate_script.score
    monkeypatch.setattr(evaluate_script, "score", lambda model, *a: scored.append(model) or real_score(model, *a))
    result_of(["--out_dir", run, "--max_tokens=2000", "--without_content_shift"], capsys)
    result_of(["--out_dir", run, "--max_tokens=2000"], capsys)
    by_hand = {name: (torch.zeros_like(value) if name.endswith("content_up") else value)
               for name, value in trained.state_dict().items()}
    assert sum(name.endswith("content_up") for name in by_hand) == len(ups)
    for model, want in zip(scored, (by_hand, trained.state_dict())):
        assert [name for name, value in model.state_dict().items() if not torch.equal(value, want[name])] == []
    with pytest.raises(SystemExit, match="--task=gates reports the model with and without it"):
        evaluate_script.main(["--out_dir", run, "--task=gates", "--without_content_shift", "--device", "cpu"])


def test_passkey_scores_the_continuation(run, capsys, monkeypatch):
    """A model that answers with the key scores 100%, one that does not 0%; each prompt fills its context
    (within a filler block) with the needle after the asked share of the blocks, and the result counts
    the blocks after it; the table has a row per context and a column per depth; the tiny model runs
    the probe end to end."""
    from prepare_data import PASSKEY_FILLER, PASSKEY_NEEDLE, PASSKEY_QUESTION
    answers, prompts = iter([]), []

    def generate(model, prompt, *args, **kwargs):
        prompts.append(bytes(prompt).decode())
        return list(f" {next(answers)}.".encode())

    monkeypatch.setattr(evaluate_script, "generate", generate)
    keys = [str(k) for k in __import__("numpy").random.default_rng(3).integers(10000, 100000, size=2)]
    answers = iter(keys * 6)
    passkey = ["--out_dir", run, "--task=passkey", "--contexts=200,400", "--depths=0,50,100", "--trials=2", "--seed=3"]
    result = result_of(passkey, capsys)
    assert [r["accuracy"] for r in result["accuracy"]] == [1.0] * 6
    settings = [(context, depth, key) for context in (200, 400) for depth in (0, 50, 100) for key in keys]
    assert len(prompts) == len(settings)
    for i, (prompt, (context, depth, key)) in enumerate(zip(prompts, settings)):
        head, tail = prompt.split(PASSKEY_NEEDLE.format(key=key))
        blocks = (len(head) + len(tail) - len(PASSKEY_QUESTION)) // len(PASSKEY_FILLER)
        assert context - len(PASSKEY_FILLER) < len(prompt) <= context and tail.endswith(PASSKEY_QUESTION), prompt
        assert len(head) == round(blocks * depth / 100) * len(PASSKEY_FILLER), (context, depth, prompt)
        after = result["accuracy"][i // 2]["filler_blocks_after_needle"]   # two keys a setting
        assert after * len(PASSKEY_FILLER) == len(tail) - len(PASSKEY_QUESTION), (context, depth, after)
    answers = iter(["00000"] * 12)
    result = result_of(passkey, capsys)
    assert [r["accuracy"] for r in result["accuracy"]] == [0.0] * 6
    monkeypatch.undo()
    evaluate_script.main(["--out_dir", run, "--task=passkey", "--contexts=150", "--depths=0,50", "--trials=1",
                          "--device", "cpu"])
    table = capsys.readouterr().out.strip().splitlines()
    assert len(table) == 2 and table[1].split()[0] == "150" and len(table[1].split()) == 3


def test_content_shift_is_the_kernels_delta():
    """eval.content_shift's Delta of the last chunk equals the state's delta after the call, and the
    first chunk has none; for 2 chunks and 3 tokens of a third (C = 8)."""
    from carve_kernel import chunk_carve_torch
    from eval import content_shift
    from reference import make_inputs
    x = make_inputs(2, 19, 2, 8, 12, "carve", rank=4)
    q, k, v, g, b_logit, w, D, U = (x[name] for name in ("q", "k", "v", "g", "b_logit", "w", "D", "U"))
    o, state = chunk_carve_torch(q, k, v, g, b_logit, w, (D, U), output_final_state=True, chunk_size=8)
    delta = content_shift(o, (D, U), 8)
    assert not delta[:, :8].any()
    assert torch.allclose(delta[:, 16:], state.delta[:, None].expand(-1, 3, -1, -1), atol=1e-6)
    m0 = o[:, :8].mean(1)                                  # the first chunk's mean output [B, H, V]
    want = torch.einsum("hkr,hrv,bhv->bhk", U, D, m0)
    assert torch.allclose(delta[:, 8:16], want[:, None].expand(-1, 8, -1, -1), atol=1e-6)


def test_gates_measure_d_from_the_runs_own_start(shakespeare, tmp_path, capsys):
    """A run at learning rate 0 keeps its initial weights: --task=gates rebuilds them from the seed, so D
    has moved by exactly 0 (and U is still 0); another seed's start would be far off."""
    out = str(tmp_path / "still")
    train.main(["carve_shakespeare", *TINY, f"--data_dir={shakespeare}", f"--out_dir={out}", "--max_steps=3",
                "--lr=0", "--min_lr=0", "--seed=7"])
    result = result_of(["--out_dir", out, "--task", "gates", "--max_tokens", "480"], capsys)
    assert all(row["D_moved"] == 0 and row["U_norm"] == 0 for row in result["layers"])
    assert result["loss"] == result["loss_without_content_shift"]   # U = 0: there is no shift to take away
    model, other = model_of(out), train.initial_model({**train.load_newest_checkpoint(out, log=print)[1]["config"], "seed": 8})
    moved = (other.blocks[0].mixer.content_down - model.blocks[0].mixer.content_down).norm()
    assert moved > 0.5 * model.blocks[0].mixer.content_down.norm()


def test_gates_table_and_a_model_without_recurrent_layers(run, shakespeare, tmp_path, capsys):
    """The text table has a column for each CARVE statistic, none for a CARVE without content shift; an
    attention-only run is a one-line error."""
    evaluate_script.main(["--out_dir", run, "--task", "gates", "--max_tokens", "480", "--device", "cpu"])
    header, *rows, losses = capsys.readouterr().out.strip().splitlines()
    assert header.split() == ["layer", "mixer", "erase_rate", "mean|Delta|", "Delta_p5", "Delta_p50", "Delta_p95",
                              "|U|", "|D|", "D_moved"]
    assert len(rows) == 2 and all(len(row.split()) == 10 for row in rows)
    assert losses.startswith("loss ") and "with Delta = 0" in losses
    plain = str(tmp_path / "plain")   # CARVE without its content shift: erase rates only, no shift to take away
    train.main(["carve_shakespeare", *TINY, f"--data_dir={shakespeare}", f"--out_dir={plain}", "--max_steps=1",
                "--content_rank=0"])
    capsys.readouterr()
    evaluate_script.main(["--out_dir", plain, "--task", "gates", "--max_tokens", "480", "--device", "cpu"])
    header, *rows, losses = capsys.readouterr().out.strip().splitlines()
    assert header.split() == ["layer", "mixer", "erase_rate"] and all(len(row.split()) == 3 for row in rows)
    assert losses.startswith("loss ") and "Delta" not in losses
    out = str(tmp_path / "attn")
    train.main(["carve_shakespeare", *TINY, f"--data_dir={shakespeare}", f"--out_dir={out}", "--max_steps=1",
                "--mixer=attn"])
    with pytest.raises(SystemExit, match="no recurrent layer"):
        evaluate_script.main(["--out_dir", out, "--task", "gates", "--max_tokens", "480", "--device", "cpu"])


def test_content_shift_worth_takes_delta_away_and_restores_it():
    """content_shift_worth of window_loss: the loss as is and with every CARVE layer's U at 0, each equal to the loss
    computed apart on the windows (one a batch: the same operations, equal to the bit; two a batch, the
    last batch of one: the same to rounding); U is the same after as before, and the two losses differ (an
    untrained model's loss barely depends on its gates, so by little: 6e-6 here); a model without CARVE
    layers has no shift to take away (None)."""
    from eval import content_shift_worth, window_loss
    torch.manual_seed(0)
    model = LM(ModelConfig(vocab_size=256, n_layer=2, d_model=32, n_head=2, head_k_dim=16, head_v_dim=16,
                           mlp_hidden=64, chunk_size=8, content_rank=4, mixer="carve,gdn2")).eval()
    with torch.no_grad():
        model.blocks[0].mixer.content_up.normal_(0, 100.0)   # Delta of order 1: m, a mean of outputs, is small
    U = model.blocks[0].mixer.content_up.clone()
    windows = [np.random.default_rng(i).integers(0, 256, 41) for i in range(3)]
    no_autocast = torch.autocast("cpu", enabled=False)

    def loss_apart():
        with torch.no_grad():
            return sum(model(torch.as_tensor(w[None, :-1]), torch.as_tensor(w[None, 1:]))[1].item()
                       for w in windows) / 3

    loss, without = content_shift_worth(model, lambda: window_loss(model, windows, 1, no_autocast))
    assert torch.equal(model.blocks[0].mixer.content_up, U)
    assert loss == loss_apart()
    assert content_shift_worth(model, lambda: window_loss(model, windows, 2, no_autocast)) == pytest.approx(
        (loss, without), rel=1e-6, abs=0)
    with torch.no_grad():
        model.blocks[0].mixer.content_up.zero_()
    assert without == loss_apart() and without != loss
    model = LM(ModelConfig(vocab_size=256, n_layer=1, d_model=32, n_head=2, head_k_dim=16, head_v_dim=16,
                           mlp_hidden=64, chunk_size=8, mixer="gdn2")).eval()
    loss, without = content_shift_worth(model, lambda: window_loss(model, windows, 1, no_autocast))
    assert loss == loss_apart() and without is None   # no CARVE layer: no shift to take away


def test_step_picks_a_checkpoint(run, capsys):
    """--step=N scores the checkpoint of step N; a step with no checkpoint names the steps there are."""
    assert result_of(["--out_dir", run, "--step", "3", "--max_tokens", "100"], capsys)["checkpoint_step"] == 3
    with pytest.raises(SystemExit, match=r"no checkpoint of step 2 in .*; it has steps 3 \(train.py keeps"):
        evaluate_script.main(["--out_dir", run, "--step", "2", "--device", "cpu"])


def test_gate_statistics(run, capsys):
    """--task=gates on the tiny CARVE run: an erase rate and a Delta distribution a layer, U and D norms;
    against a GDN-2 model, an erase rate only."""
    result = result_of(["--out_dir", run, "--task", "gates", "--max_tokens", "480"], capsys)
    layers = result["layers"]
    assert [row["layer"] for row in layers] == [0, 1] and all(0 < row["erase_rate"] < 1 for row in layers)
    assert all(row["delta_p5"] <= row["delta_p50"] <= row["delta_p95"] and row["U_norm"] > 0 for row in layers)
    assert all(row["D_moved"] > 0 for row in layers)
    from eval import gate_statistics
    model = LM(ModelConfig(vocab_size=256, n_layer=1, d_model=32, n_head=2, head_k_dim=16, head_v_dim=16,
                           mlp_hidden=64, chunk_size=16, mixer="gdn2")).eval()
    rows = gate_statistics(model, [np.arange(40) % 256], 8, torch.autocast("cpu", enabled=False))
    assert len(rows) == 1 and set(rows[0]) == {"layer", "mixer", "erase_rate"}


def test_gate_statistics_do_not_depend_on_the_batch_size(run):
    """The windows in batches of one or of two (the last one short) give the same statistics to rounding,
    CARVE's Delta distribution included: each window's Delta comes from its own outputs."""
    from eval import gate_statistics
    model = model_of(run)
    windows = [np.random.default_rng(i).integers(0, 256, 40) for i in range(3)]
    no_autocast = torch.autocast("cpu", enabled=False)
    one, two = (gate_statistics(model, windows, size, no_autocast) for size in (1, 2))
    assert "delta_p95" in one[0] and one[0]["delta_abs_mean"] > 0
    for a, b in zip(one, two):
        assert a.keys() == b.keys() and all(b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-9)
                                            for key in a if key not in ("layer", "mixer"))


def test_gate_statistics_under_bfloat16_autocast(run):
    """On the GPU eval.py runs the model under bfloat16 autocast: Delta and the erase rate are still
    computed in float32 (a bfloat16 Delta once broke the quantiles), close to the float32 run's."""
    from eval import gate_statistics
    model = model_of(run)
    windows = [np.random.default_rng(i).integers(0, 256, 40) for i in range(2)]
    full = gate_statistics(model, windows, 2, torch.autocast("cpu", enabled=False))
    half = gate_statistics(model, windows, 2, torch.autocast("cpu", dtype=torch.bfloat16))
    for a, b in zip(full, half):
        assert b["erase_rate"] == pytest.approx(a["erase_rate"], rel=1e-2)
        assert b["delta_abs_mean"] == pytest.approx(a["delta_abs_mean"], rel=0.1)


def test_score_counts_the_bytes_of_the_scored_tokens():
    torch.manual_seed(0)
    model = LM(tiny()).eval()
    tokens = np.random.default_rng(0).integers(0, 61, 101)
    lengths = np.arange(61) % 5       # tokens spell different byte counts, some none (as eot does)
    nats, scored, nbytes = evaluate_script.score(model, tokens, 16, 3, torch.device("cpu"), nullcontext(), lengths,
                                                 lambda done: None)
    assert scored == 100 and nbytes == int(lengths[tokens[1:]].sum())
