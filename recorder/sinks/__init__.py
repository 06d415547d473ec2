"""HDF5 sink: iteration events in, HDF5 files out.

* :mod:`recorder.sinks.options` — ``OutputOptions`` (the run definition's ``output:`` block)
  and safe file naming [pure].
* :mod:`recorder.sinks.codec` — lossless split of a PVSample into columns + "rest" [pure].
* :mod:`recorder.sinks.buffer` — iteration bookkeeping and column buffers [pure].
* :mod:`recorder.sinks.hdf5` — ``HDF5Recording``, the API the daemon calls (h5py).
* :mod:`recorder.sinks.livefile` / :mod:`recorder.sinks.finalize` — live (SWMR,
  log-structured) layout and its rewrite into the final per-PV layout (h5py); the
  rewrite's parts are the ``final_*`` modules (see :mod:`recorder.sinks.finalize`).
* :mod:`recorder.sinks.recover` / :mod:`recorder.sinks.superblock` — crash recovery.

Only this package's adapter modules import h5py; importing ``recorder.sinks`` does not.
The format is documented in docs/file-format.md.
"""
