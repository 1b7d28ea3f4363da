"""Faults a long run meets, each injected on a tiny model on the CPU: corrupt and truncated checkpoints,
kill -9 at any moment (while a checkpoint is written too), non-finite losses, non-finite weights at a
save, and the figures a run prints around them."""
import glob
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import sample
import train
from model import LM, ModelConfig
from reference import ROOT, TINY_MODEL_ARGS, tiny, torchrun_train, train_in_process

TINY = [*TINY_MODEL_ARGS, "--seq_len=48", "--micro_batch_size=4", "--batch_tokens=192", "--warmup_steps=2",
        "--lr=3e-3", "--eval_tokens=192", "--log_interval=1"]


def train_run(args, capsys=None):
    train_in_process(args)
    return capsys.readouterr().out if capsys else None


def checkpoints(out_dir):
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(out_dir, "ckpt_*.pt")))


def corrupt(path, how):
    data = bytearray(open(path, "rb").read())
    if how == "random bytes":   # 4 KB in the middle: the zip still opens, the tensors are garbage
        middle = len(data) // 2
        data[middle:middle + 4096] = os.urandom(4096)
    else:                       # a copy cut short
        data = data[:len(data) // 2]
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("how", ["random bytes", "truncated"])
def test_corrupt_newest_checkpoint_falls_back(shakespeare, tmp_path, capsys, how):
    """The newest checkpoint damaged: resume and sample.py say so in one line and use the one before;
    the run then continues from that one exactly as the undamaged run would have."""
    out = str(tmp_path / "run")
    common = ["carve_shakespeare", *TINY, f"--data_dir={shakespeare}", f"--out_dir={out}", "--eval_interval=2"]
    train_run([*common, "--max_steps=4"])
    assert checkpoints(out) == ["ckpt_00000002.pt", "ckpt_00000004.pt"]
    good = torch.load(os.path.join(out, "ckpt_00000002.pt"), weights_only=True)
    corrupt(os.path.join(out, "ckpt_00000004.pt"), how)
    capsys.readouterr()
    sample.main(["--out_dir", out, "--device", "cpu", "--max_new_tokens=5", "--no_stream"])
    err = capsys.readouterr().err
    assert "ckpt_00000004.pt" in err and "trying an older checkpoint" in err and "(step 2)" in err
    printed = train_run([*common, "--max_steps=6", "--init_from=resume"], capsys)
    warnings = [line for line in printed.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "ckpt_00000004.pt is corrupt" in warnings[0], printed
    assert "resuming at step 2" in printed
    # the steps after the fallback equal a run that went 2 -> 6 from the good checkpoint
    ref = str(tmp_path / "ref")
    train_run(["carve_shakespeare", *TINY, f"--data_dir={shakespeare}", f"--out_dir={ref}", "--eval_interval=2",
               "--max_steps=6"])
    a = train.load_newest_checkpoint(out, log=lambda line: None)[0]["model"]
    b = train.load_newest_checkpoint(ref, log=lambda line: None)[0]["model"]
    assert all(torch.equal(a[k], b[k]) for k in a) and good["step"] == 2


def test_every_checkpoint_bad_is_one_line(shakespeare, tmp_path):
    out = str(tmp_path / "run")
    train_run(["carve_shakespeare", *TINY, f"--data_dir={shakespeare}", f"--out_dir={out}", "--max_steps=2",
               "--eval_interval=2"])
    corrupt(os.path.join(out, "ckpt_00000002.pt"), "truncated")
    with pytest.raises(SystemExit) as info:
        train.load_newest_checkpoint(out, log=lambda line: None)
    message = str(info.value)
    assert message.startswith("error: no good checkpoint in") and "\n" not in message


def test_a_checkpoint_of_another_model_py_is_one_line(shakespeare, tmp_path):
    """Parameters renamed since a checkpoint was saved: resuming and sampling stop with one line that names
    what does not fit, not torch's list of every key."""
    out = str(tmp_path / "run")
    common = ["carve_shakespeare", *TINY, f"--data_dir={shakespeare}", f"--out_dir={out}", "--eval_interval=2"]
    train_run([*common, "--max_steps=2"])
    path = os.path.join(out, "ckpt_00000002.pt")
    state = torch.load(path, weights_only=True)
    state["model"] = {name.replace("in_proj", "qkv_proj"): t for name, t in state["model"].items()}
    torch.save(state, path)
    record = json.load(open(path[:-3] + ".json"))
    json.dump({**record, "sha256": train.sha256_of(path)}, open(path[:-3] + ".json", "w"))
    for run in (lambda: train_run([*common, "--max_steps=3", "--init_from=resume"]),
                lambda: sample.main(["--out_dir", out, "--device", "cpu", "--max_new_tokens", "1"])):
        with pytest.raises(SystemExit) as info:
            run()
        message = str(info.value)
        assert "does not fit this model.py: it lacks 2 of this model's tensors (first: blocks.0.mixer.in_proj" \
            in message and "qkv_proj" in message and "\n" not in message


def test_weights_saved_through_a_wrapper_load():
    """A state dict saved from a torch.compile or DDP wrapper (names under `_orig_mod.` or `module.`) loads
    as the plain model's, the same tensors."""
    model, copy = (LM(tiny()) for _ in range(2))
    for prefix in ("_orig_mod.", "module.", "module._orig_mod."):
        train.load_weights(copy, {prefix + name: t for name, t in model.state_dict().items()}, "wrapped")
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), copy.state_dict().values()))
        copy.reset_parameters()


def test_only_the_newest_checkpoints_are_kept(shakespeare, tmp_path, capsys):
    out = str(tmp_path / "run")
    printed = train_run(["carve_shakespeare", *TINY, f"--data_dir={shakespeare}", f"--out_dir={out}",
                         "--max_steps=5", "--eval_interval=1", "--keep_checkpoints=2"], capsys)
    assert checkpoints(out) == ["ckpt_00000004.pt", "ckpt_00000005.pt"]
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(out, "ckpt_*.json"))) == \
        ["ckpt_00000004.json", "ckpt_00000005.json"]
    assert printed.count("checkpoint: ") == 5 and os.path.join(out, "ckpt_00000005.pt") in printed
    assert json.load(open(os.path.join(out, "meta.json")))["checkpoint"] == "ckpt_00000005.pt"


def test_kill_9_at_any_moment_leaves_a_loadable_checkpoint(shakespeare, tmp_path):
    """SIGKILL at random moments of a run that checkpoints every step (so some kills land inside a
    save): afterwards the newest good checkpoint loads and resume finishes the run."""
    out = str(tmp_path / "run")
    common = ["train.py", "carve_shakespeare", *TINY, f"--data_dir={shakespeare}", f"--out_dir={out}",
              "--max_steps=400", "--eval_interval=1", "--eval_tokens=48"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rng = random.Random(0)
    kills = 0
    for attempt in range(4):
        args = common + (["--init_from=resume"] if checkpoints(out) else [])
        proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while not checkpoints(out) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.0))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(timeout=60)
        checkpoint, record = train.load_newest_checkpoint(out, log=lambda line: None)
        assert checkpoint["step"] == record["step"] >= 1
    assert kills >= 3
    finish = subprocess.run([sys.executable, *common, "--max_steps=" + str(record["step"] + 2), "--init_from=resume"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert finish.returncode == 0, finish.stderr


def test_non_finite_steps_are_skipped_then_the_run_stops(shakespeare, tmp_path, capsys):
    """An absurd learning rate makes every loss after the first step non-finite: each such update is
    skipped and counted, the run stops after max_skipped_steps with one line and a non-zero exit, and
    no checkpoint with non-finite weights is written."""
    out = str(tmp_path / "run")
    args = ["train.py", "carve_shakespeare", *TINY, f"--data_dir={shakespeare}", f"--out_dir={out}",
            "--max_steps=20", "--eval_interval=1", "--lr=1e30", "--warmup_steps=1", "--max_skipped_steps=3"]
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    skipped = [line for line in result.stdout.splitlines() if "update skipped" in line]
    assert len(skipped) == 4, result.stdout
    assert result.stderr.strip().splitlines()[-1].startswith("error: 4 steps had a non-finite loss or gradient")
    assert "Traceback" not in result.stderr
    for name in checkpoints(out):
        state = torch.load(os.path.join(out, name), weights_only=True)
        assert not train.non_finite_tensors({"model": state["model"], "optimizer": state["optimizer"]})


def test_out_of_gpu_memory_is_one_line_that_says_what_would_work(shakespeare, tmp_path):
    """A backward that runs out of GPU memory (raised here by hand, with torch's wording) ends the run with
    one line: torch's numbers without its per-process list, and what to change. The newest checkpoint
    stays and resumes."""
    out = str(tmp_path / "run")
    args = ["carve_shakespeare", *TINY, f"--data_dir={shakespeare}", f"--out_dir={out}", "--eval_interval=2"]
    message = ("CUDA out of memory. Tried to allocate 1024.00 MiB. GPU 0 has a total capacity of 139.80 GiB of which "
               "14.44 MiB is free. Process 741 has 3.67 GiB memory in use. Of the allocated memory 1.22 GiB is "
               "allocated by PyTorch")
    run_out_of_memory_at_step_3 = f"""
import runpy, sys, torch
backward, calls = torch.Tensor.backward, []
def backward_until_step_3(*args, **kwargs):
    calls.append(1)
    if len(calls) > 2:
        raise torch.OutOfMemoryError({message!r})
    return backward(*args, **kwargs)
torch.Tensor.backward = backward_until_step_3
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""
    result = subprocess.run([sys.executable, "-c", run_out_of_memory_at_step_3, *args, "--max_steps=4"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: out of GPU memory (Tried to allocate 1024.00 MiB; GPU 0 has a total capacity of 139.80 GiB of which "
        "14.44 MiB is free); lower --micro_batch_size (gradient accumulation keeps batch_tokens, the batch of a "
        "step), set --activation_checkpointing=True, or run fewer jobs on this GPU; --init_from=resume continues "
        "from the newest checkpoint"]
    assert checkpoints(out) == ["ckpt_00000002.pt"]
    train_run([*args, "--max_steps=4", "--init_from=resume"])
    assert checkpoints(out)[-1] == "ckpt_00000004.pt"


def test_non_finite_weights_are_never_saved(tmp_path):
    config = {**train.DEFAULTS, "out_dir": str(tmp_path), "vocab_size": 64, "n_layer": 1, "d_model": 16,
              "n_head": 2, "head_k_dim": 8, "head_v_dim": 8, "mlp_hidden": 32, "chunk_size": 16, "content_rank": 2,
              "doc_start_token": -1}
    model = LM(ModelConfig(**{k: config[k] for k in train.MODEL_KEYS}))
    optimizer = torch.optim.AdamW(model.parameters())
    with torch.no_grad():
        model.head.weight[3, 2] = float("nan")
    with pytest.raises(SystemExit) as info:
        train.save_checkpoint(config, model, optimizer, 7, 0, None, {}, log=print)
    assert "not finite" in str(info.value) and "head.weight" in str(info.value)
    assert os.listdir(tmp_path) == []


def test_tokens_per_s_after_an_evaluation(shakespeare, tmp_path, capsys):
    """An evaluation between two log lines resets the timer and the token count together, so the
    next line reports the training rate (it once reported ~2.6x too much)."""
    out = str(tmp_path / "run")
    printed = train_run(["carve_shakespeare", *TINY, f"--data_dir={shakespeare}", f"--out_dir={out}",
                         "--max_steps=12", "--log_interval=4", "--eval_interval=6", "--eval_tokens=4800"], capsys)
    rates = {int(line.split()[1].split("/")[0]): float(line.split(" tok/s")[0].rsplit("| ", 1)[1].replace(",", ""))
             for line in printed.splitlines() if "tok/s" in line}
    assert rates[8] < 2.0 * rates[4] and rates[8] < 2.0 * rates[12], rates


def test_resume_with_a_longer_run_says_how_the_schedule_changes(shakespeare, tmp_path, capsys):
    out = str(tmp_path / "run")
    common = ["carve_shakespeare", *TINY, f"--data_dir={shakespeare}", f"--out_dir={out}", "--eval_interval=3"]
    train_run([*common, "--max_steps=3"])
    printed = train_run([*common, "--max_steps=6", "--init_from=resume"], capsys)
    assert "note: the learning-rate schedule changes: it decays over 6 steps, not 3" in printed
    assert "--lr_decay_steps=3 keeps it" in printed


def copy_data(shakespeare, to):
    os.makedirs(to)
    for name in ("meta.json", "train.bin", "val.bin"):
        open(os.path.join(to, name), "wb").write(open(os.path.join(shakespeare, name), "rb").read())
    return str(to)


@pytest.mark.parametrize("split", ["train", "val"])
def test_token_ids_past_the_vocabulary(shakespeare, tmp_path, split):
    """Random bytes in train.bin or val.bin (uint16 ids past the byte vocabulary): one line naming the
    file, before any training for val.bin and at the first batch that reads them for train.bin."""
    data = copy_data(shakespeare, tmp_path / "data")
    path = os.path.join(data, f"{split}.bin")
    raw = bytearray(open(path, "rb").read())
    for start in range(0, len(raw) - 8192, 65536):  # 8 KB of every 64 KB: every batch of a few windows meets some
        raw[start:start + 8192] = os.urandom(8192)
    open(path, "wb").write(bytes(raw))
    args = ["carve_shakespeare", *TINY, f"--data_dir={data}", f"--out_dir={tmp_path / 'out'}", "--max_steps=50",
            "--eval_interval=200"]
    result = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {path} holds token id") and "vocab_size 256" in last, result.stderr
    if split == "val":
        assert "step 1/" not in result.stdout  # stopped before training


@pytest.mark.parametrize("content, expected", [("{not json", "is not valid JSON"),
                                               ('{"tokenizer": "byte"}', "lacks or mangles vocab_size, dtype, val"),
                                               ('{"tokenizer": "byte", "vocab_size": 70000, "dtype": "uint16", '
                                                '"val": {}}', "cannot hold it")])
def test_bad_data_meta_json(shakespeare, tmp_path, content, expected):
    data = copy_data(shakespeare, tmp_path / "data")
    open(os.path.join(data, "meta.json"), "w").write(content)
    with pytest.raises(SystemExit) as info:
        train.main(["carve_shakespeare", *TINY, f"--data_dir={data}", f"--out_dir={tmp_path / 'out'}"])
    message = str(info.value)
    assert expected in message and os.path.join(data, "meta.json") in message and "\n" not in message


def test_one_line_config_errors(shakespeare, tmp_path):
    out = f"--out_dir={tmp_path / 'out'}"
    broken_config = tmp_path / "broken.py"
    broken_config.write_text("d_model = \n")
    failing_config = tmp_path / "failing.py"   # an error raised inside a library: the config's own line is named
    failing_config.write_text("import json\nd_model = json.loads('')\n")
    cases = [(["carve_shakespeare", "--mixer=carv", out], "unknown mixer 'carv'"),
             (["no_such_config_anywhere", out], "not found."),
             (["carve_shakespeare", "--chunk_size=0", out], "chunk_size=0: must be at least 1"),
             (["carve_shakespeare", "--mixer=carve,attn", "--attn_window=-1", out],
              "attn_window=-1: must be at least 0"),
             (["carve_shakespeare", "--dtype=float16", out], "dtype='float16': expected 'auto'"),
             (["carve_shakespeare", "--mixer=carve,attn", "--head_k_dim=15", out], "must be even"),
             (["carve_shakespeare", f"--data_dir={shakespeare}", "--batch_tokens=1000", out],
              "no micro_batch_size fits"),
             (["carve_shakespeare", f"--data_dir={shakespeare}", "--micro_batch_size=12", "--seq_len=128",
               "--batch_tokens=2048", out], "--micro_batch_size=8 or 4 or 2 or 1 fits"),
             (["carve_shakespeare", "--keep_checkpoints=0", out], "keep_checkpoints=0: must be at least 1"),
             (["carve_shakespeare", "--eval_interval=0", out], "eval_interval=0: must be at least 1"),
             (["carve_shakespeare", "--lr=-1", out], "lr=-1.0: must be at least 0"),
             (["carve_shakespeare", "--beta2=1.0", out], "each must be below 1"),
             (["carve_shakespeare", "--lr=1e-4", out], "min_lr=0.0003 is above lr=0.0001"),
             (["carve_shakespeare", "--out_dir="], "out_dir is empty"),
             (["mqar", "--mqar_pairs=0", out], "mqar_pairs=0: must be at least 1"),
             (["--max_steps=2", "carve_shakespeare", out], "comes after '--max_steps=2', and would undo it"),
             (["carve_shakespeare", "gdn2_shakespeare", out], "2 config files"),
             ([str(broken_config), out], f"config file {broken_config} failed: SyntaxError"),
             ([str(failing_config), out], f"failed: JSONDecodeError: Expecting value ({failing_config}, line 2)")]
    for args, fragment in cases:
        with pytest.raises(SystemExit) as info:
            train.main(args)
        message = str(info.value)
        assert fragment in message and "\n" not in message, message
    with pytest.raises(SystemExit) as info:
        train.main(["no_such_config_anywhere", out])
    assert "Did you mean" not in str(info.value)


def test_torchrun_error_is_printed_once(shakespeare, tmp_path):
    """Two ranks meet the same bad batch size: the message appears once, with what would work."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(torchrun_train(["carve_shakespeare", f"--data_dir={shakespeare}",
                                            f"--out_dir={tmp_path / 'out'}"]),
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    text = result.stdout + result.stderr
    assert text.count("error: batch_tokens=2048 must be a multiple") == 1, text
    assert "--micro_batch_size=8 or 4 or 2 or 1 fits" in text


def test_a_rank_that_dies_stops_the_run(shakespeare, tmp_path):
    """kill -9 of one of two gloo ranks mid-run: the run ends within a bounded time (torchrun stops the
    other rank; it does not hang in a collective), with a non-zero exit, and the newest checkpoint loads."""
    out = str(tmp_path / "out")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(torchrun_train(["carve_shakespeare", *TINY, f"--data_dir={shakespeare}", f"--out_dir={out}",
                                            "--batch_tokens=384", "--max_steps=100000", "--eval_interval=5",
                                            "--eval_tokens=96"]),
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while len(checkpoints(out)) < 2:
        assert proc.poll() is None and time.time() < deadline, "the run did not get going"
        time.sleep(0.1)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(workers[1]), signal.SIGKILL)
    killed_at = time.time()
    returncode = proc.wait(timeout=120)
    assert returncode != 0 and time.time() - killed_at < 120
    checkpoint, record = train.load_newest_checkpoint(out, log=lambda line: None)
    assert checkpoint["step"] == record["step"] >= 10


def test_a_stopped_torchrun_run_checkpoints_and_exits_with_the_signal(shakespeare, tmp_path):
    """SIGTERM to both gloo ranks (as a scheduler sends it): they stop at one step, rank 0 checkpoints it,
    and each rank exits 143, which torchrun reports; the run resumes from that step."""
    out = str(tmp_path / "out")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["carve_shakespeare", *TINY, f"--data_dir={shakespeare}", f"--out_dir={out}", "--batch_tokens=384",
            "--eval_interval=1000", "--eval_tokens=96", "--log_interval=1"]
    proc = subprocess.Popen(torchrun_train([*args, "--max_steps=100000"]), cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    log_path = os.path.join(out, "log.jsonl")
    while not (os.path.exists(log_path) and len(open(log_path).readlines()) >= 3):
        assert proc.poll() is None and time.time() < deadline, "the run did not get going"
        time.sleep(0.1)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    for worker in workers:
        os.kill(int(worker), signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "stopped at step" in stdout, stdout + stderr
    assert stderr.count("exitcode  : 143") == 2, stderr
    stopped = train.load_newest_checkpoint(out, log=lambda line: None)[1]["step"]
    assert stopped >= 3
    resumed = subprocess.run([sys.executable, "train.py", *args, f"--max_steps={stopped + 1}", "--init_from=resume"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0 and f"resuming at step {stopped}" in resumed.stdout, resumed.stderr


def test_sample_refuses_a_prompt_too_long(shakespeare, tmp_path, capsys):
    out = str(tmp_path / "run")
    train_run(["carve_shakespeare", *TINY, f"--data_dir={shakespeare}", f"--out_dir={out}", "--max_steps=1",
               "--eval_interval=1"])
    with pytest.raises(SystemExit) as info:
        sample.main(["--out_dir", out, "--device", "cpu", "--prompt", "x" * 101, "--max_prompt_tokens=100"])
    message = str(info.value.code)
    assert "a prompt is 101 tokens, more than --max_prompt_tokens=100 (the model trained on 48-token sequences)" \
        in message and "\n" not in message
