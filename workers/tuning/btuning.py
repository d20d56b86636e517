"""B-Tuning (You et al., JMLR 2022 "Ranking and Tuning Pre-trained Models"; official code thuml/LogME b_tuning.py).

Teachers k = 1..K (the top-K models by LogME) each give features F_k (N x D_k) of the training set and LogME
posterior means m_k (C x D_k). Their weights are pi = softmax(LogME_k / T). The teachers' combined prediction

    target = sum_k pi_k F_k m_k^T                                    (N x C)

is computed ONCE here, from cached features (teachers are frozen, so rerunning them each epoch, as the reference
does, gives the same numbers). The target model t keeps its own m_t (C x D_t), computed by LogME on its pretrained
features and then fixed, and maps its current pooled features phi_t(x) (mean over the attention mask of the last
hidden state, or what the job's pooling takes; image models: their backbone's output pooled as ranking pools it,
see workers.tuning.regularizers.pooled_features) to phi_t(x) m_t^T. Training loss:

    CE(head(x), y) + tradeoff * mean_batch ||phi_t(x) m_t^T - target(x)||^2

(the reference uses nn.MSELoss, a mean over N x C, with tradeoff 100; ours sums over C instead, so its tradeoff
is the reference's divided by C). Because every teacher's prediction lives in the C-dimensional label space,
teachers of any width combine.

C counts LogME's targets: classes (one-hot), labels (multi-label) or regression outputs (standardised, as rank jobs
score them); the task loss is then the task's own (CE, BCE or MSE). The paper distils classification; the
posterior predictive mean is defined the same way for the other targets, so they are distilled alike.

Arrays in: the caller supplies features and m's (workers.ranking.logme(...).weights and the feature cache).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from workers.tuning.regularizers import Regularizer, SetupInfo, StepContext, pooled_features


def teacher_weights(scores: Sequence[float], temperature: float = 0.1) -> np.ndarray:
    """pi = softmax(score / T), computed stably."""
    if temperature <= 0:
        raise ValueError("temperature must be > 0")
    s = np.asarray(scores, dtype=np.float64) / temperature
    if s.ndim != 1 or s.size == 0 or not np.all(np.isfinite(s)):
        raise ValueError("scores must be a non-empty list of finite numbers")
    e = np.exp(s - s.max())
    return e / e.sum()


def _with_bias(features: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """LogME with add_bias=True returns D+1 wide weights: give the features their column of ones."""
    if weights.shape[1] == features.shape[1] + 1:
        return np.hstack([features, np.ones((features.shape[0], 1), dtype=features.dtype)])
    return features


def linear_prediction(features: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """F m^T (N x C) for features (N x D) and LogME posterior means m (C x D or C x D+1)."""
    f = np.asarray(features, dtype=np.float64)
    m = np.asarray(weights, dtype=np.float64)
    if f.ndim != 2 or m.ndim != 2:
        raise ValueError("features must be (N, D) and weights (C, D)")
    f = _with_bias(f, m)
    if f.shape[1] != m.shape[1]:
        raise ValueError(f"features have {f.shape[1]} columns but the LogME weights {m.shape[1]}")
    return f @ m.T


def distillation_target(features: Sequence[np.ndarray], weights: Sequence[np.ndarray],
                        pi: Sequence[float]) -> np.ndarray:
    """sum_k pi_k F_k m_k^T (N x C)."""
    if not (len(features) == len(weights) == len(pi)) or len(features) == 0:
        raise ValueError("need the same, non-zero number of teacher features, weights and weights pi")
    preds = [linear_prediction(f, m) for f, m in zip(features, weights, strict=True)]
    shapes = {p.shape for p in preds}
    if len(shapes) != 1:
        raise ValueError(f"teachers disagree on (N, C): {sorted(shapes)}")
    return sum(float(p_k) * pred for p_k, pred in zip(pi, preds, strict=True))


def btuning_penalty(student_features: Tensor, student_weights: Tensor, target: Tensor) -> Tensor:
    """mean over the batch of ||phi m_t^T - target||^2 (squared norm over the C outputs)."""
    if student_weights.shape[1] == student_features.shape[1] + 1:
        ones = torch.ones(student_features.shape[0], 1, dtype=student_features.dtype, device=student_features.device)
        student_features = torch.cat([student_features, ones], 1)
    pred = student_features.float() @ student_weights.float().T
    return ((pred - target.float()) ** 2).sum(-1).mean()


class BTuningTeacher:
    """The frozen teachers' combined prediction on the training set, plus the target model's fixed m_t.

    features[k]: (N, D_k) teacher k's pooled features of the training texts, in the training set's order.
    weights[k]:  (C, D_k) teacher k's LogME posterior means on those features.
    scores[k]:   teacher k's LogME score (per-example log evidence).
    student_weights: (C, D_t) the target model's LogME posterior means on its own pretrained features.
    pooling: how those features were pooled ("mean" or "head", as the rank job's option); the student's features
        are pooled the same way during training, or m_t would be applied to features it was not fitted on.
    """

    def __init__(self, features: Sequence[np.ndarray], weights: Sequence[np.ndarray], scores: Sequence[float],
                 student_weights: np.ndarray, temperature: float = 0.1,
                 names: Sequence[str] | None = None, pooling: str = "mean") -> None:
        self.pooling = pooling
        self.names = list(names) if names is not None else [f"teacher{k}" for k in range(len(features))]
        self.scores = [float(s) for s in scores]
        self.temperature = float(temperature)
        self.pi = teacher_weights(self.scores, self.temperature)
        self.target = distillation_target(features, weights, self.pi)  # (N, C), computed once
        self.student_weights = np.asarray(student_weights, dtype=np.float64)
        if self.student_weights.ndim != 2 or self.student_weights.shape[0] != self.target.shape[1]:
            raise ValueError(f"student_weights must be (C={self.target.shape[1]}, D_t), "
                             f"got {self.student_weights.shape}")

    @classmethod
    def from_target(cls, target: np.ndarray, student_weights: np.ndarray, scores: Sequence[float],
                    temperature: float = 0.1, names: Sequence[str] | None = None,
                    pooling: str = "mean") -> BTuningTeacher:
        """Rebuild from a stored combined prediction (N x C), e.g. one cached next to the features."""
        self = cls.__new__(cls)
        self.pooling = pooling
        self.names = list(names) if names is not None else [f"teacher{k}" for k in range(len(scores))]
        self.scores = [float(s) for s in scores]
        self.temperature = float(temperature)
        self.pi = teacher_weights(self.scores, self.temperature)
        self.target = np.asarray(target, dtype=np.float64)
        self.student_weights = np.asarray(student_weights, dtype=np.float64)
        if self.target.ndim != 2 or self.student_weights.shape[0] != self.target.shape[1]:
            raise ValueError("target must be (N, C) and student_weights (C, D_t)")
        return self

    @property
    def num_examples(self) -> int:
        return int(self.target.shape[0])

    def describe(self) -> dict[str, Any]:
        return {"teachers": self.names, "scores": self.scores, "weights": self.pi.tolist(),
                "temperature": self.temperature, "pooling": self.pooling}


def fit_teacher(teacher_features: Sequence[np.ndarray], student_features: np.ndarray, targets: np.ndarray, task: str,
                num_classes: int | None = None, temperature: float = 0.1, names: Sequence[str] | None = None,
                pooling: str = "mean") -> BTuningTeacher:
    """Fit LogME on each teacher's and the student's features of the training rows and combine the teachers.

    targets: what LogME scores (workers.pipeline.ranking_targets of the training labels), so every m predicts the
    same columns; features in the order of those rows."""
    from workers.ranking.logme import logme

    fits = [logme(f, targets, task=task, num_classes=num_classes) for f in teacher_features]
    student = logme(student_features, targets, task=task, num_classes=num_classes)
    return BTuningTeacher(features=list(teacher_features), weights=[f.weights for f in fits],
                          scores=[f.score for f in fits], student_weights=student.weights, temperature=temperature,
                          names=names, pooling=pooling)


class BTuningLoss(Regularizer):
    """The B-Tuning term as a training-loop piece: tradeoff * ||phi_t(x) m_t^T - target[index]||^2, phi_t the
    student's current features pooled as the teacher's were (`pooled_features`)."""

    name = "btuning"
    needs_hidden_states = True

    def __init__(self, teacher: BTuningTeacher, tradeoff: float = 1.0) -> None:
        super().__init__(tradeoff=tradeoff)
        self.teacher = teacher
        self.tradeoff = float(tradeoff)
        self._target: Tensor | None = None
        self._m_t: Tensor | None = None

    def setup(self, model: torch.nn.Module, info: SetupInfo | None = None) -> None:
        device = next(model.parameters()).device
        if info is not None and info.train_labels is not None and len(info.train_labels) != self.teacher.num_examples:
            raise ValueError(f"B-Tuning teacher covers {self.teacher.num_examples} examples, the training set has "
                             f"{len(info.train_labels)}")
        self._target = torch.as_tensor(self.teacher.target, dtype=torch.float32, device=device)
        self._m_t = torch.as_tensor(self.teacher.student_weights, dtype=torch.float32, device=device)

    def extra_loss(self, ctx: StepContext) -> Tensor:
        assert ctx.hidden is not None and self._target is not None and self._m_t is not None
        phi = pooled_features(ctx, self.teacher.pooling)
        target = self._target[ctx.batch["index"].to(self._target.device)]
        return self.tradeoff * btuning_penalty(phi, self._m_t, target)
