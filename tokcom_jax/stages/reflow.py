"""Stage 2's reflow phase: a chunk generator whose flow head samples in 1 to a few
Euler steps what its teacher's head samples in many.

With `train.reflow.num_steps > 0`, stage 2 is two runs (`phases`): the generator
trained by flow matching into `<workdir>/teacher`, then this stage in `<workdir>`: a
copy of the teacher (its parameters at the first step) whose head learns, on the
teacher's trunk states of training windows, to predict where the teacher's head
lands from the same starting noise (`generator.reflow_loss`); the trunk stays as
the teacher's (no update, no weight decay). Paths from noise to the teacher's
samples are straight lines, so a few Euler steps follow them: the run in
`<workdir>` samples with `sample.steps` of 1 to `reflow.max_steps`, and the
teacher's run beside it is a complete run too (`sample.py --workdir
<workdir>/teacher` samples it in `reflow.teacher_steps`).
"""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import ml_collections

from tokcom_jax.models import flops, generator, stacks
from tokcom_jax.stages.base import FrozenModel
from tokcom_jax.stages.flow import FlowStage

TEACHER_DIR = 'teacher'


def phases(config, workdir: str) -> list[tuple[ml_collections.ConfigDict, str]]:
  """The runs stage 2 is, in order, as (config, workdir): the flow-matching run
  alone, or with reflow the teacher's run (sampling in `reflow.teacher_steps`) in
  `<workdir>/teacher`, then the reflow run in `<workdir>`. Reflow asked for where
  there is no flow head to reflow (the DiT orders, the energy head) is skipped, with
  a warning."""
  r = config.train.reflow
  if config.stage != 'diffusion' or not (r.num_steps or r.epochs):
    return [(config, workdir)]
  if config.flow.order != 'head' or config.head.kind != 'flow':
    logging.warning('train.reflow.num_steps=%d: stage 2 has no flow head to reflow'
                    ' (flow.order=%s, head.kind=%s): it trains without reflow.',
                    r.num_steps, config.flow.order, config.head.kind)
    return [(config, workdir)]
  teacher_dir = os.path.join(workdir, TEACHER_DIR)
  teacher = ml_collections.ConfigDict(config.to_dict())
  teacher.sample.steps = config.reflow.teacher_steps
  teacher.train.reflow.update(num_steps=0, epochs=0)
  student = ml_collections.ConfigDict(config.to_dict())
  student.stage, student.teacher_workdir = 'reflow', teacher_dir
  teacher.lock()
  student.lock()
  return [(teacher, teacher_dir), (student, workdir)]


class ReflowStage(FlowStage):
  name = 'reflow'

  def frozen(self):
    return {**super().frozen(), 'teacher': FrozenModel(
        build=self.build, workdir=self.config.teacher_workdir,
        missing_hint='reflow needs the trained generator it copies: train stage 2'
                     ' (train.py --config …:diffusion trains it first).')}

  def trainable(self, path) -> bool:
    """The head only: the trunk (and the chunk input) stay the teacher's."""
    return stacks.key_name(path[0]) == 'head'

  def prepare(self, params, frozen_graphdefs, frozen, batches):
    """A copy of the teacher's parameters (latent statistics included), where
    `params` are (a copy: the training step donates its state, not the teacher)."""
    del frozen_graphdefs, batches
    return jax.tree.map(
        lambda t, p: jax.device_put(jnp.array(t, dtype=p.dtype, copy=True), p.sharding),
        frozen['teacher'], params)

  def loss(self, model, frozen, tokens_BL, rng):
    c, r = self.config, self.config.reflow
    x1_BNZ = model.to_flow(jax.lax.stop_gradient(frozen['vae'].encode(tokens_BL)[0]))
    return generator.reflow_loss(
        model, frozen['teacher'], tokens_BL, x1_BNZ, rng, teacher_steps=r.teacher_steps,
        max_steps=r.max_steps, batch_mul=r.batch_mul,
        noise_std=c.flow.noise_std * c.sample.noise_scale)

  def eval_metrics(self, model, frozen, tokens_BL, key):
    return self.loss(model, frozen, tokens_BL, key)[1]

  def wandb_batch_names(self, mean):
    return {'reflow/batch_mse_loss': mean['reflow_mse']}

  def train_flops(self, batch):
    return flops.reflow(self.config, batch)
