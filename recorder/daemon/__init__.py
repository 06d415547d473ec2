"""The recorder daemon's parts, composed by :mod:`recorder.service`.

* :mod:`~recorder.daemon.backoff` — retry delays (exponential, capped, jittered);
* :mod:`~recorder.daemon.resume` — per-run state files: the recording in progress and its
  last durably written Kafka offsets, so a restart resumes without loss or duplicates;
* :mod:`~recorder.daemon.pump` — how many events a run may hold before its topic is paused;
* :mod:`~recorder.daemon.controller` — one :class:`RunController` (and worker thread) per run;
* :mod:`~recorder.daemon.recording` — what a run records into (protocols) and the HDF5
  recording factory, with writer processes started ahead of time;
* :mod:`~recorder.daemon.bridge` — the live Karabo bridge as a run sees it (protocols, status);
* :mod:`~recorder.daemon.leftovers` — the ``.partial`` file a crashed process left, recovered
  before its recording resumes;
* :mod:`~recorder.daemon.admin` — admin commands in, exactly one reply out;
* :mod:`~recorder.daemon.adminlink` — the admin/status topics' Kafka side;
* :mod:`~recorder.daemon.heartbeat` — the status document and its schedule;
* :mod:`~recorder.daemon.silence` — a periodic run whose topic went silent (gateway restarts);
* :mod:`~recorder.daemon.diskspace` / :mod:`~recorder.daemon.diskprobe` — free space where
  the runs write, judged (pure) and checked (a thread of its own: a hung disk must not hang
  the main loop).
"""
