"""Train a tiny Megatron GPTModel with null experts on the CPU and print its routing.

    .venv/bin/python examples/null_routing_on_cpu.py [--rho 0.5] [--topk 4] [--steps 30]

Runs Megatron-Core's real GPTModel and MoE layers through the package's CPU harness (gloo,
one process). The balance loss over the N + M pool pulls the real fraction towards rho.
It saves no checkpoint: it shows the routing in Python. To train a model that exports to
Hugging Face, use the launch scripts (examples/pretrain_1gpu_quickstart.sh).
"""

import argparse
import warnings

import torch

from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_null_moe import NullExpertConfig, pop_layer_statistics, with_null_experts
from megatron_null_moe.cpu import cpu_harness, destroy_cpu_parallel_state, init_cpu_parallel_state


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rho", type=float, default=0.5, help="target real fraction, (0, 1]")
    parser.add_argument("--topk", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    torch.set_num_threads(1)  # tiny matrices: a second OpenMP thread only adds waiting

    with cpu_harness():
        init_cpu_parallel_state()
        try:
            config = TransformerConfig(
                num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                num_moe_experts=args.experts, moe_router_topk=args.topk,
                moe_ffn_hidden_size=32, moe_token_dispatcher_type="alltoall",
                moe_router_load_balancing_type="global_aux_loss", moe_aux_loss_coeff=2e-2,
                moe_z_loss_coeff=1e-3, add_bias_linear=False, hidden_dropout=0.0,
                attention_dropout=0.0, use_cpu_initialization=True,
            )
            spec = with_null_experts(
                get_gpt_decoder_block_spec(config, use_transformer_engine=False),
                NullExpertConfig(real_fraction=args.rho),
            )
            model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=128,
                             max_sequence_length=32)
            train(model, args.steps)
        finally:
            destroy_cpu_parallel_state()


def train(model, steps):
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokens = torch.randint(0, 128, (8, 32))
    position_ids = torch.arange(32).expand(8, -1)
    mask = torch.ones(8, 1, 32, 32, dtype=torch.bool).tril().logical_not()
    model.train()
    for step in range(1, steps + 1):
        optimizer.zero_grad()
        loss = model(tokens, position_ids, mask, labels=tokens).float().mean()
        loss.backward()
        optimizer.step()
        for module in model.modules():  # Megatron's finalize_model_grads does this per step
            if hasattr(module, "reset_global_aux_loss_tracker"):
                module.reset_global_aux_loss_tracker()
        statistics = pop_layer_statistics(model)
        if step == 1 or step % 10 == 0:
            layers = "  ".join(
                f"layer {layer}: real {s.real_fraction:.2f} (target {s.target_real_fraction:.2f})"
                f" zero-real tokens {s.zero_real_fraction:.2f}"
                for layer, s in sorted(statistics.items())
            )
            print(f"step {step:3d}  lm loss {loss.item():.3f}  {layers}")


if __name__ == "__main__":
    main()
