"""Collectives for process groups that mix GPU and CPU ranks.

``factory.for_group`` chooses, for one group, the shared-memory implementation (``shm``: every rank
on this host, in one segment that ``shm_segment`` names, sizes and opens; a group's one GPU rank
queues its part on its CUDA stream, ``gpu_stream``, small all-reduces as one CUDA kernel,
``fused_kernel``) or none (pinned host staging + gloo, in ``communicator``). ``sweep`` removes
segments that dead processes left.
"""
