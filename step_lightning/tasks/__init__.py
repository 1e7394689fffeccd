"""Task tables shared by a task family's data module and model, so that neither imports the other.

Data modules (``step_lightning.data``) and models (``step_lightning.models``) meet only through the CLI's
argument links; what both must agree on (GLUE's task names, label sets and validation splits) lives here.
"""
