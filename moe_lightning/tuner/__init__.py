"""The tuner: the HRM performance model (`hrm`), the policy optimizer over it (`optimizer`), roofline
plots (`roofline_plot`) and preset loading without Hydra (`presets`)."""
