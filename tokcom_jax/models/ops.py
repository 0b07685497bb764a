"""Operations whose backward pass is written out, where autodiff's costs more.

`swiglu`: XLA's CPU backend differentiates silu(x·Wg) * (x·Wu) · Wd into fusions
that transpose the [tokens, F] gradients with strided copies before the
weight-gradient matmuls (546 ms of a 3.1 s VAE train step at the bench size on 2
CPU cores, benchmarks/RESULTS.md); written out, the same products contract over the
token axis directly: 195 ms of copies left, the step 6 to 16% faster in two
interleaved runs. Same math, same dtypes as autodiff.
"""

from __future__ import annotations

import jax

Array = jax.Array


@jax.custom_vjp
def swiglu(x_BTD: Array, gate_DF: Array, up_DF: Array, down_FD: Array) -> Array:
  """silu(x @ gate) * (x @ up) @ down, in the dtype of the arguments."""
  return (jax.nn.silu(x_BTD @ gate_DF) * (x_BTD @ up_DF)) @ down_FD


def _forward(x_BTD, gate_DF, up_DF, down_FD):
  g_BTF, u_BTF = x_BTD @ gate_DF, x_BTD @ up_DF
  sig_BTF = jax.nn.sigmoid(g_BTF)
  h_BTF = g_BTF * sig_BTF * u_BTF
  return h_BTF @ down_FD, (x_BTD, g_BTF, u_BTF, sig_BTF, h_BTF, gate_DF, up_DF,
                           down_FD)


def _backward(residuals, dy_BTD):
  x_BTD, g_BTF, u_BTF, sig_BTF, h_BTF, gate_DF, up_DF, down_FD = residuals
  rows = lambda a: a.reshape(-1, a.shape[-1])  # [B·T, ·]: weight grads contract it
  dh_BTF = dy_BTD @ down_FD.T
  dg_BTF = dh_BTF * u_BTF * (sig_BTF * (1 + g_BTF * (1 - sig_BTF)))  # silu'
  du_BTF = dh_BTF * g_BTF * sig_BTF
  x_MD = rows(x_BTD)
  return (dg_BTF @ gate_DF.T + du_BTF @ up_DF.T, x_MD.T @ rows(dg_BTF),
          x_MD.T @ rows(du_BTF), rows(h_BTF).T @ rows(dy_BTD))


swiglu.defvjp(_forward, _backward)
