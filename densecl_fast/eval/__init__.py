"""Evaluation on frozen features: `python -m densecl_fast.eval MODE --checkpoint CKPT|random --data ...`.

Modules: `datasets` (labelled splits from the data sources), `features` (extraction once per
checkpoint and split, cached on disk), `knn` and `linear` (the protocols, as pure functions on
feature matrices), `__main__` (the command line).
"""
