"""The NVIDIA DALI backend (`data.backend=dali`, the default on GPUs when DALI is installed).

    params   the host-side random draws the graph is fed (numpy; no DALI needed)
    shards   webdataset shard lists and their indexes (no DALI needed)
    graph    the DALI graphs: the one module that imports DALI
    feeds    folder and shard feeds: what each batch holds, bad-sample substitution
    loader   DaliTwoViewLoader, the loader protocol over a feed

Only `params` and `shards` import without DALI, so this package does not import `loader` eagerly:
`densecl_fast.data.build_loader` reaches it only for backend=dali.
"""


def __getattr__(name):
    if name == "DaliTwoViewLoader":
        from .loader import DaliTwoViewLoader
        return DaliTwoViewLoader
    raise AttributeError(name)
