"""Launch configuration of the cuda kernels, in one place: read at every launch, so that tests
can lower it to force multi-block and remainder paths (kernels are compiled once per value)."""

THREADS_PER_BLOCK = 128  # D-GRU block (one stream) and elementwise kernels
GEMM_TILE = 16  # GEMM block is GEMM_TILE x GEMM_TILE threads ...
GEMM_REG = 4  # ... each computing GEMM_REG x GEMM_REG outputs: 64 x 64 output tiles
MAX_SHARED_BYTES = 48 * 1024  # static shared memory per block
GLUE_MAX_BLOCKS = 4096  # grid cap of the LayerNorm and shape-glue kernels (grid-stride loops)
