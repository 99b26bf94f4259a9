"""The measurement engines: pure functions of (network, plans or paths, batches) that return
tensors and numbers. No files, W&B or figures here (src/results.py and src/figures.py do that), so
a notebook can call them on any `Network`.

- `lesion`: test error under many lesion plans, reusing the unlesioned prefix (Figs 3-5, 8);
- `paths`: the gradient of sampled paths of the unraveled view (Figs 6b, 6c);
- `decomposition`: the exact per-length decomposition of the input gradient.
"""
