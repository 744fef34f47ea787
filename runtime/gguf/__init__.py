"""llama.cpp's side of the runtime: GGUF models served one at a time or batched, their
prompts, sampling, grammars, chat and tool formats, and GGUF embeddings."""
