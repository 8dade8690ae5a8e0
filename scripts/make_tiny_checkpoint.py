"""Build a tiny Llama checkpoint with its own tokenizer, offline, for the example and its test.

    python scripts/make_tiny_checkpoint.py /tmp/tiny-llama
    python examples/long_context_generate.py --model /tmp/tiny-llama --prompt-file notes.txt --question "Who?"

The tokenizer is a BPE trained here with the `tokenizers` library on a small built-in text (plus the files given with
--corpus); it is saved with a chat template (role markers around each message, then the assistant marker), so the
example's chat-template path runs. The model is a random Llama (4 layers, hidden 64, 2 query heads / 1 KV head of 32
dims; four layers so that sparse page selection, which keeps the first two layers dense, has layers to act on): its
answers are noise (random subwords), but every shape, dtype and special token is real, and `from_pretrained` loads
both like any hub checkpoint. It takes about a second.
"""
from __future__ import annotations

import argparse
import os

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"]
PAD, BOS, EOS, UNK = SPECIAL_TOKENS[:4]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
CORPUS = """\
The harbour office opens at seven in the morning and closes at five in the evening, except on public holidays.
Ships longer than eighty metres must request a pilot two hours before they enter the channel.
The pilot boat is painted orange and carries the call sign Kestrel; it answers on channel twelve.
In March the office recorded 214 arrivals, 198 departures and three groundings, none of them serious.
Question: When does the harbour office open? Answer: At seven in the morning.
Question: What is the call sign of the pilot boat? Answer: Kestrel.
Cargo manifests are filed by the agent of each vessel, who signs them and keeps a copy for twelve months.
The tide tables for the year were prepared by Ines Moreau and approved by the harbour master, Tomas Lindqvist.
A long document may hold many facts: names, dates, numbers and places, and a reader must find the one asked for.
"""


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A SentencePiece-style BPE (words marked with a leading "▁", as in Llama 2's tokenizer) trained on `texts`,
    wrapped for transformers: BOS added to plain encodings, pad/bos/eos/unk set, and the chat template. Characters
    the texts never use become <unk>."""
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tokenizer.token_to_id(BOS))])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                      unk_token=UNK, model_max_length=1 << 20)
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def tiny_llama(tokenizer: PreTrainedTokenizerFast, seed: int, max_positions: int) -> LlamaForCausalLM:
    """A random 4-layer Llama over the tokenizer's vocabulary (grouped-query attention, head dim 32)."""
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                         max_position_embeddings=max_positions, rope_theta=500000.0, tie_word_embeddings=True,
                         # wider than the usual 0.02, so greedy decoding of the random model varies instead of
                         # repeating one token
                         initializer_range=0.5,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def make_tiny_checkpoint(directory: str, corpus_files: list[str] | None = None, vocab_size: int = 512,
                         seed: int = 0, max_positions: int = 32768) -> str:
    """Write the tokenizer and the model to `directory` (save_pretrained); returns the directory."""
    texts = [CORPUS]
    for path in corpus_files or []:
        with open(path, encoding="utf-8") as f:
            texts.append(f.read())
    tokenizer = train_tokenizer(texts, vocab_size)
    model = tiny_llama(tokenizer, seed, max_positions)
    os.makedirs(directory, exist_ok=True)
    tokenizer.save_pretrained(directory)
    model.save_pretrained(directory)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", help="where to save the checkpoint (created if missing)")
    parser.add_argument("--corpus", action="append", metavar="FILE", help="more text to train the tokenizer on")
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    directory = make_tiny_checkpoint(args.directory, args.corpus, args.vocab_size, args.seed)
    print(f"saved a tiny Llama and its tokenizer to {directory}: {sorted(os.listdir(directory))}")


if __name__ == "__main__":
    main()
