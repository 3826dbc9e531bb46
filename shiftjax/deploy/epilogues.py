"""Residual adds and relus moved into the native conv before them: a pass over a jaxpr.

A packed conv with a folded BatchNorm runs as one ``kernels.fused_conv`` (on the CPU the
native conv, which applies the scale and bias in its registers). What the model's own
code does next, ``relu(y)`` or ``relu(y + shortcut)`` in a residual block, XLA computes
in passes of its own over the activations: at batch 128 a ResNet's epilogues cost about
a fifth of its forward pass. ``fuse_conv_epilogues(fn)`` traces ``fn`` (any function, any
model's code), finds each native fused conv whose only use is such an add and/or relu,
and evaluates the chain as one native call that takes the residual and applies the
relu: the same operations in the same order, without the extra passes (the results
agree up to float rounding: the kernel's register arithmetic against XLA's). Nested
jitted functions are inlined so that their convs fuse too; everything else runs as
traced. Where the native kernels are not available it changes nothing.
"""

from __future__ import annotations

import collections
import functools
from typing import Any, Callable

import jax
from jax.extend import core as jex_core
import jax.numpy as jnp

from shiftjax.kernels.cpu import native

_TARGET = "shiftjax_fused_conv"
_RESIDUAL = 4  # the native call's operands: x, kernel, scale, bias, residual
_JITS = ("pjit", "jit")  # nested jits' names (jax < 0.7: pjit)


def fuse_conv_epilogues(fn: Callable) -> Callable:
  """``fn`` with the add and relu after each native fused conv computed inside it.

  Use it on inference functions (it is not differentiable through the fused calls),
  e.g. ``jax.jit(fuse_conv_epilogues(lambda x: packed.apply(variables, x)))``.
  """

  @functools.wraps(fn)
  def fused(*args):
    closed, shapes = jax.make_jaxpr(fn, return_shape=True)(*args)
    out = _evaluate(closed.jaxpr, closed.consts, jax.tree.leaves(args))
    return jax.tree.unflatten(jax.tree.structure(shapes), out)

  return fused


def _is_plain_fused_conv(eqn) -> bool:
  """A native fused conv without a residual or relu yet."""
  if eqn.primitive.name != "ffi_call" or eqn.params.get("target_name") != _TARGET:
    return False
  attributes = dict(eqn.params["attributes"])
  return not attributes["relu"] and eqn.invars[_RESIDUAL].aval.shape == (0,)


def _is_relu(eqn) -> bool:
  """``max(x, 0)``, or a call (``jax.nn.relu``'s custom_jvp, a jit) of only that."""
  if eqn.primitive.name == "max":
    return any(isinstance(v, jex_core.Literal) and v.val == 0 for v in eqn.invars)
  inner = eqn.params.get("call_jaxpr", eqn.params.get("jaxpr"))
  inner = getattr(inner, "jaxpr", inner)
  return (inner is not None and hasattr(inner, "eqns") and len(inner.eqns) == 1
          and _is_relu(inner.eqns[0]))


def _chains(jaxpr) -> dict[int, tuple[tuple[int, ...], Any, bool]]:
  """``{index of a chain's last equation: (indices of the equations evaluated there
  instead: its conv and maybe an add), residual var, relu)}``; nothing else reads their
  outputs."""
  users = collections.defaultdict(list)
  for i, eqn in enumerate(jaxpr.eqns):
    for v in eqn.invars:
      if isinstance(v, jex_core.Var):
        users[v].append(i)
  outputs = {v for v in jaxpr.outvars if isinstance(v, jex_core.Var)}

  def only_user(v):
    return users[v][0] if len(users[v]) == 1 and v not in outputs else None

  chains = {}
  for i, eqn in enumerate(jaxpr.eqns):
    if not _is_plain_fused_conv(eqn):
      continue
    out, end, residual, relu, deferred = eqn.outvars[0], i, None, False, [i]
    user = only_user(out)
    if user is not None and jaxpr.eqns[user].primitive.name == "add":
      other = [v for v in jaxpr.eqns[user].invars if v is not out]
      if (len(other) == 1 and isinstance(other[0], jex_core.Var)
          and other[0].aval.shape == out.aval.shape
          and other[0].aval.dtype == jnp.float32):
        residual, end = other[0], user
        out = jaxpr.eqns[user].outvars[0]
        user = only_user(out)
    if user is not None and _is_relu(jaxpr.eqns[user]):
      deferred.append(end)
      relu, end = True, user
    if end != i:
      chains[end] = (tuple(d for d in deferred if d != end), residual, relu)
  return chains


def _fused_call(eqn, invals, residual, relu):
  """The conv equation ``eqn`` bound again with the residual and relu."""
  params = dict(eqn.params)
  if residual is not None:
    invals = [*invals[:_RESIDUAL], residual, *invals[_RESIDUAL + 1:]]
    layouts = list(params["input_layouts"])
    layouts[_RESIDUAL] = tuple(range(residual.ndim - 1, -1, -1))
    params["input_layouts"] = tuple(layouts)
  params["attributes"] = tuple((k, relu if k == "relu" else v)
                               for k, v in params["attributes"])
  return _bind(eqn, params, invals)


def _bind(eqn, params, invals):
  """``eqn``'s primitive applied to ``invals`` with ``params``, as ``eval_jaxpr`` does."""
  bind_params = eqn.primitive.get_bind_params(params)
  subfuns = ()
  if isinstance(bind_params, tuple):  # jax < 0.5: (subfuns, params)
    subfuns, bind_params = bind_params
  with eqn.ctx.manager:
    return eqn.primitive.bind(*subfuns, *invals, **bind_params)


def _evaluate(jaxpr, consts, args) -> list:
  env = {}

  def read(v):
    return v.val if isinstance(v, jex_core.Literal) else env[v]

  env.update(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  chains = _chains(jaxpr) if native.available() else {}
  deferred = {d for ds, _, _ in chains.values() for d in ds}
  for i, eqn in enumerate(jaxpr.eqns):
    if i in deferred:
      continue
    if i in chains:
      members, residual, relu = chains[i]
      conv_eqn = jaxpr.eqns[members[0]]
      outs = _fused_call(conv_eqn, [read(v) for v in conv_eqn.invars],
                         None if residual is None else read(residual), relu)
      outs = outs if conv_eqn.primitive.multiple_results else [outs]
    elif eqn.primitive.name in _JITS:  # inlined: the convs inside fuse too
      inner = eqn.params["jaxpr"]
      outs = _evaluate(inner.jaxpr, inner.consts, [read(v) for v in eqn.invars])
    else:
      outs = _bind(eqn, eqn.params, [read(v) for v in eqn.invars])
      outs = outs if eqn.primitive.multiple_results else [outs]
    env.update(zip(eqn.outvars, outs))
  return [read(v) for v in jaxpr.outvars]
