"""What each block does to the representation, beside how big its branch is and what deleting it costs.

    python -m analyses.representation --out runs/representation

A block's *output* here is the residual stream right after its addition, F(x) + s(x), before
any activation the block applies after the addition (a ResNet block's final ReLU): the one
tensor every residual architecture has at each block. Its *input* h is s(x) for an identity
shortcut, and the block module's input where the shortcut is a projection. Outputs are pooled
to one vector per sample (`pool`): images averaged over their spatial positions, sequences over
their positions (only the real ones when the batch has an `attention_mask`).

- Linear probes (Alain and Bengio 2016): a logistic regression on each block's standardised
  pooled output, fitted on training data and scored on the evaluation data: where class
  information becomes linearly readable, and whether blocks the deletion rule calls skipped add
  any (`gain`: a block's probe accuracy minus the one before it).
- Logit lens: the model's own head (its last nn.Linear with one output per class) applied to
  each pooled block output of the width it takes: accuracy, and agreement with the model's
  final prediction. It cannot apply to blocks of another width (`reason` says so); it sees the
  sum before the block's last activation, so even the last block can disagree a little.
- Iterative refinement (Jastrzebski et al. 2018): per sample cos(F(h), dL/dh), the branch
  against the gradient of the loss at the block's input, and ||F(h)|| / ||h||. A negative
  cosine means the block moves the features down the loss (-1: straight down the gradient).
- Representation similarity: linear CKA (Kornblith et al. 2019) between the outputs of every
  pair of blocks. Computed exactly while streaming (`CkaAccumulator`): linear CKA needs only
  the features' centred second moments, which are sums over samples, so memory is O(D^2) for
  D pooled features of all blocks together (1,008 for the default ResNet-56: 8 MB), whatever
  the number of samples, and the result equals the all-at-once CKA up to rounding. (This is not
  the minibatch estimator of Nguyen, Raghu and Kornblith 2021, an average of per-batch unbiased
  HSIC estimates, which differs from the full-data value.)
- Block by class: the accuracy each class loses when each block is deleted (from the sweep's
  per-class accuracies), and the classes each block serves most.

Tasks (`probe.scoring.tasks`): linear probes, the logit lens and block by class need class labels, so
only classification has them; for other tasks those tables are empty and
`RepresentationResult.notes` says why. CKA needs no labels and works for every task.
Refinement differentiates the task's own loss (the next-token NLL for `lm`, your own loss);
drift has no loss to descend, so it has no refinement either.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn
from torch.utils import _pytree as pytree

import probe
from analyses.attribution import differentiable_loss
from analyses.uncertainty import CLASS_COLUMNS, per_class_drops
from probe.batches import Batch, batches, call_model, class_targets, explained_misfit, input_dtype, model_device
from probe.discovery.find import Block, resolve_blocks
from probe.errors import ProbeError
from probe.deletion.evaluation import single_block_sweep
from probe.instrument.hooks import attached, model_preserved, tap_pairs
from probe.scoring.results import Evaluation
from probe.deletion.block_table import check_table, join_block_table
from probe.scoring.tasks import Classification, Task, logits_of, resolve_task
from probe.scoring.verdict import VerdictRule, cost_column

__all__ = ["CkaAccumulator", "RepresentationResult", "block_classes", "cka", "linear_probes", "logit_lens", "pool",
           "refinement", "representation", "stages", "story", "summary"]

PROBE_COLUMNS = ["block", "position", "stage", "width", "train_accuracy", "test_accuracy", "previous_test_accuracy",
                 "gain", "train_samples", "test_samples"]
LENS_COLUMNS = ["block", "position", "stage", "width", "applicable", "accuracy", "agreement", "samples", "reason"]
REFINEMENT_COLUMNS = ["block", "position", "stage", "grad_cosine", "grad_cosine_std", "step_ratio", "step_ratio_std",
                      "samples"]
CKA_COLUMNS = ["block_a", "position_a", "stage_a", "block_b", "position_b", "stage_b", "cka", "samples"]
SUMMARY_COLUMNS = ["block", "position", "stage", "ratio", "accuracy_drop", "verdict", "probe_accuracy", "probe_gain",
                   "lens_accuracy", "grad_cosine", "step_ratio", "cka_previous", "cka_next", "top_class",
                   "top_class_drop", "bn_recalibrated"]
CLASSES_COLUMNS = [*CLASS_COLUMNS, "rank"]
NO_DRIFT_REFINEMENT = ("refinement compares each branch with the gradient of the loss, and drift has no loss to "
                       "descend: it is 0 at the intact model and smallest there, so its gradient is 0.")
_MAX_ITER = 2000  # lbfgs iterations per probe; standardised features converge well before
_TINY = torch.finfo(torch.float32).tiny


@dataclass
class RepresentationResult:
    """Tables of `representation`; blocks in forward order, `stage` numbered from 1 (a new
    stage starts at each block whose shortcut is not the identity).

    probes (linear_probes.csv): one row per block: block, position, stage, width (pooled
        features), train_accuracy and test_accuracy of its linear probe (fractions),
        previous_test_accuracy (of the probe on the previous block's output; for the first
        block, on its input), gain (test_accuracy minus previous_test_accuracy), train_samples,
        test_samples.
    lens (logit_lens.csv): one row per block: block, position, stage, width, applicable (bool:
        the head takes this width), accuracy and agreement (share of samples where the head on
        this block predicts the label / the model's own final prediction; NaN when not
        applicable), samples, reason (why not applicable; "" when it is).
    refinement (refinement.csv): one row per block: block, position, stage, grad_cosine (mean
        over samples of cos(F(h), dL/dh); NaN where F(h) and h differ in shape), grad_cosine_std,
        step_ratio (mean of ||F(h)|| / ||h||), step_ratio_std, samples.
    cka (cka.csv): one row per ordered pair of blocks: block_a, position_a, stage_a, block_b,
        position_b, stage_b, cka (linear CKA of their pooled outputs over the evaluation data),
        samples.
    classes (block_classes.csv): one row per (block, class): block, position, class, samples,
        baseline_accuracy, accuracy (block deleted), accuracy_drop, bn_recalibrated, rank (1:
        the class that loses most when this block is deleted).
    summary (representation.csv): one row per block, everything together: block, position,
        stage, ratio (||F(x)||/||s(x)||), accuracy_drop (deleted alone), verdict, probe_accuracy
        (test), probe_gain, lens_accuracy, grad_cosine, step_ratio, cka_previous and cka_next
        (CKA with the neighbouring blocks; NaN at the ends), top_class and top_class_drop (the
        class that loses most when the block is deleted, and how much; <NA> and NaN when no
        class loses anything), bn_recalibrated.
        Other tasks: accuracy_drop is replaced by the task's cost column (loss_increase or
        drift, `probe.scoring.verdict.cost_column`); the columns of tables that do not apply are NaN.
    notes: {table: why it is empty} for the tables that do not apply to the task, keyed by
        field name ("probes", "lens", "classes": no class labels outside classification;
        "refinement": drift has no loss). Empty for classification.
    """

    probes: pd.DataFrame
    lens: pd.DataFrame
    refinement: pd.DataFrame
    cka: pd.DataFrame
    classes: pd.DataFrame
    summary: pd.DataFrame
    notes: dict[str, str] = field(default_factory=dict)

    def tables(self) -> dict[str, pd.DataFrame]:
        """{CSV name: table}, as the command and `probe.ablate` write them."""
        return {"linear_probes": self.probes, "logit_lens": self.lens, "refinement": self.refinement,
                "cka": self.cka, "block_classes": self.classes, "representation": self.summary}


# --- block outputs ----------------------------------------------------------------------------


def pool(output: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """One float32 vector per sample: (batch, features).

    (batch, channels, *spatial) is averaged over the spatial positions (global average pooling),
    (batch, positions, features) over the positions (a transformer's layout), and (batch,
    features) kept as it is. mask: a (batch, positions) attention mask (1: a real token, 0:
    padding); a sequence output is then averaged over its real positions only.
    """
    if output.dim() < 2:
        raise ProbeError(f"a block output of shape {tuple(output.shape)} has no features per sample to probe.")
    if output.dim() == 2:
        return output.float()
    if output.dim() == 3 and mask is not None and tuple(mask.shape) == tuple(output.shape[:2]):
        weights = mask.to(torch.float32).unsqueeze(2)  # (batch, positions, 1)
        return (output.float() * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
    dims = (1,) if output.dim() == 3 else tuple(range(2, output.dim()))
    return output.mean(dim=dims, dtype=torch.float32)


def stages(blocks: Sequence[Block]) -> list[int]:
    """Each block's stage, from 1: a new one starts at every block whose shortcut is not the
    identity (a projection or padding changes the shape, as between a ResNet's stages)."""
    numbers, stage = [], 0
    for i, block in enumerate(blocks):
        stage += 1 if i == 0 or block.shortcut is not None else 0
        numbers.append(stage)
    return numbers


def _first_tensor(args: tuple) -> torch.Tensor:
    return next(value for value in args if isinstance(value, torch.Tensor))


def _ran_twice(block: Block) -> ProbeError:
    return ProbeError(f"block {block.name!r} ran more than once in one forward; its representation has no single "
                      "output per sample. Leave it out with blocks=.")


def _check_reiterable(data: Iterable, what: str) -> None:
    if iter(data) is data:
        raise ProbeError(f"{what} passes over the data more than once; give a DataLoader or a list of batches, "
                         "not a one-shot iterator or generator.")


Visit = Callable[[torch.Tensor, list[torch.Tensor], object, Batch], None]


def _walk(model: nn.Module, data: Iterable, blocks: Sequence[Block], visit: Visit, *, progress: bool,
          desc: str) -> None:
    """Run `data` through `model` (no gradients); per batch call visit(the first block's pooled
    input, each block's pooled output in block order, the model's outputs, the `Batch`). The
    model is left as found. Sequence outputs are pooled over the positions the batch's
    `attention_mask` (keyword inputs) marks as real, when it has one."""
    modules = dict(model.named_modules())
    device = model_device(model)
    outputs: dict[str, torch.Tensor] = {}
    first_input: list[torch.Tensor] = []
    mask: list[torch.Tensor | None] = [None]  # the current batch's attention mask

    def record(block: Block, branch: torch.Tensor, shortcut: torch.Tensor) -> None:
        if block.name in outputs:
            raise _ran_twice(block)
        # mean pooling is linear: the sum is never made
        outputs[block.name] = pool(branch, mask[0]) + pool(shortcut, mask[0])

    with model_preserved(model), attached() as handles, torch.no_grad():
        tap_pairs(model, blocks, record, handles)
        handles.append(modules[blocks[0].module].register_forward_pre_hook(
            lambda _m, args: first_input.append(pool(_first_tensor(args), mask[0]))))
        for batch in batches(data, device, dtype=input_dtype(model), progress=progress, desc=desc):
            outputs.clear()
            first_input.clear()
            mask[0] = batch.inputs.get("attention_mask") if isinstance(batch.inputs, dict) else None
            with explained_misfit(batch):
                model_outputs = batch.run(model)
            missing = [block.name for block in blocks if block.name not in outputs]
            if missing:
                raise ProbeError(f"block(s) {missing} did not run in a forward of the model; probe the blocks it runs.")
            visit(first_input[0], [outputs[block.name] for block in blocks], model_outputs, batch)


# --- linear probes ----------------------------------------------------------------------------


class _Rows:
    """Rows appended batch by batch into one array that doubles when full.

    One block of memory, not one small array per batch: small arrays kept while each batch's
    large activations come and go fragment the heap (with 10x the training samples peak RSS grew
    by 230 MB for 13 MB of features; this way by 25 MB).
    """

    def __init__(self) -> None:
        self.array: np.ndarray | None = None
        self.count = 0

    def add(self, rows: np.ndarray) -> None:
        needed = self.count + len(rows)
        if self.array is None or needed > len(self.array):
            grown = np.empty((max(2 * needed, 1024), *rows.shape[1:]), dtype=rows.dtype)
            if self.array is not None:
                grown[:self.count] = self.array[:self.count]
            self.array = grown
        self.array[self.count:needed] = rows
        self.count = needed

    def value(self) -> np.ndarray:
        return self.array[:self.count]


def _fit_probe(features: np.ndarray, targets: np.ndarray) -> Pipeline:
    # lbfgs is deterministic: the same features give the same probe, no seed needed.
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=_MAX_ITER)).fit(features, targets)


def linear_probes(model: nn.Module, data: Iterable, *, train_data: Iterable,
                  blocks: Sequence[str | Block] | None = None, progress: bool = True) -> pd.DataFrame:
    """A logistic-regression probe on each block's standardised pooled output, fitted on
    `train_data` and scored on `data` (see `RepresentationResult.probes`).

    The training features (samples x pooled width per block) are kept to fit the probes; the
    evaluation data is scored batch by batch.
    """
    chosen = resolve_blocks(model, blocks)
    train = [_Rows() for _ in range(len(chosen) + 1)]  # the first block's input, then each output
    train_targets = _Rows()

    def keep(first: torch.Tensor, outputs: list[torch.Tensor], _model_outputs: object, batch: Batch) -> None:
        targets = class_targets(batch)
        for store, features in zip(train, [first, *outputs]):
            store.add(features.cpu().numpy())
        train_targets.add(targets.cpu().numpy())

    _walk(model, train_data, chosen, keep, progress=progress, desc="probe features (train)")
    labels = train_targets.value()
    if len(np.unique(labels)) < 2:
        raise ProbeError("linear probes need at least two classes in the training data; it has only "
                         f"{np.unique(labels).tolist()}.")
    features = [store.value() for store in train]
    fitted = [_fit_probe(x, labels) for x in features]
    correct = np.zeros(len(fitted), dtype=np.int64)
    count = 0

    def score(first: torch.Tensor, outputs: list[torch.Tensor], _model_outputs: object, batch: Batch) -> None:
        nonlocal count
        truth = class_targets(batch).cpu().numpy()
        for i, (fitted_probe, x) in enumerate(zip(fitted, [first, *outputs])):
            correct[i] += int((fitted_probe.predict(x.cpu().numpy()) == truth).sum())
        count += len(truth)

    _walk(model, data, chosen, score, progress=progress, desc="probe accuracy")
    test = correct / count
    rows = [{"block": block.name, "position": block.position, "stage": stage, "width": features[i + 1].shape[1],
             "train_accuracy": fitted[i + 1].score(features[i + 1], labels), "test_accuracy": test[i + 1],
             "previous_test_accuracy": test[i], "gain": test[i + 1] - test[i], "train_samples": len(labels),
             "test_samples": count}
            for i, (block, stage) in enumerate(zip(chosen, stages(chosen)))]
    return pd.DataFrame(rows, columns=PROBE_COLUMNS)


# --- logit lens -------------------------------------------------------------------------------


def _head(model: nn.Module, classes: int) -> tuple[str, nn.Linear] | None:
    """The model's head: its last nn.Linear (in module order) with one output per class."""
    heads = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == classes]
    return heads[-1] if heads else None


def logit_lens(model: nn.Module, data: Iterable, *, blocks: Sequence[str | Block] | None = None,
               progress: bool = True) -> pd.DataFrame:
    """The model's head on each block's pooled output, where the widths fit (see
    `RepresentationResult.lens`)."""
    chosen = resolve_blocks(model, blocks)
    correct = torch.zeros(len(chosen), dtype=torch.int64)
    agree = torch.zeros(len(chosen), dtype=torch.int64)
    widths: list[int] = []
    heads: list[tuple[str, nn.Linear] | None] = []  # found at the first batch, which tells the number of classes
    count = 0

    def look(_first: torch.Tensor, outputs: list[torch.Tensor], model_outputs: object, batch: Batch) -> None:
        nonlocal count
        logits, targets = logits_of(model_outputs), class_targets(batch)
        if not heads:
            heads.append(_head(model, logits.shape[-1]))
            widths.extend(x.shape[1] for x in outputs)
        final = logits.argmax(dim=-1)
        for i, x in enumerate(outputs):
            if heads[0] is not None and x.shape[1] == heads[0][1].in_features:
                head = heads[0][1]
                # F.linear, not head(x): the call would fire any hook probe holds on the head.
                predicted = F.linear(x.to(head.weight.dtype), head.weight, head.bias).argmax(dim=-1)
                correct[i] += int((predicted == targets).sum())
                agree[i] += int((predicted == final).sum())
        count += len(targets)

    _walk(model, data, chosen, look, progress=progress, desc="logit lens")
    head = heads[0]
    rows = []
    for i, (block, stage) in enumerate(zip(chosen, stages(chosen))):
        applicable = head is not None and widths[i] == head[1].in_features
        if head is None:
            reason = "the model has no nn.Linear with one output per class (its head)"
        elif not applicable:
            reason = f"its output has {widths[i]} features; the head {head[0]} takes {head[1].in_features}"
        else:
            reason = ""
        rows.append({"block": block.name, "position": block.position, "stage": stage, "width": widths[i],
                     "applicable": applicable, "accuracy": correct[i].item() / count if applicable else float("nan"),
                     "agreement": agree[i].item() / count if applicable else float("nan"), "samples": count,
                     "reason": reason})
    return pd.DataFrame(rows, columns=LENS_COLUMNS)


# --- iterative refinement ---------------------------------------------------------------------


def refinement(model: nn.Module, data: Iterable, *, blocks: Sequence[str | Block] | None = None,
               task: str | Task | Callable | None = None, progress: bool = True) -> pd.DataFrame:
    """Per block, cos(F(h), dL/dh) and ||F(h)|| / ||h|| averaged over samples (see
    `RepresentationResult.refinement`).

    L is each sample's cross-entropy; in eval mode samples do not interact, so the gradient of
    the batch's summed loss at h holds each sample's own dL/dh. It is taken with
    torch.autograd.grad with respect to the captured block inputs only: the parameters' `.grad`
    stay as they were. task: another task's per-sample loss takes the cross-entropy's place
    (`analyses.attribution.differentiable_loss`: the next-token NLL for `lm`, your own loss);
    drift has no loss to descend (ProbeError, `NO_DRIFT_REFINEMENT`).
    """
    task = resolve_task(task)
    if task.cost == "drift":
        raise ProbeError(NO_DRIFT_REFINEMENT)
    chosen = resolve_blocks(model, blocks)
    modules = dict(model.named_modules())
    device = model_device(model)
    inputs_of: dict[str, torch.Tensor] = {}
    branches: dict[str, torch.Tensor] = {}
    # Per block: samples, samples with a cosine (F(h) and h of one shape), then sums of cosine,
    # cosine^2, ratio and ratio^2.
    sums = torch.zeros(len(chosen), 6, dtype=torch.float64, device=device)

    def record(block: Block, branch: torch.Tensor, shortcut: torch.Tensor) -> None:
        if block.name in branches:
            raise _ran_twice(block)
        branches[block.name] = branch.detach().clone()  # torchvision adds the shortcut into F(x) in place later
        if block.shortcut is None:
            inputs_of[block.name] = shortcut

    def enter(args: tuple, name: str) -> None:
        inputs_of[name] = _first_tensor(args)

    with model_preserved(model), attached() as handles, torch.enable_grad():
        tap_pairs(model, chosen, record, handles)
        for block in chosen:
            if block.shortcut is not None:  # h is the block's own input, not the projected shortcut
                handles.append(modules[block.module].register_forward_pre_hook(
                    lambda _m, args, name=block.name: enter(args, name)))
        for batch in batches(data, device, dtype=input_dtype(model), progress=progress, desc="refinement"):
            inputs_of.clear()
            branches.clear()
            # Inputs that require grad make every h differentiable, also with frozen parameters.
            x = pytree.tree_map(_differentiable, batch.inputs)
            with explained_misfit(batch):
                outputs = call_model(model, x)
            hs = [inputs_of[block.name] for block in chosen]
            if not all(h.requires_grad for h in hs):
                raise ProbeError("refinement needs gradients at the block inputs; the model computes them without "
                                 "autograd (integer inputs and frozen parameters?).")
            if isinstance(task, Classification):
                loss = F.cross_entropy(logits_of(outputs).float(), class_targets(batch), reduction="sum")
            else:
                loss = differentiable_loss(task, outputs, batch)[0].sum()
            grads = torch.autograd.grad(loss, hs)
            for i, (block, h, grad) in enumerate(zip(chosen, hs, grads)):
                branch = branches[block.name]
                n = len(branch)
                f = branch.reshape(n, -1).float()  # (batch, elements)
                ratio = f.norm(dim=1) / h.detach().reshape(n, -1).float().norm(dim=1).clamp_min(_TINY)
                sums[i, 0] += n
                sums[i, 4:] += torch.stack([ratio.sum(), ratio.square().sum()]).double()
                if branch.shape == h.shape:
                    g = grad.reshape(n, -1).float()
                    cosine = (f * g).sum(dim=1) / (f.norm(dim=1) * g.norm(dim=1)).clamp_min(_TINY)
                    sums[i, 1] += n
                    sums[i, 2:4] += torch.stack([cosine.sum(), cosine.square().sum()]).double()
    totals = sums.cpu().numpy()
    cosine, cosine_std = _mean_std(totals[:, 1], totals[:, 2], totals[:, 3])
    ratio, ratio_std = _mean_std(totals[:, 0], totals[:, 4], totals[:, 5])
    return pd.DataFrame({"block": [b.name for b in chosen], "position": [b.position for b in chosen],
                         "stage": stages(chosen), "grad_cosine": cosine, "grad_cosine_std": cosine_std,
                         "step_ratio": ratio, "step_ratio_std": ratio_std, "samples": totals[:, 0].astype(np.int64)},
                        columns=REFINEMENT_COLUMNS)


def _differentiable(leaf: object) -> object:
    if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
        return leaf.detach().requires_grad_(True)
    return leaf


def _mean_std(count: np.ndarray, total: np.ndarray, squares: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sample standard deviation from counts, sums and sums of squares."""
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / count
        variance = (squares - count * mean * mean) / (count - 1)
    return mean, np.where(count > 1, np.sqrt(np.clip(variance, 0, None)), np.nan)


# --- representation similarity ----------------------------------------------------------------


class CkaAccumulator:
    """Linear CKA between every pair of feature sets, accumulated batch by batch, exactly.

    Linear CKA of X (n, p) and Y (n, q) with centred columns is
    ||Xc^T Yc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F). Every product is a block of the centred
    second-moment matrix of all feature sets side by side, Z^T Z - s s^T / n (s: column sums of
    Z), and Z^T Z, s and n are sums over samples: `add` updates them (float64) per batch, so the
    memory is O(D^2) for D features in all, whatever n, and `matrix` gives the all-at-once CKA.

    While fewer samples than features have come (a language model's 60 blocks of 576 features
    make D = 34560, and D^2 floats would take 9.5 GB), the samples themselves are kept instead,
    and ||Xc^T Yc||_F^2 = <Kx, Ky> is taken from the centred Gram matrices (n x n): memory
    min(n, D) x D, never more than the streamed form, the same numbers.
    """

    def __init__(self) -> None:
        self.widths: list[int] = []
        self.count = 0
        self.sums: torch.Tensor | None = None  # (D,)
        self.products: torch.Tensor | None = None  # (D, D), once there are more samples than features
        self.rows: list[torch.Tensor] = []  # (batch, D) each, until then

    def add(self, features: Sequence[torch.Tensor]) -> None:
        """features: one (batch, width) tensor per feature set, the same samples in each."""
        z = torch.cat([x.double() for x in features], dim=1)  # (batch, D)
        if self.sums is None:
            self.widths = [x.shape[1] for x in features]
            self.sums = torch.zeros(z.shape[1], dtype=torch.float64, device=z.device)
        self.sums += z.sum(dim=0)
        self.count += len(z)
        if self.products is not None:
            self.products += z.T @ z
            return
        self.rows.append(z)
        if self.count > z.shape[1]:  # the (D, D) sums are now the smaller form
            kept = torch.cat(self.rows)
            self.products, self.rows = kept.T @ kept, []

    def matrix(self) -> np.ndarray:
        """(sets, sets) linear CKA; NaN for a set that does not vary over the samples."""
        if self.sums is None:
            raise ProbeError("CKA needs at least one batch of features.")
        edges = np.cumsum([0, *self.widths])
        parts = range(len(self.widths))
        if self.products is not None:
            centred = (self.products - torch.outer(self.sums, self.sums) / self.count).cpu()
            # ||Xc^T Yc||_F^2 for every pair: (sets, sets)
            squares = np.array([[float(centred[edges[a]:edges[a + 1], edges[b]:edges[b + 1]].square().sum())
                                 for b in parts] for a in parts])
        else:
            z = torch.cat(self.rows)
            z = z - self.sums / self.count  # centred columns
            grams = [z[:, edges[a]:edges[a + 1]] @ z[:, edges[a]:edges[a + 1]].T for a in parts]  # (n, n) each
            squares = np.array([[float((grams[a] * grams[b]).sum()) for b in parts] for a in parts])
        norms = np.sqrt(np.diag(squares))
        with np.errstate(invalid="ignore", divide="ignore"):
            return squares / np.outer(norms, norms)


def cka(model: nn.Module, data: Iterable, *, blocks: Sequence[str | Block] | None = None,
        progress: bool = True) -> pd.DataFrame:
    """Linear CKA between the pooled outputs of every pair of blocks over `data`, streamed
    (see `CkaAccumulator` and `RepresentationResult.cka`)."""
    chosen = resolve_blocks(model, blocks)
    accumulator = CkaAccumulator()
    _walk(model, data, chosen, lambda _first, outputs, _model_outputs, _batch: accumulator.add(outputs),
          progress=progress, desc="CKA")
    values = accumulator.matrix()
    numbers = stages(chosen)
    rows = [{"block_a": a.name, "position_a": a.position, "stage_a": numbers[i], "block_b": b.name,
             "position_b": b.position, "stage_b": numbers[j], "cka": values[i, j], "samples": accumulator.count}
            for i, a in enumerate(chosen) for j, b in enumerate(chosen)]
    return pd.DataFrame(rows, columns=CKA_COLUMNS)


# --- block by class, and everything together ----------------------------------------------------


def block_classes(table: pd.DataFrame, evaluation: Evaluation, *, bn_recalibrated: bool = False) -> pd.DataFrame:
    """The accuracy drop per (block, class) (`analyses.uncertainty.per_class_drops`), with each
    class's `rank` within its block (1: loses most; ties by class). An evaluation of a task
    without classes gives an empty table with these columns."""
    drops = per_class_drops(table, evaluation, bn_recalibrated=bn_recalibrated)
    if drops.empty:
        return pd.DataFrame(columns=CLASSES_COLUMNS)
    drops["rank"] = drops.groupby("block", sort=False)["accuracy_drop"].rank(ascending=False, method="first") \
        .astype(np.int64)
    return drops


def summary(table: pd.DataFrame, probes: pd.DataFrame, lens: pd.DataFrame, refinement: pd.DataFrame,
            cka: pd.DataFrame, classes: pd.DataFrame) -> pd.DataFrame:
    """One row per block: size, deletion cost, probe gain, refinement and neighbour similarity
    (see `RepresentationResult.summary`). `table` is the per-block table (block, position,
    ratio, accuracy_drop or another task's cost column; verdict and bn_recalibrated when
    present). Tables that do not apply to the task may be empty: their columns are NaN."""
    cost = cost_column(table)
    out = table[["block", "position"]].copy()
    for column in ("ratio", cost, "verdict"):
        out[column] = table[column] if column in table.columns else np.nan

    def by_block(df: pd.DataFrame, column: str) -> pd.Series:
        if column not in df.columns:
            return pd.Series(np.nan, index=out.index)
        return out["block"].map(df.set_index("block")[column])

    out["stage"] = by_block(probes, "stage")
    if len(probes) == 0 and "stage_a" in cka.columns:  # no probes (a task without labels): CKA knows the stages
        out["stage"] = by_block(cka.drop_duplicates("block_a").rename(columns={"block_a": "block"}), "stage_a")
    out["probe_accuracy"] = by_block(probes, "test_accuracy")
    out["probe_gain"] = by_block(probes, "gain")
    out["lens_accuracy"] = by_block(lens, "accuracy")
    out["grad_cosine"] = by_block(refinement, "grad_cosine")
    out["step_ratio"] = by_block(refinement, "step_ratio")
    pairs = cka.set_index(["block_a", "block_b"])["cka"]
    names = out["block"].tolist()
    out["cka_previous"] = [pairs.get((b, a), np.nan) for a, b in zip([None, *names[:-1]], names)]
    out["cka_next"] = [pairs.get((a, b), np.nan) for a, b in zip(names, [*names[1:], None])]
    # The class a block serves most: its rank-1 class when that loses accuracy without it; a block
    # whose deletion costs no class anything serves none (as the heatmap, which boxes nothing there).
    top = classes[(classes["rank"] == 1) & (classes["accuracy_drop"] > 0)].set_index("block")
    out["top_class"] = out["block"].map(top["class"]).astype("Int64")
    out["top_class_drop"] = out["block"].map(top["accuracy_drop"])
    out["bn_recalibrated"] = bool(table["bn_recalibrated"].iloc[0]) if "bn_recalibrated" in table.columns else False
    return out[[cost if column == "accuracy_drop" else column for column in SUMMARY_COLUMNS]]


def representation(model: nn.Module, data: Iterable, *, train_data: Iterable | None = None,
                   table: pd.DataFrame | None = None, evaluation: Evaluation | None = None,
                   blocks: Sequence[str | Block] | None = None, mode: str = "zero",
                   calibration: Iterable | None = None, rule: VerdictRule | None = None,
                   task: str | Task | Callable | None = None, progress: bool = True) -> RepresentationResult:
    """Every probe of this module on `model`: linear probes (fitted on `train_data`), the logit
    lens, refinement, CKA, the drop per class, and the per-block summary.

    table: the per-block table (ratio, accuracy_drop, verdict), e.g. `python -m probe.ablate`'s;
    evaluation: its single-block sweep with per_class=True, to reuse. Both are computed here
    when evaluation is None (deleting with `mode`, BatchNorm refitted on `calibration` when
    given). blocks: the blocks to probe (names or Blocks, e.g. from a spec); all when None.
    Every call leaves the model as it found it.

    task: what the outputs mean (`probe.scoring.tasks`); None takes the evaluation's task when one is
    given, else classification. Only classification has class labels: for another task the
    probes, lens and classes tables are empty (`RepresentationResult.notes` says why), no
    `train_data` is needed, and a table handed in needs no evaluation (it holds the task's cost).
    """
    task = resolve_task(task if task is not None else getattr(evaluation, "task", None))
    if not isinstance(task, Classification):
        return _without_labels(model, data, task, table=table, evaluation=evaluation, blocks=blocks, mode=mode,
                               calibration=calibration, rule=rule, progress=progress)
    if train_data is None:
        raise ProbeError("representation: the linear probes are fitted on train_data; pass it (training batches).")
    _check_reiterable(data, "representation")
    _check_reiterable(train_data, "representation")
    chosen = resolve_blocks(model, blocks)
    if evaluation is None:
        sweep, evaluation = single_block_sweep(model, data, mode=mode, calibration=calibration, per_class=True,
                                               blocks=chosen, progress=progress)
        if table is None:
            table = join_block_table(probe.measure(model, data, blocks=chosen, progress=progress), sweep, rule=rule)
    elif table is None:
        raise ProbeError("representation: pass the per-block table together with a precomputed evaluation.")
    _check_cost(table, task)
    table = check_table(table, ["block", "position", "ratio", "accuracy_drop"], "representation", model, blocks=chosen)
    baseline, deletions = evaluation
    if len(deletions) != len(chosen) or "class_accuracy" not in baseline:
        raise ProbeError("representation: the evaluation must hold one single-block deletion per block, in forward "
                         "order, with per-class accuracies (per_class=True).")
    recal = calibration is not None
    if "bn_recalibrated" in table.columns:
        recal = bool(table["bn_recalibrated"].iloc[0])
    probes = linear_probes(model, data, train_data=train_data, blocks=chosen, progress=progress)
    lens = logit_lens(model, data, blocks=chosen, progress=progress)
    steps = refinement(model, data, blocks=chosen, progress=progress)
    similarity = cka(model, data, blocks=chosen, progress=progress)
    classes = block_classes(table, evaluation, bn_recalibrated=recal)
    return RepresentationResult(probes=probes, lens=lens, refinement=steps, cka=similarity, classes=classes,
                                summary=summary(table.assign(bn_recalibrated=recal), probes, lens, steps,
                                                similarity, classes))


def _check_cost(table: pd.DataFrame, task: Task) -> None:
    held = cost_column(table)
    if held in table.columns and held != task.cost:
        raise ProbeError(f"representation: the per-block table holds {held} (a table of another task), but the task "
                         f"{task.name!r} measures {task.cost}; pass the task the table was made with (task=).")


def _without_labels(model: nn.Module, data: Iterable, task: Task, *, table: pd.DataFrame | None,
                    evaluation: Evaluation | None, blocks: Sequence[str | Block] | None, mode: str,
                    calibration: Iterable | None, rule: VerdictRule | None, progress: bool) -> RepresentationResult:
    """`representation` for a task without class labels: CKA, refinement (not for drift), and
    empty probes, lens and classes tables with the reason in `notes`."""
    _check_reiterable(data, "representation")
    chosen = resolve_blocks(model, blocks)
    if table is None:
        if evaluation is not None:
            raise ProbeError("representation: pass the per-block table together with a precomputed evaluation.")
        sweep, _ = single_block_sweep(model, data, mode=mode, calibration=calibration, blocks=chosen, task=task,
                                      progress=progress)
        table = join_block_table(probe.measure(model, data, blocks=chosen, progress=progress), sweep, rule=rule)
    _check_cost(table, task)
    table = check_table(table, ["block", "position", "ratio", task.cost], "representation", model, blocks=chosen)
    recal = calibration is not None
    if "bn_recalibrated" in table.columns:
        recal = bool(table["bn_recalibrated"].iloc[0])
    labels = f"the task {task.name!r} has no class labels"
    notes = {"probes": f"linear probes predict class labels, and {labels}.",
             "lens": f"the logit lens scores the model's head against class labels, and {labels}.",
             "classes": f"the drop per class needs class labels, and {labels}."}
    probes = pd.DataFrame(columns=PROBE_COLUMNS)
    lens = pd.DataFrame(columns=LENS_COLUMNS)
    classes = pd.DataFrame(columns=CLASSES_COLUMNS)
    if task.cost == "drift":
        steps = pd.DataFrame(columns=REFINEMENT_COLUMNS)
        notes["refinement"] = NO_DRIFT_REFINEMENT
    else:
        steps = refinement(model, data, blocks=chosen, task=task, progress=progress)
    similarity = cka(model, data, blocks=chosen, progress=progress)
    return RepresentationResult(probes=probes, lens=lens, refinement=steps, cka=similarity, classes=classes,
                                summary=summary(table.assign(bn_recalibrated=recal), probes, lens, steps,
                                                similarity, classes), notes=notes)


# --- what the numbers say ---------------------------------------------------------------------


def story(result: RepresentationResult) -> list[str]:
    """A few sentences on what the tables say together, for the report and the terminal."""
    s, cka_df = result.summary, result.cka
    lines = []
    probes = result.probes
    notes = getattr(result, "notes", {}) or {}
    if len(probes):
        first_input = probes["previous_test_accuracy"].iloc[0]
        top_gains = probes.nlargest(3, "gain")
        lines.append(
            f"Linear probes read {first_input:.1%} of the evaluation labels from the first block's input, "
            f"{probes['test_accuracy'].iloc[0]:.1%} after the first block and {probes['test_accuracy'].iloc[-1]:.1%} "
            f"after the last (best {probes['test_accuracy'].max():.1%}, at "
            f"{probes.loc[probes['test_accuracy'].idxmax(), 'block']}). "
            "The largest gains: " + ", ".join(f"{r.block} ({r.gain * 100:+.1f} points)" for r in top_gains.itertuples())
            + ".")
    elif "probes" in notes:
        lines.append("No linear probes, logit lens or drop per class: " + notes["probes"])
    if "refinement" in notes:
        lines.append("No refinement: " + notes["refinement"])
    skipped = s[s["verdict"] == "skipped"]
    if len(skipped) and len(probes):
        gains = skipped["probe_gain"] * 100
        lines.append(f"The {len(skipped)} blocks the deletion rule calls skipped change probe accuracy by "
                     f"{gains.sum():+.1f} points together (from {gains.min():+.1f} to {gains.max():+.1f} each).")
    lens = result.lens[result.lens["applicable"].astype(bool)]
    if len(lens):
        lines.append(f"The model's own head applies to {len(lens)} of {len(result.lens)} blocks (those of its input "
                     f"width); on them its accuracy goes from {lens['accuracy'].iloc[0]:.1%} ({lens['block'].iloc[0]}) "
                     f"to {lens['accuracy'].iloc[-1]:.1%} ({lens['block'].iloc[-1]}), agreeing with the final "
                     f"prediction on {lens['agreement'].iloc[-1]:.1%} at the last.")
    defined = s[s["grad_cosine"].notna()]
    if len(defined):
        negative = int((defined["grad_cosine"] < 0).sum())
        lines.append(f"cos(F(h), dL/dh) is negative at {negative} of the {len(defined)} blocks where F(h) and h share a "
                     f"shape (mean {defined['grad_cosine'].mean():+.3f}, from {defined['grad_cosine'].min():+.3f} to "
                     f"{defined['grad_cosine'].max():+.3f}): "
                     + ("most blocks move the features down the loss, as Jastrzebski et al. 2018 found."
                        if negative > len(defined) / 2 else "most blocks do not move the features down the loss.")
                     + f" ||F(h)||/||h|| is {s['step_ratio'].iloc[0]:.2f} at the first block and "
                     f"{s['step_ratio'].iloc[-1]:.2f} at the last.")
    pairs = cka_df[cka_df["position_b"] > cka_df["position_a"]]
    within, across = pairs[pairs["stage_a"] == pairs["stage_b"]], pairs[pairs["stage_a"] != pairs["stage_b"]]
    neighbours = s.loc[s["stage"] == s["stage"].shift(-1), "cka_next"].dropna()  # next block, same stage
    if len(neighbours):
        lines.append(f"Linear CKA between neighbouring blocks of one stage averages {neighbours.mean():.2f} (all pairs "
                     f"within a stage: {within['cka'].mean():.2f}"
                     + (f"; pairs from different stages: {across['cka'].mean():.2f})." if len(across) else ")."))
    lines.append(_verdict(s, probes, neighbours, no_gradient="refinement" in notes))
    return lines


def _verdict(s: pd.DataFrame, probes: pd.DataFrame, neighbours: pd.Series, no_gradient: bool = False) -> str:
    """Which story the numbers tell: iterative refinement (Greff et al. 2017, Jastrzebski et al.
    2018), when neighbours within a stage are alike and most branches point down the loss."""
    defined = s["grad_cosine"].dropna()
    downhill = len(defined) > 0 and (defined < 0).mean() > 0.5
    alike = len(neighbours) > 0 and neighbours.mean() >= 0.9
    arrival = ""
    if len(probes):
        starts = probes["stage"] != probes["stage"].shift(1)  # the first block of each stage
        net = probes["test_accuracy"].iloc[-1] - probes["previous_test_accuracy"].iloc[0]
        arrival = (f" Of the {net * 100:+.1f} points the probes gain from the first block's input to the last "
                   f"block's output, {probes.loc[starts, 'gain'].sum() * 100:+.1f} come at the first block of a "
                   f"stage ({', '.join(probes.loc[starts, 'block'])}).")
    if downhill and alike:
        return ("Together: the iterative-refinement story. Within a stage each block changes the representation "
                "only a little (neighbours' CKA at least 0.9 on average) and in a direction that lowers the loss: "
                f"small steps of refinement.{arrival}")
    downhill_text = "the task has no loss gradient to compare the branches with" if no_gradient else \
        "most branches do not point down the loss"
    missing = [text for ok, text in ((downhill, downhill_text),
                                     (alike, "neighbouring blocks within a stage are not alike (CKA below 0.9)"))
               if not ok]
    return f"Together: not a clean iterative-refinement story ({'; '.join(missing)}).{arrival}"
