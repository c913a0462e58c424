"""The Hugging Face model of a null-expert MoE: the files an export writes beside its weights.

``configuration_qwen3_null_moe.py`` and ``modeling_qwen3_null_moe.py`` are copied verbatim,
and ``pool_routing.py`` is written as ``megatron_null_moe/pool_routing.py``'s own text, so an
exported model routes with the plugin's code on a machine with torch and transformers alone
(``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)``). Importable here too
(it needs transformers): its ``pool_routing`` then names the package's module.
"""
