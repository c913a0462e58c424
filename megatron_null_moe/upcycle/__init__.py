"""Upcycle a dense model (Megatron GPT or Hugging Face Qwen3) into a null-expert MoE.

``python -m megatron_null_moe.upcycle`` (console script ``megatron-null-moe-upcycle``).
Modules: ``weights`` (splitting, scaling, drop-upcycling, shared expert: pure tensor math),
``router_init`` (grouped router rows, null row, null selection offset), ``architecture``
(the dense architecture and the Megatron models and flags built from it), ``huggingface``
(Qwen3 directory -> dense GPTModel), ``checkpoint`` (read a dense torch_dist checkpoint,
write the upcycled one atomically), ``convert`` (settings and filling), ``__main__`` (CLI).
Nothing is imported or initialised at import time.
"""
