#!/usr/bin/env python3
"""Writes a tiny randomly initialised decoder checkpoint in Hugging Face format (config.json,
model.safetensors, tokenizer.json) for the decoder parity tests: Qwen3 (per-head q/k norms, a
head width that differs from hidden/heads, tied embeddings), Qwen2 (q/k/v biases) or Llama (an
untied output head).

Usage: tiny_decoder.py OUT_DIR [--arch qwen3|qwen2|llama] [--shape tiny|qwen3-0.6b] [--seed N]
"""

import argparse
import json
import os

import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

# Text the tiny byte-level BPE vocabulary is learnt from.
CORPUS = [
    "Vitamin D deficiency is associated with reduced bone mineral density in older adults.",
    "Latent reasoning lets a retriever think in embedding space before it encodes a passage.",
    "Gene expression in the liver changes after a high fat diet in mice.",
    "The knowledge base answers SQL queries over documents, questions and clusters.",
    "Kafka topics stream documents into micro-batches that are embedded and indexed.",
    "Antibiotic resistance spreads through horizontal gene transfer between bacteria.",
    "0123456789 numbers, punctuation; quotes 'like this' and (parentheses)!",
]

# Qwen3-0.6B's shapes (LaSER's smallest backbone), for benchmarks with random weights.
QWEN3_06B = {
    "hidden_size": 1024,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "intermediate_size": 3072,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 40960,
    "vocab_size": 151936,
}

CONFIG = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 24,
    "intermediate_size": 128,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
    "torch_dtype": "float32",
}


CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tokenizer(vocab_size):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--arch", choices=["qwen3", "qwen2", "llama"], default="qwen3")
    parser.add_argument(
        "--shape",
        choices=["tiny", "qwen3-0.6b"],
        default="tiny",
        help="tiny (parity tests) or Qwen3-0.6B's shapes with random weights (benchmarks)",
    )
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    tok = tokenizer(384)
    tok.save(os.path.join(args.out, "tokenizer.json"))
    config = dict(CONFIG, vocab_size=tok.get_vocab_size(), eos_token_id=tok.token_to_id("<|im_end|>"))
    if args.shape == "qwen3-0.6b":
        config.update(QWEN3_06B)
    if args.arch == "qwen2":
        config.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2")
    elif args.arch == "llama":
        config.update(architectures=["LlamaForCausalLM"], model_type="llama", tie_word_embeddings=False)
    if args.arch != "qwen3":
        # These families have no head_dim setting: heads split the hidden width.
        del config["head_dim"]
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    # A ChatML template (Qwen3's form, no default system turn), for the chat-wrapped embeddings.
    with open(os.path.join(args.out, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": CHATML, "eos_token": "<|im_end|>"}, f, indent=2)

    rng = np.random.default_rng(args.seed)
    H, I = config["hidden_size"], config["intermediate_size"]
    D = config.get("head_dim") or H // config["num_attention_heads"]
    NH, KV, V = config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"]

    # Benchmark-sized weights keep the usual small scale (only their shapes matter there).
    scale = 1.0 if args.shape == "tiny" else 0.1

    def normal(*shape, std):
        return (rng.standard_normal(size=shape, dtype=np.float32) * np.float32(std * scale))

    def norm_weight(n):
        return (1.0 + rng.normal(0.0, 0.1, size=n)).astype(np.float32)

    # Larger-than-usual weights keep the next-token distribution peaked, so greedy decoding is
    # decided by clear margins rather than by float rounding.
    weights = {"model.embed_tokens.weight": normal(V, H, std=1.0), "model.norm.weight": norm_weight(H)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights.update(
            {
                p + "input_layernorm.weight": norm_weight(H),
                p + "post_attention_layernorm.weight": norm_weight(H),
                p + "self_attn.q_proj.weight": normal(NH * D, H, std=0.15),
                p + "self_attn.k_proj.weight": normal(KV * D, H, std=0.15),
                p + "self_attn.v_proj.weight": normal(KV * D, H, std=0.15),
                p + "self_attn.o_proj.weight": normal(H, NH * D, std=0.15),
                p + "mlp.gate_proj.weight": normal(I, H, std=0.15),
                p + "mlp.up_proj.weight": normal(I, H, std=0.15),
                p + "mlp.down_proj.weight": normal(H, I, std=0.15),
            }
        )
        if args.arch == "qwen3":
            weights[p + "self_attn.q_norm.weight"] = norm_weight(D)
            weights[p + "self_attn.k_norm.weight"] = norm_weight(D)
        if args.arch == "qwen2":
            for name, width in (("q", NH * D), ("k", KV * D), ("v", KV * D)):
                weights[p + f"self_attn.{name}_proj.bias"] = normal(width, std=0.1)
    if not config["tie_word_embeddings"]:
        weights["lm_head.weight"] = normal(V, H, std=0.5)
    save_file(weights, os.path.join(args.out, "model.safetensors"))


if __name__ == "__main__":
    main()
