"""FullGradNorm: GradNorm's loss KL(u ‖ softmax(f/T)) differentiated w.r.t. the
whole network (all parameters, or those selected by `params`), L2 norm per
sample from gradood.persample_grad_norms (one forward, one backward). The L2
norm has the ghost shortcut; an L1 full-network norm would not. ID-high (larger
norm = more in-distribution, as GradNorm)."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from gradood.detectors._base import Detector, eval_mode
from gradood.detectors._head import HeadName
from gradood.model_io import Inputs, LogitsFn
from gradood.persample import _verify, persample_grad_norms
from gradood.persample.engine import ParamSelector


class FullGradNorm(Detector):
    def __init__(
        self,
        model: nn.Module,
        temperature: float = 1.0,
        params: ParamSelector = None,
        functional_params: Optional[str] = None,
        fallback: Optional[str] = None,
        verify: Union[bool, int] = True,
        head: Optional[HeadName] = None,
        logits: LogitsFn = None,
    ):
        super().__init__(model, head, logits)
        _verify.call_check_count(type(self).__name__, verify)  # a bad value fails here, not at score time
        self.verify = verify
        self.temperature, self.params, self.functional_params = temperature, params, functional_params
        self.fallback = fallback

    def score(self, inputs: Inputs) -> torch.Tensor:
        with eval_mode(self.model):
            return persample_grad_norms(
                self.model,
                inputs,
                "kl_uniform",
                self.temperature,
                params=self.params,
                functional_params=self.functional_params,
                fallback=self.fallback,
                logits=self.logits_fn,
                verify=self.verify,
            ).norms
