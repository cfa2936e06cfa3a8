"""Cached-feature heads: Tip-Adapter(-F), GDA, CLAP, a cosine classifier and a linear probe trained by SGD, each
trainable one also with ProGrad's projection (``+prograd``). docs/adapters.md records every default and its source.

``HEADS`` maps a method name to its ``HeadSpec``; the sweep looks a head up here and calls ``spec.fit(task)``. This
package imports nothing from the sweep or the report (imports run one way: the sweep imports the heads).
"""

from __future__ import annotations

from fastprompt.heads.clap import fit_clap, fit_clap_prograd
from fastprompt.heads.gda import fit_gda
from fastprompt.heads.linear import fit_cosine, fit_cosine_prograd, fit_linear_sgd, fit_linear_sgd_prograd
from fastprompt.heads.task import HeadResult, HeadSpec, HeadTask
from fastprompt.heads.tip_adapter import fit_tip_adapter, fit_tip_adapter_f, fit_tip_adapter_f_prograd

__all__ = ["HEADS", "HeadResult", "HeadSpec", "HeadTask"]

# The CoOp schedule (PROTOCOL.md section 4); epochs stay RunConfig's rule (by shots).
COOP_SCHEDULE = {"lr": 0.002, "batch_size": 32, "momentum": 0.9, "weight_decay": 5e-4, "warmup_lr": 1e-5,
                 "warmup_epochs": 1}  # fmt: skip
TIP_F_SCHEDULE = {"epochs": 20, "lr": 0.001, "batch_size": 256, "weight_decay": 0.01, "warmup_epochs": 0}
CLAP_SCHEDULE = {"epochs": 300, "lr": 0.1, "batch_size": 256, "momentum": 0.9, "weight_decay": 0.0, "warmup_lr": 1e-5,
                 "warmup_epochs": 1}  # fmt: skip

TIP_SOURCE = "gaopengcuhk/Tip-Adapter main.py, utils.py, configs/*.yaml"
TIP_F_SOURCE = f"{TIP_SOURCE}; AdamW weight decay 0.01 is torch's default, which the release keeps"
GDA_SOURCE = "mrflogs/ICLR24 main_few_shots.py, configs/few_shots/*.yaml"
CLAP_SOURCE = "jusiro/CLAP trainers/adapters.py (INIT=ZS, CONSTRAINT=l2), configs/trainers/SGD_lr1e-1_B256_ep300.yaml"
COOP_SOURCE = "CoOp's schedule (PROTOCOL.md section 4); head, initialisation and logit scale are fastprompt's"

HEADS: dict[str, HeadSpec] = {
    "tip_adapter": HeadSpec(fit_tip_adapter, {}, needs_views=True, needs_val=True, trained=False, prograd=False,
                            source=TIP_SOURCE),
    "tip_adapter_f": HeadSpec(fit_tip_adapter_f, TIP_F_SCHEDULE, needs_views=True, needs_val=True, trained=True,
                              prograd=False, source=TIP_F_SOURCE, dataset_defaults={"EuroSAT": {"epochs": 100}}),
    "tip_adapter_f+prograd": HeadSpec(fit_tip_adapter_f_prograd, TIP_F_SCHEDULE, needs_views=True, needs_val=True,
                                      trained=True, prograd=True, source=TIP_F_SOURCE,
                                      dataset_defaults={"EuroSAT": {"epochs": 100}}),
    "gda": HeadSpec(fit_gda, {}, needs_views=True, needs_val=True, trained=False, prograd=False, source=GDA_SOURCE),
    "clap": HeadSpec(fit_clap, CLAP_SCHEDULE, needs_views=True, needs_val=False, trained=True, prograd=False,
                     source=CLAP_SOURCE),
    "clap+prograd": HeadSpec(fit_clap_prograd, CLAP_SCHEDULE, needs_views=True, needs_val=False, trained=True,
                             prograd=True, source=CLAP_SOURCE),
    "cosine": HeadSpec(fit_cosine, COOP_SCHEDULE, needs_views=True, needs_val=False, trained=True, prograd=False,
                       source=COOP_SOURCE),
    "cosine+prograd": HeadSpec(fit_cosine_prograd, COOP_SCHEDULE, needs_views=True, needs_val=False, trained=True,
                               prograd=True, source=COOP_SOURCE),
    "linear_sgd": HeadSpec(fit_linear_sgd, COOP_SCHEDULE, needs_views=True, needs_val=False, trained=True,
                           prograd=False, source=COOP_SOURCE),
    "linear_sgd+prograd": HeadSpec(fit_linear_sgd_prograd, COOP_SCHEDULE, needs_views=True, needs_val=False,
                                   trained=True, prograd=True, source=COOP_SOURCE),
}  # fmt: skip
