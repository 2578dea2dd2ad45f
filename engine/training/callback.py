"""``VLoRACallback``: train a task in the subspace with transformers' ``Trainer``.

transformers stays optional: this module imports it, and ``engine`` imports this
module only when ``VLoRACallback`` is asked for.

The ``Trainer`` trains the model it is given, so give it the
:class:`~engine.inference.VLoRAModel` the task is attached to: its only parameters
that require gradients are the task's coefficients, so the ``Trainer``'s own
optimiser trains them and nothing else. The callback writes the task back into the
subspace at every checkpoint (and saves the subspace beside it) and at the end.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..subspace.core import SharedSubspace
from .trainer import SubspaceTrainer

try:
    from transformers import TrainerCallback as _Base

    _HAVE_TRANSFORMERS = True
except ImportError:  # pragma: no cover - exercised only without transformers
    _Base = object  # type: ignore[assignment,misc]
    _HAVE_TRANSFORMERS = False

#: The folder a checkpoint's subspace is saved to, inside the ``Trainer``'s ``checkpoint-<step>`` folder.
CHECKPOINT_SUBSPACE = "vlora-subspace"


class VLoRACallback(_Base):  # type: ignore[misc,valid-type]
    """A ``TrainerCallback`` that trains one task of a subspace in a normal ``Trainer`` loop.

    Either give a :class:`SubspaceTrainer` made with ``model=`` (its ``.model`` is what the
    ``Trainer`` gets), or a subspace and ``task_id``: the trainer is then made when the
    ``Trainer`` is (``on_init_end``), attached to the ``Trainer``'s model, which must be a
    :class:`~engine.inference.VLoRAModel` over that subspace. The ``Trainer``'s optimiser and
    learning rate apply (``lr``/``num_expand`` here only shape the :class:`SubspaceTrainer`).

    ``remove_unused_columns`` is turned off: ``VLoRAModel.forward`` takes ``**kwargs``, so
    the ``Trainer`` cannot tell the base model's inputs from its signature.

    Example::

        model = VLoRAModel(base, subspace)
        trainer = SubspaceTrainer(subspace, "new-task", model=model)
        Trainer(model=model, args=TrainingArguments(...), train_dataset=data,
                callbacks=[VLoRACallback(trainer)]).train()
        subspace.save("out/with-new-task.vlora")

    vlora's way works too: ``Trainer(model=base_model, callbacks=[VLoRACallback(subspace, task_id)])``
    with a plain base model. The trainer is then made at ``on_train_begin`` (attached to the
    model the ``Trainer`` passes, if any), and the callback steps the task's own optimiser at
    every ``on_step_end`` (the ``Trainer``'s optimiser does not hold the task's parameters).

    Args:
        trainer_or_subspace: A :class:`SubspaceTrainer`, or a :class:`~engine.SharedSubspace`.
        task_id: The task (with a subspace); it must exist unless ``init_if_missing``.
        lr: Passed to :class:`SubspaceTrainer` (with a subspace).
        num_expand: Passed to :class:`SubspaceTrainer` (with a subspace).
        log_every: With the callback's own optimiser: every this many steps, append
            ``vlora/loadings_norm`` (the norm of all trained coefficients), ``vlora/trainable_params``
            and ``vlora/step`` to ``state.log_history`` (0: never).
        save_on_end: Write the task back into the subspace at ``on_train_end``.
        save_subspace: At each checkpoint, also save the subspace to
            ``<checkpoint>/vlora-subspace`` (what resuming or exporting that step needs).
        init_if_missing: Register a task the subspace lacks (:func:`orthogonal_init`).
    """

    def __init__(self, trainer_or_subspace: SubspaceTrainer | SharedSubspace, task_id: str | None = None,
                 lr: float = 1e-3, num_expand: int = 0, log_every: int = 50, save_on_end: bool = True, *,
                 save_subspace: bool = True, init_if_missing: bool = False) -> None:
        if not _HAVE_TRANSFORMERS:
            raise ImportError("VLoRACallback needs transformers (pip install transformers)")
        self.trainer: SubspaceTrainer | None = None
        self.subspace: SharedSubspace
        if isinstance(trainer_or_subspace, SubspaceTrainer):
            if task_id is not None and task_id != trainer_or_subspace.task_id:
                raise ValueError(f"task_id {task_id!r} differs from the trainer's {trainer_or_subspace.task_id!r}")
            self.trainer = trainer_or_subspace
            self.subspace = trainer_or_subspace.subspace
            self.task_id = trainer_or_subspace.task_id
        elif isinstance(trainer_or_subspace, SharedSubspace):
            if task_id is None:
                raise ValueError("give the task_id to train with a subspace")
            self.subspace = trainer_or_subspace
            self.task_id = task_id
        else:
            raise TypeError(f"expected a SubspaceTrainer or a SharedSubspace, got {type(trainer_or_subspace).__name__}")
        self.lr, self.num_expand, self.save_subspace = lr, num_expand, save_subspace
        self.log_every, self.save_on_end, self.init_if_missing = int(log_every), bool(save_on_end), init_if_missing
        self.saved: list[Path] = []
        self._own_steps = False  # True: the Trainer's optimiser does not hold the task's parameters

    def _make(self, model: Any) -> SubspaceTrainer:
        return SubspaceTrainer(self.subspace, self.task_id, lr=self.lr, num_expand=self.num_expand, model=model,
                               init_if_missing=self.init_if_missing)

    def on_init_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        from ..inference.model import VLoRAModel

        if self.trainer is None:
            if not isinstance(model, VLoRAModel):
                args.remove_unused_columns = False
                return  # vlora's way (a plain base model): the trainer is made at on_train_begin
            if model.subspace is not self.subspace:
                raise ValueError("VLoRACallback: give the Trainer model=VLoRAModel(base_model, subspace) "
                                 "over the subspace the callback trains in")
            self.trainer = self._make(model)
        elif model is not None and model is not self.trainer.model:
            raise ValueError("VLoRACallback: the Trainer's model is not the VLoRAModel the task is attached to; "
                             "pass Trainer(model=subspace_trainer.model)")
        args.remove_unused_columns = False

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self.trainer is None:
            self.trainer = self._make(model)
            self._own_steps = True

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.trainer is None or not self._own_steps:
            return  # the Trainer's optimiser steps the task's parameters
        tr = self.trainer
        tr.optimizer.step()
        tr.optimizer.zero_grad(set_to_none=True)
        tr._step_count += 1
        step = int(getattr(state, "global_step", 0) or 0)
        if self.log_every > 0 and step > 0 and step % self.log_every == 0:
            norm = float(sum(float(p.detach().double().pow(2).sum()) for p in tr.params.values()) ** 0.5)
            state.log_history.append({"step": step, "vlora/loadings_norm": norm,
                                      "vlora/trainable_params": tr.num_trainable_params, "vlora/step": tr.step_count})

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        assert self.trainer is not None
        self.trainer.write_back()
        if self.save_subspace and getattr(state, "is_world_process_zero", True):
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}" / CHECKPOINT_SUBSPACE
            self.saved.append(self.subspace.save(path, force=True))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        assert self.trainer is not None
        if self.save_on_end:
            self.trainer.write_back()
