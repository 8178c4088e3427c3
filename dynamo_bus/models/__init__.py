"""Models: the model directory, the tokenizer, and GGUF to safetensors weights."""
