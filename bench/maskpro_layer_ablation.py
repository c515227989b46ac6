"""What each piece of MaskPro's layer reward buys, on a synthetic layer (seconds, one thread).

    python bench/maskpro_layer_ablation.py

A 96×256 layer whose inputs share a low-rank part (``corr`` sets its weight) and have 8 outlier
features; the prior is Wanda's mask. Each line is the summed output error of the learned mask
relative to Wanda's (per row the better of the two, as ``learn_layer`` keeps), with its two
ablation switches: the counterfactual baseline (each group judged by error(sample) − error(sample
with that group back at the prior)) or the row's error shared by all its groups, and the
leave-one-out baseline over the K samples.
"""
import torch

from proxsparse.methods import maskpro as mp
from proxsparse.nm import NM, topn_mask

torch.set_num_threads(1)
nm = NM(2, 4)

for corr in [0.3, 0.1]:
    torch.manual_seed(0)
    out, inn, tok = 96, 256, 4096
    shared = torch.randn(tok, 32) @ torch.randn(32, inn)
    X = shared * corr + torch.randn(tok, inn)
    X[:, :8] *= 8
    W = torch.randn(out, inn) * (1 + torch.rand(inn))
    h = mp.gram(X)
    prior = topn_mask(W.abs() * h.diagonal().sqrt(), nm)
    for name, kw in [
            ("counterfactual + LOO, K=8, T=16", dict(steps=16, samples=8)),
            ("counterfactual, no LOO, K=8, T=16", dict(steps=16, samples=8, leave_one_out=False)),
            ("counterfactual + LOO, K=2, T=64", dict(steps=64, samples=2)),
            ("counterfactual, K=1, T=128", dict(steps=128, samples=1)),
            ("row error + LOO, K=8, T=16", dict(steps=16, samples=8, counterfactual=False)),
            ("row error + LOO, K=8, T=256", dict(steps=256, samples=8, counterfactual=False))]:
        result = mp.learn_layer(W, prior, h, nm, lr=2.0, logit_scale=2.0,
                                generator=torch.Generator().manual_seed(0), **kw)
        ratio = float(result.error / result.prior_error)
        print(f"corr {corr}: {name}: layer error {ratio:.4f}x Wanda's")
