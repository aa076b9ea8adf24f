"""Tensor parallelism on ``torch.distributed``: one model sharded over K GPUs (NCCL, launched by ``torchrun``),
or over K CPU processes (gloo, for tests).

::

    # torchrun --nproc-per-node 2 generate.py
    import torch, flash_llm
    from flash_llm.parallel import init_tensor_parallel, load_tensor_parallel
    from flash_llm.engine import Engine

    with init_tensor_parallel() as tp:                         # NCCL on cuda:LOCAL_RANK, gloo on CPU
        model, report = load_tensor_parallel("opt-13b/", tp, sparsify=flash_llm.SparsifyConfig())
        print(report)                                          # this rank's slices: nonzeros, bytes
        out = Engine(model, max_batch=8, max_seq=512).generate(prompts, 64)   # same call on every rank

Megatron-style: q/k/v and gate/up/fc1 split by output features (whole heads), o/out_proj and down/fc2 by input
features followed by one all-reduce; embeddings, norms and ``lm_head`` replicated; each rank compresses only its
own slices.  ``docs/parallel.md`` has the details and the torchrun commands.
"""

from .checkpoint import load_tensor_parallel
from .group import TensorParallel, init_tensor_parallel
from .layers import ColumnParallelLinear, RowParallelLinear, ShardReport, check_divisible, tensor_parallel_

__all__ = ["init_tensor_parallel", "TensorParallel", "ColumnParallelLinear", "RowParallelLinear",
           "tensor_parallel_", "load_tensor_parallel", "ShardReport", "check_divisible"]
