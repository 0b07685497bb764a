"""The training machinery, one loop for every stage: the trainer, the train state,
jitted steps, the mesh and shardings, the metrics log."""
