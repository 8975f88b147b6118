"""Training-step time on SmolLM2-135M, side by side in one run:
(a) msp-jax prompt-only step, (b) Hugging Face PEFT prompt tuning (torch, fp32), (c) msp-jax full fine-tuning.

  python benchmarks/train_step.py [--prompt_tokens 20 100] [--batch 8] [--seq 128] [--reps 7] [--dtype fp32]
      [--skip_torch] [--peak_tflops T] [--json out.json]

Same GGUF weights and random-token batch (loss on all text tokens, as PEFT with labels = inputs);
median of `reps` timed steps after 2 warm-ups; our first call (compile) is timed separately. Our
prefix of P tokens = (P - 20)-token instruction + one pooled 20-token attribute prompt.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, for `python benchmarks/X.py`

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import msp_jax
from msp_jax import prompts as soft_prompts
from msp_jax import sharding, training
from msp_jax.models import weights
from benchmarks.forward import median_seconds, synced, torch_model
from benchmarks.machine import add_backbone_argument, describe, flops_per_token, utilisation


def batch_for(ids):
  b, t = ids.shape
  loss_mask = np.ones((b, t), bool)
  loss_mask[:, 0] = False  # nothing predicts the first token from the text alone
  return dict(input_ids=ids, attention_mask=np.ones((b, t), bool), loss_mask=loss_mask,
              attribute_ids=np.zeros((b, 1, 1), np.int32), attribute_mask=np.ones((b, 1, 1), bool))


def prompt_step(backbone, prompt_tokens, full_finetune=False):
  """The jitted training step of a pooling mixer with `prompt_tokens` prefix tokens (instruction +
  one attribute's 20), and its (trainable, opt_state, frozen): prompts only, or every weight."""
  d = backbone.config.hidden_size
  rng = np.random.default_rng(0)
  prompts = soft_prompts.SoftPrompts(rng.uniform(-0.5, 0.5, (prompt_tokens - 20, d)),
                                     {"attribute": rng.uniform(-0.5, 0.5, (4, 20, d))}, "pooling", rngs=nnx.Rngs(0))
  model = training.PromptedModel(backbone.model, prompts, encoder_decoder=False)
  graphdef, trainable, frozen = nnx.split(model, nnx.Param if full_finetune else training.PromptParam, ...)
  if full_finetune:  # the step donates what it trains: work on a copy, the next run reuses the backbone
    trainable = jax.tree.map(jnp.copy, trainable)
  tx, _ = training.make_optimizer(training.OptimizerConfig(learning_rate=3e-2, total_steps=100))
  opt_state = tx.init(trainable)
  step = training.make_train_step(graphdef, tx, sharding.make_mesh(), trainable, opt_state, frozen)
  return step, trainable, opt_state, frozen


def time_ours(backbone, ids, prompt_tokens, reps, full_finetune=False):
  step, trainable, opt_state, frozen = prompt_step(backbone, prompt_tokens, full_finetune)
  batch = batch_for(ids)
  state = {"t": trainable, "o": opt_state}

  start = time.perf_counter()
  step.lower(trainable, opt_state, frozen, batch).compile()  # what jit does on the first call
  compile_s = time.perf_counter() - start

  def run():
    state["t"], state["o"], metrics = step(state["t"], state["o"], frozen, batch)
    jax.block_until_ready(metrics["loss"])

  return median_seconds(run, reps), compile_s


def time_peft(ids, prompt_tokens, reps, source=weights.DEFAULT_BACKBONE, device="cpu"):
  import torch
  from peft import PromptTuningConfig, TaskType, get_peft_model
  base = torch_model(source, device)
  model = get_peft_model(base, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=prompt_tokens))
  model.train()
  opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
  batch = {"input_ids": torch.tensor(ids, device=device), "labels": torch.tensor(ids, device=device),
           "attention_mask": torch.ones(ids.shape, dtype=torch.long, device=device)}

  def run():
    model(**batch).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

  return median_seconds(synced(run, device), reps), torch.__version__, torch.get_num_threads()


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--prompt_tokens", type=int, nargs="+", default=[20, 100])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=128)
  parser.add_argument("--reps", type=int, default=7)
  parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="compute dtype (bf16: GPU/TPU)")
  parser.add_argument("--skip_torch", action="store_true")
  parser.add_argument("--peak_tflops", type=float, help="the device's peak, for MFU (H100/H200 bf16 dense: 989)")
  parser.add_argument("--torch_device", default="cpu", help="where PEFT runs: cpu (fp32) or cuda (bf16)")
  add_backbone_argument(parser)
  parser.add_argument("--json")
  args = parser.parse_args()
  result = describe()
  print(result, flush=True)
  backbone = msp_jax.load_backbone(args.backbone, with_tokenizer=False,
                                   dtype={"fp32": jnp.float32, "bf16": jnp.bfloat16}[args.dtype])
  ids = np.random.default_rng(0).integers(3, backbone.config.vocab_size, (args.batch, args.seq))
  result.update(dtype=str(backbone.model.dtype), batch=args.batch, seq=args.seq, runs=[])
  for p in args.prompt_tokens:
    run = {"prompt_tokens": p}
    run["ours_prompt_only_s"], run["ours_compile_s"] = (round(x, 3) for x in time_ours(backbone, ids, p, args.reps))
    print(run, flush=True)
    run["ours_full_finetune_s"] = round(time_ours(backbone, ids, p, args.reps, full_finetune=True)[0], 3)
    # Model FLOPs: forward 1x; backward 1x for the activation gradients (prompt-only stops there) + 1x
    # for the weight gradients (full fine-tuning).
    forward = args.batch * (args.seq + p) * flops_per_token(backbone.config, args.seq + p)
    run["ours_prompt_only"] = utilisation(2 * forward, run["ours_prompt_only_s"], args.peak_tflops)
    run["ours_full_finetune"] = utilisation(3 * forward, run["ours_full_finetune_s"], args.peak_tflops)
    print(run, flush=True)
    if not args.skip_torch:
      seconds, version, threads = time_peft(ids, p, args.reps, args.backbone, args.torch_device)
      run.update(peft_s=round(seconds, 3), torch=version, torch_threads=threads,
                 ours_over_peft=round(run["ours_prompt_only_s"] / seconds, 3))
    run["prompt_only_over_full"] = round(run["ours_prompt_only_s"] / run["ours_full_finetune_s"], 3)
    print(run, flush=True)
    result["runs"].append(run)
  print(json.dumps(result, indent=1))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
