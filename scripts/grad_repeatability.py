"""
Is a training step repeatable to the bit on this machine? Runs the forward and backward of one micro-batch
several times from the same weights and lists every parameter whose gradient differs between the passes.
Two runs of one command can log the same losses only when nothing is listed: any difference, however small,
grows over the steps of a run (docs/RESULTS.md: with PyTorch's CUDA embedding backward, whose gradient alone
differed, by one part in a million, two identical runs on an H200 ended 100 steps 0.001 bits per byte apart;
with carve_kernel.embedding's ordered sum nothing is listed there and the two runs logged the same bits).

    python scripts/grad_repeatability.py study_lm                    # any train.py config and --key=value
    python scripts/grad_repeatability.py mqar --mixer=gdn2 --passes=5

It also compares the gradient arriving at each block's input, which says where a difference enters the
backward: when embed.weight's gradient differs but the one into block 0's input (the embedding's output)
does not, the embedding's own backward is the cause. Exits with status 1 when a gradient or the loss
differs, 0 when every pass gave the same bits.
"""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import train  # noqa: E402


def differing_gradients(passes):
    """[(name, largest difference from the first pass, largest |gradient|)] for each parameter whose gradient
    is not the same bits in every pass; passes: [{name: gradient}], one dict a pass."""
    first = passes[0]
    return [(name, max((other[name] - grad).abs().max().item() for other in passes[1:]), grad.abs().max().item())
            for name, grad in first.items() if not all(torch.equal(grad, other[name]) for other in passes[1:])]


def main(argv):
    if "-h" in argv or "--help" in argv:
        print(__doc__.strip())
        return
    passes = 3
    rest = []
    for arg in argv:
        if arg.startswith("--passes="):
            value = arg.split("=", 1)[1]
            if not value.isdigit():
                raise SystemExit(f"grad_repeatability.py: error: --passes takes a whole number, got {value!r}")
            passes = int(value)
        else:
            rest.append(arg)
    if passes < 2:
        raise SystemExit("grad_repeatability.py: error: --passes must be at least 2 (it compares passes)")
    config = train.load_config(rest)
    device = train.device_for(config["device"])
    data = train.load_data(config)
    model = train.initial_model(config).to(device)
    x, y = (t.to(device) for t in data.train_batch(0, config["micro_batch_size"]))
    autocast = train.autocast_for(config, device)
    # the gradient arriving at each block's input too: where a difference enters the backward, which runs from
    # the last block to the first (the input of block 0 is the embedding's output)
    arriving = {}

    def keep_input_gradient(name):
        def hook(module, args):
            if args[0].requires_grad:
                args[0].register_hook(lambda grad: arriving.__setitem__(name, grad.clone()))
        return hook
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(keep_input_gradient(f"gradient into blocks.{i}'s input"))
    losses, gradients = [], []
    for _ in range(passes):
        model.zero_grad(set_to_none=True)
        arriving.clear()
        with autocast:
            _, loss = model(x, y, sparse_targets=config["task"] != "lm")
        loss.backward()
        losses.append(loss.item())
        gradients.append({**{name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None},
                          **arriving})
    print(f"{config['mixer']} on {device}, {x.shape[0]} x {x.shape[1]} tokens, {passes} passes")
    print(f"loss: {'the same bits' if len(set(losses)) == 1 else 'differs'} in every pass ({losses[0]:.6f})")
    differing = differing_gradients(gradients)
    for name, difference, scale in differing:
        print(f"  {name}: largest difference {difference:.3e} (largest |gradient| {scale:.3e})")
    print(f"{len(gradients[0]) - len(differing)} of {len(gradients[0])} gradients the same bits in every pass "
          f"({len(gradients[0]) - len(arriving)} of parameters, {len(arriving)} into the blocks' inputs)")
    if differing or len(set(losses)) > 1:
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
