"""The training loop every fine-tuning shares: any `loss_fn(model, batch) -> (loss, targets,
parts)` over endless training batches, Adam on the trainable parameters (the LoRA leaves),
progress lines, validation, adapter checkpoints, Ctrl-C saving the adapter.

Losses of several batches are combined as one batch would weigh them: a part that comes with
its own target count (`parts["<name>_targets"]`) is averaged over those targets, and when every
part has one, the loss is the sum of the parts (CSM: backbone + depth decoder; Moshi: text +
audio); otherwise the loss is averaged over `targets`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

from moshi_mlx.errors import MoshiError

LossFn = Callable[[nn.Module, Any], tuple[mx.array, mx.array, dict[str, mx.array]]]
TARGETS_SUFFIX = "_targets"


@dataclass(frozen=True)
class TrainingSettings:
    iters: int = 1000
    learning_rate: float = 1e-5
    steps_per_report: int = 10
    steps_per_eval: int = 200
    val_batches: int = 25  # -1: the whole validation set
    save_every: int = 100

    def __post_init__(self) -> None:
        for name in ("iters", "steps_per_report", "steps_per_eval", "save_every"):
            if getattr(self, name) < 1:
                raise MoshiError(f"--{name.replace('_', '-')} must be >= 1, got "
                                 f"{getattr(self, name)}")
        if self.val_batches < -1:
            raise MoshiError(f"--val-batches must be >= -1, got {self.val_batches}")
        if not self.learning_rate > 0:
            raise MoshiError(f"--learning-rate must be > 0, got {self.learning_rate}")


@dataclass
class Totals:
    """Target-weighted sums of a loss and its parts over batches."""

    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, float] = field(default_factory=dict)
    own_counts: bool = True  # every part so far came with its own target count

    def add(self, loss: mx.array, targets: mx.array, parts: dict[str, mx.array]) -> None:
        n = float(targets.item())
        named = [name for name in parts if not name.endswith(TARGETS_SUFFIX)]
        self.own_counts &= bool(named) and all(name + TARGETS_SUFFIX in parts for name in named)
        self._add("loss", float(loss.item()), n)
        for name, value in parts.items():
            if name.endswith(TARGETS_SUFFIX):
                continue
            count = parts.get(name + TARGETS_SUFFIX, targets)
            self._add(name, float(value.item()), float(count.item()))

    def _add(self, name: str, mean: float, count: float) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + mean * count
        self.counts[name] = self.counts.get(name, 0.0) + count

    def means(self) -> dict[str, float]:
        out = {name: self.sums[name] / self.counts[name] if self.counts[name] else 0.0
               for name in self.sums}
        if self.own_counts and len(out) > 1:
            out["loss"] = sum(v for k, v in out.items() if k != "loss")
        return out


def evaluate(model: nn.Module, loss_fn: LossFn, batches: Iterable[Any],
             max_batches: int = -1) -> dict[str, float]:
    """The loss and its parts over `batches` (at most `max_batches`; -1 all), combined as one
    batch would weigh them (see the module's docstring), and "targets"."""
    totals, seen, training = Totals(), 0, model.training
    model.eval()  # no dropout while evaluating
    for batch in batches:
        if seen == max_batches:
            break
        loss, targets, parts = loss_fn(model, batch)
        mx.eval(loss, targets, parts)
        totals.add(loss, targets, parts)
        seen += 1
    model.train(training)
    if not seen:
        raise MoshiError("nothing to evaluate: no batches")
    result = totals.means()
    result["targets"] = totals.counts["loss"]
    return result


@dataclass
class TrainingResult:
    steps: int
    interrupted: bool
    last_loss: float | None
    history: list[dict[str, float]] = field(default_factory=list)


def peak_memory_gb() -> float:
    return mx.get_peak_memory() / 1e9


def train(model: nn.Module, loss_fn: LossFn, batches: Iterator[Any],
          settings: TrainingSettings, save: Callable[[int | None], None],
          validation: Callable[[], Iterable[Any]] | None = None,
          report: Callable[[str], None] = print,
          frames_of: Callable[[Any], int] = lambda batch: int(getattr(batch, "frames", 0)),
          optimizer: optim.Optimizer | None = None) -> TrainingResult:
    """Train the trainable parameters of `model` for `settings.iters` steps. save(step) writes
    a checkpoint (step) or the final adapter (None); it also runs on Ctrl-C, and the result
    says it was interrupted. validation() gives fresh validation batches."""
    optimizer = optimizer or optim.Adam(learning_rate=settings.learning_rate)
    loss_and_grad = nn.value_and_grad(model, loss_fn)
    result = TrainingResult(0, False, None)
    window, started, frames = Totals(), time.perf_counter(), 0
    model.train()
    try:
        for step in range(1, settings.iters + 1):
            batch = next(batches)
            (loss, targets, parts), grads = loss_and_grad(model, batch)
            optimizer.update(model, grads)
            mx.eval(model.parameters(), optimizer.state, loss, targets, parts)
            window.add(loss, targets, parts)
            frames += frames_of(batch)
            result.steps, result.last_loss = step, float(loss.item())
            if step % settings.steps_per_report == 0 or step == settings.iters:
                elapsed = time.perf_counter() - started
                means = window.means()
                line = {"iter": step, **{f"train_{k}": v for k, v in means.items()},
                        "frames_per_s": frames / elapsed, "peak_memory_gb": peak_memory_gb()}
                result.history.append(line)
                report(progress_line(line))
                window, started, frames = Totals(), time.perf_counter(), 0
            if validation is not None and settings.val_batches != 0 and (
                    step % settings.steps_per_eval == 0 or step == settings.iters):
                val = evaluate(model, loss_fn, validation(), settings.val_batches)
                result.history.append({"iter": step, **{f"val_{k}": v for k, v in val.items()}})
                report(f"iter {step}: val loss {val['loss']:.3f}" + "".join(
                    f", {k} {v:.3f}" for k, v in val.items() if k not in ("loss", "targets")))
            if step % settings.save_every == 0 and step != settings.iters:
                save(step)
    except KeyboardInterrupt:
        result.interrupted = True
    save(None)
    return result


def progress_line(line: dict[str, float]) -> str:
    parts = ", ".join(f"{k.removeprefix('train_')} {v:.3f}" for k, v in line.items()
                      if k.startswith("train_") and k != "train_loss")
    return (f"iter {int(line['iter'])}: train loss {line['train_loss']:.3f}"
            + (f" ({parts})" if parts else "")
            + f", {line['frames_per_s']:.1f} frames/s, peak memory "
              f"{line['peak_memory_gb']:.3f} GB")
