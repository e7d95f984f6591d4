"""The jobs: production (``jobs``), training (``training``) and evaluation (``evaluation``); see ARCHITECTURE.md."""
