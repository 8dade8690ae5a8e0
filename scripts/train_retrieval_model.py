"""Train the tiny Llama-style key-value retrieval model that tests/test_sparse_retrieval.py evaluates.

Task (key-value record lookup). The vocabulary has num_keys key tokens and num_keys * NUM_VALUES record tokens; a
record token (k, v) stores value v under key k. A sequence is

    BOS  r_1 r_2 ... r_N  SEP  k_1 a_1  k_2 a_2 ... k_Q a_Q

with records of N distinct keys (random order, random values), then queries: key token k_j, answered by the record
a_j of the context that holds key k_j. The loss is on the answers only. Each value is uniform over NUM_VALUES, so an
answer is right by chance with probability 1 / NUM_VALUES; beyond that the model must attend to the one context
position holding the queried key, wherever it is. A sparse policy that drops that position's page gets it wrong.

Training runs on the CPU (fp32, SDPA): context sizes grow from short (the lookup forms fast there) to the
evaluation's records. The models are saved in float16 with `save_pretrained`:

    python scripts/train_retrieval_model.py --out tests/data/retrieval_llama          # 256 keys, head dim 32: minutes
    python scripts/train_retrieval_model.py --out tests/data/retrieval_llama_1k --keys 1024 --head-dim 64 \
        --heads 2 --kv-heads 1 --steps 3000 --tokens-per-step 4096                      # 1K-token contexts: ~30 min
    python scripts/train_retrieval_model.py --out tests/data/retrieval_llama_4k --keys 4096 --head-dim 64 \
        --heads 2 --kv-heads 1 --hidden 64 --steps 4000 --tokens-per-step 8192          # 4K-token contexts: ~45 min

Evaluating sparse policies on a saved model (dense, streaming, topk with the bounds or the key signs, each alone and
with rerank=4, at budgets of 1/4 .. 1/32):

    python scripts/train_retrieval_model.py --evaluate tests/data/retrieval_llama_4k [--device cuda --dtype bfloat16]
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM

PAD, BOS, SEP = 0, 1, 2
NUM_VALUES = 8
KEY0 = 3                          # key (query) tokens: KEY0 + k


@dataclass(frozen=True)
class RetrievalTask:
    """The task at one size and the model trained on it. num_keys: distinct keys (an evaluation context holds a record
    of each, so it is num_keys + 2 tokens long); head_dim, heads, kv_heads: the attention shape (64 / 128 let the CUDA
    kernels run; 32 is CPU-only)."""

    num_keys: int = 256
    head_dim: int = 32
    heads: int = 4
    kv_heads: int = 2
    hidden: int = 128

    @property
    def record0(self) -> int:     # record tokens: record0 + k * NUM_VALUES + v
        return KEY0 + self.num_keys

    @property
    def vocab_size(self) -> int:
        return self.record0 + self.num_keys * NUM_VALUES

    @property
    def eval_records(self) -> int:
        return self.num_keys

    @classmethod
    def of_model(cls, config: LlamaConfig) -> "RetrievalTask":
        """The task a saved model was trained on (from its config)."""
        return cls((config.vocab_size - KEY0) // (1 + NUM_VALUES), config.head_dim, config.num_attention_heads,
                   config.num_key_value_heads, config.hidden_size)

    def model_config(self) -> LlamaConfig:
        """2 layers, hidden 128 (or `hidden`), grouped-query heads (like the models flashcore targets), RoPE base
        500000 as in Llama 3 (most rotary pairs turn slowly, as in long-context models)."""
        return LlamaConfig(vocab_size=self.vocab_size, hidden_size=self.hidden, intermediate_size=2 * self.hidden,
                           num_hidden_layers=2,
                           num_attention_heads=self.heads, num_key_value_heads=self.kv_heads, head_dim=self.head_dim,
                           max_position_embeddings=max(1024, 2 * self.num_keys), rope_theta=500000.0,
                           tie_word_embeddings=True, bos_token_id=BOS, eos_token_id=SEP, pad_token_id=PAD)

    def make_batch(self, batch: int, num_records: int, num_queries: int, generator: torch.Generator):
        """(tokens [batch, 2 + num_records + 2 * num_queries] int64, answer_columns [num_queries]).

        The answer a_j sits at column answer_columns[j] and is predicted from the key token just before it.
        Keys are distinct within a sequence; the queried keys are distinct, drawn uniformly from the context's.
        """
        keys = torch.rand(batch, self.num_keys, generator=generator).argsort(dim=1)[:, :num_records]
        values = torch.randint(0, NUM_VALUES, (batch, num_records), generator=generator)
        records = self.record0 + keys * NUM_VALUES + values
        asked = torch.rand(batch, num_records, generator=generator).argsort(dim=1)[:, :num_queries]
        queries = torch.stack([KEY0 + keys.gather(1, asked), records.gather(1, asked)], dim=2).reshape(batch, -1)
        column = lambda value: torch.full((batch, 1), value)  # noqa: E731
        tokens = torch.cat([column(BOS), records, column(SEP), queries], dim=1)
        return tokens, torch.arange(num_records + 3, tokens.shape[1], 2)

    def curriculum(self, step: int, steps: int) -> int:
        """Most records a training step's contexts hold: short first (the lookup forms fast there), then longer."""
        if self.eval_records <= 256:
            return 64 if step < steps // 4 else self.eval_records
        if self.eval_records <= 1024:
            return 64 if step < steps // 8 else (256 if step < steps // 3 else self.eval_records)
        return 64 if step < steps // 8 else (256 if step < steps // 4 else
                                             (1024 if step < steps // 2 else self.eval_records))


def logits_at_answers(model: LlamaForCausalLM, tokens: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """Logits [B, len(answers), vocab] that predict each answer column (a full-attention forward; the vocabulary
    projection only at those positions: over a 37K vocabulary, full logits of long contexts take tens of GB)."""
    return model.lm_head(model.model(tokens).last_hidden_state[:, answers - 1])


def train(task: RetrievalTask, steps: int, tokens_per_step: int, seed: int, weight_decay: float,
          log_every: int = 100) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = LlamaForCausalLM(task.model_config()).float()
    model.config._attn_implementation = "sdpa"
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=weight_decay, betas=(0.9, 0.98))
    warmup = 100
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps))))
    start = time.time()
    for step in range(steps):
        top = task.curriculum(step, steps)
        num_records = int(torch.randint(8, top + 1, (1,), generator=generator))
        num_queries = min(num_records, 64)
        rows = max(2, tokens_per_step // (num_records + 2 * num_queries + 2))
        tokens, answers = task.make_batch(rows, num_records, num_queries, generator)
        logits = logits_at_answers(model, tokens, answers)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, task.vocab_size),
                                                 tokens[:, answers].reshape(-1))
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
def dense_accuracy(task: RetrievalTask, model: LlamaForCausalLM, num_prompts: int, seed: int) -> float:
    """Answer accuracy at task.eval_records records, teacher-forced in one forward (full attention)."""
    tokens, answers = task.make_batch(num_prompts, task.eval_records, 16, torch.Generator().manual_seed(seed))
    right = 0.0
    for rows in tokens.split(8):                  # a few prompts at a time: activations of 4K contexts add up
        logits = logits_at_answers(model, rows, answers)
        right += (logits.argmax(-1) == rows[:, answers]).float().sum().item()
    return right / (tokens.shape[0] * len(answers))


# ---- evaluating sparse policies on a trained model (tests/test_sparse_retrieval.py, --evaluate) ----------------

POLICIES = {
    "streaming": dict(policy="streaming"),
    "topk": dict(policy="topk"),                                          # Quest bounds
    "topk_rerank": dict(policy="topk", rerank=4),                          # bounds, then the exact second stage
    "topk_signs": dict(policy="topk", scoring="signs"),                   # key sign bits refine the bounds
    "topk_signs_rerank": dict(policy="topk", scoring="signs", rerank=4),
}
"""Sparse policies an evaluation compares with dense: name -> SparseConfig options (rerank=4: the bounds' or the
signs' 4 x budget best pages, then their keys' exact scores keep the budget)."""


def sparse_config(policy: str, budget: int):
    """flashcore SparseConfig of `policy` (a POLICIES name) with a token budget: 1 sink token, 1 recent token, both
    layers sparse (the models have only two)."""
    import flashcore_hf as fc

    return fc.SparseConfig(token_budget=budget, sink_tokens=1, recent_tokens=1, dense_layers=0, **POLICIES[policy])


@torch.no_grad()
def answer_logits(model, tokens, answers, sparse, page_size: int, context: int) -> torch.Tensor:
    """Logits after each queried key, [B, len(answers), vocab], of flashcore decoding: prefill the first `context`
    tokens (BOS + records + SEP) densely into a PagedKVCache of `page_size` pages, then decode step j on
    [a_{j-1}, k_j] (the previous answer, teacher forced, and the next key; k_1 alone), where the sparse policy
    (`sparse`, None: dense) picks the pages."""
    import flashcore_hf as fc

    cache = fc.PagedKVCache(model.config, page_size=page_size, sparse=sparse)
    # logits_to_keep=1: only the last position's logits are used (the prefill's not at all), and the lm_head over
    # every prompt position was most of this function's CPU time.
    model(tokens[:, :context], logits_to_keep=1, **{fc.CACHE_KWARG: cache})
    logits, start = [], context
    for column in answers.tolist():
        logits.append(model(tokens[:, start:column], logits_to_keep=1, **{fc.CACHE_KWARG: cache}).logits[:, -1])
        start = column
    return torch.stack(logits, dim=1)


def answer_accuracy(model, prompts, sparse, page_size: int, context: int) -> float:
    """Fraction of right answers (prompts: make_batch's (tokens, answer columns))."""
    tokens, answers = prompts
    tokens = tokens.to(model.device)
    logits = answer_logits(model, tokens, answers, sparse, page_size, context)
    return (logits.argmax(-1) == tokens[:, answers]).float().mean().item()


def policy_table(model, task: RetrievalTask, prompts, page_size: int, fractions) -> dict:
    """{("dense", 1): accuracy, (policy, fraction): accuracy at a budget of context // fraction tokens, or None where
    that budget cannot hold the sink page plus the pages of a two-token step (flashcore then reads every page: the
    number would be dense's)."""
    from flashcore_hf.sparse.selection import step_is_sparse

    context = task.eval_records + 2
    table = {("dense", 1): answer_accuracy(model, prompts, None, page_size, context)}
    for policy in POLICIES:
        for fraction in fractions:
            config = sparse_config(policy, context // fraction)
            sparse = step_is_sparse(config, 2, -(-context // page_size) + 1, page_size)
            table[(policy, fraction)] = answer_accuracy(model, prompts, config, page_size, context) if sparse else None
    return table


def print_policy_table(table: dict, task: RetrievalTask, page_size: int, fractions, prompts_desc: str) -> None:
    context = task.eval_records + 2
    print(f"retrieval accuracy, {prompts_desc}, context {context} tokens ({-(-context // page_size)} pages of "
          f"{page_size}), chance {1 / NUM_VALUES:.3f}")
    print(f"{'policy':18s} " + " ".join(f"{'1/' + str(f) + ' (' + str(context // f) + ')':>12s}" for f in fractions))
    print(f"{'dense':18s} " + " ".join(f"{table[('dense', 1)]:12.3f}" for _ in fractions))
    for policy in POLICIES:
        cells = [table[(policy, f)] for f in fractions]
        print(f"{policy:18s} " + " ".join(f"{'n/a':>12s}" if c is None else f"{c:12.3f}" for c in cells))
    if any(value is None for value in table.values()):
        print("n/a: the budget cannot hold the sink page plus a two-token step's pages (such steps read every page)")


def evaluate(path: str, page_size: int, fractions, num_prompts: int, num_queries: int, seed: int,
             device: str, dtype: torch.dtype = torch.float32) -> dict:
    """The policy table of the model saved at `path`, on held-out prompts (weights cast to dtype: bfloat16 on
    CUDA runs flashcore's kernels, which take 16-bit inputs)."""
    import flashcore_hf  # noqa: F401  (registers attn_implementation="flashcore")

    model = LlamaForCausalLM.from_pretrained(path, attn_implementation="flashcore", dtype=dtype)
    model = model.to(device).eval()
    task = RetrievalTask.of_model(model.config)
    prompts = task.make_batch(num_prompts, task.eval_records, num_queries, torch.Generator().manual_seed(seed))
    table = policy_table(model, task, prompts, page_size, fractions)
    print_policy_table(table, task, page_size, fractions,
                       f"{num_prompts} prompts x {num_queries} queries, {device} {str(dtype).removeprefix('torch.')}")
    return table


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="tests/data/retrieval_llama")
    parser.add_argument("--keys", type=int, default=256, help="distinct keys = records in an evaluation context")
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128, help="hidden size (the embedding is vocab x hidden)")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--tokens-per-step", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--evaluate", metavar="DIR", help="evaluate the model saved in DIR instead of training: "
                        "dense, streaming, topk and topk + rerank at budgets of 1/4 to 1/32 of the context")
    parser.add_argument("--page-size", type=int, default=16, help="with --evaluate")
    parser.add_argument("--prompts", type=int, default=16, help="with --evaluate")
    parser.add_argument("--device", default="cpu", help="with --evaluate")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="with --evaluate (bfloat16 on CUDA runs flashcore's kernels)")
    args = parser.parse_args()
    if args.evaluate:
        evaluate(args.evaluate, args.page_size, (4, 8, 16, 32), args.prompts, 16, 20261201, args.device,
                 getattr(torch, args.dtype))
        return
    task = RetrievalTask(args.keys, args.head_dim, args.heads, args.kv_heads, args.hidden)
    model = train(task, args.steps, args.tokens_per_step, args.seed, args.weight_decay)
    model.eval()
    model.half().save_pretrained(args.out)
    print(f"saved to {args.out}")
    print(f"dense accuracy at {task.eval_records} records (held-out seed): "
          f"{dense_accuracy(task, model.float(), 64, args.seed + 1):.3f}")


if __name__ == "__main__":
    main()
