"""Graph definitions as static arguments of compiled functions, hashed by identity.

`jax.jit` hashes its static arguments at every call to find the compiled program;
an `nnx.GraphDef` hashes its whole tree, about 1 ms for the tiny generator and its
VAE: at batch 1 a compiled sampler paid that per call, a fifth of a 64-token
sample. A loaded model wraps its graph definitions once (`Static`); compiled
functions read them with `graphdef(…)`, which takes either form.
"""

from __future__ import annotations

from flax import nnx


class Static:
  """A graph definition, hashed and compared by identity (one per loaded model)."""

  __slots__ = ('graphdef',)

  def __init__(self, graphdef: nnx.GraphDef):
    self.graphdef = graphdef


def graphdef(g: 'Static | nnx.GraphDef') -> nnx.GraphDef:
  return g.graphdef if isinstance(g, Static) else g
