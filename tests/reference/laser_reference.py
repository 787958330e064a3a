#!/usr/bin/env python3
"""An independent numpy (float64) implementation of Llama / Qwen2 / Qwen3 inference, LaSER
latent-reasoning embeddings and greedy decoding, written from their published description; the
decoder parity tests compare mkflow's ONNX runtime against it.

It reads the Hugging Face checkpoint directly (safetensors + config.json, not the exported ONNX
graph), runs one unpadded sequence at a time and recomputes the whole sequence at every step
(no KV cache), so none of the runtime's batching, padding or caching is shared with it.

LaSER (Jin et al., 2026), as its official encoder computes it (`ignorejjj/LaSER`:
`src/scripts/quick_start.py` `laser_encode`, `laser.py` `encode_query`), for K >= 1 thinking steps:
  h_0      the last-layer (final-norm) hidden state of the prompt's last token;
  then K-1 times: the last position's logits go through a softmax over the vocabulary, the soft
           token `probs @ embedding_table` is appended as the next input, and its last-layer
           hidden state is the next h_i;
  vector   the L2-normalised mean of h_0 ... h_{K-1}.
So K = 1 is plain last-token pooling. Texts are embedded as given: templates and chat wrapping
are the caller's (the tests write them out literally).

Usage: laser_reference.py CHECKPOINT_DIR REQUEST.json  (prints the answer as JSON)
REQUEST: {"texts": [...], "steps": [1, 2, 3], "prompts": [...], "new_tokens": 12}
"""

import json
import os
import sys

import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer


class Decoder:
    def __init__(self, directory):
        with open(os.path.join(directory, "config.json")) as f:
            self.cfg = json.load(f)
        raw = load_file(os.path.join(directory, "model.safetensors"))
        self.w = {k.removeprefix("model."): v.astype(np.float64) for k, v in raw.items()}
        self.embedding = self.w["embed_tokens.weight"]
        self.head = self.w.get("lm_head.weight", self.embedding)

    def rms_norm(self, x, weight):
        eps = self.cfg["rms_norm_eps"]
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight

    def rope(self, x, positions):
        # x: [heads, S, D]; rotate-half RoPE over the full head dimension.
        d = x.shape[-1]
        inv_freq = 1.0 / (self.cfg["rope_theta"] ** (np.arange(0, d, 2) / d))
        angles = positions[:, None] * inv_freq[None, :]
        angles = np.concatenate([angles, angles], axis=-1)
        half = d // 2
        rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return x * np.cos(angles) + rotated * np.sin(angles)

    def forward(self, embeds):
        """Final-norm hidden states [S, H] of one sequence of input embeddings [S, H]."""
        c = self.cfg
        nh, kv = c["num_attention_heads"], c["num_key_value_heads"]
        d = c.get("head_dim") or c["hidden_size"] // nh
        w = self.w

        def project(h, name, heads):
            y = h @ w[name + ".weight"].T
            if name + ".bias" in w:  # Qwen2
                y = y + w[name + ".bias"]
            return y.reshape(s, heads, d)

        def head_norm(t, name):  # Qwen3's per-head RMSNorm of queries and keys
            return self.rms_norm(t, w[name]) if name in w else t

        s = embeds.shape[0]
        positions = np.arange(s, dtype=np.float64)
        causal = np.tril(np.ones((s, s), dtype=bool))
        x = embeds
        for i in range(c["num_hidden_layers"]):
            p = f"layers.{i}."
            h = self.rms_norm(x, self.w[p + "input_layernorm.weight"])
            q = head_norm(project(h, p + "self_attn.q_proj", nh), p + "self_attn.q_norm.weight").transpose(1, 0, 2)
            k = head_norm(project(h, p + "self_attn.k_proj", kv), p + "self_attn.k_norm.weight").transpose(1, 0, 2)
            v = project(h, p + "self_attn.v_proj", kv).transpose(1, 0, 2)
            q, k = self.rope(q, positions), self.rope(k, positions)
            heads = []
            for head in range(nh):
                group = head // (nh // kv)
                scores = q[head] @ k[group].T / np.sqrt(d)
                scores = np.where(causal, scores, -np.inf)
                scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
                heads.append((scores / scores.sum(axis=-1, keepdims=True)) @ v[group])
            x = x + np.concatenate(heads, axis=-1) @ self.w[p + "self_attn.o_proj.weight"].T
            h = self.rms_norm(x, self.w[p + "post_attention_layernorm.weight"])
            gate = h @ self.w[p + "mlp.gate_proj.weight"].T
            up = h @ self.w[p + "mlp.up_proj.weight"].T
            x = x + (gate / (1.0 + np.exp(-gate)) * up) @ self.w[p + "mlp.down_proj.weight"].T
        return self.rms_norm(x, self.w["norm.weight"])

    def logits(self, hidden):
        return hidden @ self.head.T

    def soft_token(self, hidden):
        logits = self.logits(hidden)
        probs = np.exp(logits - logits.max())
        return (probs / probs.sum()) @ self.embedding

    def laser(self, ids, k):
        if k < 1:
            raise ValueError("LaSER pools K >= 1 hidden states")
        seq = self.embedding[ids]
        hidden = self.forward(seq)[-1]
        states = [hidden]
        for _ in range(k - 1):
            seq = np.vstack([seq, self.soft_token(hidden)])
            hidden = self.forward(seq)[-1]
            states.append(hidden)
        vector = np.mean(states, axis=0)
        return vector / np.linalg.norm(vector)

    def greedy(self, ids, new_tokens):
        ids, margins = list(ids), []
        for _ in range(new_tokens):
            logits = self.logits(self.forward(self.embedding[ids])[-1])
            top = np.sort(logits)[-2:]
            margins.append(float(top[1] - top[0]))
            ids.append(int(np.argmax(logits)))
        return ids[-new_tokens:], min(margins)


def main():
    directory, request_path = sys.argv[1], sys.argv[2]
    with open(request_path) as f:
        request = json.load(f)
    model = Decoder(directory)
    tokenizer = Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
    ids = [tokenizer.encode(t).ids for t in request["texts"]]
    answer = {
        "embeddings": {str(k): [model.laser(i, k).tolist() for i in ids] for k in request["steps"]},
        "generations": [],
    }
    for prompt in request["prompts"]:
        tokens, margin = model.greedy(tokenizer.encode(prompt).ids, request["new_tokens"])
        answer["generations"].append({"prompt": prompt, "tokens": tokens, "min_margin": margin})
    json.dump(answer, sys.stdout)


if __name__ == "__main__":
    main()
