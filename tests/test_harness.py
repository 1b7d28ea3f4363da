"""eval.py's lm-evaluation-harness adapter: its three request types against the same numbers computed
from plain forward passes (with max_length, over the windows and cut contexts lm-eval's own functions
give), its reading of generation settings, and lm-eval's simple_evaluate on three local tasks (a
multiple choice, a perplexity and a generation task) through it, on CPU."""
import json
import math
from types import SimpleNamespace

import pytest
import torch

from eval import HarnessAdapter, generation_settings, harness_model
from model import LM
from prepare_data import ByteTokenizer
from reference import perturb, tiny
from sample import generate


@pytest.fixture(scope="module")
def adapter():
    """Full context (no max_length), long texts in pieces of 7 tokens (not a multiple of chunk_size)."""
    torch.manual_seed(0)
    model = perturb(LM(tiny("carve,attn", vocab_size=256, chunk_size=8))).eval()
    return HarnessAdapter(model, ByteTokenizer(), torch.autocast("cpu", enabled=False), piece_tokens=7)


def windowed(adapter, max_length, **kw):
    return HarnessAdapter(adapter.model, adapter.tokenizer, adapter.autocast, max_length=max_length, **kw)


def lm_eval_utils():
    try:
        import lm_eval.utils
    except ImportError:
        pytest.fail("lm-eval is not installed; the README's test set-up installs it: pip install lm-eval==0.4.13")
    return lm_eval.utils


def requests(*args):
    return [SimpleNamespace(args=a) for a in args]


def plain_logprobs(adapter, ids):
    """log-softmax of one full forward over ids (no cache): row t predicts ids[t + 1]."""
    with torch.no_grad():
        return torch.log_softmax(adapter.model(torch.tensor([ids]))[0][0].float(), dim=-1)


def test_loglikelihood_from_the_shared_context_state(adapter):
    """Three continuations of one context (run once, then as one batch of copies of its state), one of
    another context and one of an empty context: each as log p and greedy from a full forward."""
    asked = requests(("ROMEO: what", " light"), ("ROMEO: what", " is it"), ("ROMEO: what", "?"),
                     ("To be", ", or not to be"), ("", "Hello"))
    got = adapter.loglikelihood(asked)
    newline = ByteTokenizer().encode("\n")
    for (context, continuation), (logprob, greedy) in zip((r.args for r in asked), got):
        context_ids, continuation_ids = list(context.encode()), list(continuation.encode())
        logprobs = plain_logprobs(adapter, newline + context_ids + continuation_ids)
        first = len(newline) + len(context_ids) - 1
        rows = logprobs[first:first + len(continuation_ids)]
        want = float(rows[torch.arange(len(continuation_ids)), continuation_ids].sum())
        assert logprob == pytest.approx(want, rel=1e-5, abs=1e-5)
        assert greedy == bool((rows.argmax(-1) == torch.tensor(continuation_ids)).all())
    # the greedy next byte of a context (an ASCII one, so that it is a string of its own) is greedy
    best = {c: int(plain_logprobs(adapter, newline + list(c.encode()))[-1].argmax()) for c in ("To be", "A", "B", "C")}
    context, byte = next((c, b) for c, b in best.items() if b < 128)
    assert adapter.loglikelihood(requests((context, chr(byte))))[0][1] is True


def test_loglikelihood_rolling_scores_every_token_on_one_state(adapter):
    """A 30-byte text in pieces of 7 tokens equals one forward over all of it: nothing truncated."""
    text = "Now is the winter of our disco"
    ids = ByteTokenizer().encode("\n") + list(text.encode())
    logprobs = plain_logprobs(adapter, ids)
    want = float(logprobs[torch.arange(len(ids) - 1), ids[1:]].sum())
    assert adapter.loglikelihood_rolling(requests((text,)))[0] == pytest.approx(want, rel=1e-5)


def test_loglikelihood_batches_and_edge_cases(adapter):
    """Continuations of one context in batches of a few tokens score as in one batch; an empty
    continuation beside others scores (0.0, True); a context's trailing space moves to its continuation,
    as lm-eval moves it."""
    asked = requests(*(("", f" {word}") for word in ("cat", "dog", "a", "horse", "be", "x")), ("abc", ""),
                     ("abc", "de"))
    whole = adapter.loglikelihood(asked)
    small = HarnessAdapter(adapter.model, adapter.tokenizer, adapter.autocast, batch_tokens=5).loglikelihood(asked)
    assert [g for _, g in small] == [g for _, g in whole]
    assert [lp for lp, _ in small] == pytest.approx([lp for lp, _ in whole], rel=1e-5)
    assert whole[6] == (0.0, True) and whole[7][0] < 0
    assert adapter.loglikelihood(requests(("Answer: ", "yes")))[0] == adapter.loglikelihood(requests(("Answer:", " yes")))[0]


def test_loglikelihood_cuts_the_context_to_max_length(adapter):
    """With max_length 12, context and continuation but its last token are cut from the left to 12
    tokens, as lm-eval's HuggingFace model cuts them: the score is that of a plain forward over them."""
    cut = windowed(adapter, 12)
    asked = requests(("ROMEO: what light through yonder", " window"), ("ROMEO: what light through yonder", " is"),
                     ("short", " one"))
    newline = ByteTokenizer().encode("\n")
    for (context, continuation), (logprob, greedy) in zip((r.args for r in asked), cut.loglikelihood(asked)):
        ids = (newline + list(context.encode()) + list(continuation.encode()))[-13:]
        n = len(continuation.encode())
        logprobs = plain_logprobs(adapter, ids[:-1])[-n:]
        want = float(logprobs[torch.arange(n), ids[-n:]].sum())
        assert logprob == pytest.approx(want, rel=1e-5, abs=1e-5)
        assert greedy == bool((logprobs.argmax(-1) == torch.tensor(ids[-n:])).all())


@pytest.mark.parametrize("max_length", [5, 8, 13, 30, 40])
def test_loglikelihood_rolling_in_the_harness_windows(adapter, max_length):
    """With max_length, a text's score is the sum over lm-eval's own disjoint rolling windows
    (get_rolling_token_windows, make_disjoint_window), each scored by a plain forward: texts shorter and
    longer than a window, a multiple of it and not."""
    utils = lm_eval_utils()
    newline = ByteTokenizer().encode("\n")
    texts = ["Now is the winter of our disco", "To be", "", "All the world's a stage, and all the men"]
    got = windowed(adapter, max_length, piece_tokens=7).loglikelihood_rolling(requests(*((t,) for t in texts)))
    for text, score in zip(texts, got):
        want = 0.0
        for context, continuation in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                list(text.encode()), newline[0], max_length, 1)):
            ids = (context + continuation)[-(max_length + 1):]
            logprobs = plain_logprobs(adapter, ids[:-1])[-len(continuation):]
            want += float(logprobs[torch.arange(len(continuation)), continuation].sum())
        assert score == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_generation_settings_as_lm_eval_reads_them():
    assert generation_settings({"until": ["\n", ""], "max_gen_toks": "6"}) == (["\n"], 6, 0.0, None, None)
    assert generation_settings({"until": "Q:", "max_new_tokens": 5}) == (["Q:"], 5, 0.0, None, None)
    assert generation_settings({"max_gen_toks": 3, "max_new_tokens": 9})[1] == 3
    assert generation_settings({}) == ([], 256, 0.0, None, None)
    assert generation_settings({"do_sample": False, "temperature": 0.7})[2] == 0.0
    assert generation_settings({"temperature": 0.7, "top_p": 0.9, "top_k": 40}) == ([], 256, 0.7, 40, 0.9)


def test_generate_until_cuts_at_the_first_stop_string(adapter):
    context = "KING:"
    full = adapter.tokenizer.decode(generate(adapter.model, ByteTokenizer().encode("\n" + context), 12, temperature=0))
    stop = full[3:5]
    got = adapter.generate_until(requests((context, {"until": [stop, "\x00never"], "max_gen_toks": 12}),
                                          (context, {"until": "\x00never", "max_gen_toks": 12})))
    assert got == [full[:full.index(stop)], full]


def test_generate_until_batches_and_stops_early(adapter, monkeypatch):
    """Prompts of several lengths and settings, generated in batches of 2 rows: each is what generate()
    gives it alone, cut; a row ends at its stop string rather than at max_gen_toks; with max_length the
    prompt keeps its last max_length - max_gen_toks tokens."""
    contexts = ["KING:", "ROMEO: what", "To be", "A"]
    full = {c: adapter.tokenizer.decode(generate(adapter.model, ByteTokenizer().encode("\n" + c), 12, temperature=0))
            for c in contexts}
    stops = [full[c][4:6] for c in contexts]
    asked = requests(*((c, {"until": stops, "max_gen_toks": 12}) for c in contexts),
                     ("KING:", {"until": "\x00never", "max_new_tokens": 12}))
    made = []
    import eval as eval_module
    real = eval_module.generate_samples
    monkeypatch.setattr(eval_module, "generate_samples", lambda *a, **kw: made.append(real(*a, **kw)) or made[-1])
    got = HarnessAdapter(adapter.model, adapter.tokenizer, adapter.autocast, generation_rows=2).generate_until(asked)
    assert got == [full[c][:min(full[c].index(s) for s in stops if s in full[c])] for c in contexts] + [full["KING:"]]
    assert [len(rows) for rows in made] == [2, 2, 1]
    assert max(len(ids) for rows in made[:2] for ids in rows) < 12   # stopped at the stop string
    cut = windowed(adapter, 16).generate_until(requests(("ROMEO: what light", {"max_gen_toks": 12})))
    assert cut == [adapter.tokenizer.decode(generate(adapter.model, list(b"ROMEO: what light")[-4:], 12, temperature=0))]
    with pytest.raises(ValueError, match="asks for 16 new tokens, which leaves no context within max_length=16"):
        windowed(adapter, 16).generate_until(requests(("KING:", {"max_gen_toks": 16})))


@pytest.mark.parametrize("max_length", [None, 12])
def test_simple_evaluate_runs_local_tasks(adapter, tmp_path, monkeypatch, max_length):
    """lm-eval's own evaluator through the adapter on three tasks made of local JSON files: the accuracy
    of a multiple choice, a text's bits per byte, a generation's exact match, each as computed here; with
    full context and with eval.py's default, windows of max_length."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        pytest.fail("lm-eval is not installed; the README's test set-up installs it: pip install lm-eval==0.4.13")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    questions = [("ROMEO: what", ["light", "is it", "?"], 1), ("To be", [", or not", "so"], 0)]
    texts = ["Now is the winter of our discontent", "All the world's a stage"]
    files = {"choice": [{"question": q, "choices": c, "answer": a} for q, c, a in questions],
             "text": [{"text": t} for t in texts],
             "gen": [{"question": "KING:", "answer": "x"}]}
    for name, rows in files.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = "dataset_path: json\ntest_split: test\n"
    (tmp_path / "choice.yaml").write_text(
        f"task: carve_choice\n{common}dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'choice.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n")
    (tmp_path / "text.yaml").write_text(
        f"task: carve_text\n{common}dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'text.jsonl'}\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: bits_per_byte\n")
    (tmp_path / "gen.yaml").write_text(
        f"task: carve_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'gen.jsonl'}\n"
        "output_type: generate_until\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 6\nmetric_list:\n  - metric: exact_match\n")
    model = harness_model(adapter.model, adapter.tokenizer, adapter.autocast, max_length)
    adapter = adapter if max_length is None else windowed(adapter, max_length)   # the expected numbers
    evaluated = lm_eval.simple_evaluate(model=model, tasks=["carve_choice", "carve_text", "carve_gen"],
                                        task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True)
    results = evaluated["results"]
    # the harness joins context and choice with its target delimiter, a space
    scores = [[adapter.loglikelihood(requests((q, " " + choice)))[0][0] for choice in c] for q, c, _ in questions]
    for sample in evaluated["samples"]["carve_choice"]:
        got = [float(response[0][0]) for response in sample["resps"]]
        assert got == pytest.approx(scores[sample["doc_id"]], rel=1e-6)
    picked = [max(range(len(s)), key=s.__getitem__) for s in scores]
    want_acc = sum(p == a for p, (_, _, a) in zip(picked, questions)) / len(questions)
    assert results["carve_choice"]["acc,none"] == pytest.approx(want_acc)
    nats = -sum(adapter.loglikelihood_rolling(requests(*((t,) for t in texts))))
    want_bpb = nats / math.log(2) / sum(len(t.encode()) for t in texts)
    assert results["carve_text"]["bits_per_byte,none"] == pytest.approx(want_bpb, rel=1e-6)
    # the harness's own response, generated with a newline (double-quoted in the YAML) as its stop string
    generated = adapter.generate_until(requests(("KING:", {"until": ["\n"], "max_gen_toks": 6})))[0]
    assert evaluated["samples"]["carve_gen"][0]["resps"] == [[generated]]
    assert results["carve_gen"]["exact_match,none"] == float(generated.strip() == "x")


def test_progress_lines(capsys):
    from eval import Progress
    progress = Progress("loglikelihood", 8, seconds=0.0)
    progress(3)
    assert capsys.readouterr().err.startswith("  loglikelihood: 3 of 8 requests, ")
    quiet = Progress("loglikelihood", 8, seconds=3600.0)
    quiet(3)
    assert capsys.readouterr().err == ""
