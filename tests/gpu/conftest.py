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


def diverge_only_at_near_ties(a, b, prompt_len: int, max_gap_std: float = 0.1) -> int:
    """Two greedy generate() outputs (return_dict_in_generate, output_logits): every row's tokens agree up to its first
    difference, which must be a near-tie of the two tokens' logits in both runs (gap < max_gap_std x the logits' std;
    test_hf_gpu.py allows 0.2 between two attention implementations). Returns the number of identical rows."""
    new_a, new_b = a.sequences[:, prompt_len:], b.sequences[:, prompt_len:]
    same = new_a == new_b
    for row in range(new_a.shape[0]):
        if same[row].all():
            continue
        t = int((~same[row]).int().argmax())
        for run in (a, b):
            logits = run.logits[t][row].float()
            gap = (logits[new_a[row, t]] - logits[new_b[row, t]]).abs().item()
            assert gap < max_gap_std * logits.std().item(), (row, t, gap)
    return int(same.all(1).sum())
