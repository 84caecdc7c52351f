"""respiscan: COVID-19 detection from chest X-rays and CT with multi-modal multi-task learning."""

__version__ = "0.1.0"
