"""The main job: a mini vision-language run that shows the paper's effect, on CPU or GPU.

    python -m megatron_null_moe.demo [--output DIR] [--device cpu|cuda] [--steps N]
                                     [--seeds 0 1 2] [--configs K2_1.0 K4_0.5 ...]
"""
