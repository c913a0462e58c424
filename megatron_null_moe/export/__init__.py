"""Export a null-expert MoE Megatron checkpoint as a Hugging Face model.

``python -m megatron_null_moe.export`` (console script ``megatron-null-moe-export``).
Modules: ``checkpoint`` (the model a checkpoint's args describe, what cannot be exported,
its tensors one layer at a time), ``huggingface`` (config.json and Qwen3-MoE weight names),
``shards`` (safetensors files and their index, written as the tensors come), ``__main__``
(CLI), ``remote_code/`` (the Hugging Face model written beside the weights; it routes with
``megatron_null_moe.pool_routing``). Nothing is imported or initialised at import time.
"""
