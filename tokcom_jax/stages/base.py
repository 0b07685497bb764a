"""A stage: everything that differs between training the VAE, the flow model and
the autoregressive baseline, behind one small interface.

The trainer, the memory report, the benchmarks, evaluation and sampling ask a stage
how to build its model, what it reads frozen, its loss, its eval metrics, what it
samples at the end of an epoch and its FLOPs; nothing else in the package branches
on the stage's name. A new stage is one file here and a config entry.

Models arrive merged (`nnx.Module`s): the stage writes plain model code, and the
caller keeps the functional split/merge, jit and shardings.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar

import jax
from etils import epath
from flax import nnx


Array = jax.Array
Metrics = dict[str, Array]
Build = Callable[[nnx.Rngs], nnx.Module]


@dataclasses.dataclass(frozen=True)
class FrozenModel:
  """A trained model that a stage reads but does not train (stage 2's VAE)."""
  build: Build
  workdir: str
  missing_hint: str  # what to do when `workdir` has no checkpoint


class Stage:
  name: ClassVar[str]  # also the config's train.<name> section
  sample_columns: ClassVar[tuple[str, ...]] = ('step', 'generation')
  sample_table: ClassVar[str] = ''  # wandb name of the sample table

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    cls.sample_table = cls.sample_table or f'{cls.name}/generations'

  def __init__(self, config):
    self.config = config

  # ------------------------------------------------------------------ the model

  def build(self, rngs: nnx.Rngs) -> nnx.Module:
    """The model this stage trains, freshly initialised."""
    raise NotImplementedError

  def frozen(self) -> dict[str, FrozenModel]:
    """Trained models this stage reads but never updates, by name."""
    return {}

  def trainable(self, path) -> bool:
    """Whether the parameter at `path` (keys of the params tree) is trained: the
    others keep their values (no update, no weight decay)."""
    del path
    return True

  def tokenizer_dir(self, workdir) -> epath.Path:
    """Where the run's tokenizer is saved (or found)."""
    return epath.Path(workdir) / 'tokenizer'

  def prepare(self, params, frozen_graphdefs, frozen, batches):
    """Parameters that come from data rather than from gradients (the flow model's
    latent statistics), filled once before the first step of a fresh run;
    `batches` yields training token batches."""
    del frozen_graphdefs, frozen, batches
    return params

  # -------------------------------------------------------------- the objective

  def loss(self, model, frozen: dict[str, Any], tokens_BL: Array, rng: Array
           ) -> tuple[Array, Metrics]:
    """(scalar loss, metrics) of one batch of token windows."""
    raise NotImplementedError

  def eval_metrics(self, model, frozen: dict[str, Any], tokens_BL: Array,
                   key: Array) -> Metrics:
    """Validation metrics of one batch; must include 'loss' (the best checkpoint's
    criterion). The same function serves training-time eval and `evaluate`."""
    del key
    return self.loss(model, frozen, tokens_BL, None)[1]

  # ----------------------------------------------------------------- samples

  def sample(self, model, frozen: dict[str, Any], tokens_BL: Array, key: Array
             ) -> Array:
    """End-of-epoch samples [B, L] for a batch of real windows [B, L]."""
    raise NotImplementedError

  def sample_rows(self, real_BL, out_BL, decode: Callable) -> list[dict]:
    """Rows of the end-of-epoch sample table (without the step column)."""
    del real_BL
    return [{'generation': decode(o)} for o in out_BL]

  def wandb_batch_names(self, mean: dict[str, float]) -> dict[str, float]:
    """Batch metrics under the original TokCom's wandb names."""
    return {f'{self.name}/batch_loss': mean['loss']}

  # -------------------------------------------------------------------- cost

  def train_flops(self, batch: int) -> int:
    """Model FLOPs of one training step on `batch` windows (tokcom_jax.models.flops)."""
    raise NotImplementedError
