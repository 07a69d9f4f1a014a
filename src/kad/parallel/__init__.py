"""Tensor parallelism on the fast path, on torch.distributed (NCCL on GPUs, gloo on CPUs).

``tensor_parallel=N`` shards the **base** over N ranks, Megatron-style: attention by heads
(each rank holds its q heads, its KV heads and its slice of the KV pool) and the MLP by columns
(gate/up), then rows (o, down), with one all-reduce after each block's output product
(`kad.parallel.shard`, `kad.fast.llama.layer_forward`). The output head is replicated, so every
rank computes the full logits the rules read, with no gather.

The **proxy** (and the proxy's base) stays whole on every rank: it runs γ + 1 sequential steps a
round at decode batch sizes, where two all-reduces per layer per step would cost more than
reading its ~1-3 GB of weights; whole, a draft step needs no collective at all.

By part: `group` (checking N, the process groups, launching or spawning the ranks), `shard` (a
rank's tensors), `runtime` (a rank's runners, and the driver every rank follows).
"""
