"""The paper's baseline for attribute extraction: a multinomial logistic-regression probe, k-fold CV."""

from __future__ import annotations

from typing import Sequence

import torch


def fit_logistic(
    x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float = 1e-2, steps: int = 100
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights [d, c] and bias [c] of an L2-regularised softmax regression, fitted with L-BFGS."""
    weight = torch.zeros(x.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight + bias, y) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def probe_accuracy(features: torch.Tensor, labels: Sequence[str], folds: int = 3, seed: int = 0) -> list[bool]:
    """Per sample, whether a probe trained on the other folds predicts its label (k-fold cross-validation).

    The classes are the labels seen in the training folds (the paper's proxy for the object range), so a
    test label never seen in training counts as wrong. Features are standardised with training statistics.
    """
    n = len(labels)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    correct = [False] * n
    x_all = features.double()
    for fold in range(folds):
        test = order[fold::folds]
        train = [k for k in order if k not in set(test)]
        classes = sorted({labels[k] for k in train})
        if len(classes) == 1:  # nothing to learn: the probe always answers the one class it saw
            for k in test:
                correct[k] = labels[k] == classes[0]
            continue
        index = {label: c for c, label in enumerate(classes)}
        mean, std = x_all[train].mean(0), x_all[train].std(0).clamp_min(1e-6)
        x_train, x_test = (x_all[train] - mean) / std, (x_all[test] - mean) / std
        weight, bias = fit_logistic(x_train, torch.tensor([index[labels[k]] for k in train]), len(classes))
        predicted = (x_test @ weight + bias).argmax(-1).tolist()
        for k, p in zip(test, predicted):
            correct[k] = classes[p] == labels[k]
    return correct


__all__ = ["fit_logistic", "probe_accuracy"]
