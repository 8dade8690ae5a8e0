"""Run by tests/test_tensor_parallel.py under torchrun: greedy generate() of a checkpoint split by transformers'
tensor parallelism (tp_plan="auto"), printing rank 0's tokens as JSON.

    torchrun --nproc-per-node 2 tests/distributed/tp_generate.py CHECKPOINT IMPLEMENTATION
"""
import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM
from transformers.distributed import DistributedConfig

import flashcore_hf

checkpoint, implementation = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(checkpoint, attn_implementation=implementation, dtype=torch.float32,
                                             distributed_config=DistributedConfig(tp_plan="auto"))
ids = torch.randint(1, model.config.vocab_size, (3, 11), generator=torch.Generator().manual_seed(1))
mask = torch.ones_like(ids)
mask[1, :4] = 0                                                # a left-padded row
with torch.no_grad():
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                         return_dict_in_generate=True)
cache = getattr(out, flashcore_hf.CACHE_KWARG)
if int(os.environ.get("RANK", "0")) == 0:
    heads = None
    if isinstance(cache, flashcore_hf.PagedKVCache):
        heads = cache.layers[0].pools.num_kv_heads            # the rank's local kv heads
    print(json.dumps({"tokens": out.sequences[:, ids.shape[1]:].tolist(), "cache": type(cache).__name__,
                      "local_kv_heads": heads}))
# Leave without the interpreter's teardown: with torch 2.13's gloo, destroying the process group or running the exit
# handlers aborts a rank now and then ("terminate called without an active exception", 2-3 runs in 24, sdpa as well
# as flashcore), after the work is done. Both ranks finish their output first.
sys.stdout.flush()
sys.stderr.flush()
if torch.distributed.is_initialized():
    torch.distributed.barrier()
os._exit(0)
