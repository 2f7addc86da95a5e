"""The lightweight attribute predictor of stage 2: P(attribute | item embedding), logistic regression or a
1-hidden-layer MLP, trained on the training split's known-valued items; its held-out AUC says how much the
metric-ordered sequences can be trusted."""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import mannwhitneyu
from torch import nn

from r4t_pipeline.modit.config import PredictorConfig


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve = P(score of a random positive > score of a random negative), ties count 1/2:
    the Mann-Whitney U statistic over n_pos x n_neg. NaN when a class is missing."""
    labels = np.asarray(labels, bool)
    positive, negative = np.asarray(scores)[labels], np.asarray(scores)[~labels]
    if len(positive) == 0 or len(negative) == 0:
        return float("nan")
    return float(mannwhitneyu(positive, negative).statistic / (len(positive) * len(negative)))


def _network(dim: int, hidden: int) -> nn.Module:
    if hidden == 0:
        return nn.Linear(dim, 1)
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 1))


def fit_predictor(vectors: np.ndarray, labels: np.ndarray, cfg: PredictorConfig) -> nn.Module:
    """Full-batch Adam on class-balanced logistic loss (the positive class is the rare quarter or tenth)."""
    if labels.all() or not labels.any():
        raise ValueError(f"the attribute predictor needs both classes in its training items, got {labels.sum()} "
                         f"positives of {len(labels)}")
    torch.manual_seed(cfg.seed)
    x = torch.as_tensor(vectors, dtype=torch.float32)
    y = torch.as_tensor(labels, dtype=torch.float32)
    model = _network(x.shape[1], cfg.hidden)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=(1 - y).sum() / y.sum())
    for _ in range(cfg.epochs):
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x).squeeze(-1), y).backward()
        optimizer.step()
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, vectors: np.ndarray, batch_size: int = 65536) -> np.ndarray:
    x = torch.as_tensor(vectors, dtype=torch.float32)
    return np.concatenate([torch.sigmoid(model(x[i:i + batch_size])).squeeze(-1).numpy()
                           for i in range(0, len(x), batch_size)])


def attribute_scores(vectors: np.ndarray, known: np.ndarray, positive: np.ndarray, split: np.ndarray,
                     cfg: PredictorConfig) -> tuple[np.ndarray, dict[str, float]]:
    """Train on known-valued training items (split code 0); predicted P(attribute) for every item, and the AUC
    on the known-valued items of each split (train, val = 1, test = 2)."""
    train = known & (split == 0)
    model = fit_predictor(vectors[train], positive[train], cfg)
    scores = predict(model, vectors)
    aucs = {name: roc_auc(scores[known & (split == code)], positive[known & (split == code)])
            for code, name in enumerate(("train", "val", "test"))}
    return scores.astype(np.float32), aucs
