"""Examples shipped with the repository, not installed with vora: run them from the repository root
(``python -m examples.demo``).

A regular package, not a namespace one: Python prefers a regular package anywhere on ``sys.path`` over a namespace
portion, and some installed distributions ship a top-level ``examples`` package (tqdm-multiprocess, which lmms-eval
pulls in, does), which would otherwise shadow this one even from the repository root.
"""
