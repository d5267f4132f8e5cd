"""Multi-GPU generation over torch.distributed: Ulysses sequence parallelism and CFG parallelism.

    config.py   ParallelConfig (world size = ulysses_degree * (2 if cfg_parallel else 1)), its validation,
                the --ulysses-degree/--cfg-parallel arguments (no torch: the server's CLI imports it)
    group.py    process group init/teardown (NCCL/RCCL, XCCL, gloo), the rank layout, the active state
    ulysses.py  sharding the DiT's tokens and the all-to-all around attention (used by models/flux|wan.py)
    cfg.py      conditional/unconditional branches on different ranks (used by the pipelines)
    launch.py   load_parallel_runner: rank 0 serves, the other ranks follow (spawned or torchrun)

Nothing here is imported eagerly: this package must stay importable without torch.
"""
