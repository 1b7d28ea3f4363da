# The embedded default: a small byte-level CARVE on Shakespeare's plays. Trains on 2 CPU cores in a
# few minutes to text that looks like a play.
#   python prepare_data.py && python train.py configs/carve_shakespeare.py && python sample.py
out_dir = "out/carve_shakespeare"
data_dir = "data/shakespeare_byte"

mixer = "carve"
n_layer = 4
d_model = 128
n_head = 4
head_k_dim = 32
head_v_dim = 32
mlp_hidden = 384
chunk_size = 32
content_rank = 8

seq_len = 128
micro_batch_size = 16
batch_tokens = 2048
max_steps = 600
warmup_steps = 30
lr = 3e-3
min_lr = 3e-4
weight_decay = 0.1

eval_interval = 200
eval_tokens = 32768
log_interval = 25
