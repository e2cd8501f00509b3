"""Numba flags, in one place.

fastmath stays off on purpose: every pre-activation is accumulated in a fixed column order
(``out += W[:, j] * x[j]`` for j = 0, 1, ...), which LLVM vectorises across rows without
reassociating sums. So a frame gives the same bits whether it is computed alone (streaming),
inside a block of frames (offline) or in a batch of streams, and offline and streaming output of
a D-GRU are identical, selected sets included.
"""

# "contract" lets LLVM fuse a*b + c into one FMA (faster and no less accurate) but, unlike full
# fastmath, never reorders a sum; the sums above keep their order.
JIT = dict(nogil=True, cache=True, fastmath={"contract"}, error_model="numpy", boundscheck=False)

# Elementwise glue that must give NumPy's bits (the streaming hop's STFT steps, compared with the
# NumPy ufuncs of the offline path): no contraction into FMA, every operation rounded as NumPy does.
JIT_EXACT = dict(nogil=True, cache=True, fastmath=False, error_model="numpy", boundscheck=False)
