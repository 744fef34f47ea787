"""Per-machine tuning of GGUF models: llama.cpp settings measured on the machine itself.

The agent's defaults (q8_0 KV cache with flash attention, 64-token prompt pieces, threads
by core count) were chosen on one CPU; on another the same settings can read prompts 40 %
slower. So each GGUF chat/completion model's candidate settings are measured here, each
in a child process (a candidate whose kernel path crashes marks itself unsafe instead of
taking the agent down), and the fastest one that keeps greedy output repeatable is cached
under the state directory by a fingerprint of the machine, the llama.cpp build and the
model file (docs/architecture.md, "Per-machine tuning").

- `settings`: the tuned knobs, which of them the bundle or the config pins, and how a
  choice is applied to the options the engines read (no I/O);
- `fingerprint`: what the choice depends on (CPU, GPU offload, llama.cpp, model file);
- `cache`: the cached choice per model, written atomically;
- `candidates`: which values each knob may take on this machine, searched one knob at a time;
- `measure`: the child process that loads one candidate and measures it;
- `search`: runs the children, scores them, picks the choice;
- `service`: when the agent tunes (before READY, in the background after it, or never).
"""
