# The GDN-2 baseline on the embedded default: carve_shakespeare with the gdn2 mixer, nothing else changed.
#   python train.py configs/gdn2_shakespeare.py && python sample.py --out_dir=out/gdn2_shakespeare
import os
exec(open(os.path.join(os.path.dirname(__file__), "carve_shakespeare.py")).read())
out_dir = "out/gdn2_shakespeare"
mixer = "gdn2"
