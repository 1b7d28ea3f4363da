# The Transformer baseline at the depth and width of carve_1b3: causal softmax attention with RoPE
# (SDPA) in every layer; same MLP, data and schedule.
import os
exec(open(os.path.join(os.path.dirname(__file__), "carve_1b3.py")).read())
out_dir = "out/transformer_1b3"
mixer = "attn"
