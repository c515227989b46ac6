"""What each piece of MaskPro's layer reward buys, on a synthetic layer (seconds, one thread).

    python bench/maskpro_layer_ablation.py

A 96×256 layer whose inputs share a low-rank part (``corr`` sets its weight) and have 8 outlier
features; the prior is Wanda's mask. Each line is the summed output error of the learned mask
relative to Wanda's (per row the better of the two, as ``learn_layer`` keeps; in brackets the
learned top-N alone). ``variant`` is ``learn_layer``'s loop with two switches: the counterfactual
baseline (each group judged by error(sample) − error(sample with that group back at the prior))
or the row's error shared by all its groups, and the leave-one-out baseline over the K samples.
"""
import torch

from proxsparse.methods import maskpro as mp
from proxsparse.nm import NM, groups, topn_mask

torch.set_num_threads(1)
nm = NM(2, 4)

def variant(weight, prior, h, steps, k, lr, C, gen, counterfactual=True, loo=True):
    # learn_layer's loop, with the counterfactual baseline or the LOO switchable
    out_f, in_f = weight.shape
    m, n = 4, 2
    width = in_f // m
    w, prior = weight.float(), prior.float()
    prior_k = groups(prior, m).flatten(0, 1).t().repeat(1, k)
    w_k = groups(w, m).flatten(0, 1).t().repeat(1, k)
    diagonal = h.view(width, m, width, m).diagonal(dim1=0, dim2=2).unsqueeze(2).contiguous()
    logits = prior_k[:, : out_f * width].mul(C)
    for _ in range(steps):
        p = logits.softmax(0).repeat(1, k)
        picks, left = mp._draw(p, n, gen)
        kept = 1 - left.sign()
        grad = mp._grad_of_pairs(p, kept, never=left.sum(0))
        rows = (w_k - w_k * kept).t().reshape(k, out_f, in_f)
        if counterfactual:
            pulled = (rows @ h).view(-1, m).t()
            back = w_k * (kept - prior_k)
            change = 2 * pulled.contiguous()
            for j in range(m):
                change += (diagonal[:, j] * back[j].view(1, -1, width)).view(m, -1)
            reward = -(back * change).sum(0).view(k, -1)
        else:  # the row's error, shared by all its groups
            e = mp.row_errors(rows, h)  # [k, out]
            reward = e.unsqueeze(-1).expand(k, out_f, width).reshape(k, -1)
        if loo and k > 1:
            reward = reward - (reward.sum(0) - reward) / (k - 1)
        elif not counterfactual:
            at_prior = mp.row_errors(w * (1 - prior), h).repeat_interleave(width)
            reward = reward - at_prior.unsqueeze(0)
        scale = reward.view(k, out_f, width).square().mean((0, 2)).sqrt()
        adv = reward.view(k, out_f, width) / scale.clamp_min(mp.TINY).view(1, -1, 1)
        logits -= (lr / k) * (grad.view(m, k, -1) * adv.view(1, k, -1)).sum(1)
    final = topn_mask(logits.t().reshape(out_f, in_f), nm).float()
    e = mp.row_errors(torch.stack([w * (1 - final), w * (1 - prior)]), h)
    return float(torch.minimum(e[0], e[1]).sum() / e[1].sum()), float(e[0].sum() / e[1].sum())

for corr in [0.3, 0.1]:
    torch.manual_seed(0)
    out, inn, tok = 96, 256, 4096
    shared = torch.randn(tok, 32) @ torch.randn(32, inn)
    X = shared * corr + torch.randn(tok, inn)
    X[:, :8] *= 8
    W = torch.randn(out, inn) * (1 + torch.rand(inn))
    h = mp.gram(X)
    prior = topn_mask(W.abs() * h.diagonal().sqrt(), nm)
    for name, kw in [("counterfactual + LOO, K=8, T=16", dict(steps=16, k=8)),
                     ("counterfactual, no LOO, K=8, T=16", dict(steps=16, k=8, loo=False)),
                     ("counterfactual + LOO, K=2, T=64", dict(steps=64, k=2)),
                     ("counterfactual, K=1, T=128", dict(steps=128, k=1)),
                     ("row error + LOO, K=8, T=16", dict(steps=16, k=8, counterfactual=False)),
                     ("row error + LOO, K=8, T=256", dict(steps=256, k=8, counterfactual=False))]:
        kept, raw = variant(W, prior, h, lr=2.0, C=2.0, gen=torch.Generator().manual_seed(0), **kw)
        print(f"corr {corr}: {name}: layer error {kept:.4f}x Wanda's (top-N alone {raw:.4f}x)")
