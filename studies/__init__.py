"""The studies: programs that run the library (every arm an ordinary train.py run) and tabulate what it
does. They sit beside `loki/`, not in it: the library does not import them.

    python -m studies                        # the toy study (conf/study.yaml, conf/study/toy.yaml; docs/study.md)
    python -m studies study=smollm135m       # the real-model study (conf/study/smollm135m.yaml; docs/real_model.md)

`python -m loki.study ...` is the same command under its older name.

  config.py       the schema both studies' configs are checked against (StudyConfig)
  arms.py         the arm record, both arm tables, the LR-grid loop, one cached train.py run
  lr.py           the LR chooser, by a validation metric given as a parameter
  suppression.py  zero rows and measure retention (both studies)
  metrics.py      reading task metrics and forgetting from a run's metrics.json (old and new layouts)
  keys.py         typed keys of the results (SuppressionKey)
  report.py       markdown tables, the plot, the docs block, the JSON write
  toy.py, real.py the two programs
"""
