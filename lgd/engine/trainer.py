"""detectron2's AMPTrainer on any device: LGD runs train with detectron2's SimpleTrainer (fp32) or this.

    trainer = AMPTrainer(model, data_loader, build_lgd_optimizer(model, lr=0.01), device_type="cpu",
                         dtype=torch.bfloat16)

detectron2 v0.6's AMPTrainer requires CUDA and float16 (torch.cuda.amp); this one runs torch.autocast on
`device_type` with `dtype` (None: autocast's default for the device) and steps through the GradScaler, as
detectron2's does.
"""
import time
from typing import Optional

import torch
from detectron2.engine import AMPTrainer as DetectronAMPTrainer

__all__ = ["AMPTrainer"]


class AMPTrainer(DetectronAMPTrainer):
    """detectron2's AMPTrainer with autocast on any device (module docstring); grad_scaler defaults to
    torch.amp.GradScaler(device_type)."""

    def __init__(self, model, data_loader, optimizer, grad_scaler=None, device_type: str = "cuda",
                 dtype: Optional[torch.dtype] = None):
        super().__init__(model, data_loader, optimizer,
                         grad_scaler if grad_scaler is not None else torch.amp.GradScaler(device_type))
        self.device_type, self.dtype = device_type, dtype

    def run_step(self):
        assert self.model.training, "[AMPTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        with torch.autocast(self.device_type, dtype=self.dtype):
            loss_dict = self.model(data)
            losses = sum(loss_dict.values())
        self.optimizer.zero_grad()
        self.grad_scaler.scale(losses).backward()
        self._write_metrics(loss_dict, data_time)
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()
