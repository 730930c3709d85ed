"""Reports of finished runs: tables, figures and comparisons from their summaries.

* :mod:`~experiments.reporting.summaries`: the kept summaries of a study, one record per run.
* :mod:`~experiments.reporting.statistics`: spread over seeds, paired differences, correlations.
* :mod:`~experiments.reporting.markdown`: cells, column labels and sections of the tables.
* :mod:`~experiments.reporting.tables`: the study's Markdown tables (``study_tables.md``).
* :mod:`~experiments.reporting.dose`: the dose-response tables.
* :mod:`~experiments.reporting.crossed`: the crossed-stage ablation.
* :mod:`~experiments.reporting.plots`: PNG figures of a run, of several runs and of a study.
* :mod:`~experiments.reporting.write`: the report's files, and the tables spliced into a
  hand-written document.
* :mod:`~experiments.reporting.compare`: finished runs side by side.

The command lines are ``python -m experiments.report`` and ``python -m experiments.compare``.
"""
