# MQAR, multi-query associative recall (the Zoology benchmark's recall task): 2 layers on examples of
# 256 tokens with 16 key-value pairs, vocabulary 8192, 100,000 training and 3,000 test examples that
# train.py makes from mqar_seed. Evaluation reports the fraction of queried values predicted exactly. Change the mixer, width, pairs and length with overrides:
#   python train.py mqar --mixer=gdn2 --d_model=256 --mqar_pairs=32 --lr=3e-3 --out_dir=out/mqar_gdn2
#   python eval.py --out_dir=out/mqar --task=mqar --mqar_pairs=32
task = "mqar"
out_dir = "out/mqar"
vocab_size = 8192
mqar_pairs = 16
mqar_train_examples = 100000
mqar_test_examples = 3000

mixer = "carve"
n_layer = 2
d_model = 128
n_head = 2
head_k_dim = 64
head_v_dim = 64
mlp_hidden = 256
chunk_size = 64
content_rank = 16

seq_len = 256
micro_batch_size = 64
batch_tokens = 65536        # 256 examples a step
max_steps = 4000            # about 10 epochs of the training set
warmup_steps = 200
lr = 1e-3
min_lr = 1e-4
weight_decay = 0.1

eval_interval = 500
log_interval = 50
