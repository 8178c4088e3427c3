"""The reference engine: a compact PyTorch Llama-family model over a paged KV cache.

``engine`` (:class:`~dynamo_bus.engines.reference.engine.ReferenceEngine`, run by the
shared batching scheduler), ``model`` (the network and its config), ``batch`` (a
forward's flat batch and the paged KV cache), ``packed`` (oneDNN-packed linears for CPU),
``sampler`` (token sampling) and ``graphs`` (CUDA-graph decode). Nothing is imported
here, so importing the package does not import torch.
"""
