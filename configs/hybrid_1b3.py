# The paper's hybrid: CARVE layers alternating with 2K-window softmax attention (RoPE).
import os
exec(open(os.path.join(os.path.dirname(__file__), "carve_1b3.py")).read())
out_dir = "out/hybrid_1b3"
mixer = "carve,attn"
attn_window = 2048
