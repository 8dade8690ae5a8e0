"""Train the tiny Llama-style key-value retrieval model that tests/test_sparse_retrieval.py evaluates.

Task (key-value record lookup). The vocabulary has NUM_KEYS key tokens and NUM_KEYS * NUM_VALUES record tokens; a
record token (k, v) stores value v under key k. A sequence is

    BOS  r_1 r_2 ... r_N  SEP  k_1 a_1  k_2 a_2 ... k_Q a_Q

with records of N distinct keys (random order, random values), then queries: key token k_j, answered by the record
a_j of the context that holds key k_j. The loss is on the answers only. Each value is uniform over NUM_VALUES, so an
answer is right by chance with probability 1 / NUM_VALUES; beyond that the model must attend to the one context
position holding the queried key, wherever it is. A sparse policy that drops that position's page gets it wrong.

Training runs on the CPU in a few minutes (fp32, SDPA): context sizes grow from short (the lookup forms fast there)
to the evaluation's EVAL_RECORDS. The model is saved in float16 (about 1.2 MB) with `save_pretrained`:

    python scripts/train_retrieval_model.py --out tests/data/retrieval_llama
"""
from __future__ import annotations

import argparse
import math
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

PAD, BOS, SEP = 0, 1, 2
NUM_KEYS, NUM_VALUES = 256, 8
KEY0 = 3                          # key (query) tokens: KEY0 + k
RECORD0 = KEY0 + NUM_KEYS         # record tokens: RECORD0 + k * NUM_VALUES + v
VOCAB_SIZE = RECORD0 + NUM_KEYS * NUM_VALUES
EVAL_RECORDS = NUM_KEYS           # evaluation contexts hold a record of every key


def model_config() -> LlamaConfig:
    """2 layers, hidden 128, 4 query / 2 kv heads of 32 (grouped-query, like the models flashcore targets), RoPE
    base 500000 as in Llama 3 (most rotary pairs turn slowly, as in long-context models)."""
    return LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=1024,
                       rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=BOS, eos_token_id=SEP,
                       pad_token_id=PAD)


def make_batch(batch: int, num_records: int, num_queries: int, generator: torch.Generator):
    """(tokens [batch, 2 + num_records + 2 * num_queries] int64, answer_columns [num_queries]).

    The answer a_j sits at column answer_columns[j] and is predicted from the key token just before it.
    Keys are distinct within a sequence; the queried keys are distinct, drawn uniformly from the context's.
    """
    keys = torch.rand(batch, NUM_KEYS, generator=generator).argsort(dim=1)[:, :num_records]
    values = torch.randint(0, NUM_VALUES, (batch, num_records), generator=generator)
    records = RECORD0 + keys * NUM_VALUES + values
    asked = torch.rand(batch, num_records, generator=generator).argsort(dim=1)[:, :num_queries]
    queries = torch.stack([KEY0 + keys.gather(1, asked), records.gather(1, asked)], dim=2).reshape(batch, -1)
    column = lambda value: torch.full((batch, 1), value)  # noqa: E731
    tokens = torch.cat([column(BOS), records, column(SEP), queries], dim=1)
    return tokens, torch.arange(num_records + 3, tokens.shape[1], 2)


def train(steps: int, tokens_per_step: int, seed: int, weight_decay: float, log_every: int = 100) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = LlamaForCausalLM(model_config()).float()
    model.config._attn_implementation = "sdpa"
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=weight_decay, betas=(0.9, 0.98))
    warmup = 100
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps))))
    start = time.time()
    for step in range(steps):
        # Short contexts first (the lookup forms within a few hundred steps there), then up to EVAL_RECORDS.
        top = 64 if step < steps // 4 else EVAL_RECORDS
        num_records = int(torch.randint(8, top + 1, (1,), generator=generator))
        num_queries = min(num_records, 64)
        rows = max(2, tokens_per_step // (num_records + 2 * num_queries + 2))
        tokens, answers = make_batch(rows, num_records, num_queries, generator)
        logits = model(tokens).logits[:, answers - 1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB_SIZE), tokens[:, answers].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % log_every == 0 or step == steps - 1:
            accuracy = (logits.argmax(-1) == tokens[:, answers]).float().mean().item()
            print(f"step {step:5d}  records {num_records:3d}  loss {loss.item():.4f}  accuracy {accuracy:.3f}  "
                  f"{time.time() - start:.0f}s", flush=True)
    return model


@torch.no_grad()
def dense_accuracy(model: LlamaForCausalLM, num_prompts: int, seed: int) -> float:
    """Answer accuracy at EVAL_RECORDS records, teacher-forced in one forward (full attention)."""
    tokens, answers = make_batch(num_prompts, EVAL_RECORDS, 16, torch.Generator().manual_seed(seed))
    logits = model(tokens).logits
    return (logits[:, answers - 1].argmax(-1) == tokens[:, answers]).float().mean().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="tests/data/retrieval_llama")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--tokens-per-step", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    args = parser.parse_args()
    model = train(args.steps, args.tokens_per_step, args.seed, args.weight_decay)
    model.eval()
    print(f"dense accuracy at {EVAL_RECORDS} records (held-out seed): {dense_accuracy(model, 64, args.seed + 1):.3f}")
    model.half().save_pretrained(args.out)
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
