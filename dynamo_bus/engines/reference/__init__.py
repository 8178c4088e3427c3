"""The reference engine: a compact PyTorch Llama-family model over a paged KV cache."""
