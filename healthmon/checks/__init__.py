"""Training sanity checks: the neural-network debugging playbook as functions.

Each check runs in seconds on one small batch, returns a :class:`CheckResult` (``ok``,
``report``, ``details``, ``seconds``) and has an ``assert_<name>`` form for pytest that
raises ``AssertionError`` with the report. Every check restores the model's parameters,
buffers, gradients, ``requires_grad`` flags, train/eval modes and the torch (and CUDA) RNG
state afterwards. Statistics come from the native fused kernels (:func:`healthmon.stats`).

A *batch* is a tuple ``(inputs, targets)``: ``inputs`` the tensor given to
``model(inputs)`` (batch dimension first, on the model's device), ``targets`` whatever
``loss_fn(outputs, targets)`` takes; ``loss_fn`` returns a scalar float tensor.

==========================  ============================================================
check                       catches
==========================  ============================================================
``initial_loss``            loss far from log(num_classes); softmax outputs; bad labels
``overfit_batch``           cannot memorise one batch; loss rising / negative (wrong sign)
``batch_independence``      view/reshape where permute was meant (samples mixed)
``parameters_update``       params with no / zero gradient, frozen, not changing
``dead_units``              dead ReLUs, saturated sigmoid/tanh
``nonlinearity``            missing activations (the model is affine)
``input_ranges``            unnormalised, channel-last, constant channels, NaN inputs
``input_dependence``        model does no better on real inputs than on constant ones
``run_all``                 all of the above, with a table
==========================  ============================================================

Example (pytest)::

    from healthmon import checks

    def test_model_is_sane():
        checks.run_all(model, (x, y), F.cross_entropy, num_classes=10).raise_if_failed()
"""
from ._common import CheckResult, preserved_state
from .activations import assert_dead_units, assert_nonlinearity, dead_units, nonlinearity
from .data import assert_input_ranges, input_ranges
from .gradients import (assert_batch_independence, assert_parameters_update,
                        batch_independence, parameters_update)
from .loss import (assert_initial_loss, assert_input_dependence, assert_overfit_batch,
                   initial_loss, input_dependence, overfit_batch)
from .suite import SuiteResult, run_all

__all__ = [
    "CheckResult", "SuiteResult", "preserved_state", "run_all",
    "initial_loss", "overfit_batch", "batch_independence", "parameters_update",
    "dead_units", "nonlinearity", "input_ranges", "input_dependence",
    "assert_initial_loss", "assert_input_dependence", "assert_overfit_batch", "assert_batch_independence",
    "assert_parameters_update", "assert_dead_units", "assert_nonlinearity",
    "assert_input_ranges",
]
