"""The native CPU matmul's tiled layout of packed words, converted once (at load or pack).

The words layout ``packed[w, n]`` (uint32 ``[W, N]``, ``P = 32 // bits`` codes of rows
``w*P .. w*P + P - 1`` per word; ``shiftjax.kernels.pow2_matmul``) is the file's, and the
one the XLA and Pallas paths read. A thread of the native kernel multiplies a block of
columns, which in that layout is a short run of every row of words, rows ``4 N`` bytes
apart. The tiled layout puts each block of ``tile`` columns in one contiguous piece of
memory:

    tiles[t, w, c] = packed[w, t * tile + c]        tiles: uint32 [T, W, tile]

``T = ceil(N / tile)``: N is padded to whole tiles with zero words (code 0 is a value,
``+2**e0``; the padding columns' outputs are computed and dropped). Rows of words (K,
odd or not) are as in the words layout. ``tile`` is a multiple of 128 (the kernel's
register tiles divide it); ``TILE`` was chosen by measurement (docs/cpu_kernel.md).

``TiledWords`` carries the tiles and N (static: a jax pytree whose only leaf is the
tiles), so ``pow2_matmul`` takes it in place of ``packed`` on any backend: the native
kernel reads it as it is, the XLA and Pallas paths convert it back (``untile``) inside
the call.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

TILE = 128  # columns per tile: measured, docs/cpu_kernel.md ("Tile width")
TILE_MULTIPLE = 128  # what the kernel requires of a tile (kTileMultiple in the .cc)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TiledWords:
  """Packed words in the tiled layout: ``tiles`` uint32 ``[T, W, tile]``, ``n`` columns.

  Make it with :func:`tile_words`; :func:`untile` gives the words back.
  """
  tiles: jax.Array
  n: int = dataclasses.field(metadata=dict(static=True))

  @property
  def tile(self) -> int:
    return self.tiles.shape[2]

  @property
  def words(self) -> int:
    return self.tiles.shape[1]

  @property
  def shape(self) -> tuple[int, int]:
    """The words layout's shape, ``(W, N)``: what ``pow2_matmul`` checks against K."""
    return (self.tiles.shape[1], self.n)

  @property
  def ndim(self) -> int:
    return 2

  @property
  def dtype(self):
    return self.tiles.dtype

  @property
  def nbytes(self) -> int:
    return self.tiles.size * self.tiles.dtype.itemsize


def tile_words(words, tile: int = TILE) -> TiledWords:
  """uint32 words ``[W, N]`` -> ``TiledWords`` (N padded to whole tiles with zeros)."""
  words = jnp.asarray(words)
  if words.ndim != 2 or words.dtype != jnp.uint32:
    raise ValueError(f"tile_words takes uint32 words [W, N], got {words.dtype} "
                     f"{tuple(words.shape)}")
  if tile <= 0 or tile % TILE_MULTIPLE:
    raise ValueError(f"tile must be a positive multiple of {TILE_MULTIPLE}, got {tile}")
  w, n = words.shape
  t = -(-n // tile)
  padded = jnp.pad(words, ((0, 0), (0, t * tile - n)))
  return TiledWords(padded.reshape(w, t, tile).transpose(1, 0, 2), int(n))


def untile(tiled: TiledWords) -> jax.Array:
  """``tile_words``' inverse: the uint32 words ``[W, N]``."""
  t, w, tile = tiled.tiles.shape
  return tiled.tiles.transpose(1, 0, 2).reshape(w, t * tile)[:, :tiled.n]


def pad_columns(v, tiled: TiledWords, fill: float) -> jax.Array:
  """A per-column float32 vector ``[N]`` (scale or bias) padded with ``fill`` to the
  tiles' columns and shaped ``[T, tile]``."""
  t, _, tile = tiled.tiles.shape
  v = jnp.asarray(v, jnp.float32)
  return jnp.pad(v, (0, t * tile - tiled.n), constant_values=fill).reshape(t, tile)
