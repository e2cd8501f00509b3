"""numba.cuda kernels for the GRU and the D-GRU over B independent streams, mirroring the cpu backend.

Imported lazily, only when ``backend="cuda"`` is asked for (``npdgru.kernels.get_backend``), so that
``import npdgru`` never imports numba.cuda. It runs on a CUDA GPU (``pip install -e ".[cuda]"``,
numba-cuda) or, slowly, on numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1`` set before Python
starts), which is how the tests run it without a GPU.

Modules: ``config`` (launch parameters), ``device`` (availability, transfers, workspaces),
``kernels`` (the private kernels), ``layers`` (validated layers, ``Ops``, the executor and its
``RUNNERS``). The same public names as the cpu backend (and ``kernels/reference.py``): :class:`GRULayer` (``init_state``,
``forward``, ``_run``), :class:`GRUState`, :class:`Linear` (``forward``, ``_run``),
:func:`gru_sequence`, :func:`dgru_sequence`, plus :func:`top_a`, :func:`gru_step` and
:func:`dgru_step`, and for the architecture graph (``model.py``) :class:`LayerNorm` and the shape
glue :class:`Ops` (the device twin of ``kernels._graph.HostOps``). Every kernel below has its NumPy twin in
``npdgru/reference.py``:

    kernel               what it computes                                     NumPy twin
    _gemm (factory)      out = act(x Wᵀ + b), tiled over rows and features     reference.linear
    _gru_cell            one dense GRU step, elementwise after M = W_hh h      reference.gru_step
    _dgru (factory)      T D-GRU steps of one stream per block                 reference.dgru_sequence
    _dgru_sparse         the same with an input accumulator (sparse input)     reference.dgru_sequence
    _topa (factory)      the select gate alone                                 reference.top_a
    _gather/_scatter     state rows in and out (StreamBatch join/leave)        numpy fancy indexing
    _layer_norm          LayerNorm of rows, one thread per row                 reference.layer_norm
    _swap01, _flip0,     shape glue between graph layers (:class:`Ops`), one   _graph.HostOps
    _add, _window,       thread per output entry: swap axes 0 and 1, reverse
    _put_cols            axis 0, sum, slice / zero-pad and concatenate the
                         last axis

Layouts (coalescing). Weights are stored transposed, column-contiguous, as on the cpu backend:
``wih_t`` (I, 3H), ``whh_t`` (H, 3H), ``Linear.wt`` (in, out). Threads of a block vary over the
output row q (one of the 3H gate rows, or an output feature), so ``wt[j, q]`` for a fixed column
j, the update from column j, is one coalesced read, and a D-GRU step reads only the A selected
columns of ``whh_t``. Activations and states are row-major with the stream (or frame·stream) as
the row: x (T, B, I), h (B, H), M (B, 3H).

Launch configuration (``config``: module parameters, read at every launch, so tests can lower them to force
multi-block and remainder paths; kernels are compiled once per value):

* ``THREADS_PER_BLOCK`` (128): the D-GRU runs one block per stream, looping over the T frames of
  a call inside the kernel with h, M, u and the selection in shared memory, so a call of T frames
  is one launch; elementwise kernels use it as their block size.
* ``GLUE_MAX_BLOCKS`` (4096): :class:`LayerNorm` (one thread per row) and the shape glue
  :class:`Ops` (one thread per output entry) are grid-stride loops on at most this many blocks
  of ``THREADS_PER_BLOCK``; past that a thread takes several rows or entries (tests lower it so
  that the simulator starts few threads).
* ``GEMM_TILE`` (16) x ``GEMM_REG`` (4): the dense layers and the input products of all T·B
  frames are one tiled GEMM: a (GEMM_TILE, GEMM_TILE) block computes a 64 x 64 output tile, each
  thread 4 x 4 outputs in registers, from shared-memory tiles of 64 rows x 16 reduction entries.

Selection (paper eq. 4). Per stream, u = 1 − z for all H neurons goes to shared memory; each
thread computes the rank of its neurons by counting,
``rank_i = #{j : u_j > u_i or (u_j == u_i and j < i)}``, and neuron i is selected iff rank_i < A.
That is exactly the stable descending sort of ``reference.top_a`` (ties to the lower index),
with no data-dependent control flow across threads and no atomics: O(H²/threads) comparisons of
broadcast shared-memory reads, about as many as the 3H·A/threads multiply-adds of the
accumulator update. The rank also gives each selected neuron its slot in the compacted list of
changed columns (no prefix sum needed).

Accumulators (``docs/design.md``), the same semantics as ``cpu.GRULayer``: M = W_hh h + b_hh is
kept per stream and updated from the A changed columns, ``M += W_hh[:, S] Δh_S``; it is recomputed
exactly when ``step % refresh_every == 0`` (step counted per stream, so the first step of a
stream computes it). At P = 100 the layer runs the dense GRU: per step one GEMM over all streams
(M = h W_hhᵀ + b_hh, weights read once per tile of 64 streams) and one elementwise kernel.

Determinism. Every output entry is computed by one thread, in a fixed order (bias first, then
columns ascending, or selected columns in rank order), independent of the block size, the batch
size B and how the frames are split into calls. So a stream in a batch gives the same bits as the
stream alone, and streaming gives the offline bits, as on the cpu backend. The bits differ from
the cpu backend's (other tanh, FMA contraction, another order of the accumulator updates).

float32 throughout; ``math.tanh`` on float32 is CUDA's ``tanhf``, σ(a) = ½ + ½·tanh(a/2) (as on the
cpu backend; no overflow for large |a|). Static shared memory bounds the sizes: 7H floats (dense
input) or 10H + I floats (sparse input) per block, at most 48 KiB, i.e. H <= 1755 (H = 400 uses
11 KiB).

Nothing is allocated inside kernel loops; per call, outputs go into workspaces kept in the
state (GRU layers) or the layer (Linear), grown when a call has more frames than before, so
streaming calls do no device allocation after the first. ``_run`` returns views of those
workspaces (valid until the next call); the public ``forward`` returns fresh arrays. The graph
glue (:class:`Ops`) and :class:`LayerNorm` return new arrays: their values are small (a frame's
width) and a value may be read by several later layers.
"""

from ..checks import DEFAULT_REFRESH
from . import config, kernels  # noqa: F401 (config: the launch parameters; kernels: for tests and benchmarks)
from .device import INSTALL_HINT, Workspace, copy_device, is_device_array, require_device, simulator, synchronize, to_device  # noqa: F401
from .layers import RUNNERS, Executor, GRULayer, GRUState, LayerNorm, Linear, Ops, dgru_sequence, dgru_step, gru_sequence, gru_step, top_a

__all__ = [
    "GRULayer", "GRUState", "Linear", "LayerNorm", "Ops", "Executor", "RUNNERS",
    "gru_sequence", "dgru_sequence", "gru_step", "dgru_step", "top_a", "DEFAULT_REFRESH",
    "config", "require_device", "is_device_array", "to_device", "synchronize", "copy_device", "Workspace",
]
