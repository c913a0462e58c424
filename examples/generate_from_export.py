"""Generate with a Hugging Face export of a null-expert model and show the compute it spent.

    python examples/generate_from_export.py HF_DIR --prompt "The capital of France is"
    python examples/generate_from_export.py HF_DIR --token-ids 5,17,3 --max-new-tokens 20

HF_DIR is written by ``python -m megatron_null_moe.export``; this needs torch and
transformers only (the export carries its modeling code). Greedy generation with the KV
cache; a forward hook on each MoE layer's router records the real experts every token got
while generating (the prompt in the prefill, then one token a step), which is the expert
compute generation spent. Prints the generated tokens, each token's real experts per MoE
layer, and the mean against the K slots a token-choice MoE of the same top-K would spend.
"""

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="the export's directory")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="text (needs the export's tokenizer files)")
    prompt.add_argument("--token-ids", help="comma-separated token ids")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    return parser.parse_args()


def record_real_experts(model) -> list:
    """Hooks on each MoE layer's router: per layer, the [batch, tokens] real-expert counts of
    every forward, appended as generation runs."""
    spent = []
    for layer in model.model.layers:
        router = getattr(layer.mlp, "gate", None)
        if router is None or not hasattr(router, "num_null_experts"):
            continue  # a dense layer, or a plain Qwen3-MoE: every token takes K experts
        counts = []
        router.register_forward_hook(lambda module, inputs, output, counts=counts:
                                     counts.append(output[3]))
        spent.append(counts)
    return spent


def main():
    args = parse_args()
    torch.set_num_threads(1)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True,
                                                 dtype=dtype).eval()
    tokenizer = None
    if args.prompt is not None:
        tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=True)
        input_ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    else:
        input_ids = torch.tensor([[int(t) for t in args.token_ids.split(",")]])
    spent = record_real_experts(model)
    if not spent:
        raise SystemExit(f"{args.model}: no null-expert MoE layer (a plain Qwen3-MoE export "
                         "spends K experts on every token)")
    with torch.no_grad():
        output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                max_new_tokens=args.max_new_tokens, do_sample=False)
    tokens = output[0].tolist()
    # [layers, tokens fed through the model]: the prompt, then each generated token but the
    # last (generation stops once it is chosen).
    real = torch.stack([torch.cat(counts, dim=1)[0] for counts in spent])
    topk = model.config.num_experts_per_tok
    print(f"generated token ids: {tokens[input_ids.shape[1]:]}")
    if tokenizer is not None:
        print(f"generated text: {tokenizer.decode(tokens[input_ids.shape[1]:])!r}")
    print(f"real experts per token in each of the {len(spent)} MoE layers (top-{topk}, "
          f"rho = {model.config.real_fraction:g}):")
    for position in range(real.shape[1]):
        token = tokens[position]
        text = f" {tokenizer.decode([token])!r}" if tokenizer is not None else ""
        kind = "prompt" if position < input_ids.shape[1] else "generated"
        counts = " ".join(str(int(count)) for count in real[:, position])
        print(f"  {position:3d} {kind:9s} token {token:6d}{text}: {counts}")
    mean = real.float().mean().item()
    print(f"mean real experts per token: {mean:.3f} of K = {topk} "
          f"({mean / topk:.3f} of the expert compute of top-{topk} without null experts); "
          f"share of (layer, token) pairs with no real expert: "
          f"{(real == 0).float().mean().item():.3f}")


if __name__ == "__main__":
    main()
