# The language-modelling comparison of docs/RESULTS.md (scripts/lm_study.py): byte-level models of about
# 12M parameters in their blocks on the King James Bible and Shakespeare's plays (README, "Offline
# machines": python prepare_data.py --source /tmp/kjv.txt shakespeare), validated on the last plays; about
# five epochs of the 8.2M training bytes with the best validation point reported (on a corpus this small
# a single pass would compare undertrained models, and the plays alone, 4.5M bytes, would need twice the
# epochs, over which the models overfit at different points).
# lm_study.py sets mixer, mlp_hidden (to equalise the parameters), lr, min_lr, seed and out_dir per run.
out_dir = "out/study_lm"
data_dir = "data/kjv_shakespeare_byte"

mixer = "carve"
n_layer = 6
d_model = 384
n_head = 3
head_k_dim = 128
head_v_dim = 128
mlp_hidden = 896
chunk_size = 64
content_rank = 16

seq_len = 512
micro_batch_size = 64
batch_tokens = 32768
max_steps = 1200            # 39M tokens, 4.8 epochs
warmup_steps = 60
lr = 2e-3
min_lr = 2e-4
weight_decay = 0.1

eval_interval = 100
eval_tokens = 262144
log_interval = 50
