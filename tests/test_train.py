"""train.py end to end on CPU: DDP equivalence, exact resume, interruption, config and data errors."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from contextlib import nullcontext

import numpy as np
import pytest
import torch

import train
from conftest import ROOT
from model import LM, ModelConfig
from reference import TINY_MODEL_ARGS, newest_checkpoint, tiny, torchrun_train, train_in_process, train_log

TINY = [*TINY_MODEL_ARGS, "--seq_len=48", "--micro_batch_size=4", "--batch_tokens=384", "--warmup_steps=2",
        "--lr=3e-3", "--eval_tokens=480", "--log_interval=1", "--eval_interval=4"]


def losses(out_dir):
    return {r["step"]: r["loss"] for r in train_log(out_dir) if "loss" in r}


def weights(out_dir):
    return newest_checkpoint(out_dir)["model"]


def test_resume_is_exact(shakespeare, tmp_path):
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    common = ["carve_shakespeare", *TINY, f"--data_dir={shakespeare}", "--lr_decay_steps=8"]
    train_in_process([*common, f"--out_dir={full}", "--max_steps=8"])
    train_in_process([*common, f"--out_dir={split}", "--max_steps=4"])
    train_in_process([*common, f"--out_dir={split}", "--max_steps=8", "--init_from=resume"])
    assert sorted(losses(full)) == list(range(1, 9))
    assert losses(split) == losses(full)  # the same floats, not merely close
    a, b = weights(full), weights(split)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ckpt = newest_checkpoint(split)
    assert ckpt["step"] == 8 and ckpt["data_position"] == 8 * 384 // 48
    meta = json.load(open(os.path.join(split, "meta.json")))
    assert meta["tokenizer"] == "byte" and meta["step"] == 8 and meta["val_bpb"] > 0


def test_content_projections_move_on_real_data(shakespeare, tmp_path):
    out = str(tmp_path / "run")
    train_in_process(["carve_shakespeare", *TINY, f"--data_dir={shakespeare}", f"--out_dir={out}", "--max_steps=6"])
    trained = weights(out)
    torch.manual_seed(1337)  # train.py's default seed: this is the model the run started from
    fresh = LM(ModelConfig.from_dict(json.load(open(os.path.join(out, "meta.json")))["model_config"]))
    for name, start in fresh.state_dict().items():
        if "content_up" in name:  # zero at init (CARVE == GDN-2); learning must move it off zero
            assert start.abs().max() == 0 and trained[name].abs().max() > 1e-4, name
        if "content_down" in name:
            assert (trained[name] - start).abs().max() > 1e-4, name
    assert json.load(open(os.path.join(out, "meta.json")))["val_loss"] < math.log(256)  # beats uniform bytes


def torchrun(nproc, args, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run(torchrun_train(args, nproc, ["--tee=3"]), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def test_ddp_two_processes_match_one_with_double_accumulation(shakespeare, tmp_path):
    """Two processes accumulating 2 micro-batches each against one accumulating 4 (as carve_1b3.py on 8
    GPUs accumulates): each rank its own micro-batches, the gradients all-reduced once, after the last."""
    common = ["carve_shakespeare", *TINY, f"--data_dir={shakespeare}", "--batch_tokens=768", "--max_steps=5",
              "--eval_interval=5", "--device=cpu"]  # on the CPU, as torchrun_train's ranks
    one = subprocess.run([sys.executable, "train.py", *common, f"--out_dir={tmp_path / 'one'}"], cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr
    assert "grad accumulation 4" in one.stdout
    two = torchrun(2, [*common, f"--out_dir={tmp_path / 'two'}"])
    assert two.returncode == 0, two.stdout + two.stderr
    assert "world 2 | grad accumulation 2" in two.stdout
    l1, l2 = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(l1) == sorted(l2) == [1, 2, 3, 4, 5]
    for step in l1:  # same batches, same model; only the summation order of gradients differs
        assert abs(l1[step] - l2[step]) <= 1e-5 * abs(l1[step]), (step, l1[step], l2[step])
    v1 = [r for r in train_log(tmp_path / "one") if "val_loss" in r][-1]
    v2 = [r for r in train_log(tmp_path / "two") if "val_loss" in r][-1]
    assert abs(v1["val_loss"] - v2["val_loss"]) <= 1e-5 * v1["val_loss"]
    assert l1[5] < l1[1] - 0.1  # it is learning, so equal curves are not two flat lines


def test_interrupted_run_checkpoints_and_resumes_exactly(shakespeare, tmp_path):
    common = ["carve_shakespeare", *TINY, f"--data_dir={shakespeare}", "--max_steps=150", "--eval_interval=1000"]
    reference = str(tmp_path / "reference")
    train_in_process([*common, f"--out_dir={reference}"])
    interrupted = str(tmp_path / "interrupted")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "train.py", *common, f"--out_dir={interrupted}"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log_path = os.path.join(interrupted, "log.jsonl")
    deadline = time.time() + 300
    while not (os.path.exists(log_path) and len(open(log_path).readlines()) >= 3):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGINT, stderr   # stopped, not finished: a script can tell
    assert "stopped at step" in stdout
    stopped_at = newest_checkpoint(interrupted)["step"]
    assert 3 <= stopped_at < 150
    train_in_process([*common, f"--out_dir={interrupted}", "--init_from=resume"])
    a, b = weights(reference), weights(interrupted)
    assert all(torch.equal(a[k], b[k]) for k in a)
    resumed = losses(interrupted)
    assert all(resumed[s] == losses(reference)[s] for s in range(stopped_at + 1, 151))


def expect_error(args, *fragments):
    with pytest.raises(SystemExit) as info:
        train.main(args)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_config_errors(shakespeare, tmp_path):
    out = f"--out_dir={tmp_path / 'out'}"
    expect_error(["carve_shakespeare", "--n_layers=3", out], "unknown config key 'n_layers'", "n_layer")
    expect_error(["carve_shakespeare", "--max_steps=ten", out], "'max_steps'", "must be int")
    expect_error(["carve_shakespeare", "--lr=fast", out], "'lr'", "must be float")
    expect_error(["carve_shakespeare", "--compile=0", out], "'compile'", "must be bool, got int 0 (True or False)")
    expect_error(["carve_shakespeare", "max_steps=3", out], "config file 'max_steps=3' not found")
    expect_error(["carve_shakespeare", "--max_steps", "3", out], "expected --key=value, got '--max_steps'")
    expect_error(["config/carve_1b3.py", out], "not found", "configs/carve_1b3.py")
    expect_error(["carve_1b", out], "configs/carve_1b3.py")
    bad_config = tmp_path / "bad.py"
    bad_config.write_text("learning_rate = 1e-3\n")
    expect_error([str(bad_config), out], "unknown config key 'learning_rate'", str(bad_config))
    expect_error(["carve_shakespeare", f"--data_dir={shakespeare}", "--batch_tokens=1000", out],
                 "batch_tokens=1000", "micro_batch_size")
    expect_error(["carve_shakespeare", f"--data_dir={shakespeare}", "--init_from=resume", out], "no checkpoint in")


def test_device_for():
    """--device in train.py, eval.py, sample.py: a bare 'cuda' gets this rank's index (torch.cuda.set_device
    refuses it without one); a name torch does not know, CUDA on a machine without it, or a GPU index past
    the machine's GPUs is one line."""
    assert train.device_for("cpu") == torch.device("cpu")
    assert train.device_for("auto") == (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    with pytest.raises(SystemExit, match=r"^error: --device=gpu is not a device: use auto, cpu, cuda or cuda:N$"):
        train.device_for("gpu")
    if torch.cuda.is_available():
        assert train.device_for("cuda") == torch.device("cuda", 0)
        assert torch.cuda.current_device() == 0
        with pytest.raises(SystemExit, match=r"is cuda:\d+, but this machine has \d+ GPUs"):
            train.device_for(f"cuda:{torch.cuda.device_count()}")
    else:
        with pytest.raises(SystemExit, match=r"^error: --device=cuda, but this torch .* sees no CUDA GPU: use"):
            train.device_for("cuda")


def test_grad_clip_zero_is_no_clipping():
    """grad_clip=0 updates as an unreachable bound does (nanoGPT's meaning); torch's clip_grad_norm_ with
    max_norm 0 would zero the gradients and leave only the weight decay."""
    def updated(grad_clip):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        loss = model(torch.randn(5, 4)).square().sum()
        loss.backward()
        norm, applied = train.apply_update(model, optimizer, loss.detach(), grad_clip, ddp=False)
        assert applied and norm > 0
        return model.weight.detach().clone()
    assert torch.equal(updated(0.0), updated(1e9))
    assert not torch.equal(updated(0.0), updated(1e-3))


def test_data_errors(shakespeare, tmp_path):
    out = f"--out_dir={tmp_path / 'out'}"
    expect_error(["carve_shakespeare", f"--data_dir={tmp_path / 'nowhere'}", out], "meta.json not found",
                 "prepare_data.py")
    expect_error(["carve_shakespeare", f"--data_dir={shakespeare}", "--tokenizer=gpt2", out],
                 "tokenizer='gpt2'", "'byte'")
    expect_error(["carve_shakespeare", f"--data_dir={shakespeare}", "--vocab_size=128", out],
                 "vocab_size=128", "256")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "meta.json").write_text(open(os.path.join(shakespeare, "meta.json")).read())
    (broken / "val.bin").write_bytes(open(os.path.join(shakespeare, "val.bin"), "rb").read())
    expect_error(["carve_shakespeare", f"--data_dir={broken}", out], "train.bin not found")
    (broken / "train.bin").write_bytes(b"\x00" * 1001)
    expect_error(["carve_shakespeare", f"--data_dir={broken}", out], "not a whole number", "uint16")


def test_log_after_a_crash_holds_each_step_once(shakespeare, tmp_path):
    """A run killed after the log of step 4 but before its checkpoint resumes from step 2 and logs steps 3 and
    4 again: its log then reads as the log of a run never stopped. Resuming a finished run trains nothing."""
    common = ["carve_shakespeare", *TINY, f"--data_dir={shakespeare}", "--max_steps=4", "--eval_interval=2",
              "--log_interval=1"]
    whole, crashed = str(tmp_path / "whole"), str(tmp_path / "crashed")
    train_in_process([*common, f"--out_dir={whole}"])
    train_in_process([*common, f"--out_dir={crashed}"])
    for name in ("ckpt_00000004.pt", "ckpt_00000004.json"):
        os.remove(os.path.join(crashed, name))
    with open(os.path.join(crashed, "log.jsonl"), "a") as f:
        f.write('{"step": 5, "lo')   # and a line torn by the kill
    train_in_process([*common, f"--out_dir={crashed}", "--init_from=resume"])
    keys = lambda rows: [(row["step"], sorted(row)) for row in rows]  # noqa: E731
    assert keys(train_log(crashed)) == keys(train_log(whole))
    assert losses(crashed) == losses(whole) and len(losses(whole)) == 4
    done = subprocess.run([sys.executable, "train.py", *common, f"--out_dir={whole}", "--init_from=resume"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and "nothing to train: the run in" in done.stdout, done.stdout + done.stderr


def test_existing_checkpoint_is_never_overwritten(shakespeare, tmp_path):
    out = str(tmp_path / "run")
    train_in_process(["carve_shakespeare", *TINY, f"--data_dir={shakespeare}", f"--out_dir={out}", "--max_steps=1"])
    before = open(os.path.join(out, "ckpt_00000001.pt"), "rb").read()
    expect_error(["carve_shakespeare", *TINY, f"--data_dir={shakespeare}", f"--out_dir={out}"],
                 "already holds checkpoints", "--init_from=resume")
    assert open(os.path.join(out, "ckpt_00000001.pt"), "rb").read() == before
    expect_error(["carve_shakespeare", *TINY, f"--data_dir={shakespeare}", f"--out_dir={out}", "--n_layer=3",
                  "--init_from=resume"], "n_layer: checkpoint 2 vs now 3")
    # what is trained and how must be the checkpoint's, so that a resume command missing an override fails
    # rather than going on with the default; how long it runs and how it reports may change
    expect_error(["carve_shakespeare", *TINY, f"--data_dir={shakespeare}", f"--out_dir={out}", "--lr=1e-3",
                  "--seed=7", "--init_from=resume"], "lr: checkpoint 0.003 vs now 0.001", "seed: checkpoint 1337 vs now 7",
                 f"{out}/meta.json")
    other = tmp_path / "other_corpus"   # the same tokenizer, another text: not the run's data
    other.mkdir()
    for name in ("train.bin", "val.bin", "meta.json"):
        (other / name).write_bytes(open(os.path.join(shakespeare, name), "rb").read())
    expect_error(["carve_shakespeare", *TINY, f"--data_dir={other}", f"--out_dir={out}", "--init_from=resume"],
                 f"data_dir: checkpoint {shakespeare!r} vs now {str(other)!r}")
    train_in_process(["carve_shakespeare", *TINY, f"--data_dir={shakespeare}", f"--out_dir={out}", "--max_steps=2",
                      "--eval_interval=1", "--log_interval=2", "--keep_checkpoints=5", "--dtype=float32",
                      "--init_from=resume"])
    assert newest_checkpoint(out)["step"] == 2


def rewrite_checkpoint(out, change):
    """change(model_config) on the newest checkpoint of out and its record, the sha256 made to match."""
    record_path = train.checkpoint_records(out)[0]
    record = json.load(open(record_path))
    path = os.path.join(out, record["checkpoint"])
    checkpoint = torch.load(path, weights_only=True)
    for config in (record["model_config"], checkpoint["model_config"], checkpoint["config"], record["config"]):
        change(config)
    torch.save(checkpoint, path)
    record["sha256"] = train.sha256_of(path)
    json.dump(record, open(record_path, "w"))


def test_checkpoints_of_other_model_keys(shakespeare, tmp_path, capsys):
    """A checkpoint without a model key added since (gate_act here) loads with the key's default and a
    note; one with a key this model.py lacks (a fork's) is refused in one line, not built as another model."""
    out = str(tmp_path / "run")
    common = ["carve_shakespeare", *TINY, f"--data_dir={shakespeare}", f"--out_dir={out}"]
    train_in_process([*common, "--max_steps=1"])
    rewrite_checkpoint(out, lambda config: config.pop("gate_act"))
    capsys.readouterr()
    train_in_process([*common, "--max_steps=2", "--init_from=resume"])
    assert "predates the model keys gate_act (taken as 'silu')" in capsys.readouterr().out
    assert train.config_conflicts({**newest_checkpoint(out)["config"], "train_trick": 1}, train.load_config(common)) \
        == {"train_trick": (1, "absent here")}   # a fork's training key
    rewrite_checkpoint(out, lambda config: config.update(write_gate=False))
    expect_error([*common, "--max_steps=3", "--init_from=resume"], "model keys this model.py does not have (write_gate)")


def test_wandb_is_optional(shakespeare, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: the import fails
    expect_error(["carve_shakespeare", *TINY, f"--data_dir={shakespeare}", f"--out_dir={tmp_path / 'w'}",
                  "--max_steps=1", "--wandb_log=True"], "wandb_log=True", "pip install wandb")
    train_in_process(["carve_shakespeare", *TINY, f"--data_dir={shakespeare}", f"--out_dir={tmp_path / 'off'}",
                    "--max_steps=1"])  # off by default: never imported


def test_activation_checkpointing_trains_the_same(shakespeare, tmp_path):
    common = ["carve_shakespeare", *TINY, f"--data_dir={shakespeare}", "--max_steps=3"]
    train_in_process([*common, f"--out_dir={tmp_path / 'plain'}"])
    train_in_process([*common, f"--out_dir={tmp_path / 'ckpt'}", "--activation_checkpointing=True"])
    assert losses(tmp_path / "plain") == losses(tmp_path / "ckpt")


@pytest.mark.parametrize("args", [["--help"], ["-h"], ["carve_shakespeare", "-h", "--data_dir=nowhere", "--lr=fast"]])
def test_help_lists_every_key_with_its_default_and_comment(args):
    # help anywhere in argv wins over the config, the data and even a bad value: it reads none of them
    result = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "usage: python train.py [CONFIG] [--key=value ...]" in out and "configs/" in out
    for key, value in train.DEFAULTS.items():
        assert f"--{key}={value!r}" in out, key
    lines = out.splitlines()
    for key, comment in (("init_from", "'scratch' or 'resume' (from the newest good checkpoint in out_dir)"),  # from DEFAULTS
                         ("mixer", "comma-separated pattern repeated over the layers")):  # from ModelConfig
        assert any(f"--{key}=" in line and line.endswith(comment) for line in lines), (key, comment)
    assert "# optimiser: AdamW, linear warm-up then cosine from lr to min_lr over lr_decay_steps" in lines
    # a key's comment over two lines continues in the comment column, not as a group heading
    assert " " * 42 + "mqar_seed (prepare_data.mqar_examples), seq_len tokens each" in lines
    assert not any(line.startswith("#  ") for line in lines)


def test_no_config_file_means_the_default_run():
    default = train.load_config([train.DEFAULT_CONFIG])
    assert train.load_config([]) == default and default["d_model"] < train.DEFAULTS["d_model"]   # not the 1.3B
    assert train.load_config(["--max_steps=5"]) == {**default, "max_steps": 5}
    assert train.load_config(["mqar"])["eval_tokens"] == train.DEFAULTS["eval_tokens"] != default["eval_tokens"]


def test_lr_schedule_warmup_cosine_and_floor():
    c = {**train.DEFAULTS, "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 10, "max_steps": 100, "lr_decay_steps": 0}
    assert train.lr_at(0, c) == pytest.approx(1e-4)          # step 0 trains: (0 + 1) / warmup of lr
    assert train.lr_at(9, c) == pytest.approx(1e-3) == train.lr_at(10, c)
    assert train.lr_at(55, c) == pytest.approx(5.5e-4)       # half-way through the cosine: the mean
    assert train.lr_at(100, c) == pytest.approx(1e-4)
    extended = {**c, "max_steps": 300, "lr_decay_steps": 100}  # README: extend a run, keep its schedule
    assert [train.lr_at(s, extended) for s in range(100)] == [train.lr_at(s, c) for s in range(100)]
    assert all(train.lr_at(s, extended) == pytest.approx(1e-4) for s in (100, 101, 200, 299))


def test_atomic_write_leaves_the_old_file_when_the_writer_dies(tmp_path):
    path = tmp_path / "meta.json"
    path.write_text("old")

    def dies(tmp):
        open(tmp, "w").write("half")
        raise KeyboardInterrupt   # kill mid-write
    with pytest.raises(KeyboardInterrupt):
        train.atomic_write(str(path), dies)
    assert path.read_text() == "old"


def test_a_bool_is_not_an_int_key():
    with pytest.raises(SystemExit, match="'max_steps' in the command line must be int"):
        train.load_config(["--max_steps=True"])


def test_mqar_test_set_is_drawn_apart_from_the_training_set():
    config = train.load_config(["mqar", "--mqar_train_examples=200", "--mqar_test_examples=200"])
    (train_x, _), (test_x, _) = train.mqar_split(config, "train"), train.mqar_split(config, "test")
    seen = {row.tobytes() for row in train_x}
    assert not any(row.tobytes() in seen for row in test_x)


class FakeValData:
    """val windows of random bytes; the val split spells 3.3 bytes a token, train 1 (as BPE data may)."""
    meta = {"val": {"tokens": 300, "bytes": 1000}, "train": {"tokens": 1000, "bytes": 1000}}

    def val_windows(self, n):
        rows = torch.randint(0, 61, (n, 17), generator=torch.Generator().manual_seed(0))
        return [(r[:-1], r[1:]) for r in rows]


def test_val_bpb_is_from_the_val_splits_bytes_and_every_window_counts():
    torch.manual_seed(0)
    model = LM(tiny())
    config = {**train.DEFAULTS, "task": "lm", "seq_len": 16, "eval_tokens": 16 * 10, "micro_batch_size": 4}
    got = train.evaluate(model, FakeValData(), config, 0, 1, torch.device("cpu"), nullcontext())
    assert got["val_bpb"] == pytest.approx(got["val_loss"] / math.log(2) * 300 / 1000, rel=1e-12)
    windows = FakeValData().val_windows(10)
    with torch.no_grad():
        want = sum(model(x[None], y[None])[1].item() for x, y in windows) / 10
    assert got["val_loss"] == pytest.approx(want, rel=1e-5)   # all 10 windows, the last batch of 2 too


def test_every_training_window_lies_inside_train_bin(tmp_path):
    seq_len = 8
    meta = {"tokenizer": "byte", "vocab_size": 256, "dtype": "uint16", "eot": None, "val": {"tokens": 41, "bytes": 41}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    for split in ("train", "val"):   # 5 windows and one token: the last window's shift has no room
        np.arange(41, dtype=np.uint16).tofile(tmp_path / f"{split}.bin")
    data = train.TokenData(str(tmp_path), seq_len, seed=0)
    starts = [data.train_window_start(i) for i in range(50 * data.n_windows)]
    assert max(starts) + seq_len + 1 <= 41
    x, y = data.train_batch(0, 50 * data.n_windows)   # a short window would not stack
    assert x.shape[1] == seq_len


def test_accumulation_gives_the_gradient_of_the_whole_batch(shakespeare, tmp_path):
    """One micro-batch of 8 sequences against two of 4 (and four of 2): the same loss and gradient norm
    each step, so each micro-batch's loss is scaled by its share of the batch (AdamW would hide a gradient
    twice too large in the weights; its norm does not)."""
    common = ["carve_shakespeare", *TINY, f"--data_dir={shakespeare}", "--max_steps=3", "--eval_interval=3",
              "--device=cpu"]  # fp32: on a GPU, bf16 rounds micro-batches of other shapes apart (1e-4 in the norm)
    logs = {}
    for micro in (8, 4, 2):
        train_in_process([*common, f"--micro_batch_size={micro}", f"--out_dir={tmp_path / str(micro)}"])
        logs[micro] = [(r["loss"], r["grad_norm"]) for r in train_log(tmp_path / str(micro)) if "loss" in r]
    for micro in (4, 2):
        assert len(logs[micro]) == len(logs[8]) == 3
        for (loss, norm), (loss_one, norm_one) in zip(logs[micro], logs[8]):
            assert loss == pytest.approx(loss_one, rel=1e-5) and norm == pytest.approx(norm_one, rel=1e-4)
