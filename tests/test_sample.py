"""sample.py: the cached decode equals repeated full forwards, the sampling knobs, the CLI end to end."""
import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from model import LM, ModelConfig  # noqa: E402
from prepare_data import get_tokenizer  # noqa: E402
import sample  # noqa: E402
from sample import generate, main, sample_next  # noqa: E402
import train  # noqa: E402

TINY = dict(vocab_size=256, n_layer=2, d_model=32, n_head=2, head_k_dim=8, head_v_dim=8, mlp_hidden=64,
            chunk_size=8, mixer="carve,attn")
PROMPT = "ROMEO:\nWhat light"  # 17 bytes: not a multiple of chunk_size, so prefill ends mid-chunk


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny ops: extra threads only add overhead, and on a busy 2-core machine BLAS threads spinning
    against another process made this file 4x slower. Restored afterwards for the other test files."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(seed=0):
    """A tiny hybrid LM with every parameter perturbed: a fresh CARVE has U = 0 (content gate off) and a
    zero write-gate projection, which would hide decode bugs in those paths. At this scale the greedy
    choice depends on the content gate (see the control below); the top-2 logit margins along the
    greedy path are >= 0.18 against cached-vs-full differences of ~3e-4."""
    torch.manual_seed(seed)
    model = LM(ModelConfig(**TINY))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    return model.eval()


def save_run(out_dir, model, tokenizer="byte"):
    """A run directory in the layout train.py writes."""
    os.makedirs(out_dir, exist_ok=True)
    model_config = dict(TINY, **{k: getattr(model.cfg, k) for k in TINY})
    path = os.path.join(out_dir, "ckpt_00000007.pt")
    torch.save({"model": model.state_dict(), "optimizer": {}, "step": 7, "data_position": 0, "rng": {},
                "config": {"out_dir": str(out_dir)}, "model_config": model_config}, path)
    with open(os.path.join(out_dir, "ckpt_00000007.json"), "w") as f:
        json.dump({"checkpoint": "ckpt_00000007.pt", "sha256": train.sha256_of(path), "model_config": model_config,
                   "tokenizer": tokenizer, "data_dir": "data/none", "step": 7, "val_loss": 3.21, "val_bpb": None}, f)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("run")
    save_run(out_dir, tiny_model())
    return out_dir


def run_cli(*args):
    env = dict(os.environ, PYTHONIOENCODING="utf-8", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "sample.py", *args], cwd=REPO, env=env, capture_output=True,
                          timeout=120)


def greedy_by_full_forward(model, ids, n):
    """Greedy decode the slow way: a full forward (no cache) over the whole sequence for every token."""
    ids, out = list(ids), []
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(torch.tensor([ids]))
            out.append(int(logits[0, -1].argmax()))
            ids.append(out[-1])
    return out


def test_cached_greedy_equals_full_forward():
    model = tiny_model()
    prompt = list(PROMPT.encode())
    n = 30  # decode crosses several chunk boundaries (chunk_size 8) from a mid-chunk prefill
    assert generate(model, prompt, n, temperature=0) == greedy_by_full_forward(model, prompt, n)
    # a one-token prompt prefills through the per-token path instead of the chunk path
    assert generate(model, prompt[:1], n, temperature=0) == greedy_by_full_forward(model, prompt[:1], n)
    # control: the content gate (U D m, carried across chunks in the decode state) changes the greedy
    # text of this model, so a decode that lost or misplaced it would fail the check above
    with torch.no_grad():
        model.blocks[0].mixer.content_up.zero_()
    assert generate(model, prompt, n, temperature=0) != greedy_by_full_forward(tiny_model(), prompt, n)


def test_top_k_1_and_tiny_top_p_are_greedy():
    model = tiny_model()
    prompt = list(PROMPT.encode())
    greedy = generate(model, prompt, 20, temperature=0)
    gen = torch.Generator().manual_seed(0)
    assert generate(model, prompt, 20, temperature=1.5, top_k=1, generator=gen) == greedy
    assert generate(model, prompt, 20, temperature=1.5, top_p=1e-6, generator=gen) == greedy


def test_sampling_is_seeded_and_varies():
    model = tiny_model()
    prompt = list(PROMPT.encode())

    def sample(seed):
        return generate(model, prompt, 40, temperature=1.0, generator=torch.Generator().manual_seed(seed))
    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


def test_sample_next_filters():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    gen = torch.Generator().manual_seed(0)

    def draws(**kw):
        return {int(sample_next(logits, 1.0, generator=gen, **kw)) for _ in range(300)}
    assert draws() == {0, 1, 2, 3}
    assert draws(top_k=2) == {0, 1}
    assert draws(top_p=0.7) == {0, 1}       # 0.5 < 0.7, 0.5 + 0.3 >= 0.7: the nucleus is {0, 1}
    assert draws(top_p=0.5) == {0}          # exactly reached by the first token
    assert draws(top_k=3, top_p=0.99) == {0, 1, 2}
    assert int(sample_next(logits, 0.0)) == 0


def test_eot_and_vocab_limit():
    model = tiny_model()
    prompt = list(PROMPT.encode())
    greedy = generate(model, prompt, 20, temperature=0)
    stop = greedy[5]
    assert generate(model, prompt, 20, temperature=0, eot=stop) == greedy[:greedy.index(stop)]
    # ids >= vocab_size are never produced (a model's vocab is often padded past the tokenizer's)
    limited = generate(model, prompt, 50, temperature=2.0, top_k=None, vocab_size=10,
                       generator=torch.Generator().manual_seed(0))
    assert len(limited) == 50 and max(limited) < 10


def test_cli_streams_the_seeded_continuation(run_dir):
    max_new = 64
    args = ["--out_dir", str(run_dir), "--prompt", PROMPT, "--max_new_tokens", str(max_new), "--device", "cpu"]
    first = run_cli(*args, "--seed", "5")
    assert first.returncode == 0, first.stderr.decode()
    text = first.stdout.decode("utf-8")

    # the same continuation in-process: byte tokenizer, so exactly max_new_tokens new bytes, decoded with
    # errors="replace" (a random model writes plenty of invalid UTF-8)
    tokenizer = get_tokenizer("byte")
    new_ids = generate(tiny_model(), list(PROMPT.encode()), max_new, temperature=0.8, top_k=200, top_p=1.0,
                       generator=torch.Generator().manual_seed(5), eot=tokenizer.eot,
                       vocab_size=tokenizer.vocab_size)
    assert len(new_ids) == max_new
    assert text == PROMPT + bytes(new_ids).decode("utf-8", errors="replace") + "\n"
    stderr = first.stderr.decode()
    assert "step 7" in stderr and "3.2100" in stderr and "tokens/s" in stderr

    again = run_cli(*args, "--seed", "5")
    assert again.returncode == 0 and again.stdout == first.stdout
    other = run_cli(*args, "--seed", "6")
    assert other.returncode == 0 and other.stdout != first.stdout


def test_cli_missing_checkpoint(tmp_path):
    missing = tmp_path / "no_such_run"
    result = run_cli("--out_dir", str(missing), "--device", "cpu")
    assert result.returncode != 0
    message = result.stderr.decode()
    assert str(missing) in message and "train.py" in message
    assert result.stdout == b""


def test_main_errors(tmp_path, run_dir):
    # run directory present but without a checkpoint
    with pytest.raises(SystemExit) as e:
        main(["--out_dir", str(tmp_path), "--device", "cpu"])
    assert f"no checkpoint in {str(tmp_path)!r}" in str(e.value.code)
    with pytest.raises(SystemExit) as e:
        main(["--out_dir", str(run_dir), "--prompt", "", "--device", "cpu"])
    assert "empty" in str(e.value.code)
    bad = tmp_path / "bad_tokenizer"
    save_run(bad, tiny_model(), tokenizer="no_such_tokenizer")
    with pytest.raises(SystemExit) as e:
        main(["--out_dir", str(bad), "--device", "cpu"])
    assert "no_such_tokenizer" in str(e.value.code)
    with pytest.raises(SystemExit, match="--device=gpu is not a device"):
        main(["--out_dir", str(run_dir), "--device", "gpu"])
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"caf\xe9\n")
    with pytest.raises(SystemExit, match=r"latin.txt' is not UTF-8 text \(byte 0xe9 at offset 3\)"):
        main(["--out_dir", str(run_dir), "--prompt_file", str(latin), "--device", "cpu"])


def test_main_no_stream_and_num_samples(run_dir, tmp_path, capsys):
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text(PROMPT, encoding="utf-8")
    common = ["--out_dir", str(run_dir), "--prompt_file", str(prompt_file), "--max_new_tokens", "12",
              "--device", "cpu", "--temperature", "0"]
    main(common)
    streamed = capsys.readouterr().out
    main(common + ["--no_stream", "--num_samples", "2"])
    both = capsys.readouterr().out
    assert both == streamed + "---------------\n" + streamed  # greedy: both samples are the same


def test_batched_samples_equal_single_ones():
    """generate_samples runs the samples as one batch: greedy, every row equals the one-sample run; a
    row that samples eot ends alone while the others go on; sampled rows differ from each other and
    repeat with the seed."""
    from sample import generate_samples
    model = tiny_model()
    prompt = [3, 1, 4, 1, 5]
    single = generate(model, prompt, 25, temperature=0)
    assert generate_samples(model, prompt, 3, 25, temperature=0) == [single] * 3
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    rows = generate_samples(model, prompt, 4, 30, temperature=1.5, generator=gen())
    assert rows == generate_samples(model, prompt, 4, 30, temperature=1.5, generator=gen())
    assert len({tuple(r) for r in rows}) > 1
    stop = rows[0][3]
    cut = generate_samples(model, prompt, 4, 30, temperature=1.5, generator=gen(), eot=stop)
    for row, full in zip(cut, rows):  # each row is its uncut self up to its own first eot
        assert row == (full[:full.index(stop)] if stop in full else full)


def test_generation_steps_once_a_token_and_at_most_once_past_eot(monkeypatch):
    """The next step runs while the host reads a step's ids (sample.ids_to_host): none after the last
    token of max_new_tokens, and one whose ids are dropped after a row's eot ends the batch."""
    from sample import generate_samples
    model = tiny_model()
    lengths, forward = [], model.forward
    monkeypatch.setattr(model, "forward", lambda ids, **kw: lengths.append(ids.shape[1]) or forward(ids, **kw))
    first = generate_samples(model, [3, 1, 4, 1, 5], 1, 12, temperature=0)[0]
    assert lengths == [5] + [1] * 11
    lengths.clear()
    stop = first.index(first[6])   # its first occurrence
    assert generate_samples(model, [3, 1, 4, 1, 5], 1, 12, temperature=0, eot=first[6]) == [first[:stop]]
    assert lengths == [5] + [1] * (stop + 1)


def test_main_reports_generated_tokens(run_dir, capsys):
    main(["--out_dir", str(run_dir), "--max_new_tokens", "9", "--device", "cpu", "--num_samples", "3",
          "--temperature", "1.0"])
    captured = capsys.readouterr()
    assert captured.out.count("---------------\n") == 2
    report = captured.err.strip().splitlines()[-1]
    assert report.startswith("3 samples in one batch: 27 new tokens") and "decode" in report, report


def test_sample_next_draws_from_the_distribution():
    """The exponential race draws each token with its probability, and never one of probability 0."""
    logits = torch.tensor([[0.5, 0.3, 0.2, 0.0]]).log().expand(40000, 4)
    ids = sample_next(logits, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(ids, minlength=4).double() / len(ids)
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.2, 0.0], dtype=torch.float64), atol=0.01), freq
    assert freq[3] == 0


def test_prompts_of_different_lengths_run_as_they_would_alone():
    """Prompts of 3, 11 and 11 tokens, two samples each, greedy: the 11s are prefilled together, the 3's rows
    decode eight steps on their own (crossing a chunk of 8) and then join them. Every row equals its
    prompt's run alone, and the rows come back prompt by prompt."""
    from sample import generate_samples
    model = tiny_model()
    prompts = [[154, 149, 63], [104, 147, 227, 46, 197, 162, 123, 148, 94, 96, 95],
               [215, 20, 132, 248, 207, 155, 244, 183, 111, 71, 144]]
    alone = [generate(model, prompt, 14, temperature=0) for prompt in prompts]
    assert len(set(map(tuple, alone))) == 3
    assert generate_samples(model, prompts, 2, 14, temperature=0) == [ids for ids in alone for _ in range(2)]
    assert generate_samples(model, [[3, 1, 4]], 1, 0) == [[]]


def test_cli_several_prompts_in_one_batch(run_dir, capsys):
    common = ["--out_dir", str(run_dir), "--max_new_tokens", "10", "--device", "cpu", "--temperature", "0"]
    alone = []
    for prompt in ("ROMEO:", "What light"):
        main(common + ["--prompt", prompt])
        alone.append(capsys.readouterr().out)
    main(common + ["--prompt", "ROMEO:", "--prompt", "What light", "--num_samples", "2"])
    captured = capsys.readouterr()
    assert captured.out == "---------------\n".join([alone[0], alone[0], alone[1], alone[1]])
    assert "prompts: 2 of" in captured.err and "4 samples in one batch" in captured.err


def test_compiled_step_generates_the_plain_tokens():
    """generate_samples with the decode step through torch.compile gives the plain step's tokens for the
    same seed (the hybrid: a recurrent and an attention layer; 30 tokens cross chunks of 8, so the
    compiled step meets the chunk-finishing path too)."""
    from sample import generate_samples
    model = tiny_model()
    gen = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    plain = generate_samples(model, [3, 1, 4, 1, 5], 2, 30, temperature=0.9, generator=gen())
    torch._dynamo.reset()   # a fresh compile: past dynamo's recompile limit the step would run as is
    assert generate_samples(model, [3, 1, 4, 1, 5], 2, 30, temperature=0.9, generator=gen(), compile=True) == plain


if torch.cuda.is_available():  # CUDA graphs need a GPU: collected there only
    @pytest.mark.parametrize("mixer", ["carve", "gdn2", "attn", "carve,attn"])
    @pytest.mark.parametrize("temperature", [0.0, 0.8], ids=["greedy", "sampled"])
    def test_cuda_graph_step_generates_the_plain_tokens(monkeypatch, mixer, temperature):
        """generate_samples with the step replayed from CUDA graphs (both kinds: 40 tokens cross chunks
        of 8 five times) gives the tokens of the plain step, for the same seed, in a batch of 3 under bf16
        autocast: the same kernels on the same inputs."""
        from reference import perturb, tiny
        from sample import generate_samples
        model = perturb(LM(tiny(mixer, head_k_dim=16, head_v_dim=16, vocab_size=256))).cuda().eval()
        replays = []
        real_replay = torch.cuda.CUDAGraph.replay
        monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda graph: replays.append(1) or real_replay(graph))
        runs = []
        for graph in (False, True):
            gen = torch.Generator(device="cuda").manual_seed(3)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                runs.append(generate_samples(model, [5, 9, 2, 7, 1], 3, 40, temperature, top_k=50, top_p=0.95,
                                             generator=gen, cuda_graph=graph))
        assert len(replays) >= 30 and runs[1] == runs[0]

    @pytest.mark.parametrize("mixer", ["carve", "gdn2", "attn", "carve,attn"])
    def test_compiled_graph_step_computes_the_plain_logits(mixer):
        """The compiled step replayed from CUDA graphs gives the plain step's logits, fed the same tokens
        (40 steps, crossing chunks of 8 five times, batch 3, bf16 autocast). Logits, not tokens: Inductor
        fuses the bf16 glue in another order, so they differ in their last bits, which can flip a greedy
        choice between two near-equal logits of a random model (seen on an H200). The tokens are fixed in
        advance and read, like the logits are written, at a step counter on the device, so the graph
        replays them."""
        from reference import assert_rel, perturb, tiny
        from sample import decode_step
        model = perturb(LM(tiny(mixer, head_k_dim=16, head_v_dim=16, vocab_size=256))).cuda().eval()
        steps, batch = 40, 3
        # step i reads tokens[i] and "picks" tokens[i + 1]
        tokens = torch.randint(0, 256, (steps + 1, batch), generator=torch.Generator().manual_seed(5)).cuda()
        runs = []
        for graph, compile in ((False, False), (True, True)):
            torch._dynamo.reset()   # a fresh compile: past dynamo's recompile limit the step would run as is
            logits = torch.full((steps, batch, 256), float("nan"), device="cuda")
            counter = torch.zeros(1, dtype=torch.long, device="cuda")

            def teacher(step_logits):
                logits.index_copy_(0, counter, step_logits[:, -1].float()[None])
                counter.add_(1)
                return tokens.index_select(0, counter)[0]

            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                cache = model.init_cache(batch, "cuda", max_len=steps + 5, dtype=torch.bfloat16)
                model(torch.tensor([[5, 9, 2, 7, 1]] * batch, device="cuda"), cache=cache)
                step = decode_step(model, cache, teacher, cuda_graph=graph, compile=compile)
                ids = tokens[0]
                for _ in range(steps):
                    ids = step(ids)
            runs.append(logits.clone())
        # 3e-2: the four mixers' logits differed by at most 8e-3 on an H200 (2026-12-03); one teacher token
        # changed at step 20 moves them by 0.2-0.4
        assert_rel(runs[1], runs[0], 3e-2, f"compiled graph step logits {mixer}")


def test_a_bpe_prompt_starts_with_eot(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", os.environ.get("CARVE_BPE_CACHE", ".bpe"))
    save_run(tmp_path, tiny_model(), tokenizer="gpt2")
    seen = []
    monkeypatch.setattr(sample, "generate_samples",
                        lambda model, prompts, *a, **k: seen.append(prompts) or [[] for _ in prompts])
    main(["--out_dir", str(tmp_path), "--prompt", "Hello world", "--max_new_tokens", "1", "--device", "cpu"])
    assert seen == [[[50256, 15496, 995]]]   # as prepare_data.py starts every document


def test_temperature_divides_the_logits():
    """A draw at temperature T is the exponential race over softmax(logits / T) with the same draws."""
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 3
    for temperature in (0.5, 2.0):
        got = sample_next(logits, temperature, generator=torch.Generator().manual_seed(1))
        race = torch.empty(3, 50).exponential_(generator=torch.Generator().manual_seed(1))
        assert torch.equal(got, (torch.softmax(logits / temperature, -1) / race).argmax(-1))
