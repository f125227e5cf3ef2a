"""`tint fit`'s estimate of the *student's* accuracy: k-fold cross-validation.

A fit has no test set: every labelled image trains. The one honest way to say how good the
student is, without asking for more labels, is to train students that did not see some of
the labelled images and score them on those. Data flow, per fold f of k::

    1. split     the labelled images of each class round-robin into k folds; fold f holds
                 out its share of every class that keeps at least one image
    2. episode   a fold episode: support = the rest, queries = the held-out images
    3. student   the fit's own units on it: the teacher fitted to the fold's support (it
                 never sees the held-out images either) and a student distilled with the
                 fit's recipe and settings, keyed and resumable like any unit
    4. score     the fold student's accuracy on its held-out images

The estimate is the accuracy pooled over every held-out image. Two differences from the
shipped student, said on the model card: fold students train on (k-1)/k of the labelled
images, and without generated images (the generator was specialised on every labelled
image, held-out ones included, so its images would leak them). Validated against real
held-out accuracy in docs/fit.md.
"""

from __future__ import annotations

from dataclasses import replace

import torch

FOLD_INDEX_BASE = 1000  # fold episodes' indices: apart from the fit's own episode 0


def fold_split(support: list[list[str]], folds: int, fold: int) -> tuple[list[list[str]], list[list[str]]]:
    """(kept, held out) per class: image j of a class is held out in fold j % k, unless
    that would leave the class without a support image."""
    kept, held = [], []
    for items in support:
        out = [item for j, item in enumerate(items) if j % folds == fold]
        if len(out) == len(items):
            out = []
        kept.append([item for item in items if item not in out])
        held.append(out)
    return kept, held


def fold_episode(episode, kept: list[list[str]], held: list[list[str]], fold: int):
    """The fit's episode with the fold's support and the held-out images as queries."""
    key = {**episode.key, "support": kept, "query": held, "fold": fold}
    folder = episode.folder.parent / f"fold{fold:02d}"
    return replace(episode, index=FOLD_INDEX_BASE + fold, folder=folder, support=kept, query=held, key=key)


def fold_context(ctx):
    """The fit's context with its student reading no generated images (they saw every
    labelled image); models and data loaded once are shared."""
    from tint.stage_bodies import make_context

    students = [replace(s, sources=[n for n in (s.sources or ctx.config.distill.sources) if n != "synthetic"])
                for s in ctx.config.students]
    fold_ctx = make_context(replace(ctx.config, students=students), ctx.store)
    fold_ctx.cache.update({k: v for k, v in ctx.cache.items()
                           if k in ("dataset", "base_items", "base_images") or k.startswith("teacher:")})
    return fold_ctx


def cross_validate(ctx, episode, folds: int) -> dict:
    """Pooled held-out accuracy of k fold students (and of the teacher on the same images)."""
    from tint.evaluation.evaluate import evaluate_on_episode
    from tint.stages import fitted_teacher, trained_student
    from tint.students.distill import load_student

    fold_ctx = fold_context(ctx)
    correct = teacher_correct = scored = 0
    per_fold = []
    for fold in range(folds):
        kept, held = fold_split(episode.support, folds, fold)
        if not any(held):
            continue
        sub = fold_episode(episode, kept, held, fold)
        trained = trained_student(fold_ctx, sub, 0)
        model, _ = load_student(trained.folder / trained.marker["weights"])
        items, labels = sub.query_items()
        images, labels = ctx.dataset.load_tensor(items), torch.tensor(labels)
        teacher = fitted_teacher(fold_ctx, sub)
        with torch.no_grad():
            accuracy = evaluate_on_episode(model.to(ctx.device), images.to(ctx.device), labels.to(ctx.device))
            teacher_hits = int((teacher.predict_proba(images).argmax(1).cpu() == labels).sum())
        correct += round(accuracy * len(items))
        teacher_correct += teacher_hits
        scored += len(items)
        per_fold.append({"fold": fold, "n": len(items), "student": accuracy, "teacher": teacher_hits / len(items)})
    ctx.cache["teacher_fitted_for"] = None  # the fold fits replaced the fit's own
    return {"student": correct / scored if scored else None, "teacher": teacher_correct / scored if scored else None,
            "n_scored": scored, "folds": folds, "per_fold": per_fold}
