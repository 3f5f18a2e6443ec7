"""Training: the train step and optimizer (step), data and batches (data), Orbax checkpoints (checkpoint)."""

from dots_jax.training.data import Batch, TokenStream
from dots_jax.training.step import (
    TrainConfig,
    TrainState,
    init_state,
    jit_train_step,
    load_cv,
    loss_fn,
    make_optimizer,
    train_step,
    update_router_bias,
    wsd_schedule,
)

__all__ = ["Batch", "TokenStream", "TrainConfig", "TrainState", "init_state", "jit_train_step", "load_cv", "loss_fn",
           "make_optimizer", "train_step", "update_router_bias", "wsd_schedule"]
