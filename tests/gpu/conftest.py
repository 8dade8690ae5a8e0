"""Fixtures shared by the GPU tests."""
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

SMALL_VOCAB = 512


@pytest.fixture(scope="module")
def small_llama():
    """A 3-layer bf16 Llama on cuda (head dim 64, GQA 4) with random weights, attention "flashcore"."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=SMALL_VOCAB, hidden_size=512, intermediate_size=1024, num_hidden_layers=3,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
                         pad_token_id=0, bos_token_id=None, eos_token_id=None)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="flashcore", dtype=torch.bfloat16)
    return model.to("cuda").eval()


def agreement_lengths(a, b, prompt_len: int) -> list[int]:
    """Two generate() outputs (return_dict_in_generate): per row, the new tokens before the first difference (all of
    them when the row is identical)."""
    same = a.sequences[:, prompt_len:] == b.sequences[:, prompt_len:]
    return torch.where(same.all(1), same.shape[1], (~same).int().argmax(1)).tolist()


def diverge_only_at_near_ties(a, b, prompt_len: int, max_gap_std: float = 0.1) -> int:
    """Two greedy generate() outputs (return_dict_in_generate, output_logits): every row's tokens agree up to its first
    difference, which must be a near-tie of the two tokens' logits in both runs (gap < max_gap_std x the logits' std;
    test_hf_gpu.py allows 0.2 between two attention implementations). Returns the number of identical rows."""
    new_a, new_b = a.sequences[:, prompt_len:], b.sequences[:, prompt_len:]
    lengths = agreement_lengths(a, b, prompt_len)
    for row, t in enumerate(lengths):
        if t == new_a.shape[1]:
            continue
        for run in (a, b):
            logits = run.logits[t][row].float()
            gap = (logits[new_a[row, t]] - logits[new_b[row, t]]).abs().item()
            assert gap < max_gap_std * logits.std().item(), (row, t, gap)
    return sum(t == new_a.shape[1] for t in lengths)
