"""Data: TFDS builders for NLU++, CrossNER and TOPv2, settings, ontology, prompt layout, batches.

  task = load_task("crossner", "music", "few_shot", seed=0)      # splits + ontology
  it = task_batches(task, "train", tokenizer, global_batch_size=8, num_epochs=None)
  batch = next(it)                                                # numpy arrays, see batching.py
  state = it.get_state()                                          # store in the checkpoint
"""
from msp_jax.data.batching import BatchConfig, make_batch
from msp_jax.data.example import Example
from msp_jax.data.iterator import BatchIterator, task_batches
from msp_jax.data.layout import ExemplarRetriever, PromptLayout, Segments, prompt_text
from msp_jax.data.ontology import Attribute, AttributeSet, Ontology
from msp_jax.data.sources import DATA_DIR_ENV, DataError
from msp_jax.data.splits import DATASETS, SETTINGS, Task, domains, load_task
from msp_jax.data import user_files

__all__ = ["Attribute", "AttributeSet", "BatchConfig", "BatchIterator", "DATASETS", "DATA_DIR_ENV", "DataError",
           "Example", "ExemplarRetriever", "Ontology", "PromptLayout", "SETTINGS", "Segments", "Task", "domains",
           "load_task", "make_batch", "prompt_text", "task_batches", "user_files"]
