"""Error analysis of one evaluation, in the manner of fastai's ``ClassificationInterpretation``: the predictions are
computed once, from the eval loop's outputs, and each view of the errors is a small method.

- :meth:`Interpretation.confusion_matrix`: counts, row = true class, column = predicted class;
- :meth:`Interpretation.per_class`: support, precision, recall, F1 and the class each is most often taken for;
- :meth:`Interpretation.confused_pairs`: the "confused twins", the class pairs most often taken for each other, with
  how they differ (:func:`relation`: ``year``, ``model`` or ``make``) and an example image of each side;
- :meth:`Interpretation.top_losses`: the wrong answers the model was surest of.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property

import torch

from twincar.data.classes import parse_car_name
from twincar.data.formats import Sample
from twincar.evaluation.loop import EvalOutputs


def relation(a: str, b: str) -> str:
    """How two class names differ: ``year`` (same family), ``model`` (same make) or ``make``."""
    ca, cb = parse_car_name(a), parse_car_name(b)
    return "year" if ca.family == cb.family else "model" if ca.make == cb.make else "make"


class Interpretation:
    """The predictions of labelled images, computed once: ``probs`` (N, K), ``preds`` (N,) and ``losses`` (N,), the
    NLL of each image's true class.

    Args:
        logits: (N, K) the logits the answers come from (the predictor's calibrated ones, in eval).
        labels: (N,) the true classes.
        samples: the N images, in the same order (the examples of :meth:`confused_pairs` and :meth:`top_losses`).
        class_names: the K class names.
    """

    def __init__(self, logits: torch.Tensor, labels: torch.Tensor, samples: Sequence[Sample],
                 class_names: Sequence[str]):
        self.labels, self.samples, self.class_names = labels, list(samples), list(class_names)
        self.probs = logits.softmax(1)
        self.preds = self.probs.argmax(1)
        self.losses = -self.probs[torch.arange(len(self.preds)), labels].clamp(min=1e-12).log()

    @classmethod
    def from_outputs(cls, out: EvalOutputs, class_names: Sequence[str]) -> Interpretation:
        """The interpretation of the eval loop's outputs, from their calibrated logits."""
        return cls(out.calibrated, out.labels, out.samples, class_names)

    @cached_property
    def _cm(self) -> torch.Tensor:
        k = len(self.class_names)
        return torch.bincount(self.labels * k + self.preds, minlength=k**2).reshape(k, k)

    def confusion_matrix(self) -> torch.Tensor:
        """(K, K) counts: row = true class, column = predicted class."""
        return self._cm.clone()

    def per_class(self) -> list[dict]:
        """Per class: support, precision, recall, F1 and the other class it is most often taken for (the rows of
        ``per_class.csv``)."""
        cm, names = self._cm, self.class_names
        rows = []
        tp, support, predicted = cm.diag(), cm.sum(1), cm.sum(0)
        off = cm.clone().fill_diagonal_(0)
        for k, name in enumerate(names):
            p = tp[k].item() / predicted[k].item() if predicted[k] else 0.0
            r = tp[k].item() / support[k].item() if support[k] else 0.0
            other = int(off[k].argmax())
            car = parse_car_name(name)
            rows.append({
                "label": k, "name": name, "make": car.make, "model": car.model, "year": car.year or "",
                "support": int(support[k]), "precision": round(p, 6), "recall": round(r, 6),
                "f1": round(2 * p * r / (p + r), 6) if p + r else 0.0,
                "most_confused_with": names[other] if off[k, other] else "",
                "most_confused_count": int(off[k, other]),
            })
        return rows

    def confused_pairs(self, top: int = 20) -> list[dict]:
        """The ``top`` class pairs most often confused (either way; most first): ``a_as_b``, ``b_as_a``, ``total``,
        how they differ (``differ_in``, :func:`relation`) and an example sample of each side (one it got wrong as
        the other, when there is one; None when the class has no image)."""
        cm, names, labels, preds = self._cm, self.class_names, self.labels, self.preds
        both = (cm + cm.T).triu(diagonal=1)
        order = both.flatten().argsort(descending=True)[:top]
        pairs = []
        for flat in order.tolist():
            a, b = divmod(flat, len(names))
            if both[a, b] == 0:
                break

            def example(x: int, y: int) -> Sample | None:
                hits = ((labels == x) & (preds == y)).nonzero().flatten().tolist()
                hits = hits or (labels == x).nonzero().flatten().tolist()
                return self.samples[hits[0]] if hits else None

            pairs.append({
                "name_a": names[a], "name_b": names[b], "a_as_b": int(cm[a, b]), "b_as_a": int(cm[b, a]),
                "total": int(both[a, b]), "differ_in": relation(names[a], names[b]),
                "example_a": example(a, b), "example_b": example(b, a),
            })
        return pairs

    def top_losses(self, k: int = 16) -> list[dict]:
        """The ``k`` wrong answers with the highest loss, highest first: ``index``, ``sample``, ``true`` and
        ``pred`` (class names), ``confidence`` (of the predicted class) and ``loss``."""
        wrong = (self.preds != self.labels).nonzero().flatten()
        worst = wrong[self.losses[wrong].argsort(descending=True)][:k].tolist()
        return [{"index": i, "sample": self.samples[i], "true": self.class_names[self.labels[i]],
                 "pred": self.class_names[self.preds[i]], "confidence": self.probs[i, self.preds[i]].item(),
                 "loss": self.losses[i].item()} for i in worst]
