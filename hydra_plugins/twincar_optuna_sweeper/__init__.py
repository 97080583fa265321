"""TwinCar's Optuna sweeper for Hydra (``hydra/sweeper=twincar_optuna``, chosen by ``hparams_search=optuna``)."""
