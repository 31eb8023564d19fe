"""The studies behind the notebooks, one module each: ``run`` (the measurements, cached where they
train) returning a study with ``to_frame()``, ``findings(study) -> list[Finding]`` (the notebook's
verdict as tested sentences, judged by the thresholds in :mod:`purifylib.studies.findings`) and
``save`` (the notebook's tables, figures and metrics).

``zoo`` (00: the bed and its planted backdoors), ``sanity`` (01: where the backdoor lives),
``signature`` (02: the signature and the purification), ``tuning`` (03: τ × strength and the live
tuner), ``grid`` (04: the held-out attack grid, the paper's Table 2).
"""
