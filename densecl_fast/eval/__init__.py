"""Evaluation of pretrained trunks: k-NN, linear probe, VOC07 SVM (full and low-shot), dense probe.

`python -m densecl_fast.eval MODE --checkpoint CKPT|random --data ... --out DIR`; see
docs/weights-and-eval.md ("Evaluation"). Features of the frozen trunk are extracted once and cached (`features.py`), the
protocols are pure functions on arrays (`knn.py`, `linear.py`, `svm.py`, `dense.py`).
"""
