"""Analysis of trained models: reports, secondary-information metrics, plots."""
