"""scripts/grad_repeatability.py: which gradients differ between passes over one batch, and its exit status."""
import re

import pytest
import torch

import model as model_module
from reference import TINY_MODEL_ARGS, load_script

TINY = [*TINY_MODEL_ARGS, "--seq_len=32", "--micro_batch_size=2", "--device=cpu"]


def test_differing_gradients_lists_only_what_changed():
    script = load_script("grad_repeatability")
    same, moved = torch.ones(3), torch.tensor([1.0, 1.0, 1.0 + 2 ** -20])
    passes = [{"a": same, "b": same}, {"a": same.clone(), "b": same.clone()}, {"a": same.clone(), "b": moved}]
    assert script.differing_gradients(passes) == [("b", 2 ** -20, 1.0)]


def test_a_cpu_step_repeats_and_an_unrepeatable_one_is_named(shakespeare, capsys, monkeypatch):
    script = load_script("grad_repeatability")
    argv = ["carve_shakespeare", f"--data_dir={shakespeare}", *TINY]
    script.main(argv)   # returns: exit status 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"(\d+) of \1 gradients the same bits in every pass \(\d+ of parameters, 2 into the "
                        r"blocks' inputs\)", last), last
    forward, calls = model_module.LM.forward, []

    def drifting(self, *args, **kwargs):   # each pass adds a different multiple of one weight to the loss
        logits, loss = forward(self, *args, **kwargs)
        calls.append(None)
        return logits, loss + len(calls) * 1e-3 * self.embed.weight.sum()
    monkeypatch.setattr(model_module.LM, "forward", drifting)
    with pytest.raises(SystemExit) as stop:
        script.main(argv)
    assert stop.value.code == 1
    out = capsys.readouterr().out
    assert "loss: differs" in out and "  embed.weight: largest difference" in out
    assert out.count("largest difference") == 1   # the gradients into the blocks' inputs are the same bits
    monkeypatch.setattr(model_module.LM, "forward", forward)
    block_forward, blocks_run = model_module.Block.forward, []

    def scaled(self, x, *args, **kwargs):   # a pass-dependent scale on every block's input
        blocks_run.append(None)
        return block_forward(self, x * (1 + len(blocks_run) * 2 ** -20), *args, **kwargs)
    monkeypatch.setattr(model_module.Block, "forward", scaled)
    with pytest.raises(SystemExit):
        script.main(argv)
    assert "  gradient into blocks.0's input: largest difference" in capsys.readouterr().out


def test_one_pass_is_refused():
    with pytest.raises(SystemExit, match="--passes must be at least 2"):
        load_script("grad_repeatability").main(["--passes=1"])


def test_help_prints_the_usage_and_trains_nothing(capsys):
    load_script("grad_repeatability").main(["--help"])
    assert "python scripts/grad_repeatability.py study_lm" in capsys.readouterr().out
