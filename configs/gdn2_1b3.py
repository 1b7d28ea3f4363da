# GDN-2, the baseline, at 1.3B: exactly the carve_1b3 recipe with the gdn2 mixer, so the mixer is
# the only difference between the two runs.
#   torchrun --standalone --nproc_per_node=8 train.py configs/gdn2_1b3.py
import os
exec(open(os.path.join(os.path.dirname(__file__), "carve_1b3.py")).read())
out_dir = "out/gdn2_1b3"
mixer = "gdn2"
