# CARVE at 1.3B parameters, the recipe of README.md ("1.3B on GPUs"; 100B tokens of FineWeb-Edu, GPT-2 BPE).
#   python prepare_data.py --source fineweb --tokenizer gpt2 --fineweb_name sample-100BT --fineweb_tokens 100e9 \
#       --out_dir data/fineweb_edu_gpt2
#   torchrun --standalone --nproc_per_node=8 train.py configs/carve_1b3.py
out_dir = "out/carve_1b3"
data_dir = "data/fineweb_edu_gpt2"
tokenizer = "gpt2"
vocab_size = 50304

mixer = "carve"
n_layer = 18
d_model = 2304
n_head = 16
head_k_dim = 128
head_v_dim = 128
mlp_hidden = 6208
chunk_size = 64
content_rank = 16

seq_len = 4096
micro_batch_size = 4            # 4 x 4096 tokens per GPU per micro-step (fits an 80 GB card)
batch_tokens = 524288           # 0.5M tokens per optimiser step, whatever the number of GPUs
max_steps = 190735              # 100B tokens
warmup_steps = 1907             # 1B tokens
lr = 4e-4
min_lr = 4e-5
weight_decay = 0.1
grad_clip = 1.0

# torch.compile: 47,600 against 44,200 tokens/s eager for CARVE on one H200, both at 45.6 GiB peak
# (docs/BENCHMARKS.md, run 4 of 2026-12-03); the configs that execute this file inherit it
compile = True

eval_interval = 1000
eval_tokens = 4194304           # 1024 windows of 4096
log_interval = 10
