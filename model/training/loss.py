"""Loss and learning rate, as deepmd-kit defines them (EnergyStdLoss, LearningRateExp).

    lr(t)     = max(stop_lr, start_lr * r^floor(t / s)),  r = (stop_lr / start_lr)^(s / T)
                s = decay_steps (reset to 100 if T // 10 > 100 else T // 100 + 1 when s >= T)
    pref_X(t) = limit_X + (start_X - limit_X) * lr(t) / start_lr          X in {e, f, v}
    L = pref_e mean_f((E - E^)^2 / N_f) + pref_f mean((F - F^)^2) + pref_v mean_f(mean_9((W - W^)^2) / N_f)
A term is dropped (find_* = 0) when the batch has no such label. Reported RMSEs: energy and
virial per atom, force per component.
"""

from __future__ import annotations

import math

from lamflow.model.data.batch import Batch
from lamflow.model.nn.potential import predict
from lamflow.model.training.config import LearningRateConfig, LossConfig


class ExpDecayLR:
    def __init__(self, cfg: LearningRateConfig, numb_steps: int):
        self.start, self.stop = cfg.start_lr, cfg.stop_lr
        T = max(numb_steps, 1)
        s = cfg.decay_steps
        if s >= T:
            s = 100 if T // 10 > 100 else T // 100 + 1
        self.decay_steps = s
        self.rate = math.exp(math.log(self.stop / self.start) / (T / s))

    def __call__(self, step: int) -> float:
        return max(self.stop, self.start * self.rate ** (step // self.decay_steps))


class EnergyLoss:
    def __init__(self, cfg: LossConfig):
        self.cfg = cfg
        self.has_e = cfg.start_pref_e != 0 or cfg.limit_pref_e != 0
        self.has_f = cfg.start_pref_f != 0 or cfg.limit_pref_f != 0
        self.has_v = cfg.start_pref_v != 0 or cfg.limit_pref_v != 0

    def prefs(self, coef: float) -> tuple[float, float, float]:
        c = self.cfg
        return tuple(lim + (st - lim) * coef for st, lim in
                     ((c.start_pref_e, c.limit_pref_e), (c.start_pref_f, c.limit_pref_f), (c.start_pref_v, c.limit_pref_v)))

    def __call__(self, model, batch: Batch, coef: float, training: bool = True):
        """coef = lr / start_lr. Returns (loss, {"rmse_e": ..., "rmse_f": ..., "rmse_v": ...})."""
        use_f = self.has_f and batch.find.get("force", 0) > 0
        use_v = self.has_v and batch.find.get("virial", 0) > 0 and batch.box is not None
        pred = predict(model, batch, forces=use_f or not training, virial=use_v, create_graph=training)
        pe, pf, pv = self.prefs(coef)
        natoms = batch.natoms.to(pred.energy.dtype)
        loss = pred.energy.new_zeros(())
        metrics = {}
        if batch.energy is not None:
            de2 = (pred.energy - batch.energy) ** 2  # [nf]
            if self.has_e:
                loss = loss + pe * (de2 / natoms).mean()
            metrics["rmse_e"] = float((de2 / natoms**2).mean().sqrt().detach())
        if batch.force is not None and pred.force is not None:
            real = (batch.atype >= 0).unsqueeze(-1)
            l2f = (((pred.force - batch.force) ** 2) * real).sum() / (real.sum() * 3)
            if use_f:
                loss = loss + pf * l2f
            metrics["rmse_f"] = float(l2f.sqrt().detach())
        if use_v and pred.virial is not None and batch.virial is not None:
            dv2 = ((pred.virial - batch.virial) ** 2).mean(-1)  # [nf]
            loss = loss + pv * (dv2 / natoms).mean()
            metrics["rmse_v"] = float((dv2 / natoms**2).mean().sqrt().detach())
        return loss, metrics
