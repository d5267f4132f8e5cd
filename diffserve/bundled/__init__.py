"""The bundled default model's recipe: procedural data (data), pixel judge (judge), training (train) and
held-out evaluation (evaluate). The trained model itself lives in diffserve/assets/default_model/."""
