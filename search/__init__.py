"""The sweep: Hydra entry points, study and storage, the objective, Lightning module,
callbacks, export, report and dashboard."""
