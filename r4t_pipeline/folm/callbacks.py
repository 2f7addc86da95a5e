"""The bridge from a transformers/TRL trainer's logs to the project's `log_fn(step, metrics)` (MLflow)."""

from __future__ import annotations

from collections.abc import Callable

from transformers import TrainerCallback

from r4t_pipeline.tracking import LogFn


class LogCallback(TrainerCallback):
    """Turns each training log into a row (`row(logs)`), keeps it in `rows` and hands it to `log_fn`, on the main
    process only. `steps_per_row` optimizer steps make one logged step (GRPO: its `num_iterations`)."""

    def __init__(self, log_fn: LogFn | None,
                 row: Callable[[dict[str, float]], dict[str, float]], steps_per_row: int = 1):
        self.log_fn, self.row, self.steps_per_row = log_fn, row, steps_per_row
        self.rows: list[dict[str, float]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs and "loss" in logs:  # the end-of-run summary has "train_loss"
            self.rows.append(self.row(logs))
            if self.log_fn:
                self.log_fn(state.global_step // self.steps_per_row, self.rows[-1])
