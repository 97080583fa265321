"""Training machinery below the ``train`` entry point: DDP launch and seeds (:mod:`.distributed`), resume,
preemption and log continuation (:mod:`.resume`), and the named steps ``train(cfg)`` calls (:mod:`.run`)."""
